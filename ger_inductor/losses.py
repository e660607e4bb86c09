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
import numbers
from typing import NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from . import _compat
from .ops import ger_loss as _op

REDUCTIONS = ("mean", "sum", "none")
LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: the class-index target dtypes F.cross_entropy takes ("Long or Byte")
TARGET_DTYPES = (torch.int64, torch.uint8)
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
class TargetDtypeError(TypeError, RuntimeError):
    """A target dtype F.cross_entropy rejects (it takes int64 or uint8 class indices and
    raises a RuntimeError for others): a TypeError, like ger_loss's other bad-input
    errors, that ``except RuntimeError`` written for F.cross_entropy also catches."""


_TORCH_TYPE_NAMES = {torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.bool: "Bool",
                     torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float32: "Float", torch.float64: "Double"}


def check_target_dtype(target: Tensor, who: str) -> None:
    """F.cross_entropy's rule for class-index targets: int64 or uint8, else an error."""
    dt = target.dtype
    if dt in TARGET_DTYPES:
        return
    name = _TORCH_TYPE_NAMES.get(dt, str(dt).replace("torch.", ""))
    if target.is_floating_point() or target.is_complex() or dt == torch.bool:
        raise TargetDtypeError(
            f"{who}: target must hold class indices (an integer tensor: int64, or uint8, as F.cross_entropy takes), "
            f"got {dt}; soft targets are not supported (F.cross_entropy: expected target dtype to be Long or Byte, "
            f"but got {name})"
        )
    raise TargetDtypeError(
        f"{who}: expected target dtype to be Long or Byte (int64 or uint8 class indices, as F.cross_entropy), "
        f"but got {name} ({dt}): convert with target.long()"
    )


def is_compiling() -> bool:
    return torch.compiler.is_compiling()


def runtime_check(cond: Tensor, message: str) -> None:
    """A data-dependent check: raises ValueError eagerly, an async assert when compiled."""
    if is_compiling():
        torch._assert_async(cond, message)
    elif not bool(cond):
        raise ValueError(message)


def check_number(name: str, value, lo: float, hi: float | None, who: str = "ger_loss") -> float:
    """A real number (a Python or NumPy int/float) in [lo, hi] (hi None: finite, >= lo)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{who}: {name} must be a Python float, got {type(value).__name__}")
    v = float(value)
    if not (v >= lo and (v <= hi if hi is not None else math.isfinite(v))):  # also rejects NaN
        rng = f"be in [{lo}, {hi}]" if hi is not None else f"be finite and >= {lo}"
        raise ValueError(f"{who}: {name} must {rng}, got {value}")
    return v


def check_index(name: str, value, who: str) -> int:
    """An int (a Python or NumPy integer; bool refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{who}: {name} must be an int, got {type(value).__name__}")
    return int(value)


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


def _check_distribution(name: str, t: Tensor, V: int, logits: Tensor, who: str = "ger_loss") -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{who}: {name} must be a tensor of shape ({V},)")
    if t.dim() != 1 or t.shape[0] != V:
        raise ValueError(f"{who}: {name} must have shape ({V},) (one entry per class), got {list(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{who}: {name} must be floating point, got {t.dtype}")
    if t.device != logits.device:
        raise ValueError(f"{who}: {name} is on {t.device} but logits are on {logits.device}")


class LossParams(NamedTuple):
    """Checked loss arguments: alpha, beta, label-smoothing eps, the base u the op's
    regulariser uses (None: uniform) and its log, and the smoothing scale, constant and
    log-sum-exp coefficient of ``combine_rows`` (see ``smoothing_target``)."""

    alpha: float
    beta: float | Tensor | None
    eps: float | None
    u: Tensor | None
    smooth_scale: float | Tensor | None
    smooth_const: float | Tensor | None
    log_u: Tensor | None = None
    smooth_lse: Tensor | None = None


def check_hyper(alpha, beta, label_smoothing, who: str) -> tuple[float, float | Tensor | None, float | None]:
    """(alpha, beta, eps) checked: either label_smoothing (alpha 1) or (alpha, beta), a
    tensor beta 0-d floating and >= 0 (checked at run time when compiled)."""
    if label_smoothing is not None:
        if alpha is not None or beta is not None:
            raise ValueError(f"{who}: pass either label_smoothing or (alpha, beta), not both")
        return 1.0, None, check_number("label_smoothing", label_smoothing, 0.0, 1.0, who)
    if alpha is None or beta is None:
        raise TypeError(f"{who}: alpha and beta are required (or pass label_smoothing)")
    alpha_f = check_number("alpha", alpha, 0.0, 1.0, who)
    if isinstance(beta, Tensor):
        if beta.dim() != 0 or not beta.is_floating_point():
            raise ValueError(f"{who}: a tensor beta must be a 0-d floating tensor, got shape {list(beta.shape)} {beta.dtype}")
        runtime_check(beta >= 0, f"{who}: beta must be >= 0")
        return alpha_f, beta, None
    return alpha_f, check_number("beta", beta, 0.0, None, who), None


def loss_params(logits: Tensor, target: Tensor, *, alpha, beta, base, ignore_index, weight, reduction,
                label_smoothing, V, who: str) -> LossParams:
    """Check ``ger_loss``'s arguments (``logits`` stands for whatever gives the dtype and
    device) and derive what the op and ``combine_rows`` need."""
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{who}: logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    check_target_dtype(target, who)
    if target.device != logits.device:
        raise ValueError(f"{who}: target is on {target.device} but logits are on {logits.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{who}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_index("ignore_index", ignore_index, who)
    alpha_f, beta, eps = check_hyper(alpha, beta, label_smoothing, who)
    if eps == 0.0:
        # F.cross_entropy forms no smoothing term at 0 (its `label_smoothing > 0` test):
        # 0 * an infinite smoothing term (a -inf logit) would be NaN where it gives inf
        eps, beta = None, 0.0

    cdt = _op.compute_dtype(logits.dtype)
    if V == 0:
        raise ValueError(f"{who}: logits have 0 classes")
    if weight is not None:
        _check_distribution("weight", weight, V, logits, who)
    if base is not None:
        _check_distribution("base", base, V, logits, who)
        runtime_check((base >= 0).all(), f"{who}: base must be a distribution: found a negative or NaN entry")
        runtime_check(
            (base.to(torch.float64).sum() - 1).abs() <= BASE_SUM_TOL,
            f"{who}: base must sum to 1 (within {BASE_SUM_TOL})",
        )
        if alpha_f == 0.0:
            runtime_check(
                (base > 0).all(),
                f"{who}: alpha=0 (confidence penalty, KL(p||u)) needs a base with no zero entry: KL is infinite there",
            )

    if torch.is_grad_enabled() and not (not is_compiling() and _compat.functorch_transformed(logits, base, weight)):
        # (the op takes the base - and, with label smoothing, the class weights times it -
        # as a constant: a gradient there would be dropped, silently; under torch.func
        # transforms the op's math runs in torch ops, which differentiate them)
        if base is not None and base.requires_grad:
            raise ValueError(f"{who}: base requires grad, but the loss is not differentiable with respect to the "
                             "base: pass base.detach()")
        if weight is not None and weight.requires_grad and eps is not None:
            raise ValueError(f"{who}: weight requires grad, but with label_smoothing the loss is not differentiable "
                             "with respect to the class weights (nor is F.cross_entropy's): pass weight.detach()")
    st = smoothing_target(eps, weight, base, V, cdt)
    return LossParams(alpha_f, beta, eps, st.u, st.scale, st.const, st.log_u, st.lse_coef)



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
        target: class indices (int64, or uint8, as F.cross_entropy takes), the logits'
            shape without the class dimension.
        alpha: in [0, 1]; 0 = confidence penalty, 1 = label-smoothing type.
        beta: strength >= 0 (a float or a 0-d tensor).
        base: baseline distribution u over the V classes (uniform when None).
        ignore_index, weight, reduction: as in ``F.cross_entropy``; with ``weight`` (any
            real values), each position's loss is scaled by the weight of its target
            class and 'mean' divides by the sum of those weights.
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
    check_target_dtype(target, "ger_loss")  # (before the shapes: probability targets get their own message)
    logits3, target2 = _as_rows(logits, target, class_dim)
    A, V, D = logits3.shape
    p = loss_params(logits, target, alpha=alpha, beta=beta, base=base, ignore_index=ignore_index, weight=weight,
                    reduction=reduction, label_smoothing=label_smoothing, V=V, who="ger_loss")
    u, log_u, eps, beta = p.u, p.log_u, p.eps, p.beta
    ignore_index = int(ignore_index)  # (a NumPy integer: the op's schema takes a Python int)
    if target2.dtype == torch.uint8:  # F.cross_entropy's other index dtype: read as int64
        target2 = target2.long()

    # ---- per-row statistics: one fused op (one read of the logits forward)
    if not is_compiling() and _compat.functorch_transformed(logits, target, weight, base, beta):
        # torch.func transforms (grad, vmap, jvp, ...) and forward AD: the op's autograd
        # formula does not compose with them; its math in torch ops does (same numbers)
        if not _compat.functorch_transformed(target2):  # (a batched target cannot be read on the host)
            _op.check_targets(target2, V, ignore_index)
        nll, reg, lse, ent, _aux = _op.fwd_math(logits3, target2, u, log_u, p.alpha, ignore_index, return_extras)
    else:
        # chunk=0: whole-row reductions; the ger backend sets the device profile's strategy
        nll, reg, lse, ent, _aux = torch.ops.ger.loss_fwd(logits3, target2, u, log_u, p.alpha, ignore_index,
                                                         return_extras, 0, rev=_op.REV)
    loss = combine_rows(
        nll, reg, target2, target.shape, beta=beta, eps=eps, smooth_scale=p.smooth_scale, smooth_const=p.smooth_const,
        weight=weight, ignore_index=ignore_index, reduction=reduction, out_dtype=logits.dtype, lse=lse,
        smooth_lse=p.smooth_lse,
    )
    if not return_extras:
        return loss
    valid = target2 != ignore_index
    n_valid = valid.sum().to(ent.dtype)
    entropy = torch.where(valid, ent, torch.zeros((), dtype=ent.dtype, device=ent.device)).sum() / n_valid
    return GERLossOutput(loss, entropy, lse.reshape(target.shape))


def log_classes(V):
    """log V; for a symbolic V (dynamic shapes) a traced value, not a specialisation."""
    if isinstance(V, int):
        return math.log(V)
    return torch.log(torch.scalar_tensor(V, dtype=torch.float64))


class SmoothingTarget(NamedTuple):
    """What the op is given (``u``, ``log_u``) and how ``combine_rows`` forms the
    smoothing term of a row from its ``reg`` and ``lse``:
    ``scale * (reg + const + lse_coef * lse)`` (``const`` / ``lse_coef`` None: 0)."""

    u: Tensor | None
    log_u: Tensor | None
    scale: float | None
    const: float | Tensor | None
    lse_coef: Tensor | None


def smoothing_target(eps, weight, base, V, cdt) -> SmoothingTarget:
    """Label smoothing's term per row is eps * (-sum_j w_j b_j log p_j) (F.cross_entropy:
    b = 1/V; ger_loss may give a base b). Without weight and base it is eps * (KL(u||p) +
    log V). Otherwise the op gets u = w b as it is - any sign, zeros, any sum c, no log
    (log u = 0) - and its reg = -sum u z + L, so the term is eps * (reg + (c - 1) L):
    exact for every real weight, gradient included. Without smoothing: the base and its log."""
    if eps is None:
        if base is None:
            return SmoothingTarget(None, None, None, None, None)
        b = base.to(cdt)
        return SmoothingTarget(b, torch.log(b), None, None, None)
    if weight is None and base is None:
        return SmoothingTarget(None, None, eps, log_classes(V), None)
    wu = (weight.to(cdt) if weight is not None else 1.0) * (base.to(cdt) if base is not None else 1.0 / V)
    return SmoothingTarget(wu, torch.zeros_like(wu), eps, None, wu.sum() - 1.0)


def combine_rows(nll, reg, target2, target_shape, *, beta, eps, smooth_scale, smooth_const, weight, ignore_index,
                 reduction, out_dtype, lse=None, smooth_lse=None):
    """The loss from the op's per-row statistics: weights, ignore_index and the reduction,
    with F.cross_entropy's conventions. O(rows) work. With label smoothing, F.cross_entropy's
    formula term by term: (1 - eps) * nll_loss(weight, reduction) + the smoothing term
    reduced alike (a 'mean' divides each by the sum of the targets' weights)."""
    cdt = nll.dtype
    valid = target2 != ignore_index
    zero = torch.zeros((), dtype=cdt, device=nll.device)
    wy = None
    if weight is not None:
        wy = weight.to(cdt)[torch.where(valid, target2, torch.zeros_like(target2))]
        if torch.is_grad_enabled() and nll.requires_grad and isinstance(weight, Tensor) \
                and (is_compiling() or not _compat.functorch_transformed(nll, weight)):
            # F.cross_entropy saves its class weights: a write to them before the backward
            # raises autograd's error there, and so here
            nll = torch.ops.ger.version_guard(nll, [weight])
    if eps is not None:
        smooth = reg if smooth_const is None else reg + smooth_const
        if smooth_lse is not None:
            smooth = smooth + smooth_lse * lse
        smooth = torch.where(valid, smooth_scale * smooth, zero)
        data = torch.where(valid, nll if wy is None else wy * nll, zero)
        if reduction == "none":
            loss = ((1.0 - eps) * data + smooth).reshape(target_shape)
        elif reduction == "sum":
            loss = (1.0 - eps) * data.sum() + smooth.sum()
        else:
            denom = valid.sum().to(cdt) if wy is None else torch.where(valid, wy, zero).sum()
            loss = (1.0 - eps) * (data.sum() / denom) + smooth.sum() / denom
        return loss.to(out_dtype)
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
        # the hyper-parameters checked here already (the tensors' shapes against the logits
        # at the call)
        check_hyper(alpha, beta, label_smoothing, "GERLoss")
        check_index("ignore_index", ignore_index, "GERLoss")
        self.alpha = alpha
        if isinstance(beta, Tensor) and not isinstance(beta, nn.Parameter):
            self.register_buffer("beta", beta)  # (moved by .to(), kept in the state_dict)
        else:
            self.beta = beta
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
            parts = [f"label_smoothing={self.label_smoothing}"]
        else:
            b = self.beta
            parts = [f"alpha={self.alpha}", f"beta={float(b) if isinstance(b, Tensor) and b.numel() == 1 else b}"]
        parts += [f"ignore_index={self.ignore_index}", f"reduction={self.reduction!r}"]
        parts += [f"{n}=({t.shape[0]},)" for n, t in (("weight", self.weight), ("base", self.base)) if t is not None]
        if self.class_dim is not None:
            parts.append(f"class_dim={self.class_dim}")
        if self.return_extras:
            parts.append("return_extras=True")
        return ", ".join(parts)


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
        if a == 0.0:  # KL(p || u), 0 log 0 = 0 where p underflows (a -inf logit)
            J = torch.where(p == 0, torch.zeros_like(p), p * (lp - torch.log(u))).sum(-1)  # (NaN stays NaN)
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
# The loss-rewrite pass (passes/loss_entropy/) replaces subgraphs of user code with
# calls to these functions, which AOTAutograd traces like any other torch code.
class RowStats(NamedTuple):
    nll: Tensor
    reg: Tensor
    lse: Tensor
    ent: Tensor
    aux: Tensor
    #: per-row minimum logit (detached), for the NaN conventions of ``row_statistic``
    zmin: Tensor | None = None
    #: L of torch.logsumexp's convention (``row_stats(lse_inf_out=True)``), for a bare logsumexp
    lse_raw: Tensor | None = None


def row_stats(logits: Tensor, target: Tensor | None, alpha: float, ignore_index: int, extras: bool, chunk: int,
              class_dim: int = -1, smooth_eps: float | None = None, smooth_weight: Tensor | None = None,
              zmin: bool = False, lse_inf: bool = False, lse_inf_out: bool = False) -> RowStats:
    """The op's statistics for every row of ``logits`` (classes in ``class_dim``), each
    shaped like the logits without the class dimension. With ``smooth_eps`` and
    ``smooth_weight`` (F.cross_entropy's weighted label smoothing) the op's regulariser
    uses u = w / V (``smoothing_target``). ``zmin``: also each row's smallest logit
    (where eager's products p * log p are NaN, see ``row_statistic``). ``target`` None:
    statistics that need none (an entropy alone); the op gets class 0 and its nll is
    not read (its gradient is none). ``lse_inf``: L (and nll = L - z_y) of torch.logsumexp's
    convention, +-inf on a row whose max is +-inf (``ger::loss_fwd(lse_inf=)``).
    ``lse_inf_out``: the statistics keep log_softmax's convention (``lse`` NaN on such
    rows), and ``lse_raw`` holds torch.logsumexp's L for a bare logsumexp beside them
    (``ger::loss_fwd(lse_inf_out=)``; ``row_statistic(lse_raw=True)``)."""
    cd = class_dim % logits.dim()
    V = logits.shape[cd]
    A = math.prod(logits.shape[:cd])
    D = math.prod(logits.shape[cd + 1:])
    cdt = _op.compute_dtype(logits.dtype)
    u = log_u = None
    if smooth_weight is not None:
        st = smoothing_target(smooth_eps, smooth_weight, None, V, cdt)
        u, log_u = st.u, st.log_u
    if target is None:
        target = torch.zeros((A, D), dtype=torch.long, device=logits.device)
    elif target.dtype != torch.long:
        # uint8 (cross_entropy), int32 (gather takes it): the op compares with int64 ignore
        # indices (NO_IGNORE = -2^62 would wrap to 0 in int32)
        target = target.long()
    rows = tuple(logits.shape[:cd]) + tuple(logits.shape[cd + 1:])
    # before the op, on the op's (A, V, D) view: Inductor then computes it in the loop
    # of the op's row maximum (after it, a loop of its own: one more read of the logits)
    mn = logits.detach().reshape(A, V, D).amin(1).to(cdt).reshape(rows) if zmin else None
    out = torch.ops.ger.loss_fwd(
        logits.reshape(A, V, D), target.reshape(A, D), u, log_u,
        float(alpha), int(ignore_index), bool(extras), int(chunk),
        *((bool(lse_inf), True) if lse_inf_out else (True,) if lse_inf else ()), rev=_op.REV,
    )
    nll, reg, lse, ent, aux = out
    raw = None
    if lse_inf_out:  # log_softmax's L (NaN on the +-inf rows) for every other statistic
        raw = lse.reshape(rows)
        lse = torch.where(lse.isinf(), torch.full((), math.nan, dtype=lse.dtype, device=lse.device), lse)
    return RowStats(nll.reshape(rows), reg.reshape(rows), lse.reshape(rows),
                    ent.reshape(rows) if extras else ent, aux.reshape(rows), mn, raw)


def cross_entropy_from_stats(stats: RowStats, logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
                             reduction: str, label_smoothing: float, out_dtype: torch.dtype, class_dim: int = -1) -> Tensor:
    """``F.cross_entropy`` (and ``F.nll_loss`` of log-softmax) from the op's row statistics."""
    cd = class_dim % logits.dim()
    V = logits.shape[cd]
    cdt = stats.nll.dtype
    eps = float(label_smoothing) if label_smoothing else None
    st = smoothing_target(eps, weight, None, V, cdt)
    if target.dtype == torch.uint8:
        target = target.long()
    return combine_rows(
        stats.nll.reshape(target.shape), stats.reg.reshape(target.shape), target, target.shape, beta=0.0, eps=eps, smooth_scale=st.scale,
        smooth_const=st.const, weight=weight, ignore_index=ignore_index, reduction=reduction, out_dtype=out_dtype,
        lse=stats.lse.reshape(target.shape), smooth_lse=st.lse_coef,
    )


def row_statistic(stats: RowStats, like: Tensor, coefs: tuple[tuple[str, float], ...], keepdim: bool, alpha: float,
                  out_dtype: torch.dtype, nan: tuple = (None, None), lse_raw: bool = False) -> Tensor:
    """A linear combination of per-row statistics of the logits ``like`` (classes last),
    shaped like ``like`` reduced over its last dimension.

    Statistics: L (log-sum-exp), zy (target logit), zsum (sum of logits), ez (E_p[z]),
    plogm (sum p log m), ulogm (sum u log m), one (1); m = alpha p + (1-alpha)/V. Each is
    first written in the op's outputs, so that terms cancel exactly (e.g. E_p[z] - L is
    -H, not (L - H) - L).

    ``nan = (forward, backward)``: where the user's spelling is NaN eagerly (the op's
    statistics take 0 log 0 = 0): "zinf" in rows with a -inf logit (p * log_softmax(z):
    0 * -inf), "p0" in rows where a probability is 0 (p * log(p), and the gradient of
    entr(p) / xlogy(p, p), -log 0 = inf), None nowhere. A forward NaN makes the row's
    gradient NaN too, as eagerly. Needs ``stats.zmin`` (``row_stats(zmin=True)``); without
    it (the fused lm head's statistics) the conventions are not applied.

    ``lse_raw``: L is torch.logsumexp's (``stats.lse_raw``, +-inf on a row whose max is
    +-inf) where the statistics carry it; the fused lm head's do not (log_softmax's L).
    """
    if lse_raw and getattr(stats, "lse_raw", None) is not None:
        stats = stats._replace(lse=stats.lse_raw)
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
            total = total + c * log_classes(V)
        else:
            total = total + c * getattr(stats, out)
    if not isinstance(total, Tensor) or total.shape != stats.lse.shape:
        # a constant (sum_j p_j = 1): still NaN, value and gradient, in the rows where eager's
        # softmax is NaN (a NaN logit, a +inf one, only -inf ones), where the op's L is NaN
        total = (total if isinstance(total, Tensor) else float(total)) + 0.0 * stats.lse
    fwd_nan, bwd_nan = nan
    if getattr(stats, "zmin", None) is None:
        # statistics without the row minimum: the fused lm head's (lm_head.LinearStats; its
        # logits never exist). They keep the op's convention (0 log 0 = 0): the same as
        # eager unless a logit is -inf or a probability underflows to 0.
        fwd_nan = bwd_nan = None
    if fwd_nan is not None:
        # value and gradient NaN in those rows (a NaN factor), unchanged elsewhere
        bad = _nan_rows(stats, fwd_nan, out_dtype)
        total = total * torch.where(bad, torch.full((), math.nan, dtype=total.dtype, device=total.device),
                                    torch.ones((), dtype=total.dtype, device=total.device))
    if bwd_nan is not None and bwd_nan != fwd_nan:
        total = _NaNGradRows.apply(total, _nan_rows(stats, bwd_nan, out_dtype))
    shape = tuple(like.shape[:-1]) + ((1,) if keepdim else ())
    return total.reshape(shape).to(out_dtype)


def _nan_rows(stats, cond: str, p_dtype: torch.dtype) -> Tensor:
    """Rows where a -inf logit ("zinf") or a zero probability ("p0": the smallest
    exp(z - L), in the probabilities' dtype, underflows) makes eager's spelling NaN; a
    NaN logit counts in both."""
    zmin = stats.zmin
    if cond == "zinf":
        return (zmin == -math.inf) | torch.isnan(zmin)
    if cond == "p0":
        pmin = torch.exp(zmin - stats.lse.detach()).to(p_dtype)
        return (pmin == 0) | torch.isnan(pmin)
    raise ValueError(f"ger: unknown NaN condition {cond!r}")


class _NaNGradRows(torch.autograd.Function):
    """Identity forward; NaN gradient in the rows ``bad`` (eager's entr(p) at p = 0: a
    finite value, a gradient through -log 0 = inf)."""

    @staticmethod
    def forward(ctx, x, bad):
        ctx.save_for_backward(bad)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        (bad,) = ctx.saved_tensors
        return g.masked_fill(bad, math.nan), None


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
