"""Two distributions: a KL divergence between the softmaxes of two logits tensors
(distillation; a KL to a reference policy), found in user code and rewritten into one
``ger::distill_fwd`` call.

The single-root algebra (algebra.py) refuses a product of two logits tensors' terms. Here
such an expression is evaluated over two roots: per element, a linear combination of the
tempered logits z_r of each root r, a per-row constant, and products p_w * (z_r or 1) of a
probability with them; a reduction over the classes gives a per-row combination of

    L_r = LSE(z_r),   E_w[z_r] = sum_j p_w,j z_r,j,   1.

A candidate is rewritten only when that combination is exactly c * KL(p_w || p_o)
= c (E_w[z_w] - L_w - E_w[z_o] + L_o) for two roots w != o; anything else (e.g. a
soft-target cross-entropy -sum p_t log p_s = KL + H(p_t), a JSD through a mixture) is a
near-miss naming what is left over.

NaN and inf as eagerly. The op forms its products as the spelling does (``distill.KL_MODES``):
"ieee" where the user's p_w log p_w product is a plain product (``p * log_softmax``,
``F.kl_div(..., log_target=True)``: 0 * -inf = NaN where a logit of w is -inf, +inf where
p_w > 0 meets a -inf of o), "xlogy" where it is xlogy(p, p) (``F.kl_div`` with
probabilities as the target, ``entr``): 0 there. The w side's gradient of the "xlogy" form
is NaN eagerly wherever p_w is 0; that case (w requiring grad) is a near-miss. The op's
backward of the "ieee" form reproduces eager's NaN / inf rows (tests/test_distill_rewrite.py
checks -inf logits, masked vocabularies and underflow against eager, value and gradient).
"""

from __future__ import annotations

import dataclasses
import math
import operator
import struct

import torch
import torch.fx as fx

from ... import distill, losses, shapes
from .. import graph
from ..graph import (
    CASTS as _CASTS, SHAPE_ONLY as _SHAPE_ONLY, VIEWS as _VIEWS, arg as _arg, dtype as _dtype, is_op as _is,
    shape as _shape, target_of as _target_of, val as _val,
)
from .algebra import TWO_DISTRIBUTIONS_HINT, NotRepresentable, Root, Row, Vocab
from .evaluate import CE, ADD, DIV, EXP, KL, LOG, LOGSUMEXP, MEAN, MUL, NEG, STACK, SUB, SUM, Evaluator, class_dim_ok

PATTERN = "distill_kl"
#: the report's pattern of a JSD_beta through a mixture (the near-misses stay PATTERN's)
PATTERN_JSD = "distill_jsd"
MATH_DTYPES = (torch.float32, torch.float64)


# ----------------------------------------------------------------------------- values
@dataclasses.dataclass
class RowP:
    """Per-row combination of L_r (("L", r)), E_w[z_r] (("E", w, r)) and 1 (("one",))."""

    coefs: dict
    keepdim: bool = False

    def scaled(self, c: float) -> "RowP":
        return RowP({k: c * v for k, v in self.coefs.items()}, self.keepdim)


def _radd(a: RowP | float, b: RowP | float, sign: float = 1.0) -> RowP | float:
    if isinstance(a, float) and isinstance(b, float):
        return a + sign * b
    ca = dict(a.coefs) if isinstance(a, RowP) else ({("one",): a} if a else {})
    for k, v in (b.coefs.items() if isinstance(b, RowP) else ((("one",), b),)):
        ca[k] = ca.get(k, 0.0) + sign * v
    return RowP({k: v for k, v in ca.items() if v != 0.0})


def _rscale(a: RowP | float, c: float) -> RowP | float:
    return a.scaled(c) if isinstance(a, RowP) else a * c


@dataclasses.dataclass
class Total:
    """A scalar: the reduction ``how`` (kl_div's "sum" / "batchmean" / "mean", or a sum /
    mean of everything) over the rows of the per-row combination ``row``, of per-element
    terms shaped ``shape``. Totals of one reduction and one shape combine linearly
    (``0.5 * (kl_div(lm, lp_t) + kl_div(lm, lp_s))``): sum_r a_r + sum_r b_r = sum_r (a_r + b_r),
    with eager's NaN where the two totals' infinities meet (inf - inf in one row, or
    rows of opposite infinities: NaN both ways)."""

    row: "RowP"
    how: str
    shape: tuple


@dataclasses.dataclass(frozen=True)
class Mix:
    """log m of the mixture m = sum_r a_r p_r of two distributions (``parts``: frozenset
    of (root, a_r)), formed as ``mode`` (distill.MIX_MODES): "lse" from log-probabilities
    (``logsumexp(stack([lp_s + log a_s, lp_t + log a_t]))``, ``logaddexp``), "pm" from
    probabilities (``log(a_t P + a_s Q)``). A per-element term ("lm", Mix); its
    expectation under p_w is the per-row ("E", w, Mix)."""

    mode: str
    parts: frozenset


@dataclasses.dataclass
class Elem:
    """Per element: ``lin`` {("z", r) | ("lm", Mix) | ("one",): coefficient} plus ``prod``
    {(w, ("z", r) | ("lm", Mix) | ("one",)): coefficient}, the products p_w * term (a
    "one" coefficient may be a :class:`RowP`). ``forms`` {w: {"ieee" | "xlogy"}}: how the p_w * z_w products
    were formed."""

    lin: dict
    prod: dict
    forms: dict

    def scaled(self, c: float) -> "Elem":
        return Elem({k: _rscale(v, c) for k, v in self.lin.items()}, {k: _rscale(v, c) for k, v in self.prod.items()},
                    {w: set(f) for w, f in self.forms.items()})


def _eadd(a: Elem, b: Elem, sign: float) -> Elem:
    lin, prod = dict(a.lin), dict(a.prod)
    for k, v in b.lin.items():
        lin[k] = _radd(lin.get(k, 0.0), v, sign)
    for k, v in b.prod.items():
        prod[k] = _radd(prod.get(k, 0.0), v, sign)
    forms = {w: set(f) for w, f in a.forms.items()}
    for w, f in b.forms.items():
        forms.setdefault(w, set()).update(f)
    return Elem(lin, prod, forms)


def _key(root: Root) -> Root:
    return root


def _from_row(row: Row) -> RowP:
    out: dict = {}
    for k, c in row.coefs.items():
        if not isinstance(c, (int, float)):
            raise NotRepresentable("a statistic with a coefficient in the number of classes")
        if k == "L":
            out[("L", row.root)] = out.get(("L", row.root), 0.0) + c
        elif k == "ez":
            out[("E", row.root, row.root)] = out.get(("E", row.root, row.root), 0.0) + c
        elif k == "one":
            out[("one",)] = out.get(("one",), 0.0) + c
        else:
            raise NotRepresentable(f"a statistic ({k}) that is not part of a KL divergence")
    if row.target is not None or row.nan != (None, None):
        raise NotRepresentable("a statistic that is not part of a KL divergence")
    return RowP(out, row.keepdim)


def _coef(c):
    if isinstance(c, Row):
        return _from_row(c)
    if isinstance(c, (int, float)):
        return float(c)
    raise NotRepresentable("a coefficient in the number of classes")


def _from_vocab(v: Vocab) -> Elem:
    if v.alpha is not None or set(v.terms) - {"z", "one", "p", "pz"}:
        raise NotRepresentable("a term that is not part of a KL divergence (a mixture, a sum of logits)")
    if v.inf == "p0" and v.terms.get("z", 0.0) != 0.0:
        raise NotRepresentable("log(softmax(...)) in a two-distribution term: eagerly -inf where a probability "
                               "underflows to 0; written with log_softmax it is rewritten")
    if v.nan[0] == "p0":
        raise NotRepresentable("p * log(p) with log(softmax(...)): eagerly NaN where a probability underflows "
                               "to 0; written with log_softmax it is rewritten")
    r = v.root
    lin, prod, forms = {}, {}, {}
    for k, c in v.terms.items():
        if k == "z":
            lin[("z", r)] = _coef(c)
        elif k == "one":
            lin[("one",)] = _coef(c)
        elif k == "p":
            prod[(r, ("one",))] = _coef(c)
        else:  # pz: p_r z_r, a plain product (NaN at 0 * -inf) unless the spelling is NaN-free
            prod[(r, ("z", r))] = _coef(c)
            forms[r] = {"ieee" if v.nan[0] == "zinf" else "xlogy"}
    if "z" in v.terms and v.inf is None and v.terms["z"] != 0.0:
        raise NotRepresentable("clamped log-probabilities in a two-distribution term")
    return Elem(lin, prod, forms)


def _prob_mixture(e: Elem) -> dict | None:
    """{w: c_w} when e is sum_w c_w p_w (one probability, or a mixture), else None."""
    if any(not (isinstance(c, float) and c == 0.0) for c in e.lin.values()) or not e.prod:
        return None
    out = {}
    for (w, term), c in e.prod.items():
        if term != ("one",) or not isinstance(c, float):
            return None
        out[w] = out.get(w, 0.0) + c
    return out


def _log_softmax_shift(e: Elem):
    """(w, c) when e is log_softmax(z_w) + c for a number c, else None."""
    if e.prod or e.forms:
        return None
    zs = [k for k in e.lin if k[0] == "z"]
    if len(zs) != 1 or set(e.lin) != {zs[0], ("one",)} or e.lin[zs[0]] != 1.0:
        return None
    w = zs[0][1]
    one = e.lin[("one",)]
    if not isinstance(one, RowP) or set(one.coefs) - {("L", w), ("one",)} or one.coefs.get(("L", w)) != -1.0:
        return None
    return w, one.coefs.get(("one",), 0.0)


def _round(v: float, dtype: torch.dtype) -> float:
    """v as a 0-d tensor of ``dtype`` holds it (float32: rounded; overflow raises)."""
    return struct.unpack("f", struct.pack("f", v))[0] if dtype == torch.float32 else v


#: constant 0-d tensors (TRL: ``beta = torch.tensor(b)``, ``torch.log(1 - beta)``)
CONST_NEW = {torch.tensor, torch.scalar_tensor, torch.as_tensor}
CONST_UNARY = {**{t: math.log for t in LOG}, **{t: math.exp for t in EXP}, torch.log1p: math.log1p,
               "log1p": math.log1p, **{t: operator.neg for t in NEG}}
CONST_BINARY = ((ADD, operator.add), (SUB, operator.sub), (MUL, operator.mul), (DIV, operator.truediv))
LOGADDEXP = {torch.logaddexp, "logaddexp"}


def _is_prob(e: Elem):
    """(w, c) when e is c * p_w, else None."""
    if e.lin or len(e.prod) != 1:
        return None
    (w, term), c = next(iter(e.prod.items()))
    return (w, c) if term == ("one",) and isinstance(c, float) else None


# ----------------------------------------------------------------------------- evaluation
class NotACandidate(NotRepresentable):
    """A reduction of per-row values (already reduced over the classes): not a candidate
    itself, and no near-miss."""


class PairEvaluator:
    """Values (Elem, RowP, float) of nodes over two roots, on top of the single-root
    evaluator (whose values are converted)."""

    def __init__(self, ev: Evaluator):
        self.ev = ev
        self.memo: dict = {}
        self.visited: set = set()
        self.roots: dict = {}
        self.consts: dict = {}  # node -> number (None: not a constant)

    def canon(self, root: Root) -> Root:
        """One Root per distribution: ``t / T`` written twice is two graph nodes, one
        distribution (the same logits, temperature and views)."""
        try:
            key = (*peel(root), root.views)
        except NotRepresentable:
            key = (root.base, None, root.views)
        return self.roots.setdefault(key, root)

    def _canon_row(self, c):
        if not isinstance(c, RowP):
            return c
        out: dict = {}
        for k, v in c.coefs.items():
            k2 = ("L", self.canon(k[1])) if k[0] == "L" else (
                ("E", self.canon(k[1]), self.canon(k[2])) if k[0] == "E" else k)
            out[k2] = out.get(k2, 0.0) + v
        return RowP(out, c.keepdim)

    def _canon_elem(self, e: Elem) -> Elem:
        def ck(k):
            return (k[0], self.canon(k[1])) if k[0] == "z" else k

        cr = self._canon_row

        lin, prod = {}, {}
        for k, v in e.lin.items():
            lin[ck(k)] = _radd(lin.get(ck(k), 0.0), cr(v))
        for (w, k), v in e.prod.items():
            key = (self.canon(w), ck(k))
            prod[key] = _radd(prod.get(key, 0.0), cr(v))
        forms: dict = {}
        for w, f in e.forms.items():
            forms.setdefault(self.canon(w), set()).update(f)
        return Elem(lin, prod, forms)

    def value(self, node):
        if not isinstance(node, fx.Node):
            if isinstance(node, (int, float)) and not isinstance(node, bool):
                return float(node)
            raise NotRepresentable(f"unsupported operand {node!r}")
        if node in self.memo:
            return self.memo[node]
        try:
            v = self.ev.value(node)
        except NotRepresentable:
            v = self._eval(node)
        else:
            if isinstance(v, Vocab):
                v = self._canon_elem(_from_vocab(v))
            elif isinstance(v, Row):
                v = self._canon_row(_from_row(v))
            if isinstance(v, (Elem, RowP)):
                self._absorb_single_root(node)
        if isinstance(v, (Elem, RowP, Total)):
            if _dtype(node) not in MATH_DTYPES:
                raise NotRepresentable(f"a two-distribution term computed in {_dtype(node)} (eager's math is not "
                                       "float32 there)", node)
            self.visited.add(node)
        self.memo[node] = v
        return v

    def _absorb_single_root(self, node: fx.Node) -> None:
        """The single-root evaluator's intermediates above ``node`` (log_softmax, exp, ...),
        which the rewrite makes dead with it."""
        stack = list(node.all_input_nodes)
        while stack:
            m = stack.pop()
            if m in self.visited or not isinstance(self.ev.memo.get(m), (Vocab, Row)):
                continue
            self.visited.add(m)
            stack.extend(m.all_input_nodes)

    def _raw(self, node) -> Elem | None:
        """A tensor of logits used by itself (p_t * z_s): its tempered logits z_r (never
        something computed from a softmax, whose refusal stands)."""
        from .classify import _has_softmax_ancestor

        if isinstance(node, fx.Node) and _dtype(node) in MATH_DTYPES and _shape(node) and \
                not _has_softmax_ancestor(node):
            return Elem({("z", self.canon(self.ev.root_of(node))): 1.0}, {}, {})
        return None

    def _operands(self, n: fx.Node):
        a, b = n.args[0], n.args[1]
        out = []
        for x, other in ((a, b), (b, a)):
            try:
                out.append(self.value(x))
            except NotRepresentable:
                raw = self._raw(x)
                if raw is None:
                    raise
                out.append(raw)
        va, vb = out
        for x, v in ((a, va), (b, vb)):
            if isinstance(v, Elem) and not shapes.known_equal(_shape(x), _shape(n)):
                raise NotRepresentable("a two-distribution term broadcast over the rows", n)
            if isinstance(v, RowP) and not isinstance(va if v is vb else vb, Elem) and \
                    not shapes.known_equal(_shape(x), _shape(n)):
                raise NotRepresentable("per-row values of different rows combined (broadcast)", n)
        return va, vb

    def const(self, n) -> float | None:
        """The number a node computes from constants alone, rounded as its dtype rounds
        it (float32 / float64 0-d tensors: TRL's ``beta = torch.tensor(b)``,
        ``torch.log(1 - beta)``); None for anything else."""
        if not isinstance(n, fx.Node):
            return float(n) if isinstance(n, (int, float)) and not isinstance(n, bool) else None
        if n in self.consts:
            return self.consts[n]
        self.consts[n] = None
        shp, dt = _shape(n), _dtype(n)
        if n.op not in ("call_function", "call_method") or shp is None or len(shp) != 0 or \
                dt not in MATH_DTYPES or set(n.kwargs) - {"dtype", "device"}:
            return None
        t = _target_of(n)
        args = [self.const(a) for a in n.args]
        if any(a is None for a in args):
            return None
        v = None
        try:
            if t in CONST_NEW and len(args) == 1:
                v = args[0]
            elif t in CONST_UNARY and len(args) == 1:
                v = CONST_UNARY[t](args[0])
            elif len(args) == 2:
                v = next((f(*args) for ts, f in CONST_BINARY if t in ts), None)
            v = None if v is None or not math.isfinite(v) else _round(float(v), dt)
        except (ValueError, ZeroDivisionError, OverflowError):
            v = None
        self.consts[n] = v
        return v

    def _eval(self, n: fx.Node):
        if n.op not in ("call_function", "call_method"):
            raise NotRepresentable(f"{n.op} {n.target} is not a loss expression", n)
        c = self.const(n)
        if c is not None:
            return c
        t = _target_of(n)
        if t in LOGSUMEXP:
            return self._lse_of_stack(n)
        if t in LOGADDEXP:
            return self._mixture("lse", [n.args[0], _arg(n, 1, "other")], n)
        if t in LOG:
            return self._log_of_mixture(n)
        if t in SUM or t in MEAN:  # a per-row reduction inside a combination (a KL split over two sums)
            x, dim, shp = n.args[0], _arg(n, 1, "dim"), _shape(n.args[0])
            if dim is None and shp and _arg(n, 3, "dtype") is None:  # a total: a KL summed whole
                e = self.value(x)
                if isinstance(e, Elem):
                    return Total(self.reduce(e, shp[-1], False, False), "sum" if t in SUM else "mean", tuple(shp))
            if dim is None or shp is None or _arg(n, 3, "dtype") is not None or not class_dim_ok(n, dim, len(shp)):
                raise NotRepresentable("a reduction that is not over the classes", n)
            e = self.value(x)
            if not isinstance(e, Elem):
                raise NotRepresentable("a reduction over the classes of per-row values", n)
            return self.reduce(e, shp[-1], t in MEAN, bool(_arg(n, 2, "keepdim", False)))
        if t in NEG:
            return self._scale(self.value(n.args[0]), -1.0)
        if t in ADD or t in SUB:
            if _arg(n, 2, "alpha", 1) != 1:
                raise NotRepresentable("add/sub with alpha", n)
            va, vb = self._operands(n)
            return self._add(va, vb, -1.0 if t in SUB else 1.0, n)
        if t in MUL:
            va, vb = self._operands(n)
            return self._mul(va, vb, n)
        if t in DIV:
            va, vb = self.value(n.args[0]), self.value(n.args[1])
            if isinstance(vb, float) and vb != 0.0:
                return self._scale(va, 1.0 / vb)
            raise NotRepresentable("division by a tensor", n)
        if t in KL:
            reduction = _arg(n, 4, "reduction", "mean")
            if reduction in ("sum", "batchmean", "mean") and _shape(n.args[0]) and \
                    _arg(n, 2, "size_average") is None and _arg(n, 3, "reduce") is None:
                return Total(self.reduce(self.kl_terms(n), None, False, False), reduction, tuple(_shape(n.args[0])))
            return self._kl_elementwise(n)
        if t in _VIEWS or t in _CASTS:
            v = self.value(n.args[0])
            if isinstance(v, Elem) and shapes.known_equal((_shape(n) or (None,))[-1], (_shape(n.args[0]) or (None,))[-1]):
                if t in _CASTS and not self.ev._is_upcast(n):
                    raise NotRepresentable("a cast to lower precision", n)
                return v
            raise NotRepresentable("a view that moves the classes", n)
        raise NotRepresentable(f"{t if isinstance(t, str) else getattr(t, '__name__', t)} is not part of a KL "
                               "divergence", n)

    # ---- log m of a mixture of the two distributions
    def _lse_of_stack(self, n: fx.Node) -> Elem:
        """logsumexp(stack([lp_1 + c_1, lp_2 + c_2], d), d): log m (TRL's GKD mixture)."""
        x, dim, keepdim = n.args[0], _arg(n, 1, "dim"), _arg(n, 2, "keepdim", False)
        if not (isinstance(x, fx.Node) and _is(x, STACK)) or keepdim:
            raise NotRepresentable("logsumexp that is not over a stack of two log-probabilities", n)
        parts, sdim = _arg(x, 0, "tensors"), _arg(x, 1, "dim", 0)
        if isinstance(dim, (list, tuple)) and len(dim) == 1:
            dim = dim[0]
        shp = _shape(x)
        if not isinstance(parts, (list, tuple)) or len(parts) != 2 or shp is None or not isinstance(dim, int) \
                or not isinstance(sdim, int) or dim % len(shp) != sdim % len(shp):
            raise NotRepresentable("logsumexp that is not over a stack of two log-probabilities", n)
        if _dtype(x) not in MATH_DTYPES:
            raise NotRepresentable(f"a mixture computed in {_dtype(x)}", n)
        out = self._mixture("lse", list(parts), n)
        self.visited.add(x)
        return out

    def _mixture(self, mode: str, parts: list, n: fx.Node) -> Elem:
        """log(a_1 p_1 + a_2 p_2) from the log-probabilities lp_r + log a_r."""
        got = {}
        for x in parts:
            v = self.value(x)
            ws = _log_softmax_shift(v) if isinstance(v, Elem) else None
            if ws is None or not shapes.known_equal(_shape(x), _shape(n)):
                raise NotRepresentable("a log-sum-exp of terms that are not log_softmax plus a number (the "
                                       "log-probabilities of a mixture)", n)
            w, c = ws
            if w in got:
                raise NotRepresentable("a mixture of one distribution with itself", n)
            got[w] = math.exp(c) if c < 700.0 else math.inf
        return self._mix_elem(mode, got, n)

    def _log_of_mixture(self, n: fx.Node) -> Elem:
        """log(a_t P + a_s Q) of two probabilities (Liger-Kernel's reference M * log(M))."""
        v = self.value(n.args[0])
        mix = _prob_mixture(v) if isinstance(v, Elem) else None
        if mix is None:
            raise NotRepresentable("log of something other than a mixture of two distributions", n)
        return self._mix_elem("pm", mix, n)

    @staticmethod
    def _mix_elem(mode: str, weights: dict, n: fx.Node) -> Elem:
        """log(sum_r a_r p_r) = log m + log(sum_r a_r), m = sum_r (a_r / sum a) p_r."""
        if len(weights) != 2 or not all(a > 0.0 and math.isfinite(a) for a in weights.values()):
            raise NotRepresentable("a mixture that is not of two distributions with positive weights", n)
        total = sum(weights.values())
        mix = Mix(mode, frozenset((w, a / total) for w, a in weights.items()))
        return Elem({("lm", mix): 1.0, ("one",): math.log(total)}, {}, {})

    @staticmethod
    def _scale(v, s: float):
        if isinstance(v, (Elem, RowP)):
            return v.scaled(s)
        if isinstance(v, Total):
            return Total(v.row.scaled(s), v.how, v.shape)
        if isinstance(v, float):
            return v * s
        raise NotRepresentable("scaling of an unsupported value")

    @staticmethod
    def _add(a, b, sign: float, n):
        if isinstance(a, Elem) and isinstance(b, Elem):
            return _eadd(a, b, sign)
        if isinstance(a, float) and isinstance(b, float):
            return a + sign * b
        if isinstance(a, Elem) and isinstance(b, float):  # lp + log(1 - beta)
            return _eadd(a, Elem({("one",): b}, {}, {}), sign)
        if isinstance(a, float) and isinstance(b, Elem):
            return _eadd(Elem({("one",): a}, {}, {}), b, sign)
        if isinstance(a, Elem) and isinstance(b, RowP) and b.keepdim:
            return _eadd(a, Elem({("one",): b}, {}, {}), sign)
        if isinstance(a, RowP) and a.keepdim and isinstance(b, Elem):
            return _eadd(Elem({("one",): a}, {}, {}), b, sign)
        if isinstance(a, RowP) and isinstance(b, RowP) and a.keepdim == b.keepdim:
            return RowP(_radd(a, b, sign).coefs if isinstance(_radd(a, b, sign), RowP) else {}, a.keepdim)
        if isinstance(a, Total) and isinstance(b, Total):
            if a.how != b.how or not shapes.known_equal(a.shape, b.shape):
                raise NotRepresentable(f"a sum of two totals reduced differently ({a.how} of {a.shape}, {b.how} of "
                                       f"{b.shape})", n)
            r = _radd(a.row, b.row, sign)
            return Total(r if isinstance(r, RowP) else RowP({}), a.how, a.shape)
        raise NotRepresentable("sum of a vocabulary-level and an unrelated tensor", n)

    def _mul(self, a, b, n):
        if isinstance(a, float):
            return self._scale(b, a)
        if isinstance(b, float):
            return self._scale(a, b)
        if isinstance(a, Elem) and isinstance(b, Elem):
            for x, y in ((a, b), (b, a)):
                mix = _prob_mixture(x)  # p_w, or a mixture sum_w c_w p_w (M * log(M))
                if mix is not None and not y.prod:
                    out = None
                    for w, c in mix.items():
                        term = self._p_times(w, c, y)
                        out = term if out is None else _eadd(out, term, 1.0)
                    return out
            raise NotRepresentable("a product that is not a probability times log-probabilities", n)
        raise NotRepresentable("a product with an unrelated tensor", n)

    @staticmethod
    def _p_times(w: Root, c: float, y: Elem) -> Elem:
        prod, forms = {}, {}
        for k, v in y.lin.items():
            prod[(w, k)] = _rscale(v, c)
            if k == ("z", w):
                forms[w] = {"ieee"}  # a plain product: 0 * -inf is NaN, as eagerly
        return Elem({}, prod, forms)

    def _kl_elementwise(self, n: fx.Node) -> Elem:
        """F.kl_div(input, target, reduction="none"): exp(t) (t - input) with log_target,
        xlogy(t, t) - t input without."""
        if _arg(n, 2, "size_average") is not None or _arg(n, 3, "reduce") is not None:
            raise NotRepresentable("deprecated size_average/reduce arguments", n)
        if _arg(n, 4, "reduction", "mean") != "none":
            raise NotRepresentable("a reduced kl_div inside an elementwise expression", n)
        return self.kl_terms(n)

    def kl_terms(self, n: fx.Node) -> Elem:
        inp, tgt = n.args[0], _arg(n, 1, "target")
        log_target = _arg(n, 5, "log_target", False)
        if not isinstance(log_target, bool):
            raise NotRepresentable("kl_div with a log_target that is not a constant", n)
        a, b = self.value(inp), self.value(tgt)
        if not isinstance(a, Elem) or not isinstance(b, Elem) or a.prod:
            raise NotRepresentable("kl_div of something other than log-probabilities and a distribution", n)
        if _shape(inp) is None or not shapes.known_equal(_shape(inp), _shape(tgt)):
            raise NotRepresentable("kl_div with broadcast operands", n)
        if log_target:
            w = _log_softmax_root(b)
            if w is None:
                raise NotRepresentable("kl_div whose log target is not a log_softmax", n)
            # exp(t) * (t - input): p_w (z_w - L_w) - p_w input, plain products
            return _eadd(self._p_times(w, 1.0, b), self._p_times(w, 1.0, a), -1.0)
        wc = _is_prob(b)
        if wc is None or wc[1] != 1.0:
            raise NotRepresentable("kl_div whose target is not a softmax", n)
        w = wc[0]
        # xlogy(t, t): p_w log p_w, 0 where p_w is 0 (its gradient is not: the "xlogy" form)
        self_term = Elem({}, {(w, ("z", w)): 1.0, (w, ("one",)): RowP({("L", w): -1.0})}, {w: {"xlogy"}})
        return _eadd(self_term, self._p_times(w, 1.0, a), -1.0)

    # ---- reductions over the classes
    def reduce(self, e: Elem, V, mean: bool, keepdim: bool) -> RowP:
        out: RowP | float = 0.0
        for k, c in e.lin.items():
            if (isinstance(c, float) and c == 0.0) or (isinstance(c, RowP) and not c.coefs):
                continue
            raise NotRepresentable("a sum over the classes of logits or constants (not a KL divergence)")
        for (w, term), c in e.prod.items():
            if term == ("one",):
                out = _radd(out, c)  # sum_j p_w,j c = c
            elif isinstance(c, float):
                out = _radd(out, RowP({("E", w, term[1]): c}))
            else:
                raise NotRepresentable("a product of probabilities and per-row values times logits")
        if mean:
            if not isinstance(V, int):
                raise NotRepresentable("a mean over a symbolic number of classes in a two-distribution term")
            out = _rscale(out, 1.0 / V)
        row = out if isinstance(out, RowP) else RowP({("one",): out} if out else {})
        return RowP({k: v for k, v in row.coefs.items() if v != 0.0}, keepdim)


def _log_softmax_root(e: Elem) -> Root | None:
    """w when e is exactly log_softmax(z_w) = z_w - L_w."""
    if e.prod or set(e.lin) != {("one",)} | {k for k in e.lin if k[0] == "z"} or len(e.lin) != 2:
        return None
    zk = next(k for k in e.lin if k[0] == "z")
    one = e.lin[("one",)]
    if e.lin[zk] != 1.0 or not isinstance(one, RowP) or one.coefs != {("L", zk[1]): -1.0}:
        return None
    return zk[1]


# ----------------------------------------------------------------------------- candidates
@dataclasses.dataclass
class PairCandidate:
    node: fx.Node
    w: Root  # the distribution the KL is taken under (p_w log p_w / p_o)
    o: Root
    coef: float
    mode: str  # distill.KL_MODES (a JSD: distill.MIX_MODES)
    how: str  # "rows" | "sum" | "batchmean" | "mean" | "rows_mean"
    keepdim: bool
    visited: set
    beta: float | None = None  # a JSD: coef * JSD_beta, m = beta p_w + (1 - beta) p_o
    consts: set = dataclasses.field(default_factory=set)  # constant nodes it reads (dead with it)
    offset: float = 0.0  # a JSD: a constant per row beside it
    rows: tuple | None = None  # the rows' shape where n reads per-row values (else n.args[0]'s minus the classes)


#: per-row combinations (a KL or JSD split over several reductions over the classes)
ROW_OPS = ADD | SUB | MUL | DIV | NEG


def classify_pair(ev: Evaluator, n: fx.Node) -> PairCandidate:
    """The two-distribution candidate at node ``n`` (a reduction, or a combination of
    per-row reductions), or NotRepresentable (NotACandidate: not one, silently)."""
    pe = PairEvaluator(ev)
    t = _target_of(n)
    V = None
    rows = None
    if t in ROW_OPS:  # sum_j p_t lp_t - sum_j p_t lp_s, 0.5 * (KL(p_t||m) + KL(p_s||m)), ...
        try:
            row = pe.value(n)
        except NotRepresentable as err:
            raise NotACandidate(err.reason, n) from None
        if isinstance(row, Total):  # 0.5 * (kl_div(lm, lp_t, "batchmean") + kl_div(lm, lp_s, "batchmean"))
            try:
                return _candidate(pe, n, row.row, row.how, False, tuple(row.shape[:-1]))
            except NotRepresentable as err:
                raise NotACandidate(err.reason, n) from None
        if not isinstance(row, RowP) or not _shape(n):
            raise NotACandidate("not a per-row value", n)
        how, keepdim = "rows", row.keepdim
        rows = tuple(_shape(n)[:-1] if keepdim else _shape(n))
        try:
            return _candidate(pe, n, row, how, keepdim, rows)
        except NotRepresentable as err:
            raise NotACandidate(err.reason, n) from None
    if t in CE:  # F.cross_entropy(z_o, softmax(z_w)): -sum p_w log_softmax(z_o), as ATen forms it
        return _candidate(pe, n, *_soft_target_ce(pe, n))
    if t in KL:
        reduction = _arg(n, 4, "reduction", "mean")
        if _arg(n, 2, "size_average") is not None or _arg(n, 3, "reduce") is not None:
            raise NotRepresentable("deprecated size_average/reduce arguments", n)
        if reduction not in ("sum", "batchmean", "mean"):
            raise NotRepresentable(f"kl_div with reduction={reduction!r} is not per row", n)
        e = pe.kl_terms(n)
        row = pe.reduce(e, None, False, False)
        how, keepdim = reduction, False
    elif t in SUM or t in MEAN:
        x = n.args[0]
        dim = _arg(n, 1, "dim")
        shp = _shape(x)
        try:
            e = pe.value(x)
        except NotRepresentable as err:
            m = err.node
            if dim is None and ((isinstance(m, fx.Node) and _is(m, SUM | MEAN) and _arg(m, 1, "dim") is not None)
                                or any(isinstance(v, RowP) for v in pe.memo.values())):
                raise NotACandidate("a sum of per-row values", n) from None  # the rows' reductions are judged
            raise
        if isinstance(e, RowP) and dim is None and shp and _arg(n, 3, "dtype") is None:
            # the sum / mean over the rows of a per-row combination
            rows = tuple(shp[:-1] if e.keepdim else shp)
            return _candidate(pe, n, RowP(e.coefs), "sum" if t in SUM else "rows_mean", False, rows)
        if not isinstance(e, Elem) or shp is None:
            raise NotACandidate("a reduction of per-row values", n)
        V = shp[-1]
        keepdim = bool(_arg(n, 2, "keepdim", False))
        if dim is None:  # sum / mean of everything: the rows' values summed
            row = pe.reduce(e, V, False, False)
            how, keepdim = ("sum" if t in SUM else "mean"), False
        elif class_dim_ok(n, dim, len(shp)):
            row = pe.reduce(e, V, t in MEAN, keepdim)
            how = "rows"
        else:
            raise NotRepresentable("reduction over a dimension other than the classes", n)
        if _arg(n, 3, "dtype") is not None:
            raise NotRepresentable("a reduction with a dtype", n)
    else:
        raise NotRepresentable("not a reduction over the classes", n)
    return _candidate(pe, n, row, how, keepdim, rows)


def _soft_target_ce(pe: PairEvaluator, n: fx.Node):
    """(row, how, keepdim, rows) of F.cross_entropy with the probabilities of another
    logits tensor as its target (no weight, no label smoothing, classes last): ATen's
    ``-(log_softmax(input) * target).sum(-1)``, plain products, 'mean' over the rows."""
    x, target = n.args[0], _arg(n, 1, "target")
    if _arg(n, 2, "weight") is not None or _arg(n, 3, "size_average") is not None or \
            _arg(n, 5, "reduce") is not None or _arg(n, 7, "label_smoothing", 0.0) != 0.0:
        raise NotRepresentable("a cross-entropy with soft targets and class weights or label smoothing", n)
    reduction = _arg(n, 6, "reduction", "mean")
    shp = _shape(x)
    if shp is None or len(shp) != 2 or reduction not in ("mean", "sum", "none"):
        raise NotRepresentable("a cross-entropy with soft targets whose classes are not the last of two "
                               "dimensions", n)
    try:
        z = pe.value(x)
    except NotRepresentable:
        z = pe._raw(x)
    p = pe.value(target)
    wc = _is_prob(p) if isinstance(p, Elem) else None
    zr = [k for k in z.lin if k[0] == "z"] if isinstance(z, Elem) and not z.prod else []
    if wc is None or wc[1] != 1.0 or len(zr) != 1 or z.lin != {zr[0]: 1.0} or \
            not shapes.known_equal(_shape(target), shp):
        raise NotRepresentable("a cross-entropy whose input is not logits or whose target is not a softmax", n)
    o = zr[0][1]
    lps = Elem({("z", o): 1.0, ("one",): RowP({("L", o): -1.0})}, {}, {})
    row = pe.reduce(pe._p_times(wc[0], -1.0, lps), shp[-1], False, False)
    how = {"mean": "rows_mean", "sum": "sum", "none": "rows"}[reduction]
    return row, how, False, tuple(shp[:-1])


def _candidate(pe: PairEvaluator, n: fx.Node, row: RowP, how: str, keepdim: bool, rows) -> PairCandidate:
    consts = {m for m, v in pe.consts.items() if v is not None}
    if any(k[0] == "E" and isinstance(k[2], Mix) for k in row.coefs):
        w, o, beta, coef, mode, offset = _as_jsd(row, n)
        bad = {f for fs in _forms_of(pe, n).values() for f in fs} - {"ieee"}
        if bad:
            raise NotRepresentable("p log p formed with xlogy (F.kl_div with probabilities as the target) in a JSD "
                                   "through a mixture: eagerly NaN-free where the op's form is not", n)
        if _dtype(n) not in MATH_DTYPES:
            raise NotRepresentable(f"a two-distribution term computed in {_dtype(n)}", n)
        return PairCandidate(n, w, o, coef, mode, how, keepdim, set(pe.visited) - {n}, beta, consts, offset, rows)
    w, o, coef, soft = _as_kl(row, n)
    forms = set()
    for r, f in _forms_of(pe, n).items():
        if r == w:
            forms |= f
    if soft:  # -sum p_w log p_o: no p_w log p_w product in the user's expression
        if forms:
            raise NotRepresentable("a cross-entropy with soft targets whose p log p terms cancel", n)
        forms = {"ce"}
    if len(forms) != 1:
        raise NotRepresentable("p log p formed two ways (a plain product and xlogy) in one KL", n)
    mode = forms.pop()
    if _dtype(n) not in MATH_DTYPES:
        raise NotRepresentable(f"a two-distribution term computed in {_dtype(n)}", n)
    return PairCandidate(n, w, o, coef, mode, how, keepdim, set(pe.visited) - {n}, None, consts, 0.0, rows)


def _forms_of(pe: PairEvaluator, n: fx.Node) -> dict:
    out: dict = {}
    for v in pe.memo.values():
        if isinstance(v, Elem):
            for r, f in v.forms.items():
                out.setdefault(r, set()).update(f)
    # every F.kl_div the value reads, also those whose value is a total (``kl_div(...,
    # reduction="batchmean") + ...``): their element forms (``xlogy`` for a probability
    # target) are not among the memo's elements (found by the stop-35 review)
    for m in [n, *pe.memo]:
        if isinstance(m, fx.Node) and _target_of(m) in KL:
            try:
                e = pe.kl_terms(m)
            except NotRepresentable:
                continue
            for r, f in e.forms.items():
                out.setdefault(r, set()).update(f)
    return out


def _root_order(r: Root):
    return (r.base.name, repr(r.views))


def _as_jsd(row: RowP, n: fx.Node) -> tuple[Root, Root, float, float, str, float]:
    """(t, s, beta, C, mode, k) with row = C * JSD_beta + k = C (beta KL(p_t || m) + (1 - beta)
    KL(p_s || m)) + k, m = beta p_t + (1 - beta) p_s, or NotRepresentable naming the
    remainder. (The op's gradient is that of JSD_beta: KL(p||m) terms weighted otherwise
    are refused.) k: what constants such as ``- log(torch.tensor(2.0))`` leave over, as
    eager rounds them (e.g. 1.9e-9 for log 2 in float32)."""
    mixes = {k[2] for k in row.coefs if k[0] == "E" and isinstance(k[2], Mix)}
    if len(mixes) != 1:
        raise NotRepresentable("two different mixtures in one divergence", n)
    mix = mixes.pop()
    (t, a_t), (s, a_s) = sorted(mix.parts, key=lambda p: _root_order(p[0]))
    if not math.isclose(a_t + a_s, 1.0, rel_tol=1e-5):
        raise NotRepresentable(f"a mixture with weights {a_t:g} + {a_s:g} != 1 (not a distribution)", n)
    beta = a_t / (a_t + a_s)
    c_t, c_s = -row.coefs.get(("E", t, mix), 0.0), -row.coefs.get(("E", s, mix), 0.0)
    C = c_t / beta if abs(c_t / beta) >= abs(c_s / (1.0 - beta)) else c_s / (1.0 - beta)
    if C == 0.0 or not (math.isclose(c_t, C * beta, rel_tol=1e-5) and math.isclose(c_s, C * (1.0 - beta), rel_tol=1e-5)):
        raise NotRepresentable(f"KL(p||m) terms weighted {c_t:g} and {c_s:g}, not in the mixture's proportions "
                               f"{beta:g} : {1.0 - beta:g} (JSD_beta = beta KL(p_t||m) + (1 - beta) KL(p_s||m), times "
                               "a constant, is rewritten)", n)
    want = {("E", t, mix): -c_t, ("E", t, t): c_t, ("L", t): -c_t, ("E", s, mix): -c_s, ("E", s, s): c_s,
            ("L", s): -c_s}
    rest = dict(row.coefs)
    for k, v in want.items():
        rest[k] = rest.get(k, 0.0) - v
    offset = rest.pop(("one",), 0.0)
    if any(not math.isclose(v, 0.0, abs_tol=1e-9 * abs(C)) for v in rest.values()):
        raise NotRepresentable("a JSD through a mixture plus other statistics of the two distributions", n)
    return t, s, beta, C, mix.mode, offset


def _as_kl(row: RowP, n: fx.Node) -> tuple[Root, Root, float, bool]:
    """(w, o, c, soft) with row = c KL(p_w || p_o), or (soft) c CE(p_w, p_o) = c (KL(p_w ||
    p_o) + H(p_w)) = c (L_o - E_w[z_o]), the cross-entropy with soft targets; else
    NotRepresentable naming the remainder."""
    cross = [k for k in row.coefs if k[0] == "E" and k[1] != k[2]]
    if len(cross) != 1:
        raise NotRepresentable("a combination of two distributions' statistics that is not one KL divergence"
                               f" ({len(cross)} cross terms)", n)
    _, w, o = cross[0]
    c = -row.coefs[cross[0]]
    want = {("E", w, w): c, ("L", w): -c, ("E", w, o): -c, ("L", o): c}
    rest = dict(row.coefs)
    for k, v in want.items():
        rest[k] = rest.get(k, 0.0) - v
    tol = 1e-12 * max(1.0, abs(c))
    rest = {k: v for k, v in rest.items() if not math.isclose(v, 0.0, abs_tol=tol)}
    if not rest:
        return w, o, c, False
    if set(rest) == {("E", w, w), ("L", w)} and math.isclose(rest[("E", w, w)], -c, abs_tol=tol) and \
            math.isclose(rest[("L", w)], c, abs_tol=tol):
        return w, o, c, True  # KL + H(p_w): -sum p_w log p_o
    if set(rest) <= {("E", w, w), ("L", w)} and math.isclose(rest.get(("E", w, w), 0.0), -rest.get(("L", w), 0.0)):
        raise NotRepresentable("KL plus a multiple of the entropy of one distribution that is neither the KL "
                               "(0) nor the cross-entropy with soft targets (1)", n)
    raise NotRepresentable("a KL divergence plus other statistics of the two distributions", n)


# ----------------------------------------------------------------------------- the rewrite
def peel(root: Root) -> tuple[fx.Node, float]:
    """(the logits before the temperature and upcasts, T) of a tempered root z / T."""
    node, T = root.base, 1.0
    if _is(node, DIV) and isinstance(_arg(node, 1, "other"), (int, float)) and not isinstance(node.args[1], bool):
        T = float(node.args[1])
        node = node.args[0]
    elif _is(node, MUL) and len(node.args) == 2 and any(isinstance(a, (int, float)) and not isinstance(a, bool)
                                                        for a in node.args):
        c, x = (node.args[0], node.args[1]) if isinstance(node.args[0], (int, float)) else (node.args[1], node.args[0])
        if not isinstance(x, fx.Node) or c == 0:
            raise NotRepresentable("a scale of the logits that is not a temperature")
        T, node = 1.0 / float(c), x
    if not (T > 0.0 and math.isfinite(T)):
        raise NotRepresentable(f"a temperature {T} that is not a finite number > 0")
    if T != 1.0 and _dtype(root.base) not in MATH_DTYPES:
        raise NotRepresentable("logits divided by the temperature in low precision (eager rounds z / T)")
    while isinstance(node, fx.Node) and _is(node, _CASTS) and Evaluator._is_upcast(node):
        node = node.args[0]
    return node, T


def _peeled_chain(base: fx.Node, x: fx.Node) -> list[fx.Node]:
    """The nodes :func:`peel` stepped over from ``base`` down to ``x`` (the division or
    scale by the temperature, upcasts)."""
    chain, node = [], base
    while isinstance(node, fx.Node) and node is not x and len(chain) < 8:
        chain.append(node)
        node = next((a for a in node.args if isinstance(a, fx.Node)), None)
    return chain if node is x else []


def pair_kl(zs: torch.Tensor, zt: torch.Tensor, like: torch.Tensor, T: float, mode: str, coef: float, how: str,
            keepdim: bool, out_dtype: torch.dtype, chunk: int, hard: tuple | None = None, rev: bool = False):
    """c * KL(p_t || p_s) per row of p = softmax(z / T) (ger::distill_fwd), shaped or
    reduced as the user's spelling, whose per-element terms are shaped like ``like``: per
    row ("rows"), or summed ("sum"), divided by like.size(0) ("batchmean") or by its
    number of elements ("mean"). ``hard``: (target, weight, ignore_index, reduction,
    dtype) of an F.cross_entropy on ``zs`` at T = 1, formed by the same op in the same
    sweep (:func:`hard_ce`); then (KL, CE). ``rev``: c * KL(p_s || p_t) (the CE's logits
    are the KL's w side)."""
    V = zs.shape[-1]
    y = _hard_rows(hard)
    D, nll = torch.ops.ger.distill_fwd(zs.reshape(-1, V), zt.reshape(-1, V), y, f"{'rev' if rev else 'fwd'}:{mode}",
                                       0.0, 1.0 if not rev else 0.0, 0.0 if not rev else 1.0, T,
                                       hard is not None, -100, chunk, distill._ops_distill.REV)[:2]
    if coef != 1.0:
        D = D * coef
    out = _rows_out(D, like, how, keepdim, out_dtype)
    return out if hard is None else (out, hard_ce(nll, hard))


def pair_jsd(zs: torch.Tensor, zt: torch.Tensor, like: torch.Tensor, T: float, mode: str, beta: float, coef: float,
             offset: float, how: str, keepdim: bool, out_dtype: torch.dtype, chunk: int, hard: tuple | None = None):
    """c * JSD_beta(p_t || p_s) + offset = c (beta KL(p_t || m) + (1 - beta) KL(p_s || m))
    + offset per row, m = beta p_t + (1 - beta) p_s (ger::distill_fwd, kind "mix:{mode}"),
    shaped or reduced as :func:`pair_kl` (``hard`` as there)."""
    V = zs.shape[-1]
    y = _hard_rows(hard)
    D, nll = torch.ops.ger.distill_fwd(zs.reshape(-1, V), zt.reshape(-1, V), y, f"mix:{mode}", beta, coef * beta,
                                       coef * (1.0 - beta), T, hard is not None, -100, chunk,
                                       distill._ops_distill.REV)[:2]
    if offset != 0.0:
        D = D + offset
    out = _rows_out(D, like, how, keepdim, out_dtype)
    return out if hard is None else (out, hard_ce(nll, hard))


def _hard_rows(hard: tuple | None):
    """The op's targets: the CE's, one per row, ignored rows read as class 0."""
    return None if hard is None else distill._rows_target(hard[0], hard[2])[0]


def hard_ce(nll: torch.Tensor, hard: tuple) -> torch.Tensor:
    """F.cross_entropy(z_s, target, weight, ignore_index, reduction) from the op's per-row
    nll = LSE(z_s) - z_s[y] (losses.combine_rows: eager's conventions for weights, ignored
    rows and the reduction; a 'mean' over no valid row is NaN as eagerly)."""
    target, weight, ignore_index, reduction, out_dtype = hard
    y = target.long() if target.dtype == torch.uint8 else target
    return losses.combine_rows(nll.reshape(y.shape), None, y, y.shape, beta=0.0, eps=None, smooth_scale=None,
                               smooth_const=None, weight=weight, ignore_index=ignore_index, reduction=reduction,
                               out_dtype=out_dtype)


def _rows_out(D: torch.Tensor, like: torch.Tensor, how: str, keepdim: bool, out_dtype: torch.dtype) -> torch.Tensor:
    rows_shape = like.shape[:-1]
    if how == "rows":
        out = D.reshape(tuple(rows_shape) + ((1,) if keepdim else ()))
    elif how == "sum":
        out = D.sum()
    elif how == "batchmean":  # F.kl_div's input.size(0): the classes of 1-d logits
        out = D.sum() / like.shape[0]
    elif how == "mean":
        out = D.sum() / like.numel()
    elif how == "rows_mean":
        out = D.sum() / D.numel()
    else:
        raise ValueError(f"ger: unknown reduction {how!r}")
    return out.to(out_dtype)


GRAPH_FUNCTIONS = (pair_kl, pair_jsd)


def logits_of(c: PairCandidate) -> tuple[fx.Node, fx.Node] | None:
    """(o, w): the two logits tensors before the temperature and upcasts, when the rewrite
    will read them there (one temperature); else None."""
    try:
        (xo, T_o), (xw, T_w) = peel(c.o), peel(c.w)
    except NotRepresentable:
        return None
    return (xo, xw) if T_o == T_w else None


def _hard_ce_merge(effects, ev: Evaluator, n: fx.Node, xo: fx.Node, xw: fx.Node, reads: list, hard,
                   ctx, replaced_nodes=()) -> tuple | None:
    """(the CE candidate, the node to insert the op before) when the op can form the hard
    CE ``hard`` = (root, group, plan) of the single-root pass (one F.cross_entropy on the
    student's logits ``xo`` at T = 1, classes last, no label smoothing) in the same sweep;
    else None (the CE is then rewritten on its own). The op reads the logits, the teacher
    and the target once, before the earlier of the two losses (``reads``: the KL's)."""
    if hard is None:
        return None
    root, group, plan = hard
    if len(group) != 1 or group[0].kind != "ce" or plan.vocab:
        return None
    ce = group[0]
    spec = ce.ce
    shp = _shape(ce.ce["input"])
    if spec["label_smoothing"] or shp is None or spec["class_dim"] != len(shp) - 1:
        return None
    # the same rows in the same order: both reach one tensor through views that merge or
    # split the leading dimensions only (Evaluator.root_of keeps the classes last)
    if ev.root_of(xo).base is not root.base:
        return None
    if ctx.eager_reason(ce.node) is not None:
        return None
    pos = effects.order
    first = min((n, ce.node), key=lambda m: pos[m])
    operands = [xo, xw, spec["target"]] + ([spec["weight"]] if spec["weight"] is not None else [])
    late = [a for a in operands if isinstance(a, fx.Node) and pos[a] >= pos[first]]
    replaced = {n, ce.node} | set(replaced_nodes)
    if late and (any(a in (xo, xw) for a in late)
                 or not graph.hoist_before(first.graph, first, late, apply=False, forbid=replaced)):
        return None  # a target computed later (y.view(-1)) is moved up when the merge is certain
    moved = list(reads) + [(ce.node, a) for a in operands[2:]] + [(ce.node, xo)] \
        + graph.snapshot_reads(ce.ce["input"], root.base)
    if effects.first_barrier(moved, first) is not None:
        return None
    if any(pos[w] > pos[first] for w in effects.writers_of(spec["target"])):
        return None  # eager's nll_loss saves the target: a later write raises in its backward
    if late:
        graph.hoist_before(first.graph, first, late, forbid=replaced)
    return ce, first


def rewrite(gm: fx.GraphModule, ev: Evaluator, c: PairCandidate, ctx, returned: set, alias_base,
            hard=None) -> tuple[bool, bool]:
    """Replace candidate ``c`` by one ``pair_kl`` call, or record why not (a near-miss).
    ``hard``: the single-root pass's (root, group, plan) of a cross-entropy on the
    student's logits, formed by the same op where it can (:func:`_hard_ce_merge`).
    (changed, whether the CE was formed)."""
    g = gm.graph
    n = c.node

    def refuse(reason: str) -> tuple[bool, bool]:
        ctx.near_miss(PATTERN, n, reason + TWO_DISTRIBUTIONS_HINT)
        return False, False

    try:
        (xo, T_o), (xw, T_w) = peel(c.o), peel(c.w)
    except NotRepresentable:
        T_o, T_w = 0.0, 1.0
    if T_o != T_w:  # two scales (or one the op cannot divide by): it reads the scaled logits themselves
        (xo, T_o), (xw, T_w) = (c.o.base, 1.0), (c.w.base, 1.0)
    so, sw = _shape(xo), _shape(xw)
    if so is None or sw is None or not shapes.known_equal(so[-1], sw[-1]):
        return refuse("the two logits tensors have different numbers of classes")
    if not shapes.known_equal(math.prod(so[:-1]), math.prod(sw[:-1])):
        return refuse("the two logits tensors have different numbers of rows")
    if shapes.known_equal(so[-1], 0):
        return refuse("logits with no classes")
    if _dtype(xo) not in (torch.float32, torch.float64, torch.bfloat16, torch.float16) or _dtype(xw) not in (
            torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return refuse("logits that are not floating point")
    vw = _val(xw)
    if c.mode == "xlogy" and isinstance(vw, torch.Tensor) and vw.requires_grad:
        return refuse("xlogy(p, p) (F.kl_div with probabilities as the target) on logits that need a gradient: "
                      "eagerly its gradient is NaN wherever a probability is 0, which the op does not reproduce")
    for x in (xo, xw):
        if alias_base(x) in returned and isinstance(_val(x), torch.Tensor) and _val(x).requires_grad:
            return refuse(f"{x.name} is also returned by the graph: the op saves it for the backward, and a "
                          "caller's in-place write before the backward would change the gradient")
    eager = ctx.eager_reason(n)
    if eager is not None:
        return refuse(f"left to run eagerly: {eager}")
    # the intermediates must die with the rewrite, or the N x V tensors stay
    inside = c.visited | {n}
    for v in c.visited:
        for u in v.users:
            if u not in inside and not _is(u, _SHAPE_ONLY):
                return refuse(f"{v.name} is also used by {u.name}: the N x V tensor would stay")
        e = ctx.eager_reason(v)
        if e is not None:
            return refuse(f"{v.name} must run eagerly ({e}); the rewrite would fuse it away")
    # the op reads both logits at n: nothing between may write them or switch modes
    reads = [(m, a) for m in inside for a in m.all_input_nodes if a not in inside]
    # the temperature's division, upcasts and views between the logits and the terms,
    # each at its own position (a copy keeps what it read there: graph.snapshot_reads)
    reads += [r for m in inside for a in m.all_input_nodes if a not in inside
              for x in (xo, xw) for r in graph.snapshot_reads(a, x)]
    reads += [(n, xo), (n, xw)]
    effects = graph.Effects(gm)
    barrier = effects.first_barrier(reads, n)
    if barrier is not None:
        return refuse(graph.moved_reads_reason(barrier))
    # the temperature's division and the upcasts between the logits and the roots are
    # recomputed by the op from the logits: a write to one of them (``z = s / T;
    # z[:, :2] = -inf``) would be lost (found by the stop-35 review)
    for root, x in ((c.o, xo), (c.w, xw)):
        for v in _peeled_chain(root.base, x):
            if effects.roots_of(v) & effects.roots_of(x):
                continue  # a view of the logits: their writes are the reads' barriers above
            writer = next((m for m in effects.writers_of(v) if m not in inside), None)
            if writer is not None:
                return refuse(f"{v.name} is written in place by {graph.describe(writer)}: the op recomputes it "
                              f"from {x.name}, so the write would be lost")
    pos = effects.order
    for x in (xo, xw):
        vx = _val(x)
        if isinstance(vx, torch.Tensor) and vx.requires_grad and any(pos[m] > pos[n] for m in effects.writers_of(x)):
            return refuse(f"{x.name} is written after the loss: the fused op saves it for its backward")
    # the per-element terms' shape (the rows the output keeps): the views between the
    # logits and the terms may differ from the roots' (e.g. log_softmax(z).view(-1, V))
    xs = _shape(n.args[0]) if c.rows is None else (*c.rows, _shape(xo)[-1])
    if xs is None:
        return refuse("per-element terms of unknown shape")
    if not shapes.known_equal(_shape(xo), xs) and not all(isinstance(d, int) for d in xs):
        return refuse("a view between the logits and the KL terms with symbolic sizes")
    # a hard CE on either logits tensor: the op's student (zs) is the CE's; where that is
    # the w side, KL(p_w || p_o) is the op's reverse kind, and a JSD's beta is 1 - beta
    merge, swap = None, False
    if T_o == T_w and hard is not None:
        merge = _hard_ce_merge(effects, ev, n, xo, xw, reads, hard, ctx, c.visited)
        if merge is None:
            merge = _hard_ce_merge(effects, ev, n, xw, xo, reads, hard, ctx, c.visited)
            swap = merge is not None
    ce = merge[0] if merge else None
    hard_args = {}
    if ce is not None:
        spec = ce.ce
        hard_args = {"hard": (spec["target"], spec["weight"], spec["ignore_index"], spec["reduction"], _dtype(ce.node))}
    zs, zt = (xw, xo) if swap else (xo, xw)
    with g.inserting_before(merge[1] if merge else n):
        # shaped as the user's per-element terms: a free view of the logits
        like = xo if shapes.known_equal(_shape(xo), xs) else g.call_method("reshape", (xo, tuple(xs)))
        if c.beta is None:
            call = g.call_function(pair_kl, (zs, zt, like, T_o, c.mode, c.coef, c.how, c.keepdim, _dtype(n), 0),
                                   {**hard_args, **({"rev": True} if swap else {})})
        else:
            call = g.call_function(pair_jsd, (zs, zt, like, T_o, c.mode, 1.0 - c.beta if swap else c.beta, c.coef,
                                              c.offset, c.how, c.keepdim, _dtype(n), 0), hard_args)
        new = g.call_function(operator.getitem, (call, 0)) if ce is not None else call
        hard_new = g.call_function(operator.getitem, (call, 1)) if ce is not None else None
    graph.copy_meta(new, n, values=True)
    n.replace_all_uses_with(new)
    g.erase_node(n)
    if ce is not None:
        graph.copy_meta(hard_new, ce.node, values=True)
        ce.node.replace_all_uses_with(hard_new)
        g.erase_node(ce.node)
        ctx.match("cross_entropy", [ce.node, call], statistics=["nll"],
                  formed_by=f"the {PATTERN_JSD if c.beta is not None else PATTERN} op on {zs.name}")
    extra = {"hard_ce": f"F.cross_entropy({zs.name}) in the same sweep"} if ce is not None else {}
    if c.beta is None:
        ctx.match(PATTERN, [n, new], kl=f"KL(softmax({xw.name}/T) || softmax({xo.name}/T))", mode=c.mode,
                  temperature=T_o, coef=c.coef, reduction=c.how, **extra)
    else:
        ctx.match(PATTERN_JSD, [n, new], jsd=f"{c.beta:g} KL(p_{xw.name} || m) + {1.0 - c.beta:g} KL(p_{xo.name} || m), "
                  f"m = {c.beta:g} p_{xw.name} + {1.0 - c.beta:g} p_{xo.name}, p = softmax(logits / T)", beta=c.beta,
                  mode=c.mode, temperature=T_o, coef=c.coef, offset=c.offset, reduction=c.how, **extra)
    dead = set(c.visited) | set(c.consts)
    for root, x in ((c.o, xo), (c.w, xw)):  # the temperature and upcast nodes between (one tensor input each)
        m = root.base
        while isinstance(m, fx.Node) and m is not x:
            dead.add(m)
            m = next((a for a in m.args if isinstance(a, fx.Node)), None)
    if ce is not None:  # the views and upcasts between the logits and the CE
        m = ce.ce["input"]
        while isinstance(m, fx.Node) and m is not zs and m is not ce.root.base:
            dead.add(m)
            m = m.args[0]
    graph.drop_dead(g, dead)
    return True, ce is not None
