"""``ger::distill_fwd`` / ``ger::distill_bwd``: two-distribution rows as two custom ops.

Rows of student and teacher logits, ``(R, V)`` each (classes last), and the checked
configuration of ``ger_inductor.distill`` spelled as plain arguments (so the graph and
the cache key carry it): ``kind`` ("fwd": KL(p_t||p_s), "rev": KL(p_s||p_t), "mix":
wt KL(p_t||m) + ws KL(p_s||m)), beta, wt, ws, the temperature T, ``hard`` (whether the
hard-label CE is formed) and ``ignore_index``. The forward returns per row

    D, nll, Ls = LSE(z_s/T), Lt = LSE(z_t/T), Ls1 = LSE(z_s) (hard, T != 1; else empty), kt, ks

(``distill.RowStats``); the backward takes the gradients of D and nll and returns
(d/dz_s, d/dz_t), an empty tensor for a side that needs none.

The eager kernels below run chunks of ``chunk`` rows (the row math of
``ger_inductor.distill``, so no N x V buffer but the gradients exists); Inductor lowers
the same math in ``lowerings/distill.py``: one kernel forward (the max, sum and KL
reductions over the classes; no N x V buffer), one elementwise pass backward.

``ger::token_fwd`` / ``ger::token_bwd``: the per-token statistics of
``ger_token_stats`` (log softmax(z/T)[y], the entropy, the row's LSE), the same way.
"""

from __future__ import annotations

import hashlib
import pathlib
from typing import Optional

import torch
from torch import Tensor

from .ger_loss import OPS_NAMESPACE, _ensure_lowerings


def _source_rev() -> int:
    """A hash of the sources that decide these ops' generated code. Every call passes it
    as the ``rev`` argument, so it is part of the graph and of Inductor's FX-graph cache
    key: under ``backend="inductor"`` (which knows nothing of ger's lowerings) a changed
    lowering never reuses a kernel compiled from the old one. (``backend="ger"`` also
    hashes the package into its pass's uuid.)"""
    root = pathlib.Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in ("ops/distill.py", "lowerings/distill.py", "distill.py"):
        h.update((root / rel).read_bytes())
    return int(h.hexdigest()[:12], 16)


#: pass as ``rev`` to every op of this module
REV = _source_rev()


def _cfg(kind, beta, wt, ws, T, hard, ignore_index, cd):
    from ..distill import DistillConfig  # the row math lives with the public API

    return DistillConfig(kind=kind, beta=beta, wt=wt, ws=ws, T=T, hw=0.0, hard=hard, ignore_index=ignore_index,
                         reduction="none", convention="jsd", cd=cd)


def compute_dtype(*dtypes) -> torch.dtype:
    """The math's dtype for inputs of ``dtypes``: float64 if any is, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _chunk(chunk: int, R: int, V: int) -> int:
    from ..distill import _chunk_rows

    return _chunk_rows(chunk or None, R, V)


@torch.library.custom_op(f"{OPS_NAMESPACE}::distill_fwd", mutates_args=())
def distill_fwd(
    zs: Tensor,
    zt: Tensor,
    y: Optional[Tensor],
    kind: str,
    beta: float,
    wt: float,
    ws: float,
    T: float,
    hard: bool,
    ignore_index: int,
    chunk: int,
    rev: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from ..distill import forward_rows

    R, V = zs.shape
    cd = compute_dtype(zs.dtype, zt.dtype)
    cfg = _cfg(kind, beta, wt, ws, T, hard, ignore_index, cd)
    c = _chunk(chunk, R, V)
    D = zs.new_empty((R,), dtype=cd)
    nll = zs.new_empty((R,) if hard else (0,), dtype=cd)
    Ls, Lt, kt, ks = (zs.new_empty((R,), dtype=cd) for _ in range(4))
    Ls1 = zs.new_empty((R,) if hard else (0,), dtype=cd)
    for s in range(0, R, c):
        e = min(s + c, R)
        d_, n_, st, _ = forward_rows(zs[s:e].to(cd), zt[s:e].to(cd), None if y is None else y[s:e], cfg)
        D[s:e] = d_
        if hard:
            nll[s:e] = n_
            Ls1[s:e] = st.Ls1
        Ls[s:e], Lt[s:e], kt[s:e], ks[s:e] = st.Ls, st.Lt, st.kt, st.ks
    return D, nll, Ls, Lt, Ls1, kt, ks


@distill_fwd.register_fake
def _distill_fwd_fake(zs, zt, y, kind, beta, wt, ws, T, hard, ignore_index, chunk, rev):
    _ensure_lowerings()  # a trace is under way: Inductor may lower this op next
    R = zs.shape[0]
    cd = compute_dtype(zs.dtype, zt.dtype)
    row = lambda: zs.new_empty((R,), dtype=cd)  # noqa: E731
    opt = lambda: zs.new_empty((R,) if hard else (0,), dtype=cd)  # noqa: E731
    return row(), opt(), row(), row(), opt(), row(), row()


@torch.library.custom_op(f"{OPS_NAMESPACE}::distill_bwd", mutates_args=())
def distill_bwd(
    gD: Optional[Tensor],
    gn: Optional[Tensor],
    zs: Tensor,
    zt: Tensor,
    y: Optional[Tensor],
    Ls: Tensor,
    Lt: Tensor,
    Ls1: Tensor,
    kt: Tensor,
    ks: Tensor,
    kind: str,
    beta: float,
    wt: float,
    ws: float,
    T: float,
    hard: bool,
    ignore_index: int,
    need_s: bool,
    need_t: bool,
    chunk: int,
    rev: int,
) -> tuple[Tensor, Tensor]:
    from ..distill import RowStats, backward_rows

    R, V = zs.shape
    cd = compute_dtype(zs.dtype, zt.dtype)
    cfg = _cfg(kind, beta, wt, ws, T, hard, ignore_index, cd)
    c = _chunk(chunk, R, V)
    g_s = torch.empty_like(zs) if need_s else zs.new_empty((0,))
    g_t = torch.empty_like(zt) if need_t else zt.new_empty((0,))
    st = RowStats(Ls, Lt, Ls1, kt, ks)
    for s in range(0, R, c):
        e = min(s + c, R)
        sub = RowStats(*(t[s:e] if t.numel() else t for t in st))
        dzs, dzt = backward_rows(zs[s:e].to(cd), zt[s:e].to(cd), None if y is None else y[s:e], cfg, sub,
                                 None if gD is None else gD[s:e].to(cd), None if gn is None else gn[s:e].to(cd),
                                 need_s, need_t)
        if need_s:
            g_s[s:e] = dzs
        if need_t:
            g_t[s:e] = dzt
    return g_s, g_t


@distill_bwd.register_fake
def _distill_bwd_fake(gD, gn, zs, zt, y, Ls, Lt, Ls1, kt, ks, kind, beta, wt, ws, T, hard, ignore_index, need_s,
                      need_t, chunk, rev):
    _ensure_lowerings()
    return (torch.empty_like(zs) if need_s else zs.new_empty((0,)),
            torch.empty_like(zt) if need_t else zt.new_empty((0,)))


# ----------------------------------------------------------------------------- autograd
_CFG_ARGS = ("kind", "beta", "wt", "ws", "T", "hard", "ignore_index")


def _setup_context(ctx, inputs, output):
    zs, zt, y, *cfg, chunk, _rev = inputs
    D, nll, Ls, Lt, Ls1, kt, ks = output
    ctx.save_for_backward(zs, zt, y, Ls, Lt, Ls1, kt, ks)
    ctx.cfg = tuple(cfg)
    ctx.chunk = chunk
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(Ls, Lt, Ls1, kt, ks)
    if not cfg[5]:  # hard
        ctx.mark_non_differentiable(nll)


def _backward(ctx, gD, gn, *_stats):
    zs, zt, y, Ls, Lt, Ls1, kt, ks = ctx.saved_tensors
    kind, beta, wt, ws, T, hard, ignore_index = ctx.cfg
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not hard:
        gn = None
    none = (None,) * (3 + len(_CFG_ARGS) + 2)
    if (gD is None and gn is None) or not (need_s or need_t):
        return none
    if torch.is_grad_enabled():
        # backward(create_graph=True): a differentiable gradient, by autograd through the
        # row math in torch ops (distill_bwd has no derivative), so a double backward works
        from ..distill import _differentiable_grads, forward_rows

        cd = compute_dtype(zs.dtype, zt.dtype)
        cfg = _cfg(kind, beta, wt, ws, T, hard, ignore_index, cd)
        gs = _differentiable_grads(lambda: forward_rows(zs.to(cd), zt.to(cd), y, cfg)[:2], (zs, zt),
                                   (need_s, need_t), (gD, gn))
        it = iter(gs)
        g_s = next(it) if need_s else None
        g_t = next(it) if need_t else None
    else:
        g_s, g_t = distill_bwd(gD, gn, zs, zt, y, Ls, Lt, Ls1, kt, ks, kind, beta, wt, ws, T, hard, ignore_index,
                               need_s, need_t, ctx.chunk, REV)
        g_s = g_s if need_s else None
        g_t = g_t if need_t else None
    return (g_s, g_t) + (None,) * (1 + len(_CFG_ARGS) + 2)


distill_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- per-token RL statistics
@torch.library.custom_op(f"{OPS_NAMESPACE}::token_fwd", mutates_args=())
def token_fwd(z: Tensor, y: Tensor, T: float, chunk: int, rev: int) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, H, L) per row of (R, V) logits at the sampled classes y: log softmax(z/T)[y],
    the entropy of softmax(z/T), and L = LSE(z/T) (``distill.token_forward``)."""
    from ..distill import token_forward

    R, V = z.shape
    cd = compute_dtype(z.dtype)
    c = _chunk(chunk, R, V)
    logp, H, L = (z.new_empty((R,), dtype=cd) for _ in range(3))
    for s in range(0, R, c):
        e = min(s + c, R)
        logp[s:e], H[s:e], L[s:e] = token_forward(z[s:e].to(cd), y[s:e], T)
    return logp, H, L


@token_fwd.register_fake
def _token_fwd_fake(z, y, T, chunk, rev):
    _ensure_lowerings()
    cd = compute_dtype(z.dtype)
    return tuple(z.new_empty((z.shape[0],), dtype=cd) for _ in range(3))


@torch.library.custom_op(f"{OPS_NAMESPACE}::token_bwd", mutates_args=())
def token_bwd(g_lp: Optional[Tensor], g_H: Optional[Tensor], z: Tensor, y: Tensor, L: Tensor, H: Tensor, T: float,
              chunk: int, rev: int) -> Tensor:
    """d/dz of sum(g_lp logp + g_H H) (``distill.token_backward``), in z's dtype."""
    from ..distill import token_backward

    R, V = z.shape
    cd = compute_dtype(z.dtype)
    c = _chunk(chunk, R, V)
    out = torch.empty_like(z)
    for s in range(0, R, c):
        e = min(s + c, R)
        out[s:e] = token_backward(z[s:e].to(cd), y[s:e], T, L[s:e], H[s:e],
                                  None if g_lp is None else g_lp[s:e].to(cd), None if g_H is None else g_H[s:e].to(cd))
    return out


@token_bwd.register_fake
def _token_bwd_fake(g_lp, g_H, z, y, L, H, T, chunk, rev):
    _ensure_lowerings()
    return torch.empty_like(z)


def _token_setup(ctx, inputs, output):
    z, y, T, chunk, _rev = inputs
    logp, H, L = output
    ctx.save_for_backward(z, y, L, H)
    ctx.T, ctx.chunk = T, chunk
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(L)


def _token_backward(ctx, g_lp, g_H, _g_L):
    z, y, L, H = ctx.saved_tensors
    if not ctx.needs_input_grad[0] or (g_lp is None and g_H is None):
        return None, None, None, None, None
    if torch.is_grad_enabled():  # double backward: autograd through the row math
        from ..distill import _differentiable_grads, token_forward

        cd = compute_dtype(z.dtype)
        (g,) = _differentiable_grads(lambda: token_forward(z.to(cd), y, ctx.T)[:2], (z,), (True,), (g_lp, g_H))
        return g, None, None, None, None
    return token_bwd(g_lp, g_H, z, y, L, H, ctx.T, ctx.chunk, REV), None, None, None, None


token_fwd.register_autograd(_token_backward, setup_context=_token_setup)


# ----------------------------------------------------------------------------- chunked heads under compile
@torch.library.custom_op(f"{OPS_NAMESPACE}::after_grad", mutates_args=())
def after_grad(x: Tensor, dep: Tensor) -> Tensor:
    """A copy of ``x`` that depends on ``dep`` (an incoming gradient): the same numbers.

    A chunked head's backward recomputes each chunk's logits from the saved hidden states.
    Traced by ``torch.compile``, that matmul depends on no gradient, so AOT autograd's
    partitioner would run it in the forward and save its output: every chunk's logits, an
    N x V tensor, held until the backward (and the joint graph's CSE merges it with the
    forward's matmul). The backward multiplies ``after_grad(h[rows], g)`` instead, which
    only the backward can compute. Opaque to the compiler; the copy is (rows, H)."""
    return x.clone()


@after_grad.register_fake
def _after_grad_fake(x, dep):
    return torch.empty_like(x)
