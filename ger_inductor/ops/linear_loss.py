"""``ger::linear_loss_fwd`` / ``ger::linear_loss_bwd`` / ``ger::grad_carrier``: an lm head
(``logits = h @ W.T + b``) and the GER loss statistics as one op, chunked over tokens so
the N x V logits and their gradient never exist at once.

Per chunk of ``chunk`` rows of ``h`` (N, H) the kernel forms the chunk's logits in one
reused buffer, reduces them to the same per-row statistics as ``ger::loss_fwd``
(nll, reg, lse, ent, aux: see ``ops/ger_loss.py``) and, when row coefficients are given,
turns the same buffer in place into the logits' gradient

    dz_j = c_nll (p_j - [j=y]) + c_reg dJ/dz_j + c_lse p_j - c_ent p_j (z_j - E_p[z])

and multiplies it out at once: grad_h[rows] = dz @ W, grad_W += dz^T @ h[rows],
grad_b += sum_rows dz. Peak extra memory is one (chunk, V) buffer in the compute dtype
(plus a second one for the entropy and general-alpha terms, and a (chunk, V) low-precision
copy of dz for bf16/fp16 matmuls) and the fp32 grad_W accumulator.

Two ways to get gradients:

* **precompute** (``coefs`` given): the caller knows, before the forward, how the loss
  depends on the statistics - a linear combination with coefficients ``coefs`` (4, N)
  for (nll, reg, lse, ent) - so the forward computes the statistics and the gradients of
  that combination in one sweep: three matmuls in all, like an unfused head. The
  statistics are then not differentiable; ``ger::grad_carrier`` (a zero added to the
  loss) carries the upstream gradient to h, W and b in the backward.
* **recompute** (``coefs`` None): the statistics are differentiable, and the backward
  (``ger::linear_loss_bwd``) sweeps the chunks again with the incoming row gradients as
  coefficients: four matmuls in all, for losses that are not a known linear function of
  the statistics (e.g. ``reduction='none'``).

``logits`` (a shape ``(rows..., V)``, or None): the op also writes the logits, each
chunk's straight into that output as it forms them, for a graph that returns them (not
differentiable here: ``lm_head.logits_output``).

Logits are formed in the input dtype (as ``F.linear`` does) and reduced in float32
(float64 for float64 inputs); the chunk's logits gradient is cast to the input dtype for
the two gradient matmuls, grad_W and grad_b accumulate in the compute dtype.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _compat
from .ger_loss import OPS_NAMESPACE, xmul, check_targets, compute_dtype, log_ratio_p_m, scaled_grad

#: size of the low-precision grad_W block formed per matmul before it is added in fp32
GRAD_W_BLOCK_BYTES = 32 << 20

#: bits of ``needs``: which gradients to form
NEED_H, NEED_W, NEED_B = 1, 2, 4


def rows_per_chunk(chunk: int, N, V) -> int:
    """Rows per chunk: ``chunk``, or when it is 0 (the caller left it to the op, e.g. a
    symbolic V at compile time) the rows of a ~256 MiB fp32 (rows, V) buffer; at most N."""
    c = chunk if chunk > 0 else max(64, min(4096, (256 << 20) // max(1, 4 * V)))
    return max(1, min(c, N))


def _skew_jensen(p: Tensor, lp: Tensor, u: Optional[Tensor], lu: Optional[Tensor], alpha: float, V, log_v):
    """Per row, for 0 < alpha < 1: (J_alpha(p || u), KL(p || m), log(p / m)) with
    m = alpha p + (1 - alpha) u (u uniform when None)."""
    if u is None:
        u = torch.full((), 1.0 / V, dtype=p.dtype, device=p.device)
        lu = -log_v + torch.zeros((), dtype=p.dtype, device=p.device)
    u, lu = u.expand_as(lp), lu.expand_as(lp)
    log_p_m, log_u_m = log_ratio_p_m(lp, lu, p, u, alpha)
    kl_pm = xmul(p, log_p_m).sum(1)
    return kl_pm / (1.0 - alpha) + xmul(u, log_u_m).sum(1) / alpha, kl_pm, log_p_m


def _row_coefs(alpha, uniform, log_v, g_nll, g_reg, g_lse, g_ent, ezs, logs, reg, aux):
    """Per-row (A, B) of the logits gradient

        dz = p * (A + B (z - m) + X_j) - [alpha = 1] g_reg u_j - g_nll [j = y]

    where X_j = g_reg / (1 - alpha) log(p_j / m_j) for general alpha, -g_reg log u_j for
    alpha = 0 with a non-uniform base, else 0 (B is None when it is 0)."""
    A = g_nll + g_lse
    B = None
    if g_ent is not None:
        A = A + g_ent * ezs
        B = -g_ent
    if alpha == 1.0:
        A = A + g_reg
    elif alpha == 0.0:
        # dJ/dz = p (log p - log u - KL) = p ((z - m) - log s - log u - KL)
        A = A + g_reg * (-logs - reg + (log_v if uniform else 0.0))
        B = g_reg if B is None else B + g_reg
    else:
        A = A - g_reg * aux / (1.0 - alpha)
    return A, B


def _kernel(h: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, base: Optional[Tensor],
            log_base: Optional[Tensor], alpha: float, ignore_index: int, extras: bool, chunk: int,
            coefs: Optional[Tensor], needs: int, logits: Optional[list] = None, temperature: float = 1.0,
            low_div: bool = False):
    N, H = h.shape
    V = weight.shape[0]
    check_targets(target, V, ignore_index)
    cd = compute_dtype(h.dtype)
    dev = h.device
    c = rows_per_chunk(chunk, N, V)
    valid = target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target))
    uniform = base is None
    log_v = math.log(V)
    if not uniform:
        u = base.to(cd)
        lu = log_base.to(cd)
        u_lu = xmul(u, lu).sum()
    nll = torch.empty(N, dtype=cd, device=dev)
    reg = torch.empty_like(nll)
    lse = torch.empty_like(nll)
    aux = torch.empty_like(nll)
    ent = torch.empty_like(nll) if extras else torch.empty((0,), dtype=cd, device=dev)
    grads = coefs is not None
    need_h = grads and bool(needs & NEED_H)
    need_w = grads and bool(needs & NEED_W)
    need_b = grads and bool(needs & NEED_B) and bias is not None
    gh = torch.empty_like(h) if need_h else h.new_empty((0,))
    gw = torch.zeros(V, H, dtype=cd, device=dev) if need_w else h.new_empty((0,))
    gb = torch.zeros(V, dtype=cd, device=dev) if need_b else h.new_empty((0,))
    # the logits themselves, in the input dtype and the shape ``logits`` (rows..., V) the
    # caller returns them in (a tensor of its own, not a view: the caller may write it)
    lo = torch.empty(logits, dtype=h.dtype, device=dev) if logits is not None else h.new_empty((0,))
    lo2 = lo.view(N, V) if logits is not None else None
    # one buffer for the chunk's logits (in the compute dtype), reused by every chunk
    buf = torch.empty(c, V, dtype=cd, device=dev)
    low = None if h.dtype == cd else torch.empty(c, V, dtype=h.dtype, device=dev)
    # the shifted logits z - m, kept for the entropy and the alpha != 1 terms
    buf2 = torch.empty(c, V, dtype=cd, device=dev) if (extras or alpha != 1.0) else None
    # low-precision inputs: grad_W accumulates in the compute dtype; each chunk's product
    # is formed in the input dtype (the fast matmul) a block of classes at a time
    vb = max(1, GRAD_W_BLOCK_BYTES // max(1, H * h.element_size()))
    w_dtype = _w_product_dtype(h.dtype, cd, dev, _compat.ceil_div(N, c))
    gw_tmp = torch.empty(min(vb, V), H, dtype=w_dtype, device=dev) if need_w and h.dtype != cd else None
    wt = weight.t()
    # ``temperature`` != 1: the statistics are of (h @ W.T + b) / temperature, divided in
    # the compute dtype, or in the input dtype before the upcast (``low_div``: bf16/fp16
    # logits divided as such, then upcast), and the logits gradient is divided alike
    scaled = temperature != 1.0
    low_div = scaled and low_div and h.dtype != cd
    for s in range(0, N, c):
        e = min(s + c, N)
        r = e - s
        hc = h[s:e]
        z = buf[:r]
        # ---- logits of the chunk, in the input dtype, then the compute dtype
        src = z  # what the row statistics read before z holds z - m
        if lo2 is not None:
            zl = lo2[s:e]
            if bias is None:
                torch.mm(hc, wt, out=zl)
            else:
                torch.addmm(bias, hc, wt, out=zl)
            if scaled and zl.dtype == cd:
                torch.div(zl, temperature, out=z)
            elif zl.dtype == cd:
                src = zl  # read where it was written; z - m formed in one pass below
            elif low_div:
                z.copy_(torch.div(zl, temperature, out=low[:r]))
            else:
                z.copy_(zl)
                if scaled:
                    z.div_(temperature)
        elif low is None:
            if bias is None:
                torch.mm(hc, wt, out=z)
            else:
                torch.addmm(bias.to(cd), hc, wt, out=z)
            if scaled:
                z.div_(temperature)
        else:
            zl = low[:r]
            if bias is None:
                torch.mm(hc, wt, out=zl)
            else:
                torch.addmm(bias, hc, wt, out=zl)
            if low_div:
                zl.div_(temperature)  # in the input dtype, as ``(h @ W.T) / T`` before the upcast
            z.copy_(zl)
            if scaled and not low_div:
                z.div_(temperature)  # in the compute dtype, after the upcast
        tc, vc = t[s:e], valid[s:e]
        # ---- statistics
        m = src.amax(1)
        zy = src.gather(1, tc.unsqueeze(1)).squeeze(1)
        if alpha == 1.0:
            zu = src.sum(1) / V if uniform else torch.mv(src, u)  # E_u[z]
        if src is z:
            z.sub_(m.unsqueeze(1))  # z - m
        else:
            torch.sub(src, m.unsqueeze(1), out=z)
        zs = None
        if buf2 is not None:
            zs = buf2[:r]
            zs.copy_(z)
            # z - m = -inf (a -inf logit: a vocabulary masked by a -inf bias) read as 0
            # where it meets its zero probability: 0 log 0 = 0 in E_p[z - m] and in the
            # gradient's B (z - m) term, as the loss op's convention (NaN stays NaN)
            zs.nan_to_num_(nan=math.nan, posinf=math.inf, neginf=0.0)
        z.exp_()  # e = exp(z - m)
        ssum = z.sum(1)
        logs = ssum.log()
        L = m + logs
        lse[s:e] = L
        nll[s:e] = torch.where(vc, L - zy, torch.zeros((), dtype=cd, device=dev))
        ezs = None  # E_p[z - m]
        if zs is not None and (extras or alpha == 0.0):
            ezs = torch.linalg.vecdot(z, zs) / ssum
            H_ = logs - ezs
            if extras:
                ent[s:e] = H_
        log_p_m = None
        if alpha == 1.0:
            # KL(u || p) = sum u log u - E_u[z] + L
            r_ = (L - zu - log_v) if uniform else (u_lu - zu + L)
            reg[s:e] = r_
            aux[s:e] = 0.0
        elif alpha == 0.0:
            # KL(p || u) = -H - E_p[log u]
            r_ = (-H_ + log_v) if uniform else (-H_ - torch.mv(z, lu) / ssum)
            reg[s:e] = r_
            aux[s:e] = r_
        else:
            p = z.div(ssum.unsqueeze(1))
            lp = zs.sub(logs.unsqueeze(1))
            reg[s:e], aux[s:e], log_p_m = _skew_jensen(p, lp, None if uniform else u, None if uniform else lu,
                                                       alpha, V, log_v)
            del lp, p
        if not grads:
            continue
        # ---- the chunk's logits gradient, in place in ``buf`` (holds e = exp(z - m))
        g_nll = torch.where(vc, coefs[0, s:e], torch.zeros((), dtype=cd, device=dev))
        g_reg, g_lse = coefs[1, s:e], coefs[2, s:e]
        g_ent = coefs[3, s:e] if extras else None
        A, B = _row_coefs(alpha, uniform, math.log(V), g_nll, g_reg, g_lse, g_ent, ezs, logs, reg[s:e], aux[s:e])
        if B is not None or log_p_m is not None or (alpha == 0.0 and not uniform):
            if B is not None:
                G = zs.mul_(B.unsqueeze(1)).add_(A.unsqueeze(1))
            else:
                G = zs.fill_(0.0).add_(A.unsqueeze(1))
            if log_p_m is not None:
                # p log(p/m) -> 0 where p underflowed to 0
                log_p_m = torch.nan_to_num_(log_p_m, nan=0.0, neginf=0.0, posinf=0.0)
                G.addcmul_(log_p_m, (g_reg / (1.0 - alpha)).unsqueeze(1))
            if alpha == 0.0 and not uniform:
                G.addr_(g_reg, lu, alpha=-1.0)
            z.mul_(G).div_(ssum.unsqueeze(1))
        else:
            z.mul_((A / ssum).unsqueeze(1))
        if alpha == 1.0:
            if uniform:
                z.sub_((g_reg / V).unsqueeze(1))
            else:
                z.addr_(g_reg, u, alpha=-1.0)
        z.scatter_add_(1, tc.unsqueeze(1), (-g_nll).unsqueeze(1))
        if scaled and not low_div:
            z.div_(temperature)
        dz = z
        if low is not None:
            dz = low[:r]
            dz.copy_(z)
            if low_div:  # the division's backward in the input dtype, as eagerly
                dz.div_(temperature)
                z.div_(temperature)  # for grad_b
        if need_h:
            torch.mm(dz, weight, out=gh[s:e])
        if need_w:
            if gw_tmp is None:
                gw.addmm_(dz.t(), hc)
            else:
                hcw = hc.to(cd) if gw_tmp.dtype == cd else hc
                for v0 in range(0, V, vb):
                    v1 = min(v0 + vb, V)
                    tmp = gw_tmp[: v1 - v0]
                    torch.mm(dz[:, v0:v1].t().to(gw_tmp.dtype), hcw, out=tmp)
                    gw[v0:v1].add_(tmp)
        if need_b:
            gb.add_(z.sum(0))
    if need_w and weight.dtype != cd:
        gw = gw.to(weight.dtype)
    if need_b and bias.dtype != cd:
        gb = gb.to(bias.dtype)
    return nll, reg, lse, ent, aux, gh, gw, gb, lo


def _w_product_dtype(dtype: torch.dtype, cd: torch.dtype, dev: torch.device, chunks: int) -> torch.dtype:
    """The dtype of a chunk's grad_W product of ``dtype`` inputs, over ``chunks`` chunks.
    Eager forms grad_W in one product over all rows, rounded once to bf16/fp16. One chunk:
    the same product (the input dtype, the fast matmul). Several, on CPUs: a product per
    chunk rounded to bf16 and then summed rounds twice (1 ulp off eager's on a third of
    the entries, stop-38 review), so each chunk's product is formed from the upcast
    inputs (exact products, fp32 sums; ~1.3x the bf16 matmul's time on an AVX-512-bf16
    CPU) and the sum is rounded once. On GPUs the input dtype (an fp32 matmul costs
    several times the tensor cores' one): a documented deviation of one ulp
    (docs/patterns.md)."""
    return cd if dev.type == "cpu" and chunks > 1 else dtype


def _w_product(a_t: Tensor, b: Tensor, cd: torch.dtype, chunks: int) -> Tensor:
    """``a_t @ b`` (a chunk's grad_W product) in the compute dtype (``_w_product_dtype``)."""
    if _w_product_dtype(b.dtype, cd, b.device, chunks) == cd:
        return a_t.to(cd) @ b.to(cd)
    return (a_t @ b).to(cd)


# ----------------------------------------------------------------------------- traced form
def unrolled(h: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, base: Optional[Tensor],
             log_base: Optional[Tensor], alpha: float, ignore_index: int, extras: bool, chunk: int,
             coefs: Optional[Tensor], needs: int, logits: Optional[list] = None, temperature: float = 1.0,
             low_div: bool = False, coef_fn=None):
    """The op's forward (statistics and, with ``coefs``, gradients) in functional torch
    with the chunk loop unrolled - for AOTAutograd to trace when the number of rows is
    static, so that Inductor fuses each chunk's row reductions and its logits gradient
    into a few kernels (Triton on GPUs, C++ on CPUs) and reuses the chunk buffers. Same
    math as :func:`_kernel`; no autograd through it (the gradients are explicit).

    ``coef_fn(s, e, nll, reg, lse, ent, aux)`` (instead of ``coefs``): the row
    coefficients of rows s:e from those rows' statistics, called once per chunk between
    its statistics and its gradient - for a loss whose gradient in each row's statistics
    depends on that row's statistics only (``lm_head.rowwise_coefficients``)."""
    from ..losses import log_classes

    if logits is not None:
        raise ValueError("ger linear loss: the unrolled form does not write the logits (the op does)")
    h, weight = h.detach(), weight.detach()
    bias = None if bias is None else bias.detach()
    N, H = h.shape
    V = weight.shape[0]
    cd = compute_dtype(h.dtype)
    dev = h.device
    c = rows_per_chunk(chunk, N, V)
    zero = torch.zeros((), dtype=cd, device=dev)
    valid = target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target))
    uniform = base is None
    log_v = log_classes(V)
    if not uniform:
        u, lu = base.to(cd), log_base.to(cd)
        u_lu = xmul(u, lu).sum()
    grads = coefs is not None or coef_fn is not None
    need_h, need_w = grads and bool(needs & NEED_H), grads and bool(needs & NEED_W)
    need_b = grads and bool(needs & NEED_B) and bias is not None
    cols = torch.arange(V, device=dev)
    scaled = temperature != 1.0
    low_div = scaled and low_div and h.dtype != cd
    out: dict[str, list] = {k: [] for k in ("nll", "reg", "lse", "ent", "aux", "gh")}
    gw = gb = None
    done: list = []  # what the previous chunk produced: the next one starts after it
    for s in range(0, N, c):
        e = min(s + c, N)
        hc, tc, vc = h[s:e], t[s:e], valid[s:e]
        if done:
            hc = torch.ops.ger.after(hc, done)
        z = torch.nn.functional.linear(hc, weight, bias)
        if scaled and low_div:
            z = torch.ops.ger.lowp_div(z, float(temperature))  # in the input dtype, before the upcast
        z = z.to(cd)
        if scaled and not low_div:
            z = z / temperature
        m = z.amax(1, keepdim=True)
        zs = z - m
        zs0 = zs
        ex = zs.exp()
        if extras or alpha != 1.0:
            # -inf (a masked class) read as 0 where it meets its zero probability, as in
            # the kernel (0 log 0 = 0); the skew-Jensen's log p is formed from zs below
            # and takes the exact limits at p = 0 either way
            zs = torch.nan_to_num(zs, nan=math.nan, posinf=math.inf, neginf=0.0)
        ssum = ex.sum(1, keepdim=True)
        logs = ssum.log()
        L = (m + logs).squeeze(1)
        # exp(log_softmax), as eager's softmax in its backward, and recomputed where read:
        # ex / ssum made Inductor write ex, an fp32 chunk-sized buffer, for its two readers
        p = (zs0 - logs).exp()
        nll = torch.where(vc, L - z.gather(1, tc.unsqueeze(1)).squeeze(1), zero)
        ezs = (p * zs).sum(1) if (extras or alpha == 0.0) else None
        H_ = None if ezs is None else logs.squeeze(1) - ezs
        log_p_m = None
        if alpha == 1.0:
            zu = z.mean(1) if uniform else torch.mv(z, u)
            reg = (L - zu - log_v) if uniform else (u_lu - zu + L)
            aux = torch.zeros_like(reg)
        elif alpha == 0.0:
            reg = (-H_ + log_v) if uniform else (-H_ - torch.mv(p, lu))
            aux = reg
        else:
            reg, aux, log_p_m = _skew_jensen(p, zs - logs, None if uniform else u, None if uniform else lu,
                                             alpha, V, log_v)
        for k, v in (("nll", nll), ("reg", reg), ("lse", L), ("aux", aux)):
            out[k].append(v)
        if extras:
            out["ent"].append(H_)
        done = [nll, reg]
        if not grads:
            continue
        cf = coefs[:, s:e] if coef_fn is None else coef_fn(s, e, nll, reg, L, H_, aux)
        g_nll = torch.where(vc, cf[0], zero)
        g_reg, g_lse = cf[1], cf[2]
        A, B = _row_coefs(alpha, uniform, log_v, g_nll, g_reg, g_lse, cf[3] if extras else None, ezs,
                          logs.squeeze(1), reg, aux)
        G = A.unsqueeze(1)
        if B is not None:
            G = G + B.unsqueeze(1) * zs
        if log_p_m is not None:
            G = G + (g_reg / (1.0 - alpha)).unsqueeze(1) * torch.nan_to_num(log_p_m, nan=0.0, neginf=0.0, posinf=0.0)
        if alpha == 0.0 and not uniform:
            G = G - g_reg.unsqueeze(1) * lu
        dz = p * G
        if alpha == 1.0:
            dz = dz - ((g_reg / V).unsqueeze(1) if uniform else g_reg.unsqueeze(1) * u)
        dz = dz - torch.where(cols == tc.unsqueeze(1), g_nll.unsqueeze(1), zero)
        if scaled and not low_div:
            dz = dz / temperature
        dzl = dz.to(h.dtype)
        if low_div:  # the division's backward in the input dtype, as eagerly
            dzl = torch.ops.ger.lowp_div(dzl, float(temperature))
            dz = dz / temperature  # for grad_b
        if need_h:
            out["gh"].append(dzl @ weight)
        if need_w:
            if gw is not None and hc.dtype == cd:  # one extern addmm: no separate pass adding the (V, H) product
                gw = torch.addmm(gw, dzl.t(), hc)
            else:
                part = _w_product(dzl.t(), hc, cd, _compat.ceil_div(N, c))
                gw = part if gw is None else gw + part
        if need_b:
            part_b = dz.sum(0)
            gb = part_b if gb is None else gb + part_b
        done = [t_ for t_ in (out["gh"][-1] if need_h else None, gw, gb, nll) if t_ is not None]
    empty = h.new_empty((0,))
    cat = {k: torch.cat(v) if v else empty for k, v in out.items()}
    ent = cat["ent"] if extras else torch.empty((0,), dtype=cd, device=dev)
    return (cat["nll"], cat["reg"], cat["lse"], ent, cat["aux"], cat["gh"] if need_h else empty,
            gw.to(weight.dtype) if need_w else empty, gb.to(bias.dtype) if need_b else empty)


@torch.library.custom_op(f"{OPS_NAMESPACE}::after", mutates_args=())
def after(x: Tensor, deps: list[Tensor]) -> Tensor:
    """``x``, once ``deps`` exist: an ordering edge for Inductor. The unrolled chunks are
    independent, and Inductor would otherwise fuse and schedule them side by side (every
    chunk's buffers alive at once, as much memory as the full logits). ``x`` is a chunk
    of ``h``, so the copy is small."""
    return x.clone()


@after.register_fake
def _after_fake(x, deps):
    return torch.empty_like(x)


@torch.library.custom_op(f"{OPS_NAMESPACE}::lowp_div", mutates_args=())
def lowp_div(x: Tensor, divisor: float) -> Tensor:
    """``x / divisor`` in ``x``'s (bfloat16/float16) dtype, rounded as eagerly: the input
    as stored, the quotient rounded to that dtype. Inductor keeps a low-precision
    intermediate that is fused into its consumer in fp32 (the downcast and upcast elided);
    this op's lowering (lowerings/ger_loss.py) writes both roundings explicitly. The
    unrolled lm head divides bf16/fp16 logits and their gradient before / after the
    upcast with it (``unrolled(low_div=True)``)."""
    return x / divisor


@lowp_div.register_fake
def _lowp_div_fake(x, divisor):
    return torch.empty_like(x)


def _check(h: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor) -> None:
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"ger linear loss: expected h (N, H) and weight (V, H), got {tuple(h.shape)} and {tuple(weight.shape)}")
    if target.shape != h.shape[:1]:
        raise ValueError(f"ger linear loss: target must be (N,) = {tuple(h.shape[:1])}, got {tuple(target.shape)}")
    if weight.dtype != h.dtype or (bias is not None and bias.dtype != h.dtype):
        raise TypeError(f"ger linear loss: h, weight and bias must share a dtype, got {h.dtype}, {weight.dtype}"
                        f"{'' if bias is None else ', ' + str(bias.dtype)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"ger linear loss: bias must be (V,) = {tuple(weight.shape[:1])}, got {tuple(bias.shape)}")


def _check_logits_shape(h: Tensor, weight: Tensor, logits) -> None:
    if logits is None:
        return
    rows = math.prod(logits[:-1]) if len(logits) else None
    if len(logits) < 2 or logits[-1] != weight.shape[0] or rows != h.shape[0]:
        raise ValueError(f"ger linear loss: the logits' shape {list(logits)} must be (rows..., V) with "
                         f"{h.shape[0]} rows and V = {weight.shape[0]}")


# ----------------------------------------------------------------------------- forward
@torch.library.custom_op(f"{OPS_NAMESPACE}::linear_loss_fwd", mutates_args=())
def linear_loss_fwd(
    h: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    base: Optional[Tensor],
    log_base: Optional[Tensor],
    alpha: float,
    ignore_index: int,
    extras: bool,
    chunk: int,
    coefs: Optional[Tensor],
    needs: int,
    logits: Optional[list[int]],
    temperature: float = 1.0,
    low_div: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check(h, weight, bias, target)
    _check_logits_shape(h, weight, logits)
    return _kernel(h, weight, bias, target, base, log_base, alpha, ignore_index, extras, chunk, coefs, needs, logits,
                   temperature, low_div)


@linear_loss_fwd.register_fake
def _linear_loss_fwd_fake(h, weight, bias, target, base, log_base, alpha, ignore_index, extras, chunk, coefs, needs,
                          logits, temperature=1.0, low_div=False):
    _check(h, weight, bias, target)
    N = h.shape[0]
    cd = compute_dtype(h.dtype)
    row = h.new_empty((N,), dtype=cd)
    ent = h.new_empty((N,) if extras else (0,), dtype=cd)
    gh, gw, gb = _grad_outputs(h, weight, bias, needs if coefs is not None else 0)
    _check_logits_shape(h, weight, logits)
    lo = h.new_empty(list(logits) if logits is not None else (0,))
    return row, torch.empty_like(row), torch.empty_like(row), ent, torch.empty_like(row), gh, gw, gb, lo


def _grad_outputs(h, weight, bias, needs):
    """Empty (grad_h, grad_w, grad_b) as the op returns them: (0,) where not needed."""
    gh = torch.empty_like(h) if needs & NEED_H else h.new_empty((0,))
    # contiguous, as the kernel forms them (the weight may be a transposed view: h @ W_t)
    gw = weight.new_empty(weight.shape) if needs & NEED_W else h.new_empty((0,))
    gb = bias.new_empty(bias.shape) if bias is not None and needs & NEED_B else h.new_empty((0,))
    return gh, gw, gb


# ----------------------------------------------------------------------------- backward (recompute)
@torch.library.custom_op(f"{OPS_NAMESPACE}::linear_loss_bwd", mutates_args=())
def linear_loss_bwd(
    coefs: Tensor,
    h: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    base: Optional[Tensor],
    log_base: Optional[Tensor],
    alpha: float,
    ignore_index: int,
    extras: bool,
    chunk: int,
    needs: int,
    temperature: float = 1.0,
    low_div: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    out = _kernel(h, weight, bias, target, base, log_base, alpha, ignore_index, extras, chunk, coefs, needs, None,
                  temperature, low_div)
    return out[5], out[6], out[7]


@linear_loss_bwd.register_fake
def _linear_loss_bwd_fake(coefs, h, weight, bias, target, base, log_base, alpha, ignore_index, extras, chunk, needs,
                          temperature=1.0, low_div=False):
    return _grad_outputs(h, weight, bias, needs)


def _needs_of(ctx, with_bias: bool) -> int:
    n = 0
    if ctx.needs_input_grad[0]:
        n |= NEED_H
    if ctx.needs_input_grad[1]:
        n |= NEED_W
    if with_bias and ctx.needs_input_grad[2]:
        n |= NEED_B
    return n


def _setup_context(ctx, inputs, output):
    h, weight, bias, target, base, log_base, alpha, ignore_index, extras, chunk, coefs, _needs, _logits, *scale = inputs
    ctx.precomputed = coefs is not None
    # aux, the precomputed gradients and the logits (whose own gradient, when they are
    # returned, ``lm_head.logits_output`` adds outside the compiled graph); with
    # precomputed gradients all of them (grad_carrier delivers the gradients). One call:
    # ``mark_non_differentiable`` replaces what an earlier call marked
    if ctx.precomputed:
        ctx.mark_non_differentiable(*output)
        return
    ctx.mark_non_differentiable(*output[4:])
    ctx.save_for_backward(h, weight, bias, target, base, log_base)
    ctx.cfg = (alpha, ignore_index, extras, chunk)
    ctx.scale = tuple(scale)  # (temperature, low_div) where given
    ctx.needs = _needs_of(ctx, bias is not None)
    ctx.set_materialize_grads(False)


def _backward(ctx, g_nll, g_reg, g_lse, g_ent, *_unused):
    none = (None,) * (13 + len(getattr(ctx, "scale", ())))
    if ctx.precomputed or ctx.needs == 0:
        return none
    grads = (g_nll, g_reg, g_lse, g_ent if ctx.cfg[2] else None)
    if all(g is None for g in grads):
        return none
    h, weight, bias, target, base, log_base = ctx.saved_tensors
    cd = compute_dtype(h.dtype)
    N = h.shape[0]
    coefs = torch.stack([torch.zeros(N, dtype=cd, device=h.device) if g is None else g.to(cd) for g in grads])
    gh, gw, gb = linear_loss_bwd(coefs, h, weight, bias, target, base, log_base, *ctx.cfg, ctx.needs, *ctx.scale)
    return (gh if ctx.needs & NEED_H else None, gw if ctx.needs & NEED_W else None,
            gb if ctx.needs & NEED_B else None) + (None,) * (10 + len(ctx.scale))


linear_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- the gradient carrier
@torch.library.custom_op(f"{OPS_NAMESPACE}::grad_carrier", mutates_args=())
def grad_carrier(h: Tensor, weight: Tensor, bias: Optional[Tensor], grad_h: Tensor, grad_w: Tensor,
                 grad_b: Tensor, keep: list[Tensor]) -> Tensor:
    """A zero whose gradient is (g * grad_h, g * grad_w, g * grad_b): added to a loss,
    it delivers gradients a precomputing ``linear_loss_fwd`` formed in its forward.
    ``keep``: the other tensors eager's loss code saves for its backward (the target a
    cross-entropy saves, a mask, a divisor); unused, saved only for the version check."""
    return torch.zeros((), dtype=compute_dtype(h.dtype), device=h.device)


@grad_carrier.register_fake
def _grad_carrier_fake(h, weight, bias, grad_h, grad_w, grad_b, keep):
    return h.new_empty((), dtype=compute_dtype(h.dtype))


def _carrier_setup(ctx, inputs, output):
    h, weight, bias, grad_h, grad_w, grad_b, keep = inputs
    # saved (not needed: the gradients exist already) so that autograd's version counter
    # raises eager's error when h, the weight or a kept tensor (the target) is written
    # between forward and backward
    ctx.save_for_backward(h, weight, *keep)
    # held as attributes, not saved tensors: the eager backward scales them in place (no
    # second V x H buffer) and so consumes them; detached, so no reference cycle
    ctx.grads = [grad_h.detach(), grad_w.detach(), grad_b.detach()]
    ctx.has_bias = bias is not None
    ctx.n_keep = len(keep)


def _carrier_backward(ctx, g):
    grads = ctx.grads
    if grads is None:
        raise RuntimeError(
            "ger's fused lm-head loss formed its gradients in the forward and its backward consumed them: "
            "a second backward through it (retain_graph=True) is not supported; call the loss again"
        )
    h, weight, *keep = ctx.saved_tensors  # the version check
    traced = any(_compat.is_traced_tensor(t) for t in (*grads, g))
    if not traced:
        ctx.grads = None

    def scaled(gr: Tensor, i: int):
        if not ctx.needs_input_grad[i]:
            return None
        if gr.numel() == 0:
            # no rows (an empty batch): eager's gradient is an empty / zero tensor, never
            # None (an optimizer skips a parameter whose .grad is None)
            return torch.zeros_like(h) if i == 0 else torch.zeros_like(weight) if i == 1 else \
                weight.new_zeros(weight.shape[0])
        # in place when running eagerly; a compiled backward reuses the saved buffer itself,
        # and reads h, the weight and the kept tensors (so it saves them, and checks their
        # versions)
        # (g as it comes, a 0-d tensor in the compute dtype: a bf16/fp16 gradient is scaled
        # in fp32 and rounded once, as eager scales its fp32 logits gradient; g cast to bf16
        # first was off by up to 2^-9 relative, stop-38 review)
        return scaled_grad(gr, g, [h, weight, *keep]) if traced else gr.mul_(g)

    gh, gw, gb = grads
    return (scaled(gh, 0), scaled(gw, 1), scaled(gb, 2) if ctx.has_bias else None, None, None, None,
            [None] * ctx.n_keep)


grad_carrier.register_autograd(_carrier_backward, setup_context=_carrier_setup)

