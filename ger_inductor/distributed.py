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
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import losses as _losses
from .ops import ger_loss as _op

__all__ = ["ger_loss_vocab_parallel", "ger_distill_loss_vocab_parallel", "ger_token_stats_vocab_parallel"]

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
    # a row whose maximum is not finite (+inf or NaN anywhere in it, or all -inf) has
    # L = NaN, as log_softmax gives it (and ger_loss): its nll, lse and gradient are NaN.
    # M itself is clamped for the exponentials only (a +inf maximum made 0 gave L = +inf,
    # an inf nll and finite gradients on the other ranks' classes)
    bad_row = ~torch.isfinite(M)
    M = torch.where(bad_row, torch.zeros_like(M), M)
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
    L = torch.where(bad_row, torch.full_like(M, math.nan), M + logS)
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


def _check_tiling(v_max: Tensor, v_min: Tensor, total_v: Tensor, n_owners: Optional[Tensor], valid: Optional[Tensor],
                  who: str = _NAME) -> None:
    """The shards tile [0, V): all ranks agree on V, the shard sizes sum to it, and every
    non-ignored target has exactly one owner (``n_owners`` None: no target read). Raises
    ValueError eagerly (an async assert when compiled); the inputs are all-reduced, so
    every rank decides alike."""
    if torch.compiler.is_compiling():
        torch._assert_async((v_max == v_min) & (total_v == v_max), f"{who}: the shards do not tile the vocabulary")
    else:
        vmax, vmin, total = int(v_max), int(v_min), int(total_v)
        if vmax != vmin or total != vmax:
            raise ValueError(
                f"{who}: the ranks' shards hold {total} classes, but the ranks expect vocab_size "
                + (f"{vmax}" if vmax == vmin else f"between {vmin} and {vmax}")
                + ": for unequal shards pass vocab_start and vocab_size on every rank"
            )
    if n_owners is None:
        return
    bad = valid & (n_owners != 1)
    _losses.runtime_check(
        ~bad.any(),
        f"{who}: a target class is owned by no rank or by several: the shards overlap or leave a gap "
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
    @torch.autograd.function.once_differentiable  # no double backward: a clear error, not ger.loss_bwd's
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
            col(lse), col(ent) if ctx.extras else ent, col(reg), col(aux), ctx.alpha, -1, rev=_op.REV,
        )
        return (grad.view(R, Vr),) + none


# ----------------------------------------------------------------------------- shards
def _local_shard(logits, process_group, who: str = _NAME):
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
            f"{who}: DTensor logits must be sharded over the last (class) dimension on a 1-d mesh, "
            f"got placements {placements} on a {mesh.ndim}-d mesh"
        )
    group = mesh.get_group()
    if process_group is not None and process_group is not group:
        raise ValueError(f"{who}: process_group differs from the DTensor's mesh group")
    V = logits.shape[-1]
    W, r = mesh.size(), mesh.get_local_rank()
    chunk = -(-V // W)  # torch.chunk's split, what Shard uses
    start = min(r * chunk, V)
    return logits.to_local(), group, start, V


def _shard_of(logits, process_group, vocab_start, vocab_size, who: str):
    """(local shard, group, vocab_start, vocab_size): a DTensor's own offsets, else the
    arguments as given (checked by :func:`_place` once the other arguments are)."""
    logits, group, dt_start, dt_size = _local_shard(logits, process_group, who)
    if dt_start is not None:
        if vocab_start is not None or vocab_size is not None:
            raise ValueError(f"{who}: vocab_start / vocab_size come from the DTensor; do not pass them")
        vocab_start, vocab_size = dt_start, dt_size
    return logits, group, vocab_start, vocab_size


def _place(Vr: int, group, vocab_start: Optional[int], vocab_size: Optional[int], who: str) -> tuple[int, int]:
    """(vocab_start, V) of a shard of ``Vr`` classes: the arguments checked, or equal
    shards in rank order. Needs an initialised process group (checked here, after the
    arguments every rank can check alone)."""
    if (vocab_start is None) != (vocab_size is None):
        raise ValueError(f"{who}: pass both vocab_start and vocab_size (unequal shards) or neither (equal shards)")
    for name, v in (("vocab_start", vocab_start), ("vocab_size", vocab_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise TypeError(f"{who}: {name} must be an int, got {type(v).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{who}: needs an initialised torch.distributed process group (init_process_group)")
    if vocab_start is None:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        vocab_start, vocab_size = rank * Vr, world * Vr
    if vocab_size <= 0 or not (0 <= vocab_start and vocab_start + Vr <= vocab_size):
        raise ValueError(
            f"{who}: this rank's shard [{vocab_start}, {vocab_start + Vr}) does not lie in the vocabulary "
            f"[0, {vocab_size})"
        )
    return vocab_start, vocab_size


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
    logits, group, vocab_start, vocab_size = _shard_of(logits, process_group, vocab_start, vocab_size, _NAME)
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
    # before any rank talks (a shard may hold no class: V_r = 0 when V < world with DTensor's split)
    _losses.loss_params(logits, target, base=None, weight=None, V=max(logits.shape[-1], 1), **loss_args)

    Vr = logits.shape[-1]
    vocab_start, V = _place(Vr, group, vocab_start, vocab_size, _NAME)
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
    z = logits.reshape(y.numel(), Vr)  # (not -1: a shard may hold no class)
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


# ----------------------------------------------------------------------------- two distributions
def _row_max(x: Tensor) -> Tensor:
    return x.amax(1) if x.shape[1] > 0 else x.new_full((x.shape[0],), -math.inf)


def _owned_target(y: Tensor, valid: Tensor, start: int, Vr: int):
    """(owned, local index): where this rank's shard holds the row's target class, and
    that class's index in the shard (0 elsewhere)."""
    owned = valid & (y >= start) & (y < start + Vr)
    return owned, torch.where(owned, y - start, torch.zeros_like(y))


def _gather_owned(z: Tensor, yl: Tensor, owned: Tensor) -> Tensor:
    if z.shape[1] == 0:
        return z.new_zeros((z.shape[0],))
    zy = z.gather(1, yl.unsqueeze(1)).squeeze(1)
    return torch.where(owned, zy, torch.zeros_like(zy))


def _distill_shard_stats(zs: Tensor, zt: Tensor, y: Optional[Tensor], valid: Optional[Tensor], cfg, start: int,
                         V: int, group, who: str):
    """(D, nll, RowStats, owned, local target) of the FULL rows from this rank's shards
    ``zs``, ``zt`` (R, V_r) in the compute dtype: the row math of
    :func:`ger_inductor.distill.forward_rows` with every max and sum over the classes
    all-reduced. Three all-reduces of O(R) numbers:

    1. MAX of the row maxima of z_s/T and z_t/T (and z_s, for the hard CE at T != 1), with
       V and -V riding along (do all ranks agree on V?);
    2. SUM of sum e^(x - M) for each, and for the hard CE the target logit and how many
       ranks own the target, with the shard size riding along: then L_s, L_t (, L_s1);
    3. SUM of the KL partial sums the kind needs (KL(p_t||p_s), KL(p_s||p_t), or both
       KL(.||m)): elementwise given L_s and L_t, as forward_rows forms them."""
    from .distill import RowStats, _prelude
    from .ops.ger_loss import xmul

    R, Vr = zs.shape
    T = cfg.T
    a = zs if T == 1.0 else zs / T
    b = zt if T == 1.0 else zt / T
    own_ce = cfg.hard and T != 1.0  # the CE's lse is of the untempered student logits
    maxes = [_row_max(a), _row_max(b)] + ([_row_max(zs)] if own_ce else [])
    k1 = len(maxes)
    mx = _all_reduce(torch.cat([torch.stack(maxes, 1).reshape(-1), zs.new_tensor([V, -V])]), dist.ReduceOp.MAX,
                     group)
    M, v_max, v_min = mx[:-2].view(R, k1), mx[-2], -mx[-1]
    sums = [torch.exp(a - M[:, 0:1]).sum(1), torch.exp(b - M[:, 1:2]).sum(1)]
    if own_ce:
        sums.append(torch.exp(zs - M[:, 2:3]).sum(1))
    owned = yl = None
    if cfg.hard:
        owned, yl = _owned_target(y, valid, start, Vr)
        sums += [_gather_owned(zs, yl, owned), owned.to(zs.dtype)]
    k2 = len(sums)
    flat = _all_reduce(torch.cat([torch.stack(sums, 1).reshape(-1), zs.new_tensor([Vr])]), dist.ReduceOp.SUM, group)
    S, total_v = flat[:-1].view(R, k2), flat[-1]
    _check_tiling(v_max, v_min, total_v, S[:, k2 - 1] if cfg.hard else None, valid if cfg.hard else None, who)
    Ls = M[:, 0] + S[:, 0].log()
    Lt = M[:, 1] + S[:, 1].log()
    if cfg.hard:
        Ls1 = (M[:, 2] + S[:, 2].log()) if own_ce else Ls
        nll = Ls1 - S[:, k2 - 2]
    else:
        Ls1 = nll = zs.new_empty((0,))
    pre, _, _ = _prelude(zs, zt, cfg, Ls, Lt)
    if cfg.kind == "fwd":
        cols = [xmul(pre.pt, pre.lpt - pre.lps).sum(1)]
    elif cfg.kind == "rev":
        cols = [xmul(pre.ps, pre.lps - pre.lpt).sum(1)]
    else:
        cols = [xmul(pre.pt, pre.log_t_m).sum(1), xmul(pre.ps, pre.log_s_m).sum(1)]
    kl = _all_reduce(torch.stack(cols, 1).contiguous(), dist.ReduceOp.SUM, group)
    zero = torch.zeros((R,), dtype=zs.dtype, device=zs.device)
    if cfg.kind == "fwd":
        kt, ks, D = kl[:, 0], zero, kl[:, 0]
    elif cfg.kind == "rev":
        kt, ks, D = zero, kl[:, 0], kl[:, 0]
    else:
        kt, ks = kl[:, 0], kl[:, 1]
        D = cfg.wt * kt + cfg.ws * ks
    return D, nll, RowStats(Ls, Lt, Ls1, kt, ks), owned, yl


class _VocabParallelDistillRows(torch.autograd.Function):
    """(D, nll) per row from vocabulary shards of the student's and the teacher's logits;
    saves the shards and O(rows) statistics; the backward is local (no communication)."""

    @staticmethod
    def forward(ctx, zs, zt, y, valid, cfg, start, V, group, who):
        cd = cfg.cd
        D, nll, st, owned, yl = _distill_shard_stats(zs.to(cd), zt.to(cd), y, valid, cfg, start, V, group, who)
        ctx.save_for_backward(zs, zt, owned, yl, *st)
        ctx.cfg = cfg
        ctx.set_materialize_grads(False)
        if not cfg.hard:
            ctx.mark_non_differentiable(nll)
        return D, nll

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gD, gn):
        from .distill import RowStats, backward_rows
        from .ops.ger_loss import xmul

        zs, zt, owned, yl, *stats = ctx.saved_tensors
        st = RowStats(*stats)
        cfg = ctx.cfg
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        none = (None,) * 7
        if not cfg.hard:
            gn = None
        if (gD is None and gn is None) or not (need_s or need_t):
            return (None, None) + none
        zsc, ztc = zs.to(cfg.cd), zt.to(cfg.cd)
        dzs, dzt = backward_rows(zsc, ztc, None, cfg._replace(hard=False), st, gD, None, need_s, need_t)
        if need_s and gn is not None:
            # d nll / dz_s = softmax(z_s) - onehot(y): the onehot only on the rank that owns y
            gnc = gn.unsqueeze(1)
            h = xmul(gnc, torch.exp(zsc - st.Ls1.unsqueeze(1)))
            if zs.shape[1] > 0:
                h = h.scatter_add(1, yl.unsqueeze(1), -torch.where(owned, gn, torch.zeros_like(gn)).unsqueeze(1))
            dzs = dzs + h
        return (dzs.to(zs.dtype) if need_s else None, dzt.to(zt.dtype) if need_t else None) + none


def _two_shards(student, teacher, process_group, vocab_start, vocab_size, who: str):
    """The local shards of the student's and the teacher's logits, their group and
    offsets: both plain tensors, or both DTensors sharded alike."""
    if hasattr(student, "to_local") != hasattr(teacher, "to_local"):
        raise TypeError(f"{who}: student_logits and teacher_logits must both be DTensors or both plain tensors")
    zs, group, start, size = _shard_of(student, process_group, vocab_start, vocab_size, who)
    zt, group_t, start_t, size_t = _shard_of(teacher, process_group, vocab_start, vocab_size, who)
    if group_t is not group or (start_t, size_t) != (start, size):
        raise ValueError(f"{who}: the student's and the teacher's DTensors must be sharded alike (same mesh, "
                         f"same split of the classes)")
    return zs, zt, group, start, size


def ger_distill_loss_vocab_parallel(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Optional[Tensor] = None,
    *,
    beta: float,
    temperature: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    convention: str = "jsd",
    process_group: Any = None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
) -> Tensor:
    """:func:`~ger_inductor.ger_distill_loss` of student and teacher logits sharded over
    the classes across ranks (vocabulary-parallel lm heads).

    Each rank passes its shards ``(..., V_r)`` of both models' logits, sharded alike
    (classes last), and the same global ``target``. Every rank returns the loss over the
    full vocabulary - the value ``ger_distill_loss`` gives on the concatenated logits -
    and backward gives each rank the gradients with respect to its shards (to the
    teacher's too when it requires grad). Per call the ranks exchange three all-reduces
    of per-position statistics (row maxima; sums of exponentials with the target logit;
    the KL partial sums): O(positions) bytes, never the logits of either model. The
    backward needs no communication. fp32/bf16/fp16 logits are reduced in fp32 (fp64
    when either is fp64).

    Args:
        student_logits, teacher_logits: this rank's shards, the same shape; or two
            ``DTensor``s sharded alike over their last dimension (``Shard(-1)``, 1-d mesh).
        target, beta, temperature, hard_weight, ignore_index, reduction, convention:
            as in :func:`~ger_inductor.ger_distill_loss` (target: global class indices).
        process_group, vocab_start, vocab_size: as in
            :func:`ger_loss_vocab_parallel` (default: equal shards in rank order).

    A double backward (``create_graph=True``) is not supported (it raises).

    >>> # each of 2 ranks: zs_r = h_s @ W_s[rank_slice].T, zt_r = h_t @ W_t[rank_slice].T
    >>> loss = ger_distill_loss_vocab_parallel(zs_r, zt_r, beta=0.5)  # doctest: +SKIP
    """
    from . import distill as _distill

    who = "ger_distill_loss_vocab_parallel"
    zs, zt, group, vocab_start, vocab_size = _two_shards(student_logits, teacher_logits, process_group, vocab_start,
                                                         vocab_size, who)
    if hasattr(target, "full_tensor"):  # a replicated DTensor target
        target = target.full_tensor()
    _distill._check_pair(who, zs, zt, "student_logits", "teacher_logits")
    if zs.shape != zt.shape:
        raise ValueError(f"{who}: the student's shard {list(zs.shape)} and the teacher's {list(zt.shape)} must have "
                         "the same shape (..., V_r)")
    if zs.dim() == 0:
        raise ValueError(f"{who}: logits must have at least 1 dimension (the classes, last)")
    rows_shape = tuple(zs.shape[:-1])
    _distill._check_target(who, target, rows_shape, zs.device, f"the logits {list(zs.shape)} without their last "
                           "(class) dimension")
    cfg = _distill._config(who, beta=beta, temperature=temperature, hard_weight=hard_weight,
                           ignore_index=ignore_index, reduction=reduction, convention=convention,
                           has_target=target is not None, dtypes=(zs.dtype, zt.dtype))
    Vr = zs.shape[-1]
    vocab_start, V = _place(Vr, group, vocab_start, vocab_size, who)
    y, valid = _distill._rows_target(target, ignore_index)
    if cfg.hard:
        _distill._check_target_range(who, target.reshape(-1).long(), V, ignore_index)
    R = math.prod(rows_shape)  # (not -1 in the reshapes: a shard may hold no class)
    D, nll = _VocabParallelDistillRows.apply(zs.reshape(R, Vr), zt.reshape(R, Vr), y, valid, cfg, vocab_start, V,
                                             group, who)
    return _distill.combine(D, nll, valid, cfg, rows_shape, zs.dtype)


class _VocabParallelTokenRows(torch.autograd.Function):
    """(logp, H) per token from a vocabulary shard: two all-reduces (MAX of the row maxima,
    SUM of [sum e^(b-M), sum e^(b-M) (b-M), the target logit, its owners]); local
    backward."""

    @staticmethod
    def forward(ctx, z, y, T, start, V, group, who):
        from .ops.ger_loss import xmul

        cd = _op.compute_dtype(z.dtype)
        zc = z.to(cd)
        R, Vr = zc.shape
        b = zc if T == 1.0 else zc / T
        mx = _all_reduce(torch.cat([_row_max(b), b.new_tensor([V, -V])]), dist.ReduceOp.MAX, group)
        M, v_max, v_min = mx[:R], mx[R], -mx[R + 1]
        bm = b - M.unsqueeze(1)
        e = bm.exp()
        valid = torch.ones_like(y, dtype=torch.bool)
        owned, yl = _owned_target(y, valid, start, Vr)
        cols = [e.sum(1), xmul(e, bm).sum(1), _gather_owned(b, yl, owned), owned.to(cd)]
        flat = _all_reduce(torch.cat([torch.stack(cols, 1).reshape(-1), b.new_tensor([Vr])]), dist.ReduceOp.SUM,
                           group)
        sums, total_v = flat[:-1].view(R, 4), flat[-1]
        _check_tiling(v_max, v_min, total_v, sums[:, 3], valid, who)
        logS = sums[:, 0].log()
        L = M + logS
        H = logS - sums[:, 1] / sums[:, 0]  # -sum p log p = log S - sum e (b - M) / S
        logp = sums[:, 2] - L
        ctx.save_for_backward(z, owned, yl, L, H)
        ctx.T = T
        ctx.set_materialize_grads(False)
        return logp, H

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp, g_H):
        from .distill import token_backward
        from .ops.ger_loss import xmul

        z, owned, yl, L, H = ctx.saved_tensors
        none = (None,) * 6
        if (g_lp is None and g_H is None) or not ctx.needs_input_grad[0]:
            return (None,) + none
        T = ctx.T
        zc = z.to(L.dtype)
        # token_backward's onehot term only where this rank owns the token
        dz = token_backward(zc, yl, T, L, H, None, g_H)
        if g_lp is not None:
            p = torch.exp((zc if T == 1.0 else zc / T) - L.unsqueeze(1))
            g = g_lp.unsqueeze(1)
            d = -xmul(g, p)
            if z.shape[1] > 0:
                d = d.scatter_add(1, yl.unsqueeze(1), torch.where(owned, g_lp, torch.zeros_like(g_lp)).unsqueeze(1))
            dz = dz + (d if T == 1.0 else d / T)
        return (dz.to(z.dtype),) + none


def ger_token_stats_vocab_parallel(
    logits: Tensor,
    target: Tensor,
    *,
    temperature: float = 1.0,
    ref_logprobs: Optional[Tensor] = None,
    kl_estimator: Optional[str] = None,
    process_group: Any = None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
):
    """:func:`~ger_inductor.ger_token_stats` of logits sharded over the classes across
    ranks: per token log p(y) and the entropy of softmax(logits / T) over the full
    vocabulary (and the KL estimator to a reference policy), on every rank, from two
    all-reduces of O(tokens) numbers; the backward is local. Every target must be a
    class (as ``ger_token_stats``).

    Args: as :func:`~ger_inductor.ger_token_stats`, plus ``process_group``,
    ``vocab_start`` and ``vocab_size`` as in :func:`ger_loss_vocab_parallel`.
    Returns a :class:`~ger_inductor.TokenStats`. A double backward is not supported.
    """
    from . import distill as _distill

    who = "ger_token_stats_vocab_parallel"
    z, group, vocab_start, vocab_size = _shard_of(logits, process_group, vocab_start, vocab_size, who)
    if hasattr(target, "full_tensor"):
        target = target.full_tensor()
    T, rows_shape = _distill._check_token_args(who, z, target, temperature, ref_logprobs, kl_estimator,
                                               shard=True)
    Vr = z.shape[-1]
    vocab_start, V = _place(Vr, group, vocab_start, vocab_size, who)
    y = target.reshape(-1).long()
    _distill._check_target_range(who, y, V, None)
    # (not -1 in the reshape: a shard may hold no class)
    logp, H = _VocabParallelTokenRows.apply(z.reshape(y.numel(), Vr), y, T, vocab_start, V, group, who)
    logp, H = logp.reshape(rows_shape), H.reshape(rows_shape)
    kl = None
    if ref_logprobs is not None:
        kl = _distill.kl_estimate(logp, ref_logprobs.to(logp.dtype), kl_estimator)
    return _distill.TokenStats(logp, H, kl)
