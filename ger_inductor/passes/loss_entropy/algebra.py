"""The algebra of the loss family, with no FX in it: symbolic values of tensors derived
from one logits tensor z (classes last).

- :class:`Vocab`: a per-element linear combination of the vocabulary terms
  z_j, 1, p_j, p_j z_j, log m_j, p_j log m_j (m = alpha p + (1 - alpha) / V), whose
  coefficients are numbers, :class:`VPoly` (polynomials in a symbolic V) or per-row
  :class:`Row` values;
- :class:`Row`: a per-row linear combination of row statistics
  (L = logsumexp z, z_y, sum z, E_p[z], sum p log m, sum u log m);
- the operations the evaluator needs on them (add, scale, join of the -inf / NaN tags).

``Root`` names the logits tensor (its graph node is an opaque key here). Unit-tested
against numeric evaluation in tests/test_loss_algebra.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the algebra has no FX in it
    import torch.fx as fx


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
    # L is torch.logsumexp's (+-inf on a row whose max is +-inf), not log_softmax's (NaN
    # there): a logsumexp spelled in the user's code (losses.row_stats(lse_inf=))
    lse_inf: bool = False

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
    # ``clamped``: a clamp was read as changing nothing (clamp(p, min<=tiny), a
    # log-probability's clamp(min=finfo.min)): true only where the value is then
    # multiplied by p (p log p, Categorical's entropy); read directly (a gather, a sum
    # over the classes) the clamped entries differ (log(tiny) = -87.3, finfo.min vs -inf)
    clamped: bool = False

    def is_(self, **expect) -> bool:
        return set(self.terms) == set(expect) and all(coef_eq(self.terms[k], v) for k, v in expect.items())

    @property
    def lse_inf(self) -> bool:
        """Whether its per-row term holds an L of torch.logsumexp's (``Row.lse_inf``):
        ``z - logsumexp(z, keepdim=True)``."""
        return any(isinstance(c, Row) and c.lse_inf for c in self.terms.values())


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


def coef_eq(a, b) -> bool:
    if isinstance(a, Row) and isinstance(b, Row):
        return a.coefs == b.coefs and a.root == b.root
    if isinstance(a, VPoly) or isinstance(b, VPoly):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return False


def lse_row(root: Root, c: float = 1.0) -> Row:
    return Row(root, {"L": c})


def log_softmax(root: Root, inf: str | None = "zinf") -> Vocab:
    return Vocab(root, {"z": 1.0, "one": lse_row(root, -1.0)}, inf=inf)


def probs(root: Root) -> Vocab:
    return Vocab(root, {"p": 1.0}, inf="p0")


def scale_coef(c, s: float):
    return c.scaled(s) if isinstance(c, Row) else c * s


def add_coef(a, b):
    if isinstance(a, Row) or isinstance(b, Row):
        ra = a if isinstance(a, Row) else None
        rb = b if isinstance(b, Row) else None
        if (ra is None and a != 0.0) or (rb is None and b != 0.0):
            # a constant plus a per-row value: keep as a Row with a "one" statistic
            base = ra or rb
            other = b if ra is not None else a
            return Row(base.root, {**base.coefs, "one": base.coefs.get("one", 0.0) + other}, lse_inf=base.lse_inf)
        if ra is None:
            return rb
        if rb is None:
            return ra
        if ra.lse_inf != rb.lse_inf and "L" in ra.coefs and "L" in rb.coefs:
            # log_softmax's L (NaN on a row whose max is +-inf) and torch.logsumexp's (+-inf)
            # in one term: neither convention is eager's on such rows
            raise NotRepresentable("log-probabilities of log_softmax and of z - logsumexp(z) combined in one term")
        coefs = dict(ra.coefs)
        for k, v in rb.coefs.items():
            coefs[k] = coefs.get(k, 0.0) + v
        return Row(ra.root, coefs, lse_inf=ra.lse_inf or rb.lse_inf)
    return a + b


_INF_ORDER = {None: 0, "zinf": 1, "p0": 2}  # "p0" rows include the "zinf" rows


def _join_inf(a, b):
    return a if _INF_ORDER[a] >= _INF_ORDER[b] else b


def join_nan(a: tuple, b: tuple) -> tuple:
    return tuple(_join_inf(x, y) for x, y in zip(a, b))


#: appended to the near-misses of expressions of two logits tensors
TWO_DISTRIBUTIONS_HINT = (
    ": a divergence between two distributions (distillation, a KL to a reference policy) is rewritten in user code "
    "only where it is exactly one KL divergence (docs/patterns.md); ger_distill_loss / ger_linear_distill_loss compute "
    "KL, the generalized JSD and the skew-Jensen fused")


def vadd(a: Vocab, b: Vocab, sign: float = 1.0) -> Vocab:
    if a.root != b.root:
        raise NotRepresentable("combines two different logits tensors" + TWO_DISTRIBUTIONS_HINT)
    if a.alpha is not None and b.alpha is not None and a.alpha != b.alpha:
        raise NotRepresentable("two different mixtures")
    za, zb = a.terms.get("z", 0.0), b.terms.get("z", 0.0)
    if a.inf is not None and b.inf is not None and isinstance(za, float) and isinstance(zb, float) \
            and za * sign * zb < 0:
        # both -inf where a logit is -inf, combined with opposite signs: eagerly
        # -inf - (-inf) = NaN there (also where the z terms cancel), which the row
        # statistics do not show
        raise NotRepresentable("a difference of two -inf-carrying terms of the same logits (log-probabilities): "
                               "eagerly NaN where a logit is -inf")
    terms = dict(a.terms)
    for k, v in b.terms.items():
        terms[k] = add_coef(terms.get(k, 0.0), scale_coef(v, sign))
    return Vocab(a.root, terms, a.alpha if a.alpha is not None else b.alpha, _join_inf(a.inf, b.inf),
                 join_nan(a.nan, b.nan), a.clamped or b.clamped)


def vscale(a: Vocab, s: float) -> Vocab:
    return Vocab(a.root, {k: scale_coef(v, s) for k, v in a.terms.items()}, a.alpha, a.inf, a.nan, a.clamped)


