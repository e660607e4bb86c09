"""``ger::loss_fwd`` / ``ger::loss_bwd``: the GER loss as two custom ops.

The ops work on *rows*: logits viewed as ``(A, V, D)`` (class dimension in the middle,
so ``(N, V)``, ``(B, T, V)`` and ``(N, V, d1, ...)`` are all views, never copies) and
targets ``(A, D)``. They know nothing of weights, beta or the reduction: the forward
returns per-row statistics, the caller (``ger_inductor.losses``) combines them with
O(rows) torch ops. Per row, with p = softmax(z), L = logsumexp(z), u the base:

    nll = L - z_y                (0 where target == ignore_index)
    reg = J_alpha(p || u)        alpha=0: KL(p||u); alpha=1: KL(u||p);
                                 else KL(p||m)/(1-alpha) + KL(u||m)/alpha, m = alpha p + (1-alpha) u
    lse = L
    ent = H(p)                   (only with extras=True; else an empty tensor)
    aux = KL(p||m)               (what the backward of general alpha needs; 0 for alpha in {0,1})

The backward takes the gradients of those outputs (None where unused) and returns

    dz_j = g_nll (p_j - [j=y]) + g_reg dJ/dz_j + g_lse p_j - g_ent p_j (z_j - E_p[z])

    dJ/dz_j = p_j (z_j - log u_j - L - KL(p||u))           alpha = 0
            = p_j - u_j                                    alpha = 1
            = p_j (log(p_j/m_j) - KL(p||m)) / (1 - alpha)   otherwise

(shared/ger-math.md). Statistics are computed in float32 (float64 for float64 logits).

The eager kernels below are the fallback (and run whenever Inductor does not lower the
ops); ``lowerings/ger_loss.py`` lowers the same math into Inductor IR.
"""

from __future__ import annotations

import hashlib
import math
import pathlib
from typing import Optional

import torch
from torch import Tensor

OPS_NAMESPACE = "ger"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for logits of ``dtype``: fp32, or fp64 for fp64 logits."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- shared math
#: alphas for which log(p/m) is formed as log p - log m (see log_ratio_p_m)
LOG_FORM_ALPHAS = (0.25, 0.75)


#: past this log-ratio the ratio u/p (p/u) is not formed: log(p/m) takes its asymptote
RATIO_LOG_CAP = 60.0


def log_ratio_p_m(lp: Tensor, lu: Tensor, p: Tensor, u: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """(log(p/m), log(u/m)) for m = alpha p + (1-alpha) u, accurate for every alpha in (0, 1).

    For alpha in LOG_FORM_ALPHAS, log m = log(alpha p + (1-alpha) u) directly (one log:
    the cheapest; its rounding, ~eps |log p|, is divided by at most 1/0.25 = 4).
    Nearer the ends, one log1p per element, of a small argument where it matters:
      alpha >= 1/2:  log(p/m) = -log1p((1-alpha) (u/p - 1)),  log(u/m) = log(u/p) + log(p/m)
      alpha <  1/2:  log(u/m) = -log1p(alpha (p/u - 1)),      log(p/m) = log(p/u) + log(u/m)
    The term divided by the small (1-alpha) or alpha is the log1p one, so the division
    never amplifies a cancellation. Where t = log u - log p exceeds RATIO_LOG_CAP (p
    subnormal beside u: u/p would overflow to inf and log(p/m) read -inf), the ratio is
    capped and the asymptotes are taken, exact to the working precision there
    (m/p = (1-alpha) e^t (1 + alpha e^-t / (1-alpha))):
      log(p/m) = -(log(1-alpha) + t),  log(u/m) = -log(1-alpha)
    and the mirror for alpha < 1/2. Underflowed p (or zero u) take the exact limits.
    The lowering spells the same expressions in Inductor IR.
    """
    lo, hi = LOG_FORM_ALPHAS
    if lo <= alpha <= hi:
        log_m = torch.log(alpha * p + (1.0 - alpha) * u)
        return lp - log_m, lu - log_m
    cap = math.exp(-RATIO_LOG_CAP)
    if alpha >= 0.5:
        t = lu - lp
        far = (p == 0) | (t > RATIO_LOG_CAP)
        log_p_m = torch.where(t > RATIO_LOG_CAP, -(math.log1p(-alpha) + t),
                              -torch.log1p((1.0 - alpha) * (u / torch.maximum(p, u * cap) - 1.0)))
        log_u_m = torch.where(far, torch.full_like(lp, -math.log1p(-alpha)), t + log_p_m)
    else:
        t = lp - lu
        far = (u == 0) | (t > RATIO_LOG_CAP)
        log_u_m = torch.where(t > RATIO_LOG_CAP, -(math.log(alpha) + t),
                              -torch.log1p(alpha * (p / torch.maximum(u, p * cap) - 1.0)))
        log_p_m = torch.where(far, torch.full_like(lp, -math.log(alpha)), t + log_u_m)
    return log_p_m, log_u_m


def xmul(w: Tensor, x: Tensor) -> Tensor:
    """w * x with 0 where w == 0 (so 0 * -inf = 0, as in x log x at 0)."""
    return torch.where(w == 0, torch.zeros((), dtype=x.dtype, device=x.device), w * x)


def _ensure_lowerings() -> None:
    """Register the Inductor lowerings the first time the op is traced (with any backend),
    not at import: importing Inductor is heavy."""
    from .. import lowerings

    lowerings.ensure_registered()


def _base_terms(base, log_base, V: int, cd: torch.dtype, device) -> tuple[Tensor, Tensor]:
    """(u, log u) broadcastable against (A, V, D): scalars for the uniform base."""
    if base is None:
        return (torch.full((), 1.0 / V, dtype=cd, device=device), torch.full((), -math.log(V), dtype=cd, device=device))
    return base.to(cd).view(1, V, 1), log_base.to(cd).view(1, V, 1)


#: the ignore index of statistics whose target is a gather index, not a loss's target (the
#: loss pass's log p(y) from ``gather``): no class is ignored, and a bad index raises what
#: gather raises
NO_IGNORE = -(2**62)


def check_targets(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Eager check (host sync) that every non-ignored target is a valid class."""
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        first = target[bad].flatten()[0].item()
        if ignore_index == NO_IGNORE:  # torch.gather's error, type and words
            raise RuntimeError(f"index {first} is out of bounds for dimension 1 with size {num_classes}")
        raise IndexError(
            f"ger_loss: target {first} is out of bounds for {num_classes} classes "
            f"(valid: 0..{num_classes - 1}, or ignore_index={ignore_index})"
        )


# ----------------------------------------------------------------------------- forward
def fwd_math(logits: Tensor, target: Tensor, base: Optional[Tensor], log_base: Optional[Tensor], alpha: float,
             ignore_index: int, extras: bool, lse_inf: bool = False,
             lse_inf_out: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward statistics in differentiable torch (no target check): the eager
    kernel, what ``ger_loss`` runs under torch.func transforms and forward AD, and what
    the op's backward differentiates for a double backward.

    For a given base, reg at alpha = 1 is ``sum u log u - sum u z + L``: KL(u||p) for a
    distribution, and for any other u (label smoothing with class weights passes
    u = w b, log u = 0) a function whose gradient is exactly p - u. ``u z`` is not
    guarded: 0 * (-inf) is NaN, as in F.cross_entropy's ``-(w * log_softmax(z)).sum()``.

    ``lse_inf``: L as torch.logsumexp forms it, M on a row whose max M is +-inf (+inf: a
    +inf logit and no NaN; -inf: only -inf logits), where log_softmax's M + log S is NaN.
    nll = L - z_y follows (+inf, NaN where z_y is +inf too or the row is -inf), and the
    backward's p = e^(z - L), from the saved L, is then logsumexp's gradient (0, NaN at a
    +inf logit; NaN on a -inf row). Only for
    statistics spelled with torch.logsumexp and the raw target logit (the loss pass's
    ``lse_inf`` rows): the other outputs are not log_softmax's on those rows.

    ``lse_inf_out``: only the L output takes torch.logsumexp's convention (a bare logsumexp,
    e.g. a z-loss, beside log_softmax statistics); nll, reg, ent and aux keep log_softmax's
    (NaN on those rows). The backward then takes L back to NaN on those rows whenever one
    of the others has a gradient (``_backward``): eager's log_softmax / softmax backward is
    NaN in the whole row there, whatever the logsumexp's gradient.
    """
    A, V, D = logits.shape
    cd = compute_dtype(logits.dtype)
    z = logits.to(cd)
    # L = M + log sum e^(z - M), IEEE throughout like the lowering and log_softmax: NaN in a
    # row with a +inf logit or only -inf logits (torch.logsumexp would give +-inf there)
    if lse_inf:  # the same value on other rows (log S + M), and logsumexp's own derivative
        lse = lse_out = torch.logsumexp(z, 1)
    else:
        M = z.detach().amax(1, keepdim=True)
        lse = lse_out = (M + torch.log(torch.exp(z - M).sum(1, keepdim=True))).squeeze(1)  # (A, D)
        if lse_inf_out:  # torch.logsumexp's value and derivative, for the L output only (the same
            # value on the other rows; a where would send a 0 * NaN gradient into a double backward)
            lse_out = torch.logsumexp(z, 1)
    valid = target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target))
    zy = z.gather(1, t.unsqueeze(1)).squeeze(1)
    nll = torch.where(valid, lse - zy, torch.zeros_like(lse))
    lp = z - lse.unsqueeze(1)
    p = lp.exp()
    u, lu = _base_terms(base, log_base, V, cd, z.device)
    ent = -xmul(p, lp).sum(1) if extras else z.new_empty((0,), dtype=cd)
    if alpha == 0.0:
        reg = xmul(p, lp - lu).sum(1)
        aux = reg.clone()
    elif alpha == 1.0:
        if base is None:
            reg = xmul(u.expand_as(lp), lu - lp).sum(1)
        else:
            reg = xmul(u, lu).sum() - (u * z).sum(1) + lse
        aux = torch.zeros_like(reg)
    else:
        log_p_m, log_u_m = log_ratio_p_m(lp, lu.expand_as(lp), p, u.expand_as(lp), alpha)
        kl_pm = xmul(p, log_p_m).sum(1)
        kl_um = xmul(u.expand_as(lp), log_u_m).sum(1)
        reg = kl_pm / (1.0 - alpha) + kl_um / alpha
        aux = kl_pm
    return nll, reg, lse_out, ent, aux


def _source_rev() -> int:
    """A hash of the sources that decide these ops' generated code, passed as ``rev`` by
    every call: part of the graph, so of Inductor's FX-graph cache key. Under
    ``backend="inductor"`` (which knows nothing of ger's lowerings) a changed lowering
    then never reuses a kernel compiled from the old one (as ``ops.distill.REV``)."""
    root = pathlib.Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in ("ops/ger_loss.py", "lowerings/ger_loss.py"):
        h.update((root / rel).read_bytes())
    return int(h.hexdigest()[:12], 16)


#: pass as ``rev`` to loss_fwd / loss_bwd
REV = _source_rev()


@torch.library.custom_op(f"{OPS_NAMESPACE}::loss_fwd", mutates_args=())
def loss_fwd(
    logits: Tensor,
    target: Tensor,
    base: Optional[Tensor],
    log_base: Optional[Tensor],
    alpha: float,
    ignore_index: int,
    extras: bool,
    chunk: int,
    lse_inf: bool = False,
    lse_inf_out: bool = False,
    rev: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # ``chunk`` selects the lowering's reduction strategy (0: whole rows, K: chunks of
    # K classes); the math, and so this eager kernel, do not depend on it. ``rev``: REV,
    # a hash of the lowering's sources (only for the cache key).
    check_targets(target, logits.shape[1], ignore_index)
    return fwd_math(logits, target, base, log_base, alpha, ignore_index, extras, lse_inf, lse_inf_out)


@loss_fwd.register_fake
def _loss_fwd_fake(logits, target, base, log_base, alpha, ignore_index, extras, chunk, lse_inf=False,
                   lse_inf_out=False, rev=0):
    _ensure_lowerings()  # a trace is under way: Inductor may lower this op next
    A, V, D = logits.shape
    cd = compute_dtype(logits.dtype)
    row = logits.new_empty((A, D), dtype=cd)
    ent = logits.new_empty((A, D) if extras else (0,), dtype=cd)
    return row, torch.empty_like(row), torch.empty_like(row), ent, torch.empty_like(row)


# ----------------------------------------------------------------------------- backward
@torch.library.custom_op(f"{OPS_NAMESPACE}::loss_bwd", mutates_args=())
def loss_bwd(
    grad_nll: Optional[Tensor],
    grad_reg: Optional[Tensor],
    grad_lse: Optional[Tensor],
    grad_ent: Optional[Tensor],
    logits: Tensor,
    target: Tensor,
    base: Optional[Tensor],
    log_base: Optional[Tensor],
    lse: Tensor,
    ent: Tensor,
    reg: Tensor,
    aux: Tensor,
    alpha: float,
    ignore_index: int,
    rev: int = 0,
) -> Tensor:
    A, V, D = logits.shape
    cd = compute_dtype(logits.dtype)
    z = logits.to(cd)
    L = lse.unsqueeze(1)
    lp = z - L
    p = lp.exp()
    grad = torch.zeros_like(z)
    if grad_nll is not None:
        valid = target != ignore_index
        g = torch.where(valid, grad_nll, torch.zeros_like(grad_nll)).unsqueeze(1)
        t = torch.where(valid, target, torch.full_like(target, -1)).unsqueeze(1)
        onehot = torch.arange(V, device=z.device).view(1, V, 1) == t
        grad = grad + g * (p - onehot.to(cd))
    if grad_reg is not None:
        u, lu = _base_terms(base, log_base, V, cd, z.device)
        gr = grad_reg.unsqueeze(1)
        # p_j * (...) is 0 where p_j == 0 (a -inf logit: 0 * -inf), as in the lowering
        if alpha == 0.0:
            d = xmul(p, lp - lu - reg.unsqueeze(1))
        elif alpha == 1.0:
            d = p - u
        else:
            log_p_m, _ = log_ratio_p_m(lp, lu.expand_as(lp), p, u.expand_as(lp), alpha)
            d = xmul(p, log_p_m - aux.unsqueeze(1)) / (1.0 - alpha)
        grad = grad + gr * d
    if grad_lse is not None:
        grad = grad + grad_lse.unsqueeze(1) * p
    if grad_ent is not None:
        ez = (lse - ent).unsqueeze(1)  # E_p[z] = L - H
        grad = grad - grad_ent.unsqueeze(1) * xmul(p, z - ez)
    return grad.to(logits.dtype)


@loss_bwd.register_fake
def _loss_bwd_fake(grad_nll, grad_reg, grad_lse, grad_ent, logits, target, base, log_base, lse, ent, reg, aux, alpha,
                   ignore_index, rev=0):
    _ensure_lowerings()
    return torch.empty_like(logits)


# ----------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    logits, target, base, log_base, alpha, ignore_index, extras, _chunk, *rest = inputs
    nll, reg, lse, ent, aux = output
    ctx.save_for_backward(logits, target, base, log_base, lse, ent, reg, aux)
    ctx.alpha = alpha
    ctx.ignore_index = ignore_index
    ctx.extras = extras
    ctx.lse_inf = bool(rest[0]) if rest else False
    ctx.lse_inf_out = bool(rest[1]) if len(rest) > 1 else False
    # unused outputs (e.g. reg when beta == 0, lse/ent without extras) get None, and
    # the backward kernel then skips their terms
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(aux)


def _backward(ctx, g_nll, g_reg, g_lse, g_ent, g_aux):
    logits, target, base, log_base, lse, ent, reg, aux = ctx.saved_tensors
    if not ctx.extras:
        g_ent = None
    if g_nll is None and g_reg is None and g_lse is None and g_ent is None:
        return (None,) * _N_ARGS
    if ctx.lse_inf_out and (g_nll is not None or g_reg is not None or g_ent is not None):
        # the saved L is logsumexp's (+-inf on a row whose max is +-inf); a log_softmax
        # statistic with a gradient makes eager's whole row NaN there (its backward reads
        # the NaN log-probabilities): log_softmax's L gives the same
        lse = torch.where(lse.isinf(), torch.full_like(lse, math.nan), lse)
    if torch.is_grad_enabled():
        # backward(create_graph=True): a differentiable gradient, by autograd through the
        # forward math in torch ops (loss_bwd has no derivative), so a double backward works
        return (_differentiable_grad(ctx, logits, target, base, log_base, (g_nll, g_reg, g_lse, g_ent)),) + (None,) * (_N_ARGS - 1)
    grad = loss_bwd(
        g_nll, g_reg, g_lse, g_ent, logits, target, base, log_base, lse, ent, reg, aux, ctx.alpha, ctx.ignore_index,
        rev=REV,
    )
    return (grad,) + (None,) * (_N_ARGS - 1)


#: loss_fwd's arguments, trailing optional ones included: its backward returns a gradient (or None) each
_N_ARGS = len(loss_fwd._opoverload._schema.arguments)


def _differentiable_grad(ctx, logits, target, base, log_base, grads) -> Tensor:
    """The gradient of the statistics with incoming ``grads``, as a differentiable
    function of the logits and of ``grads`` (the op's eager math differentiated by autograd)."""
    stats = fwd_math(logits, target, base, log_base, ctx.alpha, ctx.ignore_index, ctx.extras, ctx.lse_inf,
                     ctx.lse_inf_out)
    outs = [(s, g) for s, g in zip(stats[:4], grads) if g is not None]
    (grad,) = torch.autograd.grad([s for s, _ in outs], [logits], [g for _, g in outs], create_graph=True)
    return grad


loss_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- version checks
@torch.library.custom_op(f"{OPS_NAMESPACE}::scaled_grad", mutates_args=())
def scaled_grad(grad: Tensor, g: Tensor, keep: list[Tensor]) -> Tensor:
    """``grad * g``; ``keep`` (unused) makes a compiled backward save those tensors, so
    autograd checks that they were not written after the forward, as eager does."""
    return grad * g


@scaled_grad.register_fake
def _scaled_grad_fake(grad, g, keep):
    return torch.empty_like(grad)


def _scaled_setup(ctx, inputs, output):
    grad, g, keep = inputs
    ctx.save_for_backward(grad, g)
    ctx.n_keep = len(keep)


def _scaled_backward(ctx, go):
    """Its own derivative (a double backward, a jvp through a backward that scaled with it)."""
    grad, g = ctx.saved_tensors
    d_grad = go * g if ctx.needs_input_grad[0] else None
    d_g = (go * grad).sum_to_size(g.shape) if ctx.needs_input_grad[1] else None
    return d_grad, d_g, [None] * ctx.n_keep


scaled_grad.register_autograd(_scaled_backward, setup_context=_scaled_setup)


@torch.library.custom_op(f"{OPS_NAMESPACE}::version_guard", mutates_args=())
def version_guard(x: Tensor, keep: list[Tensor]) -> Tensor:
    """``x`` (a copy); its backward passes the gradient through and reads ``keep``, so
    autograd checks that they were not written between forward and backward - the
    tensors eager's spelling saves that the fused form does not need (a cross-entropy's
    class weights). With ``keep`` empty: a private copy that AOTAutograd's partitioner
    saves rather than recomputes (``loss_entropy.protect_saved_logits``)."""
    return x.clone()


@version_guard.register_fake
def _version_guard_fake(x, keep):
    return torch.empty_like(x)


def _guard_setup(ctx, inputs, output):
    x, keep = inputs
    ctx.save_for_backward(*keep)
    ctx.n_keep = len(keep)


def _guard_backward(ctx, g):
    keep = ctx.saved_tensors  # the version check
    return scaled_grad(g, torch.ones((), dtype=g.dtype, device=g.device), list(keep)), [None] * ctx.n_keep


version_guard.register_autograd(_guard_backward, setup_context=_guard_setup)
