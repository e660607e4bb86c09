"""loss + entropy subgraphs -> ``ger::loss_fwd`` (one read of the logits forward, one
fused elementwise kernel backward), on unmodified user code.

How it works. Rather than one template per spelling, the pass evaluates the Dynamo
graph symbolically. Every tensor derived from a logits tensor z (classes last) by
log_softmax / softmax / exp / log / products / sums / clamps is written as a linear
combination of a few *vocabulary terms* with per-row coefficients:

    z_j, 1, p_j, p_j z_j, log m_j, p_j log m_j      (m = alpha p + (1 - alpha) / V)

and every reduction over the classes (sum, mean, gather at the target, logsumexp,
F.cross_entropy, F.nll_loss, F.kl_div) as a linear combination of *row statistics*

    L = logsumexp z, z_y, sum_j z_j, E_p[z], sum_j p_j log m_j, sum_j u_j log m_j

which the op computes in one pass (nll = L - z_y, KL(u||p) gives sum z, the entropy
gives E_p[z], J_alpha and KL(p||m) give the log m sums). So log_softmax * softmax,
p * p.log(), torch.special.entr, Categorical(logits).entropy(), fairseq/transformers
label smoothing, F.kl_div to a uniform distribution, and the plain-torch GER criterion
all reduce to the same statistics. The reductions are replaced by O(rows) combinations
of the op's outputs; everything downstream (beta, masks, means over positions) is left
as the user wrote it. The N x V intermediates become dead and are removed.

Refused (near-misses, with the reason): a logits tensor whose regulariser has no
cross-entropy on the same logits (e.g. a temperature inside only one softmax), a
reduction over another dimension, a log-probability tensor also used elsewhere, soft
targets, products that are not entropy-like, several targets on one logits tensor.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import torch
import torch.fx as fx

from .. import _compat, fleet, losses, shapes
from . import graph
# the graph layer's accessors and op tables, under this module's short names
from .graph import CASTS as _CASTS, SHAPE_ONLY as _SHAPE_ONLY, VIEWS as _VIEWS, mutates
from .graph import arg as _arg, dtype as _dtype, is_op as _is, shape as _shape, target_of as _target_of, val as _val

FAMILY = "loss_entropy"
LOSS_FWD = (torch.ops.ger.loss_fwd, torch.ops.ger.loss_fwd.default)
#: ignore_index for statistics read through gather (every target is then a valid class)
NO_IGNORE = -(2**62)


#: the functions the rewrite inserts into graphs (AOTAutograd traces through them)
GRAPH_FUNCTIONS = (losses.row_stats, losses.cross_entropy_from_stats, losses.row_statistic, losses.kl_div_reduce)


class NotRepresentable(Exception):
    """A candidate that is not exactly one of the GER statistics; carries the reason."""

    def __init__(self, reason: str, node: fx.Node | None = None):
        super().__init__(reason)
        self.reason = reason
        self.node = node


# ----------------------------------------------------------------------------- values
@dataclasses.dataclass(frozen=True)
class Root:
    """A logits tensor: the node before upcasts and views, and the views applied to it."""

    base: fx.Node
    views: tuple  # ((method, args), ...) applied to base, classes last throughout


@dataclasses.dataclass
class Row:
    """Per-row linear combination of statistics of one root (classes reduced)."""

    root: Root
    coefs: dict[str, float]
    keepdim: bool = False
    target: fx.Node | None = None
    alpha: float | None = None
    nan: tuple = (None, None)  # (forward, backward): where eager's spelling is NaN (Vocab.nan)

    def scaled(self, c: float) -> "Row":
        return dataclasses.replace(self, coefs={k: c * v for k, v in self.coefs.items()})


@dataclasses.dataclass
class Vocab:
    """Per-element linear combination of vocabulary terms of one root.

    ``terms`` maps z, one, p, pz, logm, plogm to a float coefficient; ``one`` and ``p``
    may also carry a per-row coefficient (a :class:`Row`), e.g. log_softmax = z - L.
    """

    root: Root
    terms: dict[str, Any]
    alpha: float | None = None  # for the log m terms
    # Eager's -inf / NaN, which the op's statistics (0 log 0 = 0) do not show by themselves:
    # ``inf``: where this value is -inf - "zinf" where a logit is -inf (log_softmax, the
    # logits), "p0" where a probability is 0 (log(softmax), incl. underflow); for a
    # probability, where its log would be (p0; None once clamped above 0).
    inf: str | None = None
    # ``nan``: (forward, backward) conditions where products p * (-inf) made it NaN
    # (losses.row_statistic reproduces them per row)
    nan: tuple = (None, None)

    def is_(self, **expect) -> bool:
        return set(self.terms) == set(expect) and all(_coef_eq(self.terms[k], v) for k, v in expect.items())


class VPoly:
    """A coefficient that depends on a symbolic number of classes V (dynamic shapes):
    sum_k c_k V^k (mean over the classes gives V^-1, a sum of a constant V^1). Static V
    never makes one (the coefficient is then a float); ``losses.row_statistic``
    evaluates :meth:`encode` with the run-time V, so nothing specialises on V."""

    __slots__ = ("terms",)

    def __init__(self, terms: dict[int, float]):
        self.terms = {k: c for k, c in terms.items() if c != 0.0}

    @staticmethod
    def lift(x) -> "VPoly":
        return x if isinstance(x, VPoly) else VPoly({0: float(x)})

    def _out(self):
        return self.terms.get(0, 0.0) if set(self.terms) <= {0} else self

    def __add__(self, o):
        if not isinstance(o, (VPoly, int, float)):
            return NotImplemented
        t = dict(self.terms)
        for k, c in VPoly.lift(o).terms.items():
            t[k] = t.get(k, 0.0) + c
        return VPoly(t)._out()

    __radd__ = __add__

    def __neg__(self):
        return VPoly({k: -c for k, c in self.terms.items()})

    def __sub__(self, o):
        return self + (-VPoly.lift(o))

    def __rsub__(self, o):
        return VPoly.lift(o) + (-self)

    def __mul__(self, o):
        if not isinstance(o, (VPoly, int, float)):
            return NotImplemented
        t: dict[int, float] = {}
        for k1, c1 in self.terms.items():
            for k2, c2 in VPoly.lift(o).terms.items():
                t[k1 + k2] = t.get(k1 + k2, 0.0) + c1 * c2
        return VPoly(t)._out()

    __rmul__ = __mul__

    def _inverse(self) -> "VPoly":
        if len(self.terms) != 1:
            raise NotRepresentable("division by a polynomial in the number of classes")
        (k, c), = self.terms.items()
        return VPoly({-k: 1.0 / c})

    def __truediv__(self, o):
        return self * (o._inverse() if isinstance(o, VPoly) else 1.0 / o)

    def __rtruediv__(self, o):
        return self._inverse() * o

    def __eq__(self, o):
        return isinstance(o, (VPoly, int, float)) and self.terms == VPoly.lift(o).terms

    def __hash__(self):
        return hash(tuple(sorted(self.terms.items())))

    def encode(self) -> tuple:
        """Graph-argument form: ("V", ((power, coefficient), ...))."""
        return ("V", tuple(sorted(self.terms.items())))

    def __repr__(self) -> str:
        return " + ".join(f"{c:g}*V^{k}" for k, c in sorted(self.terms.items())) or "0"


def _coef_eq(a, b) -> bool:
    if isinstance(a, Row) and isinstance(b, Row):
        return a.coefs == b.coefs and a.root == b.root
    if isinstance(a, VPoly) or isinstance(b, VPoly):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return False


def _lse_row(root: Root, c: float = 1.0) -> Row:
    return Row(root, {"L": c})


def _log_softmax(root: Root, inf: str | None = "zinf") -> Vocab:
    return Vocab(root, {"z": 1.0, "one": _lse_row(root, -1.0)}, inf=inf)


def _probs(root: Root) -> Vocab:
    return Vocab(root, {"p": 1.0}, inf="p0")


def _scale_coef(c, s: float):
    return c.scaled(s) if isinstance(c, Row) else c * s


def _add_coef(a, b):
    if isinstance(a, Row) or isinstance(b, Row):
        ra = a if isinstance(a, Row) else None
        rb = b if isinstance(b, Row) else None
        if (ra is None and a != 0.0) or (rb is None and b != 0.0):
            # a constant plus a per-row value: keep as a Row with a "one" statistic
            base = ra or rb
            other = b if ra is not None else a
            return Row(base.root, {**base.coefs, "one": base.coefs.get("one", 0.0) + other})
        if ra is None:
            return rb
        if rb is None:
            return ra
        coefs = dict(ra.coefs)
        for k, v in rb.coefs.items():
            coefs[k] = coefs.get(k, 0.0) + v
        return Row(ra.root, coefs)
    return a + b


_INF_ORDER = {None: 0, "zinf": 1, "p0": 2}  # "p0" rows include the "zinf" rows


def _join_inf(a, b):
    return a if _INF_ORDER[a] >= _INF_ORDER[b] else b


def _join_nan(a: tuple, b: tuple) -> tuple:
    return tuple(_join_inf(x, y) for x, y in zip(a, b))


def _vadd(a: Vocab, b: Vocab, sign: float = 1.0) -> Vocab:
    if a.root != b.root:
        raise NotRepresentable("combines two different logits tensors")
    if a.alpha is not None and b.alpha is not None and a.alpha != b.alpha:
        raise NotRepresentable("two different mixtures")
    terms = dict(a.terms)
    for k, v in b.terms.items():
        terms[k] = _add_coef(terms.get(k, 0.0), _scale_coef(v, sign))
    return Vocab(a.root, terms, a.alpha if a.alpha is not None else b.alpha, _join_inf(a.inf, b.inf),
                 _join_nan(a.nan, b.nan))


def _vscale(a: Vocab, s: float) -> Vocab:
    return Vocab(a.root, {k: _scale_coef(v, s) for k, v in a.terms.items()}, a.alpha, a.inf, a.nan)


# ----------------------------------------------------------------------------- op spellings
_LOG_SOFTMAX = {torch.log_softmax, torch.nn.functional.log_softmax, torch.special.log_softmax, "log_softmax"}
_SOFTMAX = {torch.softmax, torch.nn.functional.softmax, torch.special.softmax, "softmax"}
_EXP = {torch.exp, "exp"}
_LOG = {torch.log, "log"}
_SUM = {torch.sum, "sum"}
_MEAN = {torch.mean, "mean"}
_LOGSUMEXP = {torch.logsumexp, "logsumexp", torch.special.logsumexp}
_GATHER = {torch.gather, "gather"}
_CLAMP = {torch.clamp, torch.clip, "clamp", "clip"}
_ENTR = {torch.special.entr, "entr"}
_XLOGY = {torch.xlogy, torch.special.xlogy, "xlogy"}
_NEG = {operator.neg, torch.neg, "neg"}
_MUL = {operator.mul, torch.mul, "mul"}
_ADD = {operator.add, torch.add, "add"}
_SUB = {operator.sub, torch.sub, "sub"}
_DIV = {operator.truediv, torch.div, torch.true_divide, "div", "true_divide"}
_CE = {torch.nn.functional.cross_entropy}
_NLL = {torch.nn.functional.nll_loss}
_KL = {torch.nn.functional.kl_div}
_ONES_LIKE = {torch.ones_like, "new_ones"}
_FULL_LIKE = {torch.full_like, "new_full"}

if _compat.special_entr_c_function() is not None:  # Dynamo records torch.special.entr by its C name
    _ENTR.add(_compat.special_entr_c_function())


def _static_classes(root: Root) -> int:
    """The number of classes where the user's constants must be compared with it (the
    GER mixture (1 - alpha)/V): it must be static. Sums and means over the classes take
    a symbolic V (``_classes``)."""
    V = _shape(root.base)[-1]
    if not isinstance(V, int):
        raise NotRepresentable(STATIC_CLASSES_REASON)
    return V


#: the near-miss of a constant the user computes from a symbolic size (1 / V, log V)
SYMBOLIC_SCALAR_REASON = (
    "a constant computed from a symbolic size (e.g. 1 / logits.size(-1) with dynamic shapes) is a graph value, "
    "not a number the rewrite can check: mark the class dimension static "
    "(torch._dynamo.mark_static(logits, logits.dim() - 1)) to rewrite this term")

#: the near-miss of a GER mixture on a symbolic number of classes
STATIC_CLASSES_REASON = (
    "the GER mixture (alpha p + (1 - alpha)/V) needs a static number of classes, which is symbolic here "
    "(dynamic=True or mark_dynamic): mark the class dimension static "
    "(torch._dynamo.mark_static(logits, logits.dim() - 1)) to rewrite this term")


def _classes(root: Root):
    """The number of classes: an int, or ``VPoly`` V when it is symbolic."""
    V = _shape(root.base)[-1]
    return V if isinstance(V, int) else VPoly({1: 1.0})


def _class_dim_ok(node: fx.Node, dim, ndim: int) -> bool:
    if dim is None:
        return False
    if isinstance(dim, (list, tuple)):
        if len(dim) != 1:
            return False
        dim = dim[0]
    return isinstance(dim, int) and dim % ndim == ndim - 1


# ----------------------------------------------------------------------------- the evaluator
class Evaluator:
    """Symbolic values of graph nodes (memoised); raises NotRepresentable with a reason."""

    def __init__(self):
        self.memo: dict[fx.Node, Any] = {}
        self.vocab_nodes: dict[Root, set[fx.Node]] = {}

    # ---- roots
    def root_of(self, node: fx.Node) -> Root:
        views: list = []
        cur = node
        while isinstance(cur, fx.Node):
            if _is(cur, _VIEWS):
                shape, inner = _shape(cur), _shape(cur.args[0])
                if shape is None or inner is None or not shape or not inner or not shapes.known_equal(shape[-1], inner[-1]):
                    break  # a view that moves the classes: cur is the root
                views.append(cur)
                cur = cur.args[0]
                continue
            if _is(cur, _CASTS) and self._is_upcast(cur):
                cur = cur.args[0]
                continue
            break
        ops = tuple((v.target if v.op == "call_method" else v.target, tuple(v.args[1:]), tuple(sorted(v.kwargs.items())))
                    for v in reversed(views))
        return Root(cur, ops)

    @staticmethod
    def _is_upcast(node: fx.Node) -> bool:
        src, dst = _dtype(node.args[0]), _dtype(node)
        if src is None or dst is None:
            return False
        if src == dst:
            return True
        return dst == torch.float32 and src in (torch.float16, torch.bfloat16)

    def _shifted_root(self, x) -> Root | None:
        """softmax(z - c) = softmax(z) for a per-row shift c (e.g. Categorical's z - lse)."""
        if not (_is(x, _SUB | _ADD)):
            return None
        try:
            v = self.value(x)
        except NotRepresentable:
            return None
        if isinstance(v, Vocab) and set(v.terms) <= {"z", "one"} and _coef_eq(v.terms.get("z"), 1.0):
            return v.root
        return None

    # ---- evaluation
    def value(self, node) -> Any:
        if not isinstance(node, fx.Node):
            if isinstance(node, (int, float)) and not isinstance(node, bool):
                return float(node)
            raise NotRepresentable(f"unsupported operand {node!r}")
        if node in self.memo:
            v = self.memo[node]
            if isinstance(v, NotRepresentable):
                raise v
            return v
        try:
            v = self._eval(node)
        except NotRepresentable as e:
            if e.node is None:
                e.node = node
            self.memo[node] = e
            raise
        self.memo[node] = v
        if isinstance(v, Vocab):
            self.vocab_nodes.setdefault(v.root, set()).add(node)
        return v

    def _eval(self, n: fx.Node) -> Any:
        if isinstance(_val(n), (torch.SymInt, torch.SymFloat)):
            raise NotRepresentable(SYMBOLIC_SCALAR_REASON)
        if n.op != "call_function" and n.op != "call_method":
            raise NotRepresentable(f"{n.op} {n.target} is not a loss expression")
        t = _target_of(n)
        if t in _LOG_SOFTMAX or t in _SOFTMAX:
            x = n.args[0]
            dim = _arg(n, 1, "dim")
            shp = _shape(x)
            if shp is None or not _class_dim_ok(n, dim, len(shp)):
                raise NotRepresentable("softmax over a dimension other than the last (classes)")
            if _arg(n, 2, "dtype") not in (None, torch.float32):
                raise NotRepresentable("softmax with a dtype other than float32")
            root = self._shifted_root(x) or self.root_of(x)
            return _log_softmax(root) if t in _LOG_SOFTMAX else _probs(root)
        if t in _LOGSUMEXP:
            x = n.args[0]
            shp = _shape(x)
            if shp is None or not _class_dim_ok(n, _arg(n, 1, "dim"), len(shp)):
                raise NotRepresentable("logsumexp over a dimension other than the classes")
            return Row(self.root_of(x), {"L": 1.0}, keepdim=bool(_arg(n, 2, "keepdim", False)))
        if t in _EXP:
            v = self.value(n.args[0])
            if isinstance(v, Vocab) and v.is_(z=1.0, one=_lse_row(v.root, -1.0)):
                return _probs(v.root)
            raise NotRepresentable("exp of something other than log-probabilities")
        if t in _LOG:
            v = self.value(n.args[0])
            if isinstance(v, Vocab):
                if v.is_(p=1.0):
                    return _log_softmax(v.root, inf=v.inf)  # -inf where p is 0 (unless clamped)
                c = v.terms.get("one")
                if set(v.terms) == {"one"} and isinstance(c, float) and c > 0:
                    return Vocab(v.root, {"one": math.log(c)})  # log of a constant, e.g. u = 1/V
                return self._log_mixture(v)
            if isinstance(v, float) and v > 0:
                return math.log(v)
            raise NotRepresentable("log of an expression that is not a probability")
        if t in _CLAMP:
            v = self.value(n.args[0])
            lo, hi = _arg(n, 1, "min"), _arg(n, 2, "max")
            tiny = torch.finfo(_dtype(n) or torch.float32)
            # Categorical's clamp(min=finfo.min) of log-probabilities changes no finite value
            if isinstance(v, Vocab) and hi is None and isinstance(lo, float) and lo <= tiny.min:
                return dataclasses.replace(v, inf=None) if lo > -math.inf else v  # -inf becomes finite
            if isinstance(v, Vocab) and v.is_(p=1.0) and hi is None and isinstance(lo, float) and lo <= tiny.tiny:
                # clamp(p, min=eps) only changes probabilities below the smallest normal
                return dataclasses.replace(v, inf=None) if lo > 0 else v
            raise NotRepresentable("clamp that can change the log-probabilities")
        if t in _ENTR:
            v = self.value(n.args[0])
            if isinstance(v, Vocab) and v.is_(p=1.0):  # entr(p) = -p log p = -p z + p L
                # entr(0) = 0, but its gradient -(1 + log 0) makes the row's gradient NaN
                return Vocab(v.root, {"pz": -1.0, "p": _lse_row(v.root, 1.0)}, nan=(None, v.inf))
            raise NotRepresentable("entr of something other than probabilities")
        if t in _XLOGY:
            a, b = self.value(n.args[0]), self.value(n.args[1])
            if isinstance(a, Vocab) and isinstance(b, Vocab) and a.is_(p=1.0) and b.is_(p=1.0) and a.root == b.root:
                if a.inf != b.inf:
                    raise NotRepresentable("xlogy of a clamped and an unclamped probability")
                # xlogy(0, 0) = 0, but its gradient 0 / 0 makes the row's gradient NaN
                return Vocab(a.root, {"pz": 1.0, "p": _lse_row(a.root, -1.0)}, nan=(None, a.inf))
            raise NotRepresentable("xlogy of something other than (p, p)")
        if t in _NEG:
            return self._scale(self.value(n.args[0]), -1.0)
        if t in _ADD or t in _SUB:
            if _arg(n, 2, "alpha", 1) != 1:
                raise NotRepresentable("add/sub with alpha")
            a, b = n.args[0], n.args[1]
            vb = self.value(b)
            try:
                va = self.value(a)
            except NotRepresentable:
                # z - logsumexp(z, keepdim=True): the raw logits beside their own row statistic
                if isinstance(vb, Row) and vb.keepdim and isinstance(a, fx.Node) and self.root_of(a) == vb.root:
                    va = Vocab(vb.root, {"z": 1.0}, inf="zinf")
                else:
                    raise
            return self._add(va, vb, -1.0 if t in _SUB else 1.0)
        if t in _MUL:
            return self._mul(self.value(n.args[0]), self.value(n.args[1]))
        if t in _DIV:
            a, b = self.value(n.args[0]), self.value(n.args[1])
            if isinstance(b, float) and b != 0:
                return self._scale(a, 1.0 / b)
            raise NotRepresentable("division by a tensor")
        if t in _ONES_LIKE or t in _FULL_LIKE:
            like = n.args[0]
            shp = _shape(n)
            fill = 1.0 if t in _ONES_LIKE else _arg(n, 1, "fill_value")
            if isinstance(_val(fill), (torch.SymInt, torch.SymFloat)):
                raise NotRepresentable(SYMBOLIC_SCALAR_REASON)
            if not isinstance(fill, (int, float)) or shp is None:
                raise NotRepresentable("a constant tensor with an unknown value")
            v = self.value(like)
            if not isinstance(v, Vocab):
                raise NotRepresentable("a constant not shaped like the logits")
            return Vocab(v.root, {"one": float(fill)})
        if t in _VIEWS or t in _CASTS:
            v = self.value(n.args[0])
            if isinstance(v, Vocab) and _shape(n) and _shape(n.args[0]) and shapes.known_equal(_shape(n)[-1], _shape(n.args[0])[-1]):
                if t in _CASTS and not self._is_upcast(n):
                    raise NotRepresentable("a cast to lower precision")
                return v
            if isinstance(v, Row) and t in _CASTS and self._is_upcast(n):
                return v
            raise NotRepresentable("a view that moves the classes")
        raise NotRepresentable(f"{t if isinstance(t, str) else getattr(t, '__name__', t)} is not part of a GER loss")

    # ---- algebra
    def _log_mixture(self, v: Vocab) -> Vocab:
        """log(alpha p + c) with c = (1 - alpha) / V: the GER mixture with a uniform u."""
        a = v.terms.get("p", 0.0)
        c = v.terms.get("one", 0.0)
        if set(v.terms) - {"p", "one"} or not isinstance(a, float) or not isinstance(c, float) or not 0 < a < 1:
            raise NotRepresentable("log of an expression that is not a probability or a mixture with u")
        V = _static_classes(v.root)
        if not math.isclose(c, (1 - a) / V, rel_tol=1e-6):
            raise NotRepresentable("mixture with a distribution other than uniform")
        return Vocab(v.root, {"logm": 1.0}, alpha=a)

    def _scale(self, v, s: float):
        if isinstance(v, Vocab):
            return _vscale(v, s)
        if isinstance(v, Row):
            return v.scaled(s)
        if isinstance(v, float):
            return v * s
        raise NotRepresentable("scaling of an unsupported value")

    def _add(self, a, b, sign: float):
        if isinstance(a, Vocab) and isinstance(b, Vocab):
            return _vadd(a, b, sign)
        if isinstance(a, float) and isinstance(b, float):
            return a + sign * b
        if isinstance(a, Vocab) and isinstance(b, Row) and b.keepdim and b.root == a.root:
            # z - logsumexp(z, keepdim=True): a per-row term broadcast over the classes
            return _vadd(a, Vocab(a.root, {"one": b.scaled(sign)}))
        if isinstance(a, Vocab) and isinstance(b, float):
            return _vadd(a, Vocab(a.root, {"one": sign * b}))
        if isinstance(a, float) and isinstance(b, Vocab):
            return _vadd(Vocab(b.root, {"one": a}), b, sign)
        raise NotRepresentable("sum of a vocabulary-level and an unrelated tensor")

    def _mul(self, a, b):
        if isinstance(a, float):
            return self._scale(b, a)
        if isinstance(b, float):
            return self._scale(a, b)
        if isinstance(a, Vocab) and isinstance(b, Vocab):
            if a.root != b.root:
                raise NotRepresentable("product of two different logits tensors")
            for x, y in ((a, b), (b, a)):
                if x.is_(one=x.terms.get("one")) and isinstance(x.terms.get("one"), float):
                    return _vscale(y, x.terms["one"])  # a constant (e.g. u = 1/V) times y
            for x, y in ((a, b), (b, a)):
                pc = x.terms.get("p")
                if set(x.terms) <= {"p", "one"} and isinstance(pc, float):
                    c = x.terms.get("one", 0.0)
                    if not isinstance(c, float):
                        continue
                    if c == 0.0:
                        return self._p_times(y, pc)
                    if y.alpha is not None and set(y.terms) == {"logm"}:  # m log m
                        alpha = y.alpha
                        if math.isclose(pc, alpha, rel_tol=1e-9) and math.isclose(c, (1 - alpha) / _static_classes(x.root), rel_tol=1e-6):
                            k = y.terms["logm"]
                            return Vocab(x.root, {"plogm": alpha * k, "logm": c * k}, alpha=alpha)
            raise NotRepresentable("product that is not p times a log-probability-like term")
        raise NotRepresentable("product with an unrelated tensor (vocabulary-level)")

    @staticmethod
    def _p_times(y: Vocab, pc: float) -> Vocab:
        out: dict[str, Any] = {}
        for k, c in y.terms.items():
            if k == "z":
                if isinstance(c, Row):
                    raise NotRepresentable("nonlinear term")
                out["pz"] = out.get("pz", 0.0) + pc * c
            elif k == "one":
                out["p"] = _add_coef(out.get("p", 0.0), _scale_coef(c, pc))
            elif k == "logm":
                out["plogm"] = out.get("plogm", 0.0) + pc * c
            else:
                raise NotRepresentable("a product of probabilities (not an entropy term)")
        # p * y is NaN eagerly where p = 0 and y = -inf (0 * -inf): y's -inf rows
        z = y.terms.get("z", 0.0)
        cond = y.inf if (isinstance(z, (int, float)) and z != 0.0) or isinstance(z, VPoly) else None
        return Vocab(y.root, out, y.alpha, None, _join_nan(y.nan, (cond, cond)))

    # ---- reductions over the classes
    def reduce(self, v: Vocab, mean: bool, keepdim: bool) -> Row:
        """Sum (or mean) over the classes: sum_j z_j = zsum, sum_j 1 = V, sum_j p_j = 1, ..."""
        coefs: dict[str, float] = {}
        _refuse_log_of_probabilities(v, "a sum over the classes")

        def add(k, c):
            coefs[k] = coefs.get(k, 0.0) + c

        for k, c in v.terms.items():
            if k == "z":
                add("zsum", c)
            elif k == "one":  # sum_j c = V c (a VPoly for a symbolic V)
                V = _classes(v.root)
                for kk, cc in (c.coefs.items() if isinstance(c, Row) else (("one", c),)):
                    add(kk, V * cc)
            elif k == "p":  # sum_j c p_j = c
                for kk, cc in (c.coefs.items() if isinstance(c, Row) else (("one", c),)):
                    add(kk, cc)
            elif k == "pz":
                add("ez", c)
            elif k == "plogm":
                add("plogm", c)
            elif k == "logm":  # sum_j log m_j = V sum_j u_j log m_j
                add("ulogm", _static_classes(v.root) * c)
        if mean:
            V = _classes(v.root)
            coefs = {k: c / V for k, c in coefs.items()}
        return Row(v.root, {k: c for k, c in coefs.items() if c != 0.0}, keepdim=keepdim, alpha=v.alpha, nan=v.nan)


def _refuse_log_of_probabilities(v, what: str) -> None:
    """log(softmax(z)) itself (not times p) read by ``what``: eagerly -inf where a
    probability underflows to 0 (and its gradient NaN), which log_softmax's statistics
    do not reproduce."""
    if isinstance(v, Vocab) and v.inf == "p0" and "z" in v.terms and v.terms["z"] != 0.0:
        raise NotRepresentable(f"log(softmax(...)) read by {what}: eagerly -inf where a probability underflows to 0; "
                               "written with log_softmax it is rewritten")


# ----------------------------------------------------------------------------- candidates
@dataclasses.dataclass
class Candidate:
    node: fx.Node
    kind: str  # row | ce | kl
    root: Root
    row: Row | None = None
    ce: dict[str, Any] | None = None  # target, weight, ignore_index, reduction, label_smoothing, class_dim
    kl_reduction: str | None = None
    operands: tuple = ()  # vocabulary-level nodes the candidate consumes


def _classify(ev: Evaluator, n: fx.Node, guard=None) -> Candidate | None:
    """A class-dimension reduction (or a loss call) whose value is a GER statistic, or None.
    ``guard(cond, why)`` (``PassContext.guard``) is asked for size conditions that are not
    known to hold for every size (symbolic sizes)."""
    t = _target_of(n) if n.op in ("call_function", "call_method") else None
    if t is None:
        return None
    if t in _CE or t in _NLL:
        return _classify_ce(ev, n, nll=t in _NLL)
    if t in _KL:
        return _classify_kl(ev, n)
    if t in _SUM or t in _MEAN:
        x = n.args[0]
        dim = _arg(n, 1, "dim")
        shp = _shape(x)
        if shp is None or dim is None or not isinstance(_val(x), torch.Tensor):
            return None
        v = _value_if_loss_like(ev, x)
        if not isinstance(v, Vocab):
            return None
        if not _class_dim_ok(n, dim, len(shp)):
            raise NotRepresentable("reduction over a dimension other than the classes", n)
        row = ev.reduce(v, mean=t in _MEAN, keepdim=bool(_arg(n, 2, "keepdim", False)))
        return Candidate(n, "row", v.root, row=row, operands=(x,))
    if t in _LOGSUMEXP:
        x = n.args[0]
        shp = _shape(x)
        if shp is None or not _class_dim_ok(n, _arg(n, 1, "dim"), len(shp)):
            return None
        root = ev.root_of(x)
        return Candidate(n, "row", root, row=Row(root, {"L": 1.0}, keepdim=bool(_arg(n, 2, "keepdim", False))))
    if t in _GATHER:
        x = n.args[0]
        v = _value_if_loss_like(ev, x)
        if not isinstance(v, Vocab):
            return None
        try:
            _refuse_log_of_probabilities(v, "a gather at the target")
        except NotRepresentable as e:
            raise NotRepresentable(e.reason, n) from None
        shp = _shape(x)
        if shp is None or not _class_dim_ok(n, _arg(n, 1, "dim"), len(shp)):
            raise NotRepresentable("gather over a dimension other than the classes", n)
        index = _arg(n, 2, "index")
        # gather also takes an index with fewer rows than the logits (rows 0..k-1): the op
        # needs one target per row, known for every size or guarded
        ishape = _shape(index)
        if ishape is None or len(ishape) != len(shp) or not shapes.known_equal(ishape[-1], 1) or not (
            shapes.known_equal(ishape[:-1], shp[:-1])
            or (guard is not None and guard(_rows_equal(ishape[:-1], shp[:-1]), GATHER_ROWS_WHY))
        ):
            raise NotRepresentable("gather with an index that is not one target per row", n)
        target = _squeeze_last(index)
        if target is None:
            target = ("squeeze", index)  # e.g. clamp(y.unsqueeze(-1), min=0): squeezed at rewrite
        coefs: dict[str, float] = {}
        for k, c in v.terms.items():
            if k == "z":
                coefs["zy"] = coefs.get("zy", 0.0) + c
            elif k == "one":
                for kk, cc in (c.coefs.items() if isinstance(c, Row) else (("one", c),)):
                    coefs[kk] = coefs.get(kk, 0.0) + cc
            else:
                raise NotRepresentable("gather of probabilities (not a log-likelihood)", n)
        row = Row(v.root, {k: c for k, c in coefs.items() if c != 0.0}, keepdim=True, target=target)
        return Candidate(n, "row", v.root, row=row, operands=(x,))
    return None


#: why the gather rewrite asks for a guard when the sizes are symbolic
GATHER_ROWS_WHY = "gather's index has one target per row of the logits (gather also accepts fewer rows)"


def _rows_equal(a: tuple, b: tuple):
    """The SymBool (or bool) ``a == b`` elementwise, for PassContext.guard."""
    conds = [x == y for x, y in zip(a, b)]
    if any(c is False for c in conds):
        return False
    symbolic = [c for c in conds if c is not True]
    if not symbolic:
        return True
    cond = symbolic[0]
    for c in symbolic[1:]:
        cond = cond & c
    return cond


def _value_if_loss_like(ev: Evaluator, x):
    """x's symbolic value; None if x has nothing to do with log-probabilities; re-raises
    (a near-miss) when a softmax-family op is involved but the whole is not a statistic."""
    try:
        return ev.value(x)
    except NotRepresentable:
        if _has_softmax_ancestor(x):
            raise
        return None


def _has_softmax_ancestor(node, depth: int = 8) -> bool:
    seen, frontier = set(), [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if not isinstance(n, fx.Node) or n in seen:
                continue
            seen.add(n)
            if _is(n, _LOG_SOFTMAX | _SOFTMAX) or (n.op == "call_function" and n.target is torch.ops.ger.loss_fwd.default):
                return True
            nxt.extend(n.all_input_nodes)
        frontier = nxt
    return False


def _squeeze_last(index) -> fx.Node | None:
    """y from y.unsqueeze(-1) / y.view(..., 1) / y[..., None]."""
    if not isinstance(index, fx.Node):
        return None
    shp = _shape(index)
    if shp is None or not shp or not shapes.known_equal(shp[-1], 1):
        return None
    if _is(index, {"unsqueeze", torch.unsqueeze}) and _arg(index, 1, "dim") in (-1, len(shp) - 1):
        return index.args[0]
    if _is(index, {"view", "reshape"}) and shapes.known_equal(_shape(index.args[0]), shp[:-1]):
        return index.args[0]
    if index.op == "call_function" and index.target is operator.getitem:
        src, idx = index.args
        if isinstance(idx, tuple) and idx and idx[-1] is None and shapes.known_equal(_shape(src), shp[:-1]):
            return src
    return None


def _classify_ce(ev: Evaluator, n: fx.Node, nll: bool) -> Candidate:
    x, target = n.args[0], _arg(n, 1, "target")
    weight = _arg(n, 2, "weight")
    size_average, reduce_ = _arg(n, 3, "size_average"), _arg(n, 5, "reduce")
    ignore_index = _arg(n, 4, "ignore_index", -100)
    reduction = _arg(n, 6, "reduction", "mean")
    eps = 0.0 if nll else _arg(n, 7, "label_smoothing", 0.0)
    if size_average is not None or reduce_ is not None:
        raise NotRepresentable("deprecated size_average/reduce arguments", n)
    if not isinstance(ignore_index, int) or not isinstance(reduction, str) or not isinstance(eps, (int, float)):
        raise NotRepresentable("loss arguments that are not constants", n)
    tdt = _dtype(target)
    if tdt is None or tdt.is_floating_point:
        raise NotRepresentable("soft targets (class probabilities) are not a smoothing of one-hot targets", n)
    if tdt not in losses.TARGET_DTYPES:  # eager raises "expected target dtype to be Long or Byte"
        raise NotRepresentable(f"{tdt} targets: F.cross_entropy takes int64 or uint8 class indices (eagerly an error)", n)
    if weight is not None and not isinstance(_val(weight), torch.Tensor):
        raise NotRepresentable("weight that is not a tensor", n)
    shp = _shape(x)
    if shp is None or len(shp) < 1:
        raise NotRepresentable("logits of unknown shape", n)
    class_dim = 1 if len(shp) >= 3 else len(shp) - 1
    if nll:
        v = ev.value(x)
        if not (isinstance(v, Vocab) and v.is_(z=1.0, one=_lse_row(v.root, -1.0))):
            raise NotRepresentable("nll_loss of something other than log_softmax(logits)", n)
        if v.inf == "p0":
            raise NotRepresentable("nll_loss of log(softmax(...)): eagerly inf where the target's probability "
                                   "underflows to 0; written with log_softmax it is rewritten", n)
        if len(shp) >= 3:
            raise NotRepresentable("nll_loss with classes in dim 1 of a >2-d input", n)
        root = v.root
        operands = (x,)
    else:
        if len(shp) >= 3:
            root = Root(x, ())  # (N, C, d...) layout: the op reads it through a view
        else:
            root = ev.root_of(x)
        operands = ()
    spec = dict(target=target, weight=weight, ignore_index=ignore_index, reduction=reduction,
                label_smoothing=float(eps), class_dim=class_dim)
    return Candidate(n, "ce", root, ce=spec, operands=operands)


def _classify_kl(ev: Evaluator, n: fx.Node) -> Candidate:
    inp, tgt = n.args[0], _arg(n, 1, "target")
    reduction = _arg(n, 4, "reduction", "mean")
    log_target = bool(_arg(n, 5, "log_target", False))
    if _arg(n, 2, "size_average") is not None or _arg(n, 3, "reduce") is not None:
        raise NotRepresentable("deprecated size_average/reduce arguments", n)
    if reduction not in ("sum", "batchmean", "mean"):
        raise NotRepresentable(f"kl_div with reduction={reduction!r} is not per row", n)
    a, b = ev.value(inp), ev.value(tgt)
    if not isinstance(a, Vocab) or not isinstance(b, Vocab):
        raise NotRepresentable("kl_div between tensors that are not both vocabulary-level", n)
    # elementwise: target * (log target - input)   (log_target: exp(t) * (t - input))
    if log_target:
        t_prob = Vocab(b.root, {"p": 1.0}) if b.is_(z=1.0, one=_lse_row(b.root, -1.0)) else None
    else:
        t_prob = b
    if a.is_(z=1.0, one=_lse_row(a.root, -1.0)) and not log_target and set(b.terms) == {"one"} and isinstance(b.terms["one"], float):
        c = b.terms["one"]  # sum_j c (log c - log p_j), the KL(u||p) direction when c = 1/V
        row = ev.reduce(Vocab(a.root, {"one": c * math.log(c) if c > 0 else 0.0}), False, False)
        row2 = ev.reduce(_vscale(a, -c), False, False)
        coefs = dict(row.coefs)
        for k, v in row2.coefs.items():
            coefs[k] = coefs.get(k, 0.0) + v
        return Candidate(n, "kl", a.root, row=Row(a.root, coefs), kl_reduction=reduction, operands=(inp, tgt))
    if set(a.terms) == {"one"} and isinstance(a.terms["one"], float) and t_prob is not None and t_prob.is_(p=1.0):
        # sum_j p_j (log p_j - log u_j): KL(p||u) with input = log u
        lu = a.terms["one"]
        row = ev.reduce(Vocab(t_prob.root, {"pz": 1.0, "p": _add_coef(_lse_row(t_prob.root, -1.0), -lu)}), False, False)
        # eagerly: xlogy(p, p) is 0 at p = 0 but its gradient (0 / 0) NaN; with log_target,
        # exp(t) * (t - input) is NaN where t = -inf
        row.nan = (b.inf, b.inf) if log_target else (None, t_prob.inf)
        return Candidate(n, "kl", t_prob.root, row=row, kl_reduction=reduction, operands=(inp, tgt))
    raise NotRepresentable("kl_div that is not between the model's distribution and a constant one", n)


# ----------------------------------------------------------------------------- the pass
def run(gm: fx.GraphModule, ctx) -> bool:
    changed = _set_strategy_of_existing_ops(gm, ctx)
    ev = Evaluator()
    cands: list[Candidate] = []
    for n in list(gm.graph.nodes):
        try:
            c = _classify(ev, n, guard=ctx.guard)
        except NotRepresentable as e:
            ctx.near_miss("loss_statistic", e.node or n, e.reason)
            continue
        if c is not None:
            eager = ctx.eager_reason(n)
            if eager is not None:
                ctx.near_miss("loss_statistic", n, f"left to run eagerly: {eager}")
                continue
            cands.append(c)
    groups: dict[Root, list[Candidate]] = {}
    for c in cands:
        groups.setdefault(_group_key(c.root), []).append(c)
    for root, group in groups.items():
        plan = _plan(ev, root, group, ctx)
        if plan is not None and _absorbs_eager_node(group, plan, ctx):
            continue
        if plan is not None and _reads_may_move(gm, ev, group, ctx) and _hoist_operands(gm.graph, group, plan, ctx):
            _rewrite(gm, root, group, plan, ctx)
            changed = True
    return changed


def _absorbs_eager_node(group: list[Candidate], plan: Plan, ctx) -> bool:
    """Whether the rewrite would remove a node that must run eagerly (``eager_ops``, a
    device without Inductor): an intermediate it absorbs (a softmax, a log_softmax, a
    product) is removed with the statistics. Refused then, a near-miss naming it."""
    for n in sorted(plan.vocab, key=lambda n: n.name):
        eager = ctx.eager_reason(n)
        if eager is not None:
            for c in group:
                ctx.near_miss("cross_entropy+entropy", c.node,
                              f"{n.name} must run eagerly ({eager}); the rewrite would fuse it away")
            return True
    return False


def _group_key(root: Root) -> Root:
    return Root(root.base, ())


def _set_strategy_of_existing_ops(gm: fx.GraphModule, ctx) -> bool:
    """ger_loss called directly: give its op the chunk size of this graph's profile."""
    changed = False
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in LOSS_FWD:
            V = (_shape(n.args[0]) or (None, None))[1]
            chunk = fleet.loss_chunk(torch.device(ctx.profile.device_type), V if isinstance(V, int) else None, profile=ctx.profile)
            changed |= graph.set_op_arg(n, "chunk", chunk)
            ctx.strategy(**{k: v for k, v in fleet.strategy(FAMILY, ctx.profile).items() if k != "why"})
    return changed


@dataclasses.dataclass
class Plan:
    target: fx.Node
    ignore_index: int
    alpha: float
    extras: bool
    ce: Candidate | None
    smooth: tuple | None  # (eps, weight node) for weighted label smoothing
    vocab: set  # the N x V intermediates the rewrite makes dead


def _plan(ev: Evaluator, root: Root, group: list[Candidate], ctx) -> Plan | None:
    """Decide the single op call that serves every statistic of this logits tensor."""
    ces = [c for c in group if c.kind == "ce"]
    rows = [c for c in group if c.kind in ("row", "kl")]
    zy_targets = {id(c.row.target): c.row.target for c in rows if c.row.target is not None and "zy" in c.row.coefs}

    def refuse(reason: str, cands=None) -> None:
        for c in cands or group:
            ctx.near_miss("cross_entropy+entropy", c.node, reason)
        return None

    if len(ces) > 1:
        return refuse("several cross-entropy losses on one logits tensor")
    targets = ([ces[0].ce["target"]] if ces else []) + list(zy_targets.values())
    if not targets:
        if all(c.kind == "row" and set(c.row.coefs) <= {"L"} for c in group):
            return None  # a logsumexp of some tensor: nothing to do with a loss
        return refuse("entropy/KL term without a cross-entropy on the same logits (e.g. a temperature inside only one softmax): not a GER loss")
    if len({_strip_views(t) if isinstance(t, fx.Node) else t[1] for t in targets}) > 1:
        return refuse("statistics of one logits tensor with different targets")
    # vocabulary-level intermediates must not be used elsewhere (they would stay materialised)
    inside = {c.node for c in group}
    vocab = set()
    for c in group:
        vocab |= _vocab_closure(ev, c.operands)
    for v in vocab:
        for u in v.users:
            if u not in inside and u not in vocab and not _is(u, _SHAPE_ONLY):
                return refuse(f"log-probabilities/probabilities ({v.name}) are also used by {u.name}: the N x V tensor would stay")
    # the statistics needed decide alpha and extras
    needed = set()
    alphas = set()
    for c in rows:
        needed |= set(c.row.coefs)
        if c.row.alpha is not None and ({"plogm", "ulogm"} & set(c.row.coefs)):
            alphas.add(c.row.alpha)
    if len(alphas) > 1:
        return refuse("two different GER mixtures on one logits tensor")
    alpha = alphas.pop() if alphas else 1.0
    if "zsum" in needed and alpha != 1.0:
        return refuse("a sum of logits together with a GER mixture (two passes)")
    smooth = None
    ce = ces[0] if ces else None
    if ce is not None and ce.ce["label_smoothing"] and ce.ce["weight"] is not None:
        if needed & {"zsum"}:
            return refuse("weighted label smoothing together with another KL(u||p) term")
        smooth = (ce.ce["label_smoothing"], ce.ce["weight"])
    if ce is not None and ce.ce["class_dim"] != len(_shape(ce.node.args[0])) - 1 and rows:
        return refuse("cross-entropy with classes in dim 1 together with hand-written terms")
    if ce is not None and zy_targets and ce.ce["ignore_index"] >= 0:
        # the op zeroes nll where target == ignore_index; a gather at that (valid) class
        # would then read L instead of z_y
        return refuse("a target log-probability read by gather beside a cross-entropy whose ignore_index "
                      "is a valid class")
    extras = bool(needed & {"ez", "plogm"})
    ignore_index = ce.ce["ignore_index"] if ce is not None else NO_IGNORE
    return Plan(targets[0], ignore_index, alpha, extras, ce, smooth, vocab)


def _reads_may_move(gm: fx.GraphModule, ev: Evaluator, group: list[Candidate], ctx) -> bool:
    """The op reads the logits, targets and weights once, before the first statistic it
    replaces; every statistic and intermediate it absorbs read them at its own position.
    Refused (near-miss naming the node) when something between writes one of them
    (through any alias) or switches modes: the statistics would differ from eager's."""
    g = gm.graph
    first = min((c.node for c in group), key=_order(g))
    reads = []
    for c in group:
        closure = _vocab_closure(ev, c.operands) | {c.node}
        for n in closure:
            reads.extend((n, a) for a in n.all_input_nodes if a not in closure)
    effects = graph.Effects(gm)
    barrier = effects.first_barrier(reads, first)
    reason = graph.moved_reads_reason(barrier) if barrier is not None else None
    logits = group[0].root.base
    lv = _val(logits)
    if reason is None and isinstance(lv, torch.Tensor) and lv.requires_grad:
        # the op saves the logits for its backward, where eager's softmax / log_softmax
        # saved their outputs: a later write to the logits would raise autograd's
        # version error in ger only
        pos = effects.order
        later = [m for m in effects.writers_of(logits) if pos[m] > pos[first]]
        if later:
            reason = (f"{graph.describe(later[0])} writes the logits after the loss: the fused op saves them for "
                      "its backward (eager saves only the softmax outputs), so autograd would raise where eager runs")
    if reason is None:
        return True
    for c in group:
        ctx.near_miss("cross_entropy+entropy", c.node, reason)
    return False


def _hoist_operands(g: fx.Graph, group: list[Candidate], plan: Plan, ctx) -> bool:
    """The op goes before the first statistic it replaces; a target (or smoothing weight)
    computed later, e.g. ``y.flatten()`` written after an entropy term, is moved up to
    it when it is pure code that nothing in between mutates. Else a near-miss."""
    first = min((c.node for c in group), key=_order(g))
    pos = {n: i for i, n in enumerate(g.nodes)}
    target = plan.target[1] if isinstance(plan.target, tuple) else plan.target
    operands = [target] + ([plan.smooth[1]] if plan.smooth and isinstance(plan.smooth[1], fx.Node) else [])
    late: set = set()

    def collect(n) -> bool:
        if not isinstance(n, fx.Node) or pos[n] < pos[first] or n in late:
            return True
        if n.op not in ("call_function", "call_method") or mutates(n):
            return False
        late.add(n)
        return all(collect(a) for a in n.all_input_nodes)

    if all(collect(o) for o in operands):
        last = max((pos[n] for n in late), default=-1)
        if not any(mutates(n) for n in g.nodes if pos[first] <= pos[n] <= last and n not in late):
            for n in sorted(late, key=pos.get):
                first.prepend(n)
            return True
    for c in group:
        ctx.near_miss("cross_entropy+entropy", c.node, "the target is computed after a statistic that needs it, by "
                                                       "code that cannot be moved up")
    return False


def _strip_views(node):
    while isinstance(node, fx.Node) and _is(node, _VIEWS | {"unsqueeze", "squeeze"}):
        node = node.args[0]
    return node


def _vocab_closure(ev: Evaluator, nodes) -> set:
    out = set()
    stack = [n for n in nodes if isinstance(n, fx.Node)]
    while stack:
        n = stack.pop()
        if n in out or not isinstance(ev.memo.get(n), Vocab):
            continue
        out.add(n)
        stack.extend(a for a in n.all_input_nodes)
    return out


def _rewrite(gm: fx.GraphModule, root: Root, group: list[Candidate], plan: Plan, ctx) -> None:
    g = gm.graph
    first = min((c.node for c in group), key=_order(g))
    logits = root.base
    shp = _shape(logits)
    ce = plan.ce
    # the (N, C, d...) layout keeps the loss input as its root; class-last roots may be views
    class_dim = ce.ce["class_dim"] if ce is not None and ce.root.base is ce.node.args[0] else len(shp) - 1
    V = shp[class_dim]
    chunk = fleet.loss_chunk(torch.device(ctx.profile.device_type), V if isinstance(V, int) else None, profile=ctx.profile)
    with g.inserting_before(first):
        target = plan.target
        if isinstance(target, tuple):  # an index of shape (..., 1)
            target = g.call_method("squeeze", (target[1], -1))
        stats_kw = {"class_dim": class_dim, "smooth_eps": plan.smooth[0] if plan.smooth else None,
                    "smooth_weight": plan.smooth[1] if plan.smooth else None}
        if any(c.row is not None and c.row.nan != (None, None) for c in group):
            stats_kw["zmin"] = True  # the rows where eager's spelling is NaN (losses.row_statistic)
        stats = g.call_function(
            losses.row_stats,
            (logits, target, plan.alpha, plan.ignore_index, plan.extras, chunk),
            stats_kw,
        )
    views_cache: dict = {}
    for c in group:
        with g.inserting_before(c.node):
            if c.kind == "ce":
                new = g.call_function(
                    losses.cross_entropy_from_stats,
                    (stats, logits, c.ce["target"], c.ce["weight"], c.ce["ignore_index"], c.ce["reduction"],
                     c.ce["label_smoothing"], _dtype(c.node), class_dim),
                )
            else:
                like = _viewed(g, c.root, views_cache)
                coefs = tuple(sorted((k, v.encode() if isinstance(v, VPoly) else v) for k, v in c.row.coefs.items()))
                out_dtype = _dtype(c.node) if c.kind == "row" else torch.float32
                nan_kw = {"nan": c.row.nan} if c.row.nan != (None, None) else {}
                new = g.call_function(losses.row_statistic, (stats, like, coefs, c.row.keepdim, plan.alpha, out_dtype),
                                      nan_kw)
                if c.kind == "kl":
                    new = g.call_function(losses.kl_div_reduce, (new, like, c.kl_reduction, _dtype(c.node)))
        graph.copy_meta(new, c.node, values=True)
        c.node.replace_all_uses_with(new)
        g.erase_node(c.node)
        ctx.match(
            _pattern_name(c), [c.node, stats], alpha=plan.alpha, extras=plan.extras, chunk=chunk,
            statistics=sorted(c.row.coefs) if c.row else ["nll"],
        )
        plan.vocab.add(new)  # a replacement nobody reads (e.g. a logsumexp inside an entropy)
    ctx.strategy(**{k: v for k, v in fleet.strategy(FAMILY, ctx.profile).items() if k != "why"})
    # shape queries (x.size(-1)) of the intermediates read the logits' (equal) shape instead
    for v in plan.vocab:
        for u in list(v.users):
            if _is(u, _SHAPE_ONLY) and _shape(v) is not None:
                like = _viewed(g, root, views_cache) if shapes.known_equal(_shape(_viewed(g, root, views_cache)), _shape(v)) else None
                if like is not None:
                    u.replace_input_with(v, like)
    _drop_dead(g, plan.vocab)


def _viewed(g: fx.Graph, root: Root, cache: dict) -> fx.Node:
    """The root's views re-applied to its (pre-cast) base: free views, no N x V data."""
    if root.views in cache:
        return cache[root.views]
    cur = root.base
    for target, args, kwargs in root.views:
        if isinstance(target, str):
            cur = g.call_method(target, (cur, *args), dict(kwargs))
        else:
            cur = g.call_function(target, (cur, *args), dict(kwargs))
    cache[root.views] = cur
    return cur


def _order(g: fx.Graph):
    pos = {n: i for i, n in enumerate(g.nodes)}
    return lambda n: pos[n]


def _pattern_name(c: Candidate) -> str:
    if c.kind == "ce":
        t = _target_of(c.node)
        if t in _NLL:
            return "nll_loss(log_softmax)"
        return "cross_entropy" + ("(label_smoothing)" if c.ce["label_smoothing"] else "")
    if c.kind == "kl":
        return "kl_div"
    keys = set(c.row.coefs)
    if keys & {"plogm", "ulogm"}:
        return "ger_mixture_term"
    if "ez" in keys:
        return "entropy"
    if "zy" in keys:
        return "target_log_prob"
    if "zsum" in keys:
        return "sum_log_probs"
    return "row_statistic"


def _drop_dead(g: fx.Graph, vocab: set) -> None:
    """Remove the N x V intermediates the rewrite left without users."""
    removed = True
    while removed:
        removed = False
        for n in reversed(list(g.nodes)):
            if n in vocab and not n.users:
                g.erase_node(n)
                vocab.discard(n)
                removed = True
