"""Evaluation: the symbolic value (passes/loss_entropy/algebra.py) of each graph node
derived from a logits tensor, by op spelling (log_softmax, softmax, exp, log, products,
sums, means, clamps, gather, logsumexp, F.cross_entropy / nll_loss / kl_div, ...).
Anything outside the algebra raises :class:`NotRepresentable` with the reason that
becomes the near-miss.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import torch
import torch.fx as fx

from ... import _compat, shapes
from ..graph import (
    CASTS as _CASTS, VIEWS as _VIEWS, arg as _arg, dtype as _dtype, is_op as _is, shape as _shape,
    target_of as _target_of, val as _val,
)
from .algebra import (
    TWO_DISTRIBUTIONS_HINT, NotRepresentable, Root, Row, VPoly, Vocab, add_coef, coef_eq, join_nan, log_softmax, lse_row, probs, scale_coef,
    vadd, vscale,
)


# ----------------------------------------------------------------------------- op spellings
LOG_SOFTMAX = {torch.log_softmax, torch.nn.functional.log_softmax, torch.special.log_softmax, "log_softmax"}
SOFTMAX = {torch.softmax, torch.nn.functional.softmax, torch.special.softmax, "softmax"}
EXP = {torch.exp, "exp"}
LOG = {torch.log, "log"}
SUM = {torch.sum, "sum"}
MEAN = {torch.mean, "mean"}
LOGSUMEXP = {torch.logsumexp, "logsumexp", torch.special.logsumexp}
GATHER = {torch.gather, "gather"}
STACK = {torch.stack, "stack"}
CLAMP = {torch.clamp, torch.clip, "clamp", "clip"}
ENTR = {torch.special.entr, "entr"}
XLOGY = {torch.xlogy, torch.special.xlogy, "xlogy"}
NEG = {operator.neg, torch.neg, "neg"}
MUL = {operator.mul, torch.mul, "mul"}
ADD = {operator.add, torch.add, "add"}
SUB = {operator.sub, torch.sub, "sub"}
DIV = {operator.truediv, torch.div, torch.true_divide, "div", "true_divide"}
CE = {torch.nn.functional.cross_entropy}
NLL = {torch.nn.functional.nll_loss}
KL = {torch.nn.functional.kl_div}
ONES_LIKE = {torch.ones_like, "new_ones"}
FULL_LIKE = {torch.full_like, "new_full"}

if _compat.special_entr_c_function() is not None:  # Dynamo records torch.special.entr by its C name
    ENTR.add(_compat.special_entr_c_function())


def _static_classes(root: Root) -> int:
    """The number of classes where the user's constants must be compared with it (the
    GER mixture (1 - alpha)/V): it must be static. Sums and means over the classes take
    a symbolic V (``_classes``)."""
    V = _shape(root.base)[-1]
    if not isinstance(V, int):
        raise NotRepresentable(STATIC_CLASSES_REASON)
    return V


#: the near-miss of a constant the user computes from a symbolic size (1 / V, log V)
#: a view after log_softmax / softmax that changes the rows (fairseq's ``lprobs.view(-1, V)``)
ROW_VIEW_REASON = ("a view of the log-probabilities that changes their rows (e.g. lprobs.view(-1, V)): the "
                   "statistics keep the rows of the logits; view the logits before the softmax instead")


def changes_rows(n: fx.Node) -> bool:
    """A view (classes kept last) whose rows differ from its input's: the single-root
    statistics, shaped by the logits' rows, would keep the rows before it (a (B, T)
    result where eager's is (B * T,), a (B, 1, 1) one broadcast into (B, B, 1): a wrong
    loss; review, stop 38)."""
    if not _is(n, _VIEWS) or not n.args or not isinstance(n.args[0], fx.Node):
        return False
    a, b = _shape(n), _shape(n.args[0])
    return a is None or b is None or not shapes.known_equal(tuple(a), tuple(b))
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


def class_dim_ok(node: fx.Node, dim, ndim: int) -> bool:
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
        if not (_is(x, SUB | ADD)):
            return None
        try:
            v = self.value(x)
        except NotRepresentable:
            return None
        if isinstance(v, Vocab) and set(v.terms) <= {"z", "one"} and coef_eq(v.terms.get("z"), 1.0):
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
        if t in LOG_SOFTMAX or t in SOFTMAX:
            x = n.args[0]
            dim = _arg(n, 1, "dim")
            shp = _shape(x)
            if shp is None or not class_dim_ok(n, dim, len(shp)):
                raise NotRepresentable("softmax over a dimension other than the last (classes)")
            if _arg(n, 2, "dtype") not in (None, torch.float32):
                raise NotRepresentable("softmax with a dtype other than float32")
            if _arg(n, 2, "dtype") is not None and _dtype(x) == torch.float64:
                # eager casts the logits down first (1e39 becomes inf: a NaN row)
                raise NotRepresentable("softmax(dtype=float32) of float64 logits (a cast to lower precision)")
            root = self._shifted_root(x) or self.root_of(x)
            return log_softmax(root) if t in LOG_SOFTMAX else probs(root)
        if t in LOGSUMEXP:
            x = n.args[0]
            shp = _shape(x)
            if shp is None or not class_dim_ok(n, _arg(n, 1, "dim"), len(shp)):
                raise NotRepresentable("logsumexp over a dimension other than the classes")
            return Row(self.root_of(x), {"L": 1.0}, keepdim=bool(_arg(n, 2, "keepdim", False)), lse_inf=True)
        if t in EXP:
            v = self.value(n.args[0])
            if isinstance(v, Vocab) and v.is_(z=1.0, one=lse_row(v.root, -1.0)):
                return probs(v.root)
            raise NotRepresentable("exp of something other than log-probabilities")
        if t in LOG:
            v = self.value(n.args[0])
            if isinstance(v, Vocab):
                if v.is_(p=1.0):
                    # -inf where p is 0 (unless clamped)
                    return dataclasses.replace(log_softmax(v.root, inf=v.inf), clamped=v.clamped)
                c = v.terms.get("one")
                if set(v.terms) == {"one"} and isinstance(c, float) and c > 0:
                    return Vocab(v.root, {"one": math.log(c)})  # log of a constant, e.g. u = 1/V
                return self._log_mixture(v)
            if isinstance(v, float) and v > 0:
                return math.log(v)
            raise NotRepresentable("log of an expression that is not a probability")
        if t in CLAMP:
            v = self.value(n.args[0])
            lo, hi = _arg(n, 1, "min"), _arg(n, 2, "max")
            tiny = torch.finfo(_dtype(n) or torch.float32)
            # Categorical's clamp(min=finfo.min) of log-probabilities changes no finite value
            # (inside p * (...) only: ``Vocab.clamped``)
            if isinstance(v, Vocab) and hi is None and isinstance(lo, float) and lo <= tiny.min:
                # -inf becomes finite
                return dataclasses.replace(v, inf=None, clamped=True) if lo > -math.inf else v
            if isinstance(v, Vocab) and v.is_(p=1.0) and hi is None and isinstance(lo, float) and lo <= tiny.tiny:
                # clamp(p, min=eps) only changes probabilities below the smallest normal
                return dataclasses.replace(v, inf=None, clamped=True) if lo > 0 else v
            raise NotRepresentable("clamp that can change the log-probabilities")
        if t in ENTR:
            v = self.value(n.args[0])
            if isinstance(v, Vocab) and v.clamped:
                raise NotRepresentable("entr of a clamped probability: the clamp changes the entries it reads")
            if isinstance(v, Vocab) and v.is_(p=1.0):  # entr(p) = -p log p = -p z + p L
                # entr(0) = 0, but its gradient -(1 + log 0) makes the row's gradient NaN
                return Vocab(v.root, {"pz": -1.0, "p": lse_row(v.root, 1.0)}, nan=(None, v.inf))
            raise NotRepresentable("entr of something other than probabilities")
        if t in XLOGY:
            a, b = self.value(n.args[0]), self.value(n.args[1])
            if any(isinstance(v, Vocab) and v.clamped for v in (a, b)):
                raise NotRepresentable("xlogy of a clamped probability: the clamp changes the entries it reads")
            if isinstance(a, Vocab) and isinstance(b, Vocab) and a.is_(p=1.0) and b.is_(p=1.0) and a.root == b.root:
                if a.inf != b.inf:
                    raise NotRepresentable("xlogy of a clamped and an unclamped probability")
                # xlogy(0, 0) = 0, but its gradient 0 / 0 makes the row's gradient NaN
                return Vocab(a.root, {"pz": 1.0, "p": lse_row(a.root, -1.0)}, nan=(None, a.inf))
            raise NotRepresentable("xlogy of something other than (p, p)")
        if t in NEG:
            return self._scale(self.value(n.args[0]), -1.0)
        if t in ADD or t in SUB:
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
            return self._add(va, vb, -1.0 if t in SUB else 1.0)
        if t in MUL:
            return self._mul(*self._with_raw_logits(n.args[0], n.args[1]))
        if t in DIV:
            if n.kwargs.get("rounding_mode") is not None:
                raise NotRepresentable("division with a rounding mode")
            a, b = self.value(n.args[0]), self.value(n.args[1])
            if isinstance(b, float) and b != 0:
                return self._scale(a, 1.0 / b)
            raise NotRepresentable("division by a tensor")
        if t in ONES_LIKE or t in FULL_LIKE:
            like = n.args[0]
            shp = _shape(n)
            fill = 1.0 if t in ONES_LIKE else _arg(n, 1, "fill_value")
            if isinstance(_val(fill), (torch.SymInt, torch.SymFloat)):
                raise NotRepresentable(SYMBOLIC_SCALAR_REASON)
            if not isinstance(fill, (int, float)) or shp is None:
                raise NotRepresentable("a constant tensor with an unknown value")
            v = self.value(like)
            if not isinstance(v, Vocab) or not shapes.known_equal(shp, _shape(like)):
                raise NotRepresentable("a constant not shaped like the logits")
            return Vocab(v.root, {"one": float(fill)})
        if t in _VIEWS or t in _CASTS:
            v = self.value(n.args[0])
            if isinstance(v, Vocab) and _shape(n) and _shape(n.args[0]) and shapes.known_equal(_shape(n)[-1], _shape(n.args[0])[-1]):
                if t in _CASTS and not self._is_upcast(n):
                    raise NotRepresentable("a cast to lower precision")
                # (a view that changes the rows is refused by the single-root rewrite's plan,
                # ``changes_rows``; the two-distribution rewrite shapes its terms by it)
                return v
            if isinstance(v, Row) and t in _CASTS and self._is_upcast(n):
                return v
            raise NotRepresentable("a view that moves the classes")
        raise NotRepresentable(f"{t if isinstance(t, str) else getattr(t, '__name__', t)} is not part of a GER loss")

    def _with_raw_logits(self, a, b) -> tuple:
        """The values of a product's operands, where one may be the logits themselves beside
        a term of them (``softmax(z) * z``, verl's entropy): z, -inf where a logit is."""
        vals = []
        for x in (a, b):
            try:
                vals.append(self.value(x))
            except NotRepresentable as e:
                vals.append(e)
        for i in (0, 1):
            x, other = (a, b)[i], vals[1 - i]
            if isinstance(vals[i], NotRepresentable) and isinstance(other, Vocab) and isinstance(x, fx.Node) \
                    and self.root_of(x) == other.root and shapes.known_equal(_shape(x), _shape((b, a)[i])):
                vals[i] = Vocab(other.root, {"z": 1.0}, inf="zinf")
        for v in vals:
            if isinstance(v, NotRepresentable):
                raise v
        return tuple(vals)

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
            return vscale(v, s)
        if isinstance(v, Row):
            return v.scaled(s)
        if isinstance(v, float):
            return v * s
        raise NotRepresentable("scaling of an unsupported value")

    def _add(self, a, b, sign: float):
        if isinstance(a, Vocab) and isinstance(b, Vocab):
            return vadd(a, b, sign)
        if isinstance(a, float) and isinstance(b, float):
            return a + sign * b
        if isinstance(a, Vocab) and isinstance(b, Row) and b.keepdim and b.root == a.root:
            # z - logsumexp(z, keepdim=True): a per-row term broadcast over the classes
            return vadd(a, Vocab(a.root, {"one": b.scaled(sign)}))
        if isinstance(a, Vocab) and isinstance(b, float):
            return vadd(a, Vocab(a.root, {"one": sign * b}))
        if isinstance(a, float) and isinstance(b, Vocab):
            return vadd(Vocab(b.root, {"one": a}), b, sign)
        raise NotRepresentable("sum of a vocabulary-level and an unrelated tensor")

    def _mul(self, a, b):
        if isinstance(a, float):
            return self._scale(b, a)
        if isinstance(b, float):
            return self._scale(a, b)
        if isinstance(a, Vocab) and isinstance(b, Vocab):
            if a.root != b.root:
                raise NotRepresentable("product of two different logits tensors" + TWO_DISTRIBUTIONS_HINT)
            for x, y in ((a, b), (b, a)):
                if x.is_(one=x.terms.get("one")) and isinstance(x.terms.get("one"), float):
                    return vscale(y, x.terms["one"])  # a constant (e.g. u = 1/V) times y
            for x, y in ((a, b), (b, a)):
                pc = x.terms.get("p")
                if set(x.terms) <= {"p", "one"} and isinstance(pc, float):
                    if x.clamped:  # clamp(p, min=tiny) holds tiny where eager's p is 0
                        raise NotRepresentable("a clamped probability as the factor p of a product: the clamp "
                                               "changes the entries it multiplies")
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
                out["p"] = add_coef(out.get("p", 0.0), scale_coef(c, pc))
            elif k == "logm":
                out["plogm"] = out.get("plogm", 0.0) + pc * c
            else:
                raise NotRepresentable("a product of probabilities (not an entropy term)")
        # p * y is NaN eagerly where p = 0 and y = -inf (0 * -inf): y's -inf rows
        # (also where y's z terms cancelled or were scaled by 0: lp - lp.clamp(min=finfo.min)
        # or 0 * lp is still -inf (or NaN) there eagerly, and p * it NaN)
        cond = y.inf
        return Vocab(y.root, out, y.alpha, None, join_nan(y.nan, (cond, cond)))

    # ---- reductions over the classes
    def reduce(self, v: Vocab, mean: bool, keepdim: bool) -> Row:
        """Sum (or mean) over the classes: sum_j z_j = zsum, sum_j 1 = V, sum_j p_j = 1, ..."""
        coefs: dict[str, float] = {}
        refuse_log_of_probabilities(v, "a sum over the classes")

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
        return Row(v.root, {k: c for k, c in coefs.items() if c != 0.0}, keepdim=keepdim, alpha=v.alpha, nan=v.nan,
                   lse_inf=v.lse_inf)


def refuse_log_of_probabilities(v, what: str) -> None:
    """log(softmax(z)) itself (not times p) read by ``what``: eagerly -inf where a
    probability underflows to 0 (and its gradient NaN), which log_softmax's statistics
    do not reproduce."""
    if isinstance(v, Vocab) and v.inf == "p0" and "z" in v.terms and v.terms["z"] != 0.0:
        raise NotRepresentable(f"log(softmax(...)) read by {what}: eagerly -inf where a probability underflows to 0; "
                               "written with log_softmax it is rewritten")
    if isinstance(v, Vocab) and v.clamped:
        raise NotRepresentable(f"a clamped (log-)probability read by {what}: the clamp changes the entries it "
                               "reads (log(tiny) or finfo.min where eager's are smaller or -inf); only a product "
                               "with p hides it")


