"""The GER loss family: ``ger_loss`` / ``GERLoss`` and the plain-torch reference.

Generalized Entropy Regularization (Meister, Salesky & Cotterell, ACL 2020): per
position, with p = softmax(logits), target y and a baseline distribution u,

    loss = -log p_y + beta * J_alpha(p || u)

where J_alpha is the skew-Jensen divergence; alpha = 0 is the confidence penalty
(KL(p||u)), alpha = 1 the label-smoothing type (KL(u||p)). See docs/ger.md and
../shared/ger-math.md. ``label_smoothing=eps`` reproduces
``F.cross_entropy(label_smoothing=eps)`` exactly (alpha = 1, beta = eps / (1 - eps)),
also with class weights and ignore_index.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from .ops import ger_loss as _op

REDUCTIONS = ("mean", "sum", "none")
LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: |sum(base) - 1| allowed, relative to float32 rounding of a V-term sum
BASE_SUM_TOL = 1e-4


class GERLossOutput(NamedTuple):
    """``ger_loss(..., return_extras=True)``: the loss and two by-products.

    entropy: mean H(p) over non-ignored positions (a scalar; NaN if all are ignored).
    lse:     log-sum-exp of the logits per position (target's shape), for a z-loss.
    Both are differentiable.
    """

    loss: Tensor
    entropy: Tensor
    lse: Tensor


# ----------------------------------------------------------------------------- validation
def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _runtime_check(cond: Tensor, message: str) -> None:
    """A data-dependent check: raises ValueError eagerly, an async assert when compiled."""
    if _is_compiling():
        torch._assert_async(cond, message)
    elif not bool(cond):
        raise ValueError(message)


def _check_number(name: str, value, lo: float, hi: float | None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"ger_loss: {name} must be a Python float, got {type(value).__name__}")
    v = float(value)
    if not (v >= lo and (hi is None or v <= hi)):  # also rejects NaN
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"ger_loss: {name} must be in {rng}, got {value}")
    return v


def _class_dim(logits: Tensor, target: Tensor, class_dim: int | None) -> int:
    nd = logits.dim()
    if nd == 0:
        raise ValueError("ger_loss: logits must have at least 1 dimension (the classes)")
    if class_dim is not None:
        if not isinstance(class_dim, int) or isinstance(class_dim, bool):
            raise TypeError("ger_loss: class_dim must be an int")
        cd = class_dim % nd if -nd <= class_dim < nd else None
        if cd is None:
            raise ValueError(f"ger_loss: class_dim={class_dim} out of range for {nd}-d logits")
        return cd
    if nd <= 2:
        return nd - 1
    shape = tuple(logits.shape)
    tshape = tuple(target.shape)
    last_ok = tshape == shape[:-1]
    torch_ok = tshape == shape[:1] + shape[2:]
    if last_ok and torch_ok:
        raise ValueError(
            f"ger_loss: logits {list(shape)} with target {list(tshape)} is ambiguous: the classes may be "
            "dim 1 (F.cross_entropy's layout) or the last dim; pass class_dim"
        )
    if last_ok:
        return nd - 1
    if torch_ok:
        return 1
    raise ValueError(
        f"ger_loss: target shape {list(tshape)} does not match logits {list(shape)}: expected "
        f"{list(shape[:-1])} (classes last) or {list(shape[:1] + shape[2:])} (classes in dim 1)"
    )


def _as_rows(logits: Tensor, target: Tensor, class_dim: int | None) -> tuple[Tensor, Tensor]:
    """View logits as (A, V, D) and target as (A, D), D = product of dims after the classes."""
    cd = _class_dim(logits, target, class_dim)
    V = logits.shape[cd]
    expected_t = tuple(logits.shape[:cd]) + tuple(logits.shape[cd + 1 :])
    if tuple(target.shape) != expected_t:
        raise ValueError(
            f"ger_loss: target shape {list(target.shape)} does not match logits {list(logits.shape)} "
            f"with classes in dim {cd} (expected {list(expected_t)})"
        )
    A = math.prod(logits.shape[:cd])
    D = math.prod(logits.shape[cd + 1 :])
    return logits.reshape(A, V, D), target.reshape(A, D)


def _check_distribution(name: str, t: Tensor, V: int, logits: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"ger_loss: {name} must be a tensor of shape ({V},)")
    if t.dim() != 1 or t.shape[0] != V:
        raise ValueError(f"ger_loss: {name} must have shape ({V},) (one entry per class), got {list(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"ger_loss: {name} must be floating point, got {t.dtype}")
    if t.device != logits.device:
        raise ValueError(f"ger_loss: {name} is on {t.device} but logits are on {logits.device}")


class LossParams(NamedTuple):
    """Checked loss arguments: alpha, beta, label-smoothing eps, the base u the regulariser
    compares with (None: uniform) and the smoothing scale/constant of ``combine_rows``."""

    alpha: float
    beta: float | Tensor | None
    eps: float | None
    u: Tensor | None
    smooth_scale: float | Tensor | None
    smooth_const: float | Tensor | None


def loss_params(logits: Tensor, target: Tensor, *, alpha, beta, base, ignore_index, weight, reduction,
                label_smoothing, V, who: str) -> LossParams:
    """Check ``ger_loss``'s arguments (``logits`` stands for whatever gives the dtype and
    device) and derive what the op and ``combine_rows`` need."""
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{who}: logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"{who}: target must hold class indices (an integer tensor), got {target.dtype}; "
            "soft targets are not supported"
        )
    if target.device != logits.device:
        raise ValueError(f"{who}: target is on {target.device} but logits are on {logits.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{who}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{who}: ignore_index must be an int")
    if label_smoothing is not None:
        if alpha is not None or beta is not None:
            raise ValueError(f"{who}: pass either label_smoothing or (alpha, beta), not both")
        eps = _check_number("label_smoothing", label_smoothing, 0.0, 1.0)
        alpha_f = 1.0
    else:
        if alpha is None or beta is None:
            raise TypeError(f"{who}: alpha and beta are required (or pass label_smoothing)")
        alpha_f = _check_number("alpha", alpha, 0.0, 1.0)
        eps = None
        if isinstance(beta, Tensor):
            if beta.dim() != 0 or not beta.is_floating_point():
                raise ValueError(f"{who}: a tensor beta must be a 0-d floating tensor, got shape {list(beta.shape)} {beta.dtype}")
            _runtime_check(beta >= 0, f"{who}: beta must be >= 0")
        else:
            beta = _check_number("beta", beta, 0.0, None)

    cdt = _op.compute_dtype(logits.dtype)
    if V == 0:
        raise ValueError(f"{who}: logits have 0 classes")
    if weight is not None:
        _check_distribution("weight", weight, V, logits)
    if base is not None:
        _check_distribution("base", base, V, logits)
        _runtime_check((base >= 0).all(), f"{who}: base must be a distribution: found a negative entry")
        _runtime_check(
            (base.to(torch.float64).sum() - 1).abs() <= BASE_SUM_TOL,
            f"{who}: base must sum to 1 (within {BASE_SUM_TOL})",
        )
        if alpha_f == 0.0:
            _runtime_check(
                (base > 0).all(),
                f"{who}: alpha=0 (confidence penalty, KL(p||u)) needs a base with no zero entry: KL is infinite there",
            )

    u, smooth_scale, smooth_const = _smoothing_target(eps, weight, base, V, cdt)
    return LossParams(alpha_f, beta, eps, u, smooth_scale, smooth_const)



# ----------------------------------------------------------------------------- the loss
def ger_loss(
    logits: Tensor,
    target: Tensor,
    *,
    alpha: float | None = None,
    beta: float | Tensor | None = None,
    base: Tensor | None = None,
    ignore_index: int = -100,
    weight: Tensor | None = None,
    reduction: str = "mean",
    label_smoothing: float | None = None,
    class_dim: int | None = None,
    return_extras: bool = False,
) -> Tensor | GERLossOutput:
    """Cross-entropy with Generalized Entropy Regularization.

    Args:
        logits: (N, V), (B, T, V) or (N, V, d1, ...) like ``F.cross_entropy``; fp32,
            bf16, fp16 (math in fp32) or fp64.
        target: class indices, the logits' shape without the class dimension.
        alpha: in [0, 1]; 0 = confidence penalty, 1 = label-smoothing type.
        beta: strength >= 0 (a float or a 0-d tensor).
        base: baseline distribution u over the V classes (uniform when None).
        ignore_index, weight, reduction: as in ``F.cross_entropy``; with ``weight``,
            each position's loss is scaled by the weight of its target class and
            'mean' divides by the sum of those weights.
        label_smoothing: eps instead of (alpha, beta): exactly
            ``F.cross_entropy(label_smoothing=eps)``, weights and ignore_index included.
        class_dim: where the classes are, when the shapes leave it ambiguous.
        return_extras: also return the mean entropy and the per-position log-sum-exp.

    >>> import torch
    >>> z, y = torch.randn(8, 100), torch.randint(0, 100, (8,))
    >>> a = ger_loss(z, y, label_smoothing=0.1)
    >>> torch.allclose(a, torch.nn.functional.cross_entropy(z, y, label_smoothing=0.1))
    True
    """
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise TypeError("ger_loss: logits and target must be tensors")
    logits3, target2 = _as_rows(logits, target, class_dim)
    A, V, D = logits3.shape
    p = loss_params(logits, target, alpha=alpha, beta=beta, base=base, ignore_index=ignore_index, weight=weight,
                    reduction=reduction, label_smoothing=label_smoothing, V=V, who="ger_loss")
    u, eps, beta = p.u, p.eps, p.beta
    log_u = None if u is None else torch.log(u)

    # ---- per-row statistics: one fused op (one read of the logits forward)
    # chunk=0: whole-row reductions; the ger backend sets the device profile's strategy
    nll, reg, lse, ent, _aux = torch.ops.ger.loss_fwd(logits3, target2, u, log_u, p.alpha, ignore_index, return_extras, 0)
    loss = combine_rows(
        nll, reg, target2, target.shape, beta=beta, eps=eps, smooth_scale=p.smooth_scale, smooth_const=p.smooth_const,
        weight=weight, ignore_index=ignore_index, reduction=reduction, out_dtype=logits.dtype,
    )
    if not return_extras:
        return loss
    valid = target2 != ignore_index
    n_valid = valid.sum().to(ent.dtype)
    entropy = torch.where(valid, ent, torch.zeros((), dtype=ent.dtype, device=ent.device)).sum() / n_valid
    return GERLossOutput(loss, entropy, lse.reshape(target.shape))


def _log_classes(V):
    """log V; for a symbolic V (dynamic shapes) a traced value, not a specialisation."""
    if isinstance(V, int):
        return math.log(V)
    return torch.log(torch.scalar_tensor(V, dtype=torch.float64))


def _smoothing_target(eps, weight, base, V, cdt):
    """For label smoothing: (u~, eps * sum_j w_j u_j, H(u~)), the base the regulariser
    compares with when F.cross_entropy weights the smoothing term per class (u~ = w u /
    sum w u); (base, None, None) otherwise."""
    if eps is None:
        return (None if base is None else base.to(cdt)), None, None
    if weight is None and base is None:
        return None, eps, _log_classes(V)
    wu = (weight.to(cdt) if weight is not None else 1.0) * (base.to(cdt) if base is not None else 1.0 / V)
    c = wu.sum()
    u = wu / c
    return u, eps * c, -torch.special.xlogy(u, u).sum()


def combine_rows(nll, reg, target2, target_shape, *, beta, eps, smooth_scale, smooth_const, weight, ignore_index,
                 reduction, out_dtype):
    """The loss from the op's per-row statistics: weights, ignore_index and the reduction,
    with F.cross_entropy's conventions. O(rows) work."""
    cdt = nll.dtype
    valid = target2 != ignore_index
    wy = None
    if weight is not None:
        wy = weight.to(cdt)[torch.where(valid, target2, torch.zeros_like(target2))]
    if eps is not None:
        data = nll * (1.0 - eps) if wy is None else (1.0 - eps) * wy * nll
        per = data + smooth_scale * (reg + smooth_const)
    else:
        use_reg = isinstance(beta, Tensor) or beta != 0.0
        per = nll + beta * reg if use_reg else nll
        if wy is not None:
            per = wy * per
    zero = torch.zeros((), dtype=per.dtype, device=per.device)
    per = torch.where(valid, per, zero)
    if reduction == "none":
        loss = per.reshape(target_shape)
    elif reduction == "sum":
        loss = per.sum()
    else:
        denom = valid.sum().to(per.dtype) if wy is None else torch.where(valid, wy, zero).sum()
        loss = per.sum() / denom
    return loss.to(out_dtype)


class GERLoss(nn.Module):
    """Module form of :func:`ger_loss` (same arguments).

    >>> import torch
    >>> crit = GERLoss(alpha=0.5, beta=0.7)
    >>> loss = crit(torch.randn(4, 10, requires_grad=True), torch.tensor([1, 2, 3, -100]))
    >>> loss.backward()
    """

    def __init__(
        self,
        *,
        alpha: float | None = None,
        beta: float | None = None,
        base: Tensor | None = None,
        ignore_index: int = -100,
        weight: Tensor | None = None,
        reduction: str = "mean",
        label_smoothing: float | None = None,
        class_dim: int | None = None,
        return_extras: bool = False,
    ):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"GERLoss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.alpha, self.beta = alpha, beta
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.class_dim, self.return_extras = label_smoothing, class_dim, return_extras
        self.register_buffer("base", base)
        self.register_buffer("weight", weight)

    def forward(self, logits: Tensor, target: Tensor):
        return ger_loss(
            logits, target, alpha=self.alpha, beta=self.beta, base=self.base, ignore_index=self.ignore_index,
            weight=self.weight, reduction=self.reduction, label_smoothing=self.label_smoothing,
            class_dim=self.class_dim, return_extras=self.return_extras,
        )

    def extra_repr(self) -> str:
        if self.label_smoothing is not None:
            return f"label_smoothing={self.label_smoothing}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"
        return f"alpha={self.alpha}, beta={self.beta}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"


# ----------------------------------------------------------------------------- reference
def ger_loss_reference(
    logits: Tensor,
    target: Tensor,
    *,
    alpha: float | None = None,
    beta: float | Tensor | None = None,
    base: Tensor | None = None,
    ignore_index: int = -100,
    weight: Tensor | None = None,
    reduction: str = "mean",
    label_smoothing: float | None = None,
    class_dim: int | None = None,
) -> Tensor:
    """The same loss in plain torch, straight from the definitions (the test oracle).

    J_alpha is computed from its definition [alpha G(p) + (1-alpha) G(u) - G(m)] /
    (alpha (1-alpha)) with G(q) = sum q log q (closed forms at alpha in {0, 1}), and
    label smoothing as the cross-entropy with the soft target (1-eps) onehot + eps u,
    weighted per class like F.cross_entropy. Materialises several N x V tensors; run
    it in float64 for reference-grade numbers.
    """
    cd = _class_dim(logits, target, class_dim)
    z = logits.movedim(cd, -1)
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = z.to(dt).reshape(-1, z.shape[-1])
    y = target.reshape(-1)
    V = z.shape[-1]
    lp = torch.log_softmax(z, -1)
    p = lp.exp()
    u = torch.full((V,), 1.0 / V, dtype=dt, device=z.device) if base is None else base.to(dt)
    valid = y != ignore_index
    ys = torch.where(valid, y, torch.zeros_like(y))
    nll = -lp.gather(1, ys[:, None])[:, 0]
    w = weight.to(dt) if weight is not None else torch.ones(V, dtype=dt, device=z.device)
    wy = w[ys]

    def G(q):
        return torch.special.xlogy(q, q).sum(-1)

    if label_smoothing is not None:
        eps = float(label_smoothing)
        q = (1 - eps) * torch.nn.functional.one_hot(ys, V).to(dt) + eps * u
        per = -(w * q * lp).sum(-1)
    else:
        a = float(alpha)
        if a == 0.0:
            J = (p * (lp - torch.log(u))).sum(-1)
        elif a == 1.0:
            J = (torch.special.xlogy(u, u) - u * lp).sum(-1)
        else:
            m = a * p + (1 - a) * u
            J = (a * G(p) + (1 - a) * G(u) - G(m)) / (a * (1 - a))
        per = wy * (nll + beta * J)
    per = torch.where(valid, per, torch.zeros_like(per))
    if reduction == "none":
        out = per.reshape(target.shape)
    elif reduction == "sum":
        out = per.sum()
    else:
        out = per.sum() / torch.where(valid, wy, torch.zeros_like(wy)).sum()
    return out.to(logits.dtype)


# ----------------------------------------------------------------------------- rewrite helpers
# The loss-rewrite pass (passes/loss_entropy.py) replaces subgraphs of user code with
# calls to these functions, which AOTAutograd traces like any other torch code.
class RowStats(NamedTuple):
    nll: Tensor
    reg: Tensor
    lse: Tensor
    ent: Tensor
    aux: Tensor


def row_stats(logits: Tensor, target: Tensor, alpha: float, ignore_index: int, extras: bool, chunk: int,
              class_dim: int = -1, smooth_eps: float | None = None, smooth_weight: Tensor | None = None) -> RowStats:
    """The op's statistics for every row of ``logits`` (classes in ``class_dim``), each
    shaped like the logits without the class dimension. With ``smooth_eps`` and
    ``smooth_weight`` (F.cross_entropy's weighted label smoothing) the regulariser
    compares with u~ = w / sum w."""
    cd = class_dim % logits.dim()
    V = logits.shape[cd]
    A = math.prod(logits.shape[:cd])
    D = math.prod(logits.shape[cd + 1:])
    cdt = _op.compute_dtype(logits.dtype)
    u = None
    if smooth_weight is not None:
        u, _, _ = _smoothing_target(smooth_eps, smooth_weight, None, V, cdt)
    out = torch.ops.ger.loss_fwd(
        logits.reshape(A, V, D), target.reshape(A, D), u, None if u is None else torch.log(u),
        float(alpha), int(ignore_index), bool(extras), int(chunk),
    )
    rows = tuple(logits.shape[:cd]) + tuple(logits.shape[cd + 1:])
    nll, reg, lse, ent, aux = out
    return RowStats(nll.reshape(rows), reg.reshape(rows), lse.reshape(rows),
                    ent.reshape(rows) if extras else ent, aux.reshape(rows))


def cross_entropy_from_stats(stats: RowStats, logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
                             reduction: str, label_smoothing: float, out_dtype: torch.dtype, class_dim: int = -1) -> Tensor:
    """``F.cross_entropy`` (and ``F.nll_loss`` of log-softmax) from the op's row statistics."""
    cd = class_dim % logits.dim()
    V = logits.shape[cd]
    cdt = stats.nll.dtype
    eps = float(label_smoothing) if label_smoothing else None
    _, smooth_scale, smooth_const = _smoothing_target(eps, weight, None, V, cdt)
    return combine_rows(
        stats.nll.reshape(target.shape), stats.reg.reshape(target.shape), target, target.shape, beta=0.0, eps=eps, smooth_scale=smooth_scale,
        smooth_const=smooth_const, weight=weight, ignore_index=ignore_index, reduction=reduction, out_dtype=out_dtype,
    )


def row_statistic(stats: RowStats, like: Tensor, coefs: tuple[tuple[str, float], ...], keepdim: bool, alpha: float,
                  out_dtype: torch.dtype) -> Tensor:
    """A linear combination of per-row statistics of the logits ``like`` (classes last),
    shaped like ``like`` reduced over its last dimension.

    Statistics: L (log-sum-exp), zy (target logit), zsum (sum of logits), ez (E_p[z]),
    plogm (sum p log m), ulogm (sum u log m), one (1); m = alpha p + (1-alpha)/V. Each is
    first written in the op's outputs, so that terms cancel exactly (e.g. E_p[z] - L is
    -H, not (L - H) - L).
    """
    V = like.shape[-1]
    # coefficients are polynomials in V ({power: c}): the loss pass writes a coefficient
    # that depends on a symbolic V as ("V", ((power, c), ...)); the algebra below is exact
    # in V (V^-1 * V = 1), and V enters as a value only at the end (no specialisation)
    v1 = {1: 1.0}
    in_outputs = {
        "L": {"lse": {0: 1.0}},
        "zy": {"lse": {0: 1.0}, "nll": {0: -1.0}},
        "ez": {"lse": {0: 1.0}, "ent": {0: -1.0}},
        "zsum": {"lse": v1, "reg": {1: -1.0}, "logv": {1: -1.0}},  # KL(u||p) = L - zsum/V - log V
        "plogm": {"ent": {0: -1.0}, "aux": {0: -1.0}},  # sum p log m = -H - KL(p||m)
        # sum u log m = -log V - KL(u||m),  KL(u||m) = alpha (J - KL(p||m) / (1 - alpha))
        "ulogm": {"logv": {0: -1.0}, "reg": {0: -alpha}, "aux": {0: alpha / (1.0 - alpha) if alpha != 1.0 else 0.0}},
        "one": {"one": {0: 1.0}},
    }
    total_coefs: dict[str, dict[int, float]] = {}
    for name, c in coefs:
        for out, k in in_outputs[name].items():
            acc = total_coefs.setdefault(out, {})
            for pc, cc in _coef_poly(c).items():
                for pk, ck in k.items():
                    acc[pc + pk] = acc.get(pc + pk, 0.0) + cc * ck
    total: Tensor | float = 0.0
    for out, poly in total_coefs.items():
        c = _poly_value(poly, V, stats.lse)
        if isinstance(c, (int, float)) and c == 0.0:
            continue
        if out == "one":
            total = total + c
        elif out == "logv":
            total = total + c * _log_classes(V)
        else:
            total = total + c * getattr(stats, out)
    if not isinstance(total, Tensor):
        total = torch.full_like(stats.lse, float(total))
    shape = tuple(like.shape[:-1]) + ((1,) if keepdim else ())
    return total.reshape(shape).to(out_dtype)


def _coef_poly(c) -> dict[int, float]:
    """A coefficient of ``row_statistic``: a float, or ("V", ((power, c), ...))."""
    if isinstance(c, tuple) and c and c[0] == "V":
        return {int(k): float(v) for k, v in c[1]}
    return {0: float(c)}


def _poly_value(poly: dict[int, float], V, like: Tensor):
    """sum_k c_k V^k: a float for a static V, a 0-d tensor for a symbolic one (traced
    arithmetic on V, no specialisation)."""
    poly = {k: c for k, c in poly.items() if c != 0.0}
    if all(k == 0 for k in poly):
        return sum(poly.values())
    if isinstance(V, int):
        return sum(c * float(V) ** k for k, c in poly.items())
    v = torch.scalar_tensor(V, dtype=like.dtype, device=like.device)
    return sum(c * (v if k == 1 else v ** k) if k else c for k, c in poly.items())


def kl_div_reduce(rows: Tensor, like: Tensor, reduction: str, out_dtype: torch.dtype) -> Tensor:
    """F.kl_div's reduction of per-row KL values of ``like`` (the input log-probabilities)."""
    if reduction == "sum":
        out = rows.sum()
    elif reduction == "batchmean":
        out = rows.sum() / like.shape[0]
    elif reduction == "mean":
        out = rows.sum() / like.numel()
    else:
        raise ValueError(f"kl_div reduction {reduction!r} is not per row")
    return out.to(out_dtype)
