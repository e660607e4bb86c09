"""The lm head fused with the GER loss: ``ger_linear_loss`` (public) and the functions the
``lm_head`` pass inserts into Dynamo graphs.

``logits = h @ W.T + b`` followed by any loss the GER op serves is computed by
``ger::linear_loss_fwd`` chunk by chunk over the tokens: the N x V logits and their
gradient are never materialised. When the loss is a known linear function of the op's
per-row statistics (every reduction 'mean'/'sum' spelling: cross-entropy, label
smoothing, entropy terms, GER), the coefficients of that function are found by
differentiating it at zero statistics - O(rows) work - and the forward forms the
gradients in the same sweep (three matmuls, like an unfused head); otherwise the
backward sweeps the chunks again (see ``ops/linear_loss.py``).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from . import losses
from .ops import ger_loss as _loss_op
from .ops import linear_loss as _op


class LinearStats(NamedTuple):
    """``ger::loss_fwd``'s statistics (same order, so ``stats[i]`` reads alike), the
    gradients a precomputing forward formed and the logits the op wrote for a graph that
    returns them (each empty otherwise)."""

    nll: Tensor
    reg: Tensor
    lse: Tensor
    ent: Tensor
    aux: Tensor
    grad_h: Tensor
    grad_w: Tensor
    grad_b: Tensor
    logits: Tensor  # the head's logits when asked for (``logits=True``), else empty


def needs_of(h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> int:
    """Which of h, W, b need a gradient (``ops.linear_loss.NEED_*`` bits)."""
    if not torch.is_grad_enabled():
        return 0
    n = 0
    if h.requires_grad:
        n |= _op.NEED_H
    if weight.requires_grad:
        n |= _op.NEED_W
    if bias is not None and bias.requires_grad:
        n |= _op.NEED_B
    return n


# ----------------------------------------------------------------------------- graph functions
def linear_row_stats(h: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, alpha: float,
                     ignore_index: int, extras: bool, chunk: int, smooth_eps: float | None = None,
                     smooth_weight: Tensor | None = None, coefs: Tensor | None = None, needs: int = 0,
                     base: Tensor | None = None, unroll: int = 0, log_base: Tensor | None = None,
                     logits: bool = False, temperature: float = 1.0, low_div: bool = False,
                     tail: Callable | None = None, tail_inputs: tuple = ()) -> LinearStats:
    """The op's statistics of ``h @ weight.T + bias`` against ``target``, each shaped like
    ``target`` (``h`` is ``target.shape + (H,)``). With ``coefs`` (4, *target.shape) the
    statistics are constants and ``grad_*`` hold the gradients of
    ``sum(coefs[k] * stat_k)`` with respect to the inputs named by ``needs``. ``base``
    (V,): the distribution the regulariser compares with (uniform when None); ``log_base``
    its log as the op takes it (default log(base); 0 for a label-smoothing weight).

    ``unroll`` > 0 (set by the pass for compiled graphs): when the rows are static, their
    number of chunks at most ``unroll`` and no backward sweep is needed (``coefs`` given,
    or no gradient), the chunks are written out in functional torch
    (``ops.linear_loss.unrolled``) for Inductor to fuse; else the op is called.

    ``logits=True``: the op also writes the logits (``h.shape[:-1] + (V,)``, the input
    dtype), chunk by chunk as it forms them, for a graph that returns them; they are not
    differentiable here (``logits_output`` gives them their gradient).

    ``temperature``: the statistics are of ``(h @ weight.T + bias) / temperature``, divided
    in the compute dtype, or with ``low_div`` in the input dtype before the upcast (the
    returned logits are the undivided head output).

    ``tail(stats, *tail_inputs) -> loss`` (instead of ``coefs``): a loss that is a sum of
    per-row terms, non-linear in each row's statistics (a PPO objective): the gradients are
    formed in the forward, each chunk's coefficients being d loss / d statistics at that
    chunk's statistics (``rowwise_coefficients``). The chunk loop is then unrolled (static
    rows only)."""
    H = h.shape[-1]
    V = weight.shape[0]
    cdt = _loss_op.compute_dtype(h.dtype)
    u, log_u = base, (torch.log(base) if log_base is None else log_base) if base is not None else None
    if smooth_weight is not None:
        st = losses.smoothing_target(smooth_eps, smooth_weight, None, V, cdt)
        u, log_u = st.u, st.log_u
    flat_coefs = None if coefs is None else coefs.reshape(4, -1)
    N = target.numel()
    if tail is not None:
        nll, reg, lse, ent, aux, gh, gw, gb = _op.unrolled(
            h.reshape(-1, H), weight, bias, target.reshape(-1), u, log_u, float(alpha), int(ignore_index),
            bool(extras), int(chunk), None, int(needs), None, float(temperature), bool(low_div),
            coef_fn=rowwise_coefficients(tail, tail_inputs, target.shape, extras, cdt))
        rows = target.shape
        return LinearStats(nll.reshape(rows), reg.reshape(rows), lse.reshape(rows),
                           ent.reshape(rows) if extras else ent, aux.reshape(rows), gh, gw, gb, h.new_empty((0,)))
    fn = torch.ops.ger.linear_loss_fwd
    if unroll and not logits and isinstance(N, int) and N > 0 and (coefs is not None or needs == 0):
        if -(-N // _op.rows_per_chunk(chunk, N, V)) <= unroll:
            fn = _op.unrolled
    out = fn(
        h.reshape(-1, H), weight, bias, target.reshape(-1), u, log_u, float(alpha),
        int(ignore_index), bool(extras), int(chunk), flat_coefs, int(needs), [*h.shape[:-1], V] if logits else None,
        float(temperature), bool(low_div),
    )
    rows = target.shape
    nll, reg, lse, ent, aux, gh, gw, gb = out[:8]
    lo = out[8] if logits else h.new_empty((0,))
    return LinearStats(nll.reshape(rows), reg.reshape(rows), lse.reshape(rows), ent.reshape(rows) if extras else ent,
                       aux.reshape(rows), gh, gw, gb, lo)


def rowwise_coefficients(tail: Callable, tail_inputs: tuple, rows, extras: bool, dtype: torch.dtype) -> Callable:
    """``coef_fn`` for ``ops.linear_loss.unrolled``: the (4, e - s) coefficients of rows
    s:e are d tail(stats) / d (nll, reg, lse, ent) at statistics that hold the chunk's own
    values in rows s:e (zeros elsewhere). Exact for a loss that is a sum of per-row terms
    (the pass checks it): a row's derivative then depends on that row's statistics only."""
    N = math.prod(rows)

    def coef_fn(s, e, nll, reg, lse, ent, aux):
        empty = torch.zeros((0,), dtype=dtype, device=nll.device)
        with torch.enable_grad():
            def full(x, grad: bool):
                f = torch.nn.functional.pad(x.detach().to(dtype), (s, N - e)).reshape(rows)
                return f.requires_grad_() if grad else f

            leaves = LinearStats(full(nll, True), full(reg, True), full(lse, True),
                                 full(ent, True) if extras else empty, full(aux, False), empty, empty, empty, empty)
            loss = tail(leaves, *tail_inputs)
        return stat_coefficients(loss, leaves).reshape(4, -1)[:, s:e]

    return coef_fn


def stat_leaves(target: Tensor, dtype: torch.dtype, extras: bool) -> LinearStats:
    """Zero statistics shaped like ``target`` that require grad: the point at which
    ``stat_coefficients`` differentiates the loss (a linear function of them)."""
    with torch.enable_grad():
        def leaf():
            return torch.zeros(target.shape, dtype=dtype, device=target.device).requires_grad_()

        empty = torch.zeros((0,), dtype=dtype, device=target.device)
        ent = leaf() if extras else empty
        aux = torch.zeros(target.shape, dtype=dtype, device=target.device)
        return LinearStats(leaf(), leaf(), leaf(), ent, aux, empty, empty, empty, empty)


def stat_coefficients(loss: Tensor, leaves: LinearStats) -> Tensor:
    """d loss / d (nll, reg, lse, ent) at the leaves, stacked (4, *rows)."""
    wrt = [t for t in leaves[:4] if t.requires_grad]
    with torch.enable_grad():
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    it = iter(grads)
    out = []
    for t in leaves[:4]:
        g = next(it) if t.requires_grad else None
        out.append(torch.zeros_like(leaves.nll) if g is None else g.to(leaves.nll.dtype))
    return torch.stack(out)


def add_carrier(loss: Tensor, stats: LinearStats, h: Tensor, weight: Tensor, bias: Optional[Tensor],
                keep: tuple = ()) -> Tensor:
    """``loss`` plus a zero that carries the upstream gradient to h, weight and bias;
    ``keep``: tensors eager's loss code would save (autograd checks their versions)."""
    z = torch.ops.ger.grad_carrier(h.reshape(-1, h.shape[-1]), weight, bias, stats.grad_h, stats.grad_w, stats.grad_b,
                                   [t for t in keep if isinstance(t, Tensor)])
    return loss + z.to(loss.dtype)


def logits_stand_in(h: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
    """A zero-stride tensor of the logits' shape and dtype: what is left of the logits
    for code that reads only their shape (the rewritten loss's shape arguments)."""
    return torch.zeros((), dtype=dtype, device=h.device).expand(*h.shape[:-1], weight.shape[0])


class _LogitsGrad(torch.autograd.Function):
    """The logits a fused head wrote, given back their own gradient: the linear's
    backward (grad_h = g W, grad_W = g^T h, grad_b = sum g), run only when a gradient
    reaches the logits. Returns ``z.detach()``: the same storage and version counter (a
    caller's write is seen by any version check on ``z``), not a view, so in-place code
    may write it as it may write eager's logits. (Returning ``z`` itself would need
    ``mark_dirty``, which bumps the version counter.)"""

    @staticmethod
    def forward(ctx, z, h, weight, bias):
        ctx.save_for_backward(h, weight)  # what eager's linear saves: same version checks
        ctx.has_bias = bias is not None
        return z.detach()

    @staticmethod
    def backward(ctx, g):
        h, weight = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gh = (g2 @ weight).reshape(h.shape) if ctx.needs_input_grad[1] else None
        gw = g2.t() @ h.reshape(-1, h.shape[-1]) if ctx.needs_input_grad[2] else None
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return None, gh, gw, gb


def logits_output(z: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The head's logits ``z`` (written by the fused op, not differentiable) as the graph
    returns them, with the gradient of ``h @ weight.T + bias``. In a graph ger compiles,
    this node is taken out before AOTAutograd (``passes.lm_head.detach_logits_outputs``)
    and applied to the compiled graph's outputs: inside the graph, AOTAutograd would give
    the returned logits an N x V zero gradient in every backward that does not use them."""
    if not torch.is_grad_enabled() or not any(
            isinstance(t, Tensor) and t.requires_grad for t in (h, weight, bias)):
        return z
    return _LogitsGrad.apply(z, h, weight, bias)


GRAPH_FUNCTIONS = (linear_row_stats, stat_leaves, stat_coefficients, add_carrier, logits_stand_in, logits_output)


# ----------------------------------------------------------------------------- eager / public
def linear_loss_head(h: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, *, alpha: float,
                     ignore_index: int, extras: bool, chunk: int, combine: Callable[[LinearStats], Tensor],
                     base: Tensor | None = None, log_base: Tensor | None = None, keep: tuple = ()) -> Tensor:
    """``combine(stats)`` of the fused head's statistics, with the gradients formed in
    the forward when ``combine`` returns a scalar (it must then be linear in the
    statistics) and by a second sweep otherwise. ``keep``: tensors ``combine`` reads that
    the unfused loss would save (class weights; the target is kept anyway)."""
    needs = needs_of(h, weight, bias)
    kw = dict(base=base, log_base=log_base)
    if needs:
        cdt = _loss_op.compute_dtype(h.dtype)
        leaves = stat_leaves(target, cdt, extras)
        probe = combine(leaves)
        if probe.numel() == 1:
            coefs = stat_coefficients(probe, leaves)
            stats = linear_row_stats(h, weight, bias, target, alpha, ignore_index, extras, chunk, coefs=coefs,
                                     needs=needs, **kw)
            return add_carrier(combine(stats), stats, h, weight, bias, (target, base, *keep))
    stats = linear_row_stats(h, weight, bias, target, alpha, ignore_index, extras, chunk, **kw)
    return combine(stats)


def ger_linear_loss(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    alpha: float | None = None,
    beta: float | Tensor | None = None,
    base: Tensor | None = None,
    ignore_index: int | None = -100,
    weight: Tensor | None = None,
    reduction: str = "mean",
    label_smoothing: float | None = None,
    chunk: int | None = None,
) -> Tensor:
    """``ger_loss(F.linear(input, linear_weight, linear_bias), target, ...)`` without ever
    holding the (N, V) logits or their gradient: the tokens are processed ``chunk`` rows
    at a time (default: a ~256 MiB fp32 chunk buffer).

    Argument names follow ``F.linear_cross_entropy``: ``weight`` is the per-class weight
    of the loss, ``linear_weight`` (V, H) and ``linear_bias`` (V,) the head's. ``input``
    is (..., H) and ``target`` its shape without H. The other arguments are
    ``ger_loss``'s; with neither (alpha, beta) nor label_smoothing it is the plain
    cross-entropy. With reduction 'mean' or 'sum' the forward also forms the gradients
    (three matmuls in all); with 'none' the backward recomputes the logits chunk by chunk.

    >>> import torch
    >>> h, W, y = torch.randn(6, 8), torch.randn(50, 8), torch.randint(0, 50, (6,))
    >>> a = ger_linear_loss(h, W, y, label_smoothing=0.1)
    >>> torch.allclose(a, torch.nn.functional.cross_entropy(h @ W.T, y, label_smoothing=0.1), atol=1e-6)
    True
    """
    if not all(isinstance(t, Tensor) for t in (input, linear_weight, target)):
        raise TypeError("ger_linear_loss: input, linear_weight and target must be tensors")
    if input.dim() < 1 or linear_weight.dim() != 2:
        raise ValueError(f"ger_linear_loss: expected input (..., H) and linear_weight (V, H), got "
                         f"{tuple(input.shape)} and {tuple(linear_weight.shape)}")
    if input.shape[-1] != linear_weight.shape[1]:
        raise ValueError(f"ger_linear_loss: input has {input.shape[-1]} features but linear_weight "
                         f"{tuple(linear_weight.shape)} expects {linear_weight.shape[1]}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"ger_linear_loss: target must have shape {tuple(input.shape[:-1])} (input without its "
                         f"last dimension), got {tuple(target.shape)}")
    if input.dtype not in losses.LOGIT_DTYPES:
        raise TypeError(f"ger_linear_loss: input must be float16, bfloat16, float32 or float64, got {input.dtype}")
    if linear_weight.dtype != input.dtype or (linear_bias is not None and linear_bias.dtype != input.dtype):
        raise TypeError("ger_linear_loss: input, linear_weight and linear_bias must share a dtype")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"ger_linear_loss: chunk must be a positive int (rows per chunk), got {chunk!r}")
    if alpha is None and beta is None and label_smoothing is None:
        label_smoothing = 0.0  # plain cross-entropy, as F.linear_cross_entropy
    if ignore_index is None:  # F.linear_cross_entropy's default, which it maps to -100
        ignore_index = -100
    params = losses.loss_params(input, target, alpha=alpha, beta=beta, base=base, ignore_index=ignore_index,
                                weight=weight, reduction=reduction, label_smoothing=label_smoothing,
                                V=linear_weight.shape[0], who="ger_linear_loss")
    ignore_index = int(ignore_index)
    target2 = target.reshape(-1)
    if target2.dtype == torch.uint8:  # F.cross_entropy's other index dtype: read as int64
        target2 = target2.long()

    def combine(stats: LinearStats) -> Tensor:
        return losses.combine_rows(
            stats.nll, stats.reg, target2, target.shape, beta=params.beta, eps=params.eps,
            smooth_scale=params.smooth_scale, smooth_const=params.smooth_const, weight=weight,
            ignore_index=ignore_index, reduction=reduction, out_dtype=input.dtype, lse=stats.lse,
            smooth_lse=params.smooth_lse,
        )

    h2 = input.reshape(-1, input.shape[-1])
    return linear_loss_head(h2, linear_weight, linear_bias, target2, alpha=params.alpha, ignore_index=ignore_index,
                            extras=False, chunk=chunk or 0, combine=combine, base=params.u,
                            log_base=params.log_u, keep=(weight,))
