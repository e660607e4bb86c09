"""The GER loss with logits sharded over the vocabulary across ranks.

A vocabulary-parallel language-model head (Megatron-style tensor parallelism) leaves
each rank with the logits of its slice of the classes, ``(..., V_r)``. Every statistic
of the GER forward is a max or a sum over the classes (shared/ger-math.md), so the loss
needs only small all-reduces of per-position statistics - never an all-gather of the
logits:

1. ``all_reduce(MAX)`` of the local row maxima, ``(rows,)``;
2. ``all_reduce(SUM)`` of the local sums ``(rows, k)``, ``k <= 5``: S = sum e^(z-M), the
   target logit (from the rank that owns the target class), how many ranks own it, and
   what the regulariser needs (sum e^(z-M) (z-M) for alpha = 0 and the entropy,
   sum u (z-M) for alpha = 1), plus one number: the ranks' shard sizes;
3. general alpha only: ``all_reduce(SUM)`` of (KL(p||m), KL(u||m)) partial sums,
   ``(rows, 2)``: m = alpha p + (1-alpha) u needs L = M + log S first.

So a rank sends O(rows) bytes per step, independent of the vocabulary (the tests count
the collectives and their sizes). The backward needs no communication: given L and the
reduced statistics, dz_j is local (``ger::loss_bwd``, the same kernel and lowering as
:func:`~ger_inductor.ger_loss`). The loss is replicated: every rank gets the same value
and the gradient with respect to its own shard.

    >>> # on each of W ranks, logits_r = h @ W_head[rank_slice].T  (shape (N, V/W))
    >>> loss = ger_loss_vocab_parallel(logits_r, target, label_smoothing=0.1)  # doctest: +SKIP

See docs/distributed.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import losses as _losses
from .ops import ger_loss as _op

__all__ = ["ger_loss_vocab_parallel"]

_NAME = "ger_loss_vocab_parallel"


# ----------------------------------------------------------------------------- collectives
def _all_reduce(t: Tensor, op, group) -> Tensor:
    # looked up at call time (not bound at import) so tests can count the calls
    torch.distributed.all_reduce(t, op=op, group=group)
    return t


# ----------------------------------------------------------------------------- statistics
def _shard_stats(z: Tensor, y: Tensor, u: Tensor, lu: Tensor, ulu: Tensor, alpha: float, ignore_index: int,
                 extras: bool, start: int, V: int, group, uniform: bool):
    """Per-row nll, reg, lse, ent, aux of the FULL rows, from this rank's shard ``z``
    (R, V_r) in the compute dtype; ``y`` global class indices (R,); ``u``/``lu`` the base
    and its log on this shard (V_r,); ``ulu`` = sum over all classes of u log u."""
    R, Vr = z.shape
    # 1. the row maxima, and (riding along) max(V) and max(-V): do all ranks agree on V?
    M = z.amax(1) if Vr > 0 else z.new_full((R,), -math.inf)
    mx = _all_reduce(torch.cat([M, z.new_tensor([V, -V])]), dist.ReduceOp.MAX, group)
    M, v_max, v_min = mx[:R], mx[R], -mx[R + 1]
    M = torch.where(torch.isfinite(M), M, torch.zeros_like(M))  # all -inf rows: keep exp finite
    zm = z - M.unsqueeze(1)
    e = zm.exp()

    # 2. the sums, one all-reduce; the shard sizes ride along
    valid = y != ignore_index
    owned = valid & (y >= start) & (y < start + Vr)
    yl = torch.where(owned, y - start, torch.zeros_like(y))
    zy = z.gather(1, yl.unsqueeze(1)).squeeze(1) if Vr > 0 else torch.zeros_like(M)
    zy = torch.where(owned, zy, torch.zeros_like(zy))
    cols = [e.sum(1), zy, owned.to(z.dtype)]
    need_t = alpha == 0.0 or extras
    if need_t:
        cols.append(_op.xmul(e, zm).sum(1))  # sum e^(z-M) (z-M): E_p[z] = M + T/S
    if alpha == 0.0 and not uniform:
        cols.append(_op.xmul(e, lu.expand_as(e)).sum(1))  # sum e^(z-M) log u
    if alpha == 1.0:
        cols.append((u * z).sum(1))  # sum u z (not guarded: 0 * -inf is NaN, as the op)
    k = len(cols)
    flat = torch.cat([torch.stack(cols, 1).reshape(-1), z.new_tensor([Vr])])
    flat = _all_reduce(flat, dist.ReduceOp.SUM, group)
    sums, total_v = flat[:-1].view(R, k), flat[-1]
    S, zy, n_owners = sums[:, 0], sums[:, 1], sums[:, 2]
    # every condition below is the same on all ranks (reduced values): all raise or none
    _check_tiling(v_max, v_min, total_v, n_owners, valid)
    logS = S.log()
    L = M + logS
    nll = torch.where(valid, L - zy, torch.zeros_like(L))
    T = sums[:, 3] if need_t else None
    ent = (logS - T / S) if extras else z.new_empty((0,))
    col = 3 + int(need_t)
    if alpha == 0.0:
        # KL(p||u) = sum p (log p - log u) = T/S - log S - sum p log u
        plu = -math.log(V) if uniform else sums[:, col] / S
        reg = T / S - logS - plu
        aux = reg.clone()
    elif alpha == 1.0:
        # KL(u||p) = sum u log u - sum u z + L (the op's reg for any u, e.g. a smoothing weight)
        reg = ulu - sums[:, col] + L
        aux = torch.zeros_like(reg)
    else:
        lp = zm - logS.unsqueeze(1)
        p = lp.exp()
        uu, lluu = u.expand_as(lp), lu.expand_as(lp)
        log_p_m, log_u_m = _op.log_ratio_p_m(lp, lluu, p, uu, alpha)
        kl = torch.stack([_op.xmul(p, log_p_m).sum(1), _op.xmul(uu, log_u_m).sum(1)], 1)
        kl = _all_reduce(kl.contiguous(), dist.ReduceOp.SUM, group)
        kl_pm, kl_um = kl[:, 0], kl[:, 1]
        reg = kl_pm / (1.0 - alpha) + kl_um / alpha
        aux = kl_pm
    return nll, reg, L, ent, aux


def _check_tiling(v_max: Tensor, v_min: Tensor, total_v: Tensor, n_owners: Tensor, valid: Tensor) -> None:
    """The shards tile [0, V): all ranks agree on V, the shard sizes sum to it, and every
    non-ignored target has exactly one owner. Raises ValueError eagerly (an async assert
    when compiled); the inputs are all-reduced, so every rank decides alike."""
    if torch.compiler.is_compiling():
        torch._assert_async((v_max == v_min) & (total_v == v_max), f"{_NAME}: the shards do not tile the vocabulary")
    else:
        vmax, vmin, total = int(v_max), int(v_min), int(total_v)
        if vmax != vmin or total != vmax:
            raise ValueError(
                f"{_NAME}: the ranks' shards hold {total} classes, but the ranks expect vocab_size "
                + (f"{vmax}" if vmax == vmin else f"between {vmin} and {vmax}")
                + ": for unequal shards pass vocab_start and vocab_size on every rank"
            )
    bad = valid & (n_owners != 1)
    _losses.runtime_check(
        ~bad.any(),
        f"{_NAME}: a target class is owned by no rank or by several: the shards overlap or leave a gap "
        "(check vocab_start), or the ranks were given different targets",
    )


class _VocabParallelRows(torch.autograd.Function):
    """(nll, reg, lse, ent, aux) per row from a vocabulary shard; backward is local."""

    @staticmethod
    def forward(ctx, z_shard, y, u, lu, ulu, alpha, ignore_index, extras, start, V, group, uniform):
        cd = _op.compute_dtype(z_shard.dtype)
        nll, reg, lse, ent, aux = _shard_stats(
            z_shard.to(cd), y, u, lu, ulu, alpha, ignore_index, extras, start, V, group, uniform
        )
        Vr = z_shard.shape[1]
        valid = y != ignore_index
        owned = valid & (y >= start) & (y < start + Vr)
        # ger::loss_bwd's target: the local class where this rank owns it, a class no
        # rank position has (Vr) where another rank does, -1 where ignored
        local_t = torch.where(owned, y - start, torch.full_like(y, Vr))
        local_t = torch.where(valid, local_t, torch.full_like(y, -1))
        ctx.save_for_backward(z_shard, local_t, u, lu, lse, ent, reg, aux)
        ctx.alpha, ctx.extras = alpha, extras
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(aux)
        return nll, reg, lse, ent, aux

    @staticmethod
    def backward(ctx, g_nll, g_reg, g_lse, g_ent, _g_aux):
        z, local_t, u, lu, lse, ent, reg, aux = ctx.saved_tensors
        if not ctx.extras:
            g_ent = None
        none = (None,) * 11
        if g_nll is None and g_reg is None and g_lse is None and g_ent is None:
            return (None,) + none
        R, Vr = z.shape

        def col(t):
            return None if t is None else t.reshape(R, 1)

        grad = torch.ops.ger.loss_bwd(
            col(g_nll), col(g_reg), col(g_lse), col(g_ent), z.view(R, Vr, 1), local_t.view(R, 1), u, lu,
            col(lse), col(ent) if ctx.extras else ent, col(reg), col(aux), ctx.alpha, -1,
        )
        return (grad.view(R, Vr),) + none


# ----------------------------------------------------------------------------- shards
def _local_shard(logits, process_group):
    """(local logits, group, vocab_start, vocab_size) from a DTensor sharded over its
    last dimension, or (logits, process_group, None, None) for a plain tensor."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - torch without DTensor
        return logits, process_group, None, None
    if not isinstance(logits, DTensor):
        return logits, process_group, None, None
    mesh, placements = logits.device_mesh, tuple(logits.placements)
    last = logits.dim() - 1
    if mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim not in (
        last, -1,
    ):
        raise ValueError(
            f"{_NAME}: DTensor logits must be sharded over the last (class) dimension on a 1-d mesh, "
            f"got placements {placements} on a {mesh.ndim}-d mesh"
        )
    group = mesh.get_group()
    if process_group is not None and process_group is not group:
        raise ValueError(f"{_NAME}: process_group differs from the DTensor's mesh group")
    V = logits.shape[-1]
    W, r = mesh.size(), mesh.get_local_rank()
    chunk = -(-V // W)  # torch.chunk's split, what Shard uses
    start = min(r * chunk, V)
    return logits.to_local(), group, start, V


# ----------------------------------------------------------------------------- the loss
def ger_loss_vocab_parallel(
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
    return_extras: bool = False,
    process_group: Any = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
) -> Tensor | _losses.GERLossOutput:
    """:func:`~ger_inductor.ger_loss` of logits sharded over the classes across ranks.

    Each rank passes its shard ``logits`` of shape ``(..., V_r)`` (classes LAST: (N, V_r)
    or (B, T, V_r)) and the same global ``target`` (class indices in ``[0, V)``, shape
    ``logits.shape[:-1]``). Every rank returns the loss over the full vocabulary - the
    value ``ger_loss`` gives on the concatenated logits - and backward gives each rank
    the gradient with respect to its shard. Per call, the ranks exchange two all-reduces
    of per-position statistics (three for 0 < alpha < 1): O(positions) bytes, never the
    logits. fp32/bf16/fp16 logits are reduced in fp32 (fp64 in fp64).

    Args:
        logits: this rank's shard, or a ``DTensor`` sharded over its last dimension
            (``Shard(-1)`` on a 1-d mesh; its group and offsets are used).
        target, alpha, beta, ignore_index, reduction, label_smoothing, return_extras:
            as in :func:`~ger_inductor.ger_loss`.
        base, weight: FULL-vocabulary ``(V,)`` tensors, the same on every rank.
        process_group: the ranks that share the vocabulary (default: the world).
        vocab_start, vocab_size: this rank's first class and the total number of
            classes. Default: equal shards in rank order (``V = world * V_r``,
            ``vocab_start = rank * V_r``); pass both for unequal shards. The shards must
            tile ``[0, V)``: checked (the sizes sum to V, every target has one owner).

    Raises ``ValueError`` for arguments ``ger_loss`` would refuse, for ``class_dim``-style
    layouts other than classes-last, and for shards that do not tile the vocabulary.

    >>> # each of 2 ranks (gloo or nccl), logits (N, V) split as logits.chunk(2, -1)[rank]
    >>> loss = ger_loss_vocab_parallel(shard, y, alpha=0.5, beta=0.2)  # doctest: +SKIP
    >>> loss.backward()                                                # doctest: +SKIP
    """
    logits, group, dt_start, dt_size = _local_shard(logits, process_group)
    if dt_start is not None:
        if vocab_start is not None or vocab_size is not None:
            raise ValueError(f"{_NAME}: vocab_start / vocab_size come from the DTensor; do not pass them")
        vocab_start, vocab_size = dt_start, dt_size
    if hasattr(target, "full_tensor"):  # a replicated DTensor target
        target = target.full_tensor()
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{_NAME}: logits and target must be tensors")
    if logits.dim() == 0 or tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{_NAME}: logits must have the classes in the LAST dimension and target the other dimensions: "
            f"got logits {list(logits.shape)}, target {list(target.shape)} (expected {list(logits.shape[:-1])})"
        )

    loss_args = dict(alpha=alpha, beta=beta, ignore_index=ignore_index, reduction=reduction,
                     label_smoothing=label_smoothing, who=_NAME)
    _losses.loss_params(logits, target, base=None, weight=None, V=logits.shape[-1], **loss_args)  # before any rank talks

    # ---- the shard's place in the vocabulary
    if (vocab_start is None) != (vocab_size is None):
        raise ValueError(f"{_NAME}: pass both vocab_start and vocab_size (unequal shards) or neither (equal shards)")
    for name, v in (("vocab_start", vocab_start), ("vocab_size", vocab_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise TypeError(f"{_NAME}: {name} must be an int, got {type(v).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{_NAME}: needs an initialised torch.distributed process group (init_process_group)")
    Vr = logits.shape[-1]
    if vocab_start is None:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        vocab_start, vocab_size = rank * Vr, world * Vr
    V = vocab_size
    if V <= 0 or not (0 <= vocab_start and vocab_start + Vr <= V):
        raise ValueError(
            f"{_NAME}: this rank's shard [{vocab_start}, {vocab_start + Vr}) does not lie in the vocabulary [0, {V})"
        )
    cdt = _op.compute_dtype(logits.dtype)
    # ---- every other argument exactly as ger_loss checks it (full-vocabulary weight/base)
    params = _losses.loss_params(logits, target, base=base, weight=weight, V=V, **loss_args)
    alpha_f, beta, eps = params.alpha, params.beta, params.eps
    u_full, smooth_scale, smooth_const = params.u, params.smooth_scale, params.smooth_const
    log_u_full = params.log_u
    uniform = u_full is None
    if uniform:
        u = torch.full((Vr,), 1.0 / V, dtype=cdt, device=logits.device)
        lu = torch.full((Vr,), -math.log(V), dtype=cdt, device=logits.device)
        ulu = torch.full((), -math.log(V), dtype=cdt, device=logits.device)
    else:
        u_full, log_u_full = u_full.to(cdt), log_u_full.to(cdt)
        u = u_full[vocab_start : vocab_start + Vr]
        lu = log_u_full[vocab_start : vocab_start + Vr]
        ulu = _op.xmul(u_full, log_u_full).sum()

    y = target.reshape(-1)
    if y.dtype == torch.uint8:  # F.cross_entropy's other index dtype: read as int64
        y = y.long()
    z = logits.reshape(-1, Vr)
    if torch.compiler.is_compiling():  # no host sync in a graph: an async assert
        bad = (y != ignore_index) & ((y < 0) | (y >= V))
        torch._assert_async(~bad.any(), f"{_NAME}: a target is out of bounds for {V} classes")
    else:
        _op.check_targets(y, V, ignore_index)
    nll, reg, lse, ent, _aux = _VocabParallelRows.apply(
        z, y, u, lu, ulu, alpha_f, ignore_index, return_extras, vocab_start, V, group, uniform
    )
    loss = _losses.combine_rows(
        nll, reg, y, target.shape, beta=beta, eps=eps, smooth_scale=smooth_scale, smooth_const=smooth_const,
        weight=weight, ignore_index=ignore_index, reduction=reduction, out_dtype=logits.dtype, lse=lse,
        smooth_lse=params.smooth_lse,
    )  # fmt: skip
    if not return_extras:
        return loss
    valid = y != ignore_index
    entropy = torch.where(valid, ent, torch.zeros((), dtype=ent.dtype, device=ent.device)).sum() / valid.sum().to(
        ent.dtype
    )
    return _losses.GERLossOutput(loss, entropy, lse.reshape(target.shape))
