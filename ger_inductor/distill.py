"""Two-distribution rows: distillation losses and per-token policy-gradient statistics.

Per row, with student logits z_s, teacher logits z_t, temperature T,
p_s = softmax(z_s / T), p_t = softmax(z_t / T) and m = beta p_t + (1 - beta) p_s:

    KL(p_t || p_s)                                  forward KL
    KL(p_s || p_t)                                  reverse KL
    JSD_beta = beta KL(p_t || m) + (1 - beta) KL(p_s || m)
             = beta (1 - beta) J_beta               J_beta: GER's skew-Jensen, teacher as p, student as u

Two conventions, named by ``convention``:

* ``"jsd"`` (the default; TRL's ``GKDTrainer.generalized_jsd_loss``, Liger-Kernel's
  ``LigerJSD`` / fused linear JSD): the unnormalised JSD_beta for 0 < beta < 1, with the
  ends special-cased: beta = 0 is the forward KL(p_t || p_s), beta = 1 the reverse
  KL(p_s || p_t). (The unnormalised JSD itself tends to 0 at both ends, so this
  convention jumps there, exactly as the trainers do.)
* ``"skew_jensen"``: the normalised J_beta = JSD_beta / (beta (1 - beta)), which runs
  continuously from KL(p_t || p_s) (beta -> 0) to KL(p_s || p_t) (beta -> 1).

The loss per row is ``(1 - hard_weight) * T**2 * D + hard_weight * CE(z_s, y)``: the
distillation term D times T^2 (Hinton et al. 2015: gradient magnitudes comparable across
T; TRL's and Liger's JSD functions do not multiply by T^2, so at T != 1 their numbers are
ours / T^2), the hard-label cross-entropy on the *untempered* student logits (Hinton et
al.; Liger-Kernel's distillation base). 'mean' divides by the number of rows whose target
is not ``ignore_index`` (all rows without a target), as F.cross_entropy and TRL's
'batchmean' with labels do.

``ger_token_stats``: per token, log p(y) and the entropy of softmax(z / T), and the k1 /
k2 / k3 estimators of KL(pi || pi_ref) at the sampled token (verl ``kl_penalty``, TRL
GRPO). See docs/ger.md, "Distillation and policy-gradient rows".

The ops run chunks of rows and save O(rows) statistics (plus the inputs) for an analytic
backward; ``ger_linear_distill_loss`` also chunks the two lm heads so that no N x V
tensor of either model exists.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _compat
from . import losses as _losses
from .ops import distill as _ops_distill
from .ops import linear_loss as _lin
from .ops.ger_loss import xmul

CONVENTIONS = ("jsd", "skew_jensen")
KL_ESTIMATORS = ("k1", "k2", "k3")
#: default size of one (rows, V) compute-dtype buffer of a chunk (a chunk uses ~10 of them)
CHUNK_BYTES = 32 << 20


# ----------------------------------------------------------------------------- configuration
class DistillConfig(NamedTuple):
    """Checked arguments. kind: "fwd" (KL(p_t||p_s)), "rev" (KL(p_s||p_t)) or "mix"
    (D = wt KL(p_t||m) + ws KL(p_s||m)); hard: whether the CE term is formed."""

    kind: str
    beta: float
    wt: float
    ws: float
    T: float
    hw: float
    hard: bool
    ignore_index: int
    reduction: str
    convention: str
    cd: torch.dtype


_compute_dtype = _ops_distill.compute_dtype  # fp32, or fp64 when any input is fp64


def _positive(who: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{who}: {name} must be a Python float, got {type(value).__name__}")
    v = float(value)
    if not (v > 0.0 and math.isfinite(v)):
        raise ValueError(f"{who}: {name} must be a finite number > 0, got {value}")
    return v


def _config(who: str, *, beta, temperature, hard_weight, ignore_index, reduction, convention, has_target,
            dtypes) -> DistillConfig:
    b = _losses.check_number("beta", beta, 0.0, 1.0, who=who)
    T = _positive(who, "temperature", temperature)
    hw = _losses.check_number("hard_weight", hard_weight, 0.0, 1.0, who=who)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{who}: ignore_index must be an int")
    if reduction not in _losses.REDUCTIONS:
        raise ValueError(f"{who}: reduction must be one of {_losses.REDUCTIONS}, got {reduction!r}")
    if convention not in CONVENTIONS:
        raise ValueError(f"{who}: convention must be one of {CONVENTIONS} ('jsd': the trainers' unnormalised "
                         f"JSD_beta, 'skew_jensen': J_beta = JSD_beta / (beta (1 - beta))), got {convention!r}")
    if hw > 0.0 and not has_target:
        raise ValueError(f"{who}: hard_weight={hard_weight} mixes in the hard-label cross-entropy: pass target")
    if b == 0.0:
        kind, wt, ws = "fwd", 1.0, 0.0
    elif b == 1.0:
        kind, wt, ws = "rev", 0.0, 1.0
    elif convention == "jsd":
        kind, wt, ws = "mix", b, 1.0 - b
    else:
        kind, wt, ws = "mix", 1.0 / (1.0 - b), 1.0 / b
    return DistillConfig(kind, b, wt, ws, T, hw, hw > 0.0, ignore_index, reduction, convention,
                         _compute_dtype(*dtypes))


def _check_target(who: str, target: Optional[Tensor], rows_shape, device, what: str) -> None:
    if target is None:
        return
    if not isinstance(target, Tensor):
        raise TypeError(f"{who}: target must be a tensor of class indices or None")
    _losses.check_target_dtype(target, who)
    if tuple(target.shape) != tuple(rows_shape):
        raise ValueError(f"{who}: target shape {list(target.shape)} does not match {what}: expected "
                         f"{list(rows_shape)}")
    if target.device != device:
        raise ValueError(f"{who}: target is on {target.device} but the inputs are on {device}")


def _check_target_range(who: str, y: Tensor, V: int, ignore_index: Optional[int]) -> None:
    """Eager check (host sync) that every used target is a class (skipped when compiling
    or under a torch.func transform of the target)."""
    if _losses.is_compiling() or _compat.functorch_transformed(y):
        return
    bad = (y < 0) | (y >= V)
    if ignore_index is not None:
        bad = bad & (y != ignore_index)
    if bool(bad.any()):
        first = y[bad].flatten()[0].item()
        extra = f", or ignore_index={ignore_index}" if ignore_index is not None else ""
        raise IndexError(f"{who}: target {first} is out of bounds for {V} classes (valid: 0..{V - 1}{extra})")


def _rows_target(target: Optional[Tensor], ignore_index: int):
    """(y, valid) over the rows: y int64 with ignored rows read as class 0, valid bool (None
    without a target)."""
    if target is None:
        return None, None
    y = target.reshape(-1)
    if y.dtype == torch.uint8:
        y = y.long()
    valid = y != ignore_index
    return torch.where(valid, y, torch.zeros_like(y)), valid


def _chunk_rows(chunk_size: Optional[int], R: int, V: int) -> int:
    if chunk_size is None or chunk_size == 0:
        c = max(8, min(4096, CHUNK_BYTES // max(1, 4 * V)))
    else:
        c = chunk_size
    return max(1, min(c, R))


def _next_chunk_count(K: int) -> int:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, ...: the chunk counts a compiled head may take."""
    if K < 4:
        return K + 1
    return K + K // 2 if K & (K - 1) == 0 else K // 3 * 4


def _head_chunks(N, chunk_size: Optional[int], V: int, compiling: bool) -> list:
    """The (start, end) rows of each chunk of a chunked lm head of ``N`` rows and ``V``
    classes, at most c rows each: ``chunk_size``, or by default the rows of a ~256 MiB
    fp32 (rows, V) buffer (64..4096), as ``ger_linear_loss``. (Each chunk's matmuls read
    the whole (V, H) weight and add into the whole grad_W, so at a large head - V=128256,
    H=1024: 512 MiB - small chunks pay that traffic once per chunk; and under
    ``torch.compile`` the chunk loop is unrolled, so compile time grows with it.)

    Eagerly: chunks of c rows. Under ``torch.compile`` N is symbolic after
    a second sequence length (or with ``dynamic=True``), and a Python loop over it guards
    on its value: a recompile per length (Dynamo shows a symbolic N as an int, so the two
    cases cannot be told apart here). There it takes K chunks of about N / K rows with
    symbolic bounds, K the first of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... with N <= K c. The
    only guards are that bucket (K' c < N <= K c, K' the count before K), so one graph
    serves every length in it, a longer batch compiles one more, and no chunk exceeds c
    rows. (A static N gets the same chunks, folded: at most 4/3 the chunks of c rows from
    5 chunks on, the same count below.)"""
    if not compiling:
        c = _lin.rows_per_chunk(chunk_size or 0, N, V)
        return [(s, min(s + c, N)) for s in range(0, N, c)]
    c = _lin.rows_per_chunk(chunk_size or 0, 1 << 62, V)  # not capped at N: that would guard on it
    K = 1
    while N > K * c:  # a guard per comparison: the bucket of N
        K = _next_chunk_count(K)
    return [((i * N) // K, ((i + 1) * N) // K) for i in range(K)]


def _check_chunk(who: str, chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{who}: chunk_size must be a positive int (rows per chunk) or None, got {chunk_size!r}")


# ----------------------------------------------------------------------------- row math
def _lse(x: Tensor) -> Tensor:
    """Row log-sum-exp, IEEE like ger's op (NaN in a row with +inf or only -inf)."""
    M = x.detach().amax(1, keepdim=True)
    return (M + torch.log(torch.exp(x - M).sum(1, keepdim=True))).squeeze(1)


#: betas for which log m is formed directly (one log per element; see _log_ratios)
LOG_FORM_BETAS = (0.25, 0.75)


def _log_ratios(lpt: Tensor, lps: Tensor, beta: float, mode: str = "") -> tuple[Tensor, Tensor]:
    """(log(p_t / m), log(p_s / m)) for m = beta p_t + (1 - beta) p_s, 0 < beta < 1.

    For beta in LOG_FORM_BETAS: log m = log(beta p_t + (1 - beta) p_s) directly, one log
    per element (the cheapest, as GER's ``log_ratio_p_m``: its rounding, eps |log m|, is
    multiplied by at most 1 / 0.25 = 4 in J_beta). Nearer the ends, from r = log p_t -
    log p_s only:

        log(p_t / m) = -logaddexp(log(1 - beta) - r, log beta)
        log(p_s / m) = -logaddexp(log beta + r, log(1 - beta))

    Never log m itself (log p - log m cancels: its rounding, eps |log m|, would be divided
    by beta or 1 - beta); logaddexp(x, y) = max + log1p(exp(-|x - y|)) keeps the small
    results accurate (absolute error ~eps * beta near beta -> 0, so the 1/beta of J_beta
    and of its gradient does not amplify it). Exact limits at r = +-inf; no overflow for
    any r (a ratio p_t / p_s, as GER's ``log_ratio_p_m`` forms, overflows when one side is
    subnormal). The lowering (lowerings/distill.py) spells the same expressions.

    ``mode`` (``MIX_MODES``) gives eager's NaN where the user's spelling has them: "pm"
    the log form for every beta (m from the probabilities: log m = -inf where both
    probabilities underflow to 0, and the products there NaN); "lse" (log m from the
    log-probabilities, as logsumexp / logaddexp do: finite there, the products 0) the
    form in r outside LOG_FORM_BETAS, and inside them the log form with 0 for the log m
    of such a class (p log(p / m) is then p log p: 0, or NaN at a -inf logit, as eagerly)."""
    lo, hi = LOG_FORM_BETAS
    if mode == "pm" or (mode in ("", "lse") and lo <= beta <= hi):
        log_m = torch.log(beta * torch.exp(lpt) + (1.0 - beta) * torch.exp(lps))
        if mode == "lse":
            log_m = torch.where(log_m == -math.inf, torch.zeros_like(log_m), log_m)
        return lpt - log_m, lps - log_m
    r = lpt - lps
    la, lb = math.log(beta), math.log1p(-beta)
    return -torch.logaddexp(lb - r, torch.full_like(r, la)), -torch.logaddexp(la + r, torch.full_like(r, lb))


#: how a KL kind forms its products p (log p - log q): "" (0 log 0 = 0, the public API),
#: "ieee" (plain products: NaN and inf where eager's ``exp(lt) * (lt - ls)`` /
#: ``p * (log_softmax - log_softmax)`` spellings are), "xlogy" (``xlogy(p, p) - p * log q``:
#: F.kl_div with probabilities as the target), "ce" (the cross-entropy with soft targets
#: ``-(p * log q).sum(-1)`` = KL + H(p) instead of the KL, plain products; the gradient of
#: the q side is the KL's). The loss pass's two-distribution rewrite
#: (passes/loss_entropy/pairs.py) asks for "fwd:ieee", "rev:xlogy", "fwd:ce", ...
KL_MODES = ("", "ieee", "xlogy", "ce")
#: how the "mix" kind forms log m and its products: "" (by beta, 0 log 0 = 0, the public
#: API), "lse" (log m from the log-probabilities, ``logsumexp(stack([lps + log(1 - b),
#: lpt + log b]))`` as TRL's GKD trainer, plain products), "pm" (m from the probabilities,
#: ``M * log(M)`` with M = b P + (1 - b) Q as Liger-Kernel's reference formula, plain
#: products: NaN where both probabilities underflow to 0, as eagerly)
MIX_MODES = ("", "lse", "pm")


def split_kind(kind: str) -> tuple[str, str]:
    """("fwd" | "rev" | "mix", mode) of an op's ``kind`` argument ("fwd", "fwd:ieee",
    "mix:lse", ...)."""
    base, _, mode = kind.partition(":")
    if base not in ("fwd", "rev", "mix") or mode not in (MIX_MODES if base == "mix" else KL_MODES):
        raise ValueError(f"ger: unknown distillation kind {kind!r}")
    return base, mode


def _kl_rows(w: Tensor, lw: Tensor, lo: Tensor, mode: str) -> Tensor:
    """sum_j w_j (lw_j - lo_j) per row, w = exp(lw), with the products of ``mode`` ("ce":
    -sum_j w_j lo_j)."""
    if mode == "ce":
        return (-(w * lo)).sum(1)
    if mode == "ieee":
        return (w * (lw - lo)).sum(1)
    if mode == "xlogy":
        return (xmul(w, lw) - w * lo).sum(1)
    return xmul(w, lw - lo).sum(1)


def _kl_grad(w: Tensor, lw: Tensor, lo: Tensor, K: Tensor, mode: str) -> Tensor:
    """d KL / d(logits of the w side) = w (lw - lo - K), with the products of ``mode``
    ("ce": w (-lo - K), K the soft cross-entropy)."""
    if mode == "ce":
        return w * (-lo - K.unsqueeze(1))
    if mode == "ieee":
        return w * (lw - lo - K.unsqueeze(1))
    if mode == "xlogy":  # eagerly NaN where w == 0 (xlogy's gradient log 0); the pass never asks for it
        raise ValueError("ger: the gradient of the xlogy side of a KL is not formed (eagerly NaN wherever its "
                         "probability is 0); the loss pass refuses such a site, and the public API never asks")
    return xmul(w, lw - lo - K.unsqueeze(1))


class _Pre(NamedTuple):
    lps: Tensor
    lpt: Tensor
    ps: Tensor
    pt: Tensor
    log_t_m: Optional[Tensor]
    log_s_m: Optional[Tensor]


class RowStats(NamedTuple):
    """Per-row statistics saved for the backward: LSE(z_s/T), LSE(z_t/T), LSE(z_s) (the CE's;
    empty without it), KL(p_t||m) (fwd: KL(p_t||p_s)), KL(p_s||m) (rev: KL(p_s||p_t))."""

    Ls: Tensor
    Lt: Tensor
    Ls1: Tensor
    kt: Tensor
    ks: Tensor


def _prelude(zs: Tensor, zt: Tensor, cfg: DistillConfig, Ls: Optional[Tensor] = None,
             Lt: Optional[Tensor] = None):
    T = cfg.T
    a = zs if T == 1.0 else zs / T
    b = zt if T == 1.0 else zt / T
    if Ls is None:
        Ls, Lt = _lse(a), _lse(b)
    lps = a - Ls.unsqueeze(1)
    lpt = b - Lt.unsqueeze(1)
    ps, pt = torch.exp(lps), torch.exp(lpt)
    log_t_m = log_s_m = None
    kind, mode = split_kind(cfg.kind)
    if kind == "mix":
        log_t_m, log_s_m = _log_ratios(lpt, lps, cfg.beta, mode)
    return _Pre(lps, lpt, ps, pt, log_t_m, log_s_m), Ls, Lt


def forward_rows(zs: Tensor, zt: Tensor, y: Optional[Tensor], cfg: DistillConfig):
    """(D, nll, RowStats, _Pre) for rows of raw logits (compute dtype). Differentiable torch:
    also the math under torch.func transforms and for a double backward."""
    pre, Ls, Lt = _prelude(zs, zt, cfg)
    kind, mode = split_kind(cfg.kind)
    if kind == "fwd":
        kt = _kl_rows(pre.pt, pre.lpt, pre.lps, mode)
        ks = torch.zeros_like(kt)
        D = kt
    elif kind == "rev":
        ks = _kl_rows(pre.ps, pre.lps, pre.lpt, mode)
        kt = torch.zeros_like(ks)
        D = ks
    else:
        pmul = xmul if mode == "" else torch.mul  # plain products: eager's NaN at 0 * -inf
        kt = pmul(pre.pt, pre.log_t_m).sum(1)
        ks = pmul(pre.ps, pre.log_s_m).sum(1)
        D = cfg.wt * kt + cfg.ws * ks
    if cfg.hard:
        Ls1 = Ls if cfg.T == 1.0 else _lse(zs)
        nll = Ls1 - zs.gather(1, y.unsqueeze(1)).squeeze(1)
    else:
        Ls1 = nll = zs.new_empty((0,))
    return D, nll, RowStats(Ls, Lt, Ls1, kt, ks), pre


def backward_rows(zs: Tensor, zt: Tensor, y: Optional[Tensor], cfg: DistillConfig, st: RowStats,
                  gD: Optional[Tensor], gn: Optional[Tensor], need_s: bool, need_t: bool,
                  pre: Optional[_Pre] = None):
    """(d/dz_s, d/dz_t) of sum(gD * D + gn * nll) for rows of raw logits (compute dtype):

        fwd:  dD/da = p_s - p_t                         dD/db = p_t (log p_t/p_s - KL(p_t||p_s))
        rev:  dD/da = p_s (log p_s/p_t - KL(p_s||p_t))  dD/db = p_t - p_s
        mix:  dD/da = ws p_s (log(p_s/m) - KL(p_s||m))  dD/db = wt p_t (log(p_t/m) - KL(p_t||m))

    with a = z_s / T, b = z_t / T (d/dz = d/da / T), and d nll / dz_s = softmax(z_s) - onehot(y)."""
    if pre is None:
        pre, _, _ = _prelude(zs, zt, cfg, st.Ls, st.Lt)
    dzs = dzt = None
    if gD is not None:
        g = (gD / cfg.T).unsqueeze(1)
        kind, mode = split_kind(cfg.kind)
        if kind == "fwd":
            da = (pre.ps - pre.pt) if need_s else None
            db = _kl_grad(pre.pt, pre.lpt, pre.lps, st.kt, mode) if need_t else None
        elif kind == "rev":
            da = _kl_grad(pre.ps, pre.lps, pre.lpt, st.ks, mode) if need_s else None
            db = (pre.pt - pre.ps) if need_t else None
        else:
            pmul = xmul if mode == "" else torch.mul
            da = cfg.ws * pmul(pre.ps, pre.log_s_m - st.ks.unsqueeze(1)) if need_s else None
            db = cfg.wt * pmul(pre.pt, pre.log_t_m - st.kt.unsqueeze(1)) if need_t else None
        gmul = xmul if mode == "" else torch.mul  # eager's spellings: g * NaN is NaN even where g == 0
        dzs = gmul(g, da) if need_s else None
        dzt = gmul(g, db) if need_t else None
    if need_s and cfg.hard and gn is not None:
        p1 = pre.ps if cfg.T == 1.0 else torch.exp(zs - st.Ls1.unsqueeze(1))
        gnc = gn.unsqueeze(1)
        h = xmul(gnc, p1).scatter_add(1, y.unsqueeze(1), -gnc)
        dzs = h if dzs is None else dzs + h
    if need_s and dzs is None:
        dzs = torch.zeros_like(zs)
    if need_t and dzt is None:
        dzt = torch.zeros_like(zt)
    return dzs, dzt


def combine(D: Tensor, nll: Tensor, valid: Optional[Tensor], cfg: DistillConfig, rows_shape,
            out_dtype: torch.dtype) -> Tensor:
    """(1 - hw) T^2 D + hw nll per row, 0 on ignored rows, reduced."""
    per = None
    if cfg.hw < 1.0:
        per = ((1.0 - cfg.hw) * cfg.T * cfg.T) * D
    if cfg.hard:
        t = cfg.hw * nll
        per = t if per is None else per + t
    if valid is not None:
        per = torch.where(valid, per, torch.zeros((), dtype=per.dtype, device=per.device))
    if cfg.reduction == "none":
        out = per.reshape(rows_shape)
    elif cfg.reduction == "sum":
        out = per.sum()
    else:
        n = valid.sum().to(per.dtype) if valid is not None else per.new_full((), float(per.numel()))
        out = per.sum() / n
    return out.to(out_dtype)


# ----------------------------------------------------------------------------- logits op
def _differentiable_grads(fwd, inputs, needs, grads):
    """backward(create_graph=True): the gradient as a differentiable function, by autograd
    through the row math in torch ops (as ger_loss does), so a double backward works."""
    with torch.enable_grad():
        outs = fwd()
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.numel() > 0 and o.requires_grad]
    wrt = [t for t, n in zip(inputs, needs) if n]
    if not pairs:
        return [None] * len(wrt)
    return list(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], create_graph=True,
                                    allow_unused=True))


def distill_rows(zs: Tensor, zt: Tensor, y: Optional[Tensor], cfg: DistillConfig, chunk: Optional[int]):
    """(D, nll) per row of (R, V) student and teacher logits, by the ``ger::distill_fwd``
    op (ops/distill.py): chunks of rows eagerly, one fused kernel under Inductor; saves
    the logits and O(R) statistics for an analytic backward (``ger::distill_bwd``)."""
    D, nll, *_ = torch.ops.ger.distill_fwd(zs, zt, y, cfg.kind, cfg.beta, cfg.wt, cfg.ws, cfg.T, cfg.hard,
                                           cfg.ignore_index, chunk or 0, _ops_distill.REV)
    return D, nll


def _check_pair(who: str, zs, zt, s_name: str, t_name: str) -> None:
    if not isinstance(zs, Tensor) or not isinstance(zt, Tensor):
        raise TypeError(f"{who}: {s_name} and {t_name} must be tensors")
    for name, t in ((s_name, zs), (t_name, zt)):
        if t.dtype not in _losses.LOGIT_DTYPES:
            raise TypeError(f"{who}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if zs.device != zt.device:
        raise ValueError(f"{who}: {s_name} is on {zs.device} but {t_name} on {zt.device}")


def ger_distill_loss(
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
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Distillation loss between student and teacher logits (classes last).

    Per row: ``(1 - hard_weight) * T**2 * D + hard_weight * CE(student_logits, target)``
    with D the generalized JSD_beta of p_t = softmax(teacher / T) and p_s =
    softmax(student / T) in the named ``convention`` ("jsd": the trainers' unnormalised
    JSD_beta, beta = 0 forward KL(p_t||p_s), beta = 1 reverse KL(p_s||p_t);
    "skew_jensen": J_beta = JSD_beta / (beta (1 - beta)), continuous between the same
    ends). Rows whose target is ``ignore_index`` contribute nothing; 'mean' divides by
    the number of the others (all rows when target is None). Gradients go to the student
    and, when it requires grad, to the teacher.

    Args:
        student_logits, teacher_logits: (..., V), the same shape; fp16/bf16/fp32 (math in
            fp32) or fp64 (math in fp64); they may differ in dtype.
        target: class indices (int64 or uint8), the logits' shape without V; needed for
            ``hard_weight > 0``, otherwise only masks rows.
        beta: in [0, 1]. temperature: > 0. hard_weight: in [0, 1].
        reduction: 'mean' | 'sum' | 'none' (per row, target's shape).
        chunk_size: rows per chunk (default: a ~32 MiB fp32 (rows, V) buffer).

    >>> import torch
    >>> zs, zt = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
    >>> ger_distill_loss(zs, zt, beta=0.0).backward()  # forward KL(p_t || p_s), mean over rows
    """
    who = "ger_distill_loss"
    _check_pair(who, student_logits, teacher_logits, "student_logits", "teacher_logits")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"{who}: student_logits {list(student_logits.shape)} and teacher_logits "
                         f"{list(teacher_logits.shape)} must have the same shape (..., V)")
    if student_logits.dim() == 0:
        raise ValueError(f"{who}: logits must have at least 1 dimension (the classes, last)")
    V = student_logits.shape[-1]
    if V == 0:
        raise ValueError(f"{who}: logits have 0 classes")
    rows_shape = tuple(student_logits.shape[:-1])
    _check_target(who, target, rows_shape, student_logits.device, f"the logits {list(student_logits.shape)} "
                  "without their last (class) dimension")
    _check_chunk(who, chunk_size)
    cfg = _config(who, beta=beta, temperature=temperature, hard_weight=hard_weight, ignore_index=ignore_index,
                  reduction=reduction, convention=convention, has_target=target is not None,
                  dtypes=(student_logits.dtype, teacher_logits.dtype))
    y, valid = _rows_target(target, ignore_index)
    if cfg.hard:
        _check_target_range(who, target.reshape(-1).long(), V, ignore_index)
    zs = student_logits.reshape(-1, V)
    zt = teacher_logits.reshape(-1, V)
    if not _losses.is_compiling() and _compat.functorch_transformed(student_logits, teacher_logits, target):
        # torch.func transforms / forward AD: the Function's formula does not compose with
        # them; the same math in torch ops does
        D, nll, _, _ = forward_rows(zs.to(cfg.cd), zt.to(cfg.cd), y, cfg)
    else:
        D, nll = distill_rows(zs, zt, y, cfg, chunk_size)
    return combine(D, nll, valid, cfg, rows_shape, student_logits.dtype)


# ----------------------------------------------------------------------------- reference
def ger_distill_reference(
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
) -> Tensor:
    """:func:`ger_distill_loss` in plain float64 torch, straight from the definitions (the
    test oracle; materialises several N x V tensors; returns float64).

    JSD_beta = beta KL(p_t||m) + (1-beta) KL(p_s||m) with log m = logsumexp of the two
    log-mixture terms (as TRL writes it); J_beta = JSD_beta / (beta (1 - beta)); the ends
    beta in {0, 1} are the closed forms KL(p_t||p_s) and KL(p_s||p_t) in both conventions.
    """
    who = "ger_distill_reference"
    _check_pair(who, student_logits, teacher_logits, "student_logits", "teacher_logits")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"{who}: student_logits {list(student_logits.shape)} and teacher_logits "
                         f"{list(teacher_logits.shape)} must have the same shape (..., V)")
    V = student_logits.shape[-1]
    rows_shape = tuple(student_logits.shape[:-1])
    _check_target(who, target, rows_shape, student_logits.device, "the logits without their last dimension")
    cfg = _config(who, beta=beta, temperature=temperature, hard_weight=hard_weight, ignore_index=ignore_index,
                  reduction=reduction, convention=convention, has_target=target is not None,
                  dtypes=(torch.float64,))
    dt = torch.float64
    zs = student_logits.to(dt).reshape(-1, V)
    zt = teacher_logits.to(dt).reshape(-1, V)
    T = cfg.T
    lps = torch.log_softmax(zs / T, -1)
    lpt = torch.log_softmax(zt / T, -1)
    ps, pt = lps.exp(), lpt.exp()

    def kl(p, lp, lq):  # KL(p || q) = sum p (log p - log q), 0 log 0 = 0
        return torch.where(p == 0, torch.zeros((), dtype=dt), p * (lp - lq)).sum(-1)

    b = cfg.beta
    if b == 0.0:
        D = kl(pt, lpt, lps)
    elif b == 1.0:
        D = kl(ps, lps, lpt)
    else:
        lm = torch.logsumexp(torch.stack([lps + math.log1p(-b), lpt + math.log(b)]), dim=0)
        D = b * kl(pt, lpt, lm) + (1 - b) * kl(ps, lps, lm)
        if cfg.convention == "skew_jensen":
            D = D / (b * (1 - b))
    # a term of weight 0 is not formed (as ``combine`` does): hard_weight = 1 is the plain
    # CE even where D is infinite (a class the teacher excludes), not 0 * inf = NaN
    per = (1 - cfg.hw) * T * T * D if cfg.hw < 1.0 else torch.zeros_like(D)
    valid = None
    if target is not None:
        y = target.reshape(-1).long()
        valid = y != ignore_index
        if cfg.hard:
            nll = F.cross_entropy(zs, y, reduction="none", ignore_index=ignore_index)
            per = per + cfg.hw * nll
        per = torch.where(valid, per, torch.zeros((), dtype=dt))
    if reduction == "none":
        return per.reshape(rows_shape)
    if reduction == "sum":
        return per.sum()
    return per.sum() / (valid.sum() if valid is not None else per.numel())


# ----------------------------------------------------------------------------- with the lm heads
def _head_grads_init(h: Tensor, W: Tensor, b: Optional[Tensor], needs: int, cd):
    gh = torch.empty_like(h) if needs & _lin.NEED_H else h.new_empty((0,))
    gw = torch.zeros(W.shape, dtype=cd, device=W.device) if needs & _lin.NEED_W else h.new_empty((0,))
    gb = torch.zeros(b.shape, dtype=cd, device=b.device) if (b is not None and needs & _lin.NEED_B) else h.new_empty((0,))
    return [gh, gw, gb]


def _head_grads_add(grads, dz: Tensor, h: Tensor, W: Tensor, s: int, e: int, needs: int) -> None:
    """The chunk's logits gradient dz (compute dtype) multiplied out: grad_h[rows] = dz @ W,
    grad_W += dz^T @ h[rows], grad_b += sum_rows dz (dz in the input dtype for the matmuls,
    grad_W and grad_b accumulated in the compute dtype, as ger's fused head)."""
    dzl = dz if dz.dtype == h.dtype else dz.to(h.dtype)
    if needs & _lin.NEED_H:
        grads[0][s:e] = dzl @ W
    if needs & _lin.NEED_W:
        if grads[1].dtype == h.dtype:
            grads[1].addmm_(dzl.t(), h[s:e])  # one sweep of grad_W per chunk, not a product and an add
        else:  # a low-precision product accumulated in fp32
            grads[1].add_(dzl.t() @ h[s:e])
    if grads[2].numel():
        grads[2].add_(dz.sum(0))


def _head_grads_done(grads, W: Tensor, b: Optional[Tensor]):
    gh, gw, gb = grads
    if gw.numel() and gw.dtype != W.dtype:
        gw = gw.to(W.dtype)
    if gb.numel() and gb.dtype != b.dtype:
        gb = gb.to(b.dtype)
    return gh, gw, gb


def linear_distill_kernel(hs, Ws, bs, ht, Wt, bt, y, cfg: DistillConfig, chunk: Optional[int],
                          coefs: Optional[Tensor] = None, needs_s: int = 0, needs_t: int = 0,
                          in_backward: bool = False):
    """(D, nll, student grads, teacher grads) of two lm heads, ``chunk`` tokens at a time:
    only (chunk, V) logits of each model exist at once. With ``coefs`` (2, N) the forward
    also forms the gradients of sum(coefs[0] D + coefs[1] nll) for the inputs named by
    ``needs_s`` / ``needs_t`` (``ops.linear_loss.NEED_*`` bits); grads are (0,) elsewhere.

    Eagerly each chunk runs the row math in torch ops (``forward_rows`` /
    ``backward_rows``, sharing their intermediates). Under ``torch.compile`` each chunk
    calls ``ger::distill_fwd`` / ``ger::distill_bwd``, whose lowerings read the chunk's
    logits once per pass and realise their per-row outputs chunk by chunk, so Inductor
    frees each chunk's logits before the next chunk's matmuls (the same math; traced as
    torch ops, the chunks' row outputs were fused into late kernels that kept every
    chunk's logits alive). ``in_backward`` (the recompute sweep of reduction='none'): the
    hidden rows pass through ``ger::after_grad`` so the recomputed matmuls stay in the
    backward (ops/distill.py)."""
    N = hs.shape[0]
    V = Ws.shape[0]
    cd = cfg.cd
    compiling = _losses.is_compiling()
    D = hs.new_empty((N,), dtype=cd)
    nll = hs.new_empty((N,) if cfg.hard else (0,), dtype=cd)
    grads = coefs is not None
    gs = _head_grads_init(hs, Ws, bs, needs_s if grads else 0, cd)
    gt = _head_grads_init(ht, Wt, bt, needs_t if grads else 0, cd)
    cfg_args = (cfg.kind, cfg.beta, cfg.wt, cfg.ws, cfg.T, cfg.hard, cfg.ignore_index)
    want = grads and bool(needs_s or needs_t)
    for s, e in _head_chunks(N, chunk, V, compiling):
        hsc, htc = hs[s:e], ht[s:e]
        if compiling and in_backward:
            hsc, htc = torch.ops.ger.after_grad(hsc, coefs), torch.ops.ger.after_grad(htc, coefs)
        zs = F.linear(hsc, Ws, bs).to(cd)
        zt = F.linear(htc, Wt, bt).to(cd)
        yc = None if y is None else y[s:e]
        if compiling:
            d_, n_, *stats = torch.ops.ger.distill_fwd(zs, zt, yc, *cfg_args, 0, _ops_distill.REV)
        else:
            d_, n_, st, pre = forward_rows(zs, zt, yc, cfg)
        D[s:e] = d_
        if cfg.hard:
            nll[s:e] = n_
        if not want:
            continue
        gD, gn = coefs[0, s:e], coefs[1, s:e] if cfg.hard else None
        if compiling:
            dzs, dzt = torch.ops.ger.distill_bwd(gD, gn, zs, zt, yc, *stats, *cfg_args, bool(needs_s),
                                                 bool(needs_t), 0, _ops_distill.REV)
        else:
            dzs, dzt = backward_rows(zs, zt, yc, cfg, st, gD, gn, bool(needs_s), bool(needs_t), pre)
            del pre
        del zs, zt
        if needs_s:
            _head_grads_add(gs, dzs, hs, Ws, s, e, needs_s)
        if needs_t:
            _head_grads_add(gt, dzt, ht, Wt, s, e, needs_t)
    return D, nll, _head_grads_done(gs, Ws, bs), _head_grads_done(gt, Wt, bt)


def _needs(ctx_needs, offset: int, has_bias: bool) -> int:
    n = 0
    if ctx_needs[offset]:
        n |= _lin.NEED_H
    if ctx_needs[offset + 1]:
        n |= _lin.NEED_W
    if has_bias and ctx_needs[offset + 2]:
        n |= _lin.NEED_B
    return n


class _LinearDistillRows(torch.autograd.Function):
    """(D, nll) per token of two lm heads; the backward sweeps the chunks again with the
    incoming row gradients as coefficients (for reduction='none')."""

    @staticmethod
    def forward(ctx, hs, Ws, bs, ht, Wt, bt, y, cfg, chunk, kept_target):
        D, nll, _, _ = linear_distill_kernel(hs, Ws, bs, ht, Wt, bt, y, cfg, chunk)
        # ``kept_target``: the caller's own target where a hard-label CE reads it (eager's
        # nll_loss saves it: a write to it before the backward raises autograd's error);
        # ``y`` is a copy (ignored rows read as class 0), which no caller can write
        ctx.save_for_backward(hs, Ws, bs, ht, Wt, bt, y, kept_target)
        ctx.cfg, ctx.chunk = cfg, chunk
        ctx.set_materialize_grads(False)
        if not cfg.hard:
            ctx.mark_non_differentiable(nll)
        return D, nll

    @staticmethod
    def backward(ctx, gD, gn):
        hs, Ws, bs, ht, Wt, bt, y, _ = ctx.saved_tensors
        cfg = ctx.cfg
        needs_s = _needs(ctx.needs_input_grad, 0, bs is not None)
        needs_t = _needs(ctx.needs_input_grad, 3, bt is not None)
        none = (None,) * 10
        if not cfg.hard:
            gn = None
        if (gD is None and gn is None) or not (needs_s or needs_t):
            return none
        if torch.is_grad_enabled():
            raise RuntimeError(
                "ger_linear_distill_loss: a double backward (backward(create_graph=True)) is not supported; "
                "use ger_distill_loss on materialised logits for higher-order gradients"
            )
        N = hs.shape[0]
        z = torch.zeros(N, dtype=cfg.cd, device=hs.device)
        coefs = torch.stack([z if gD is None else gD.to(cfg.cd), z if gn is None else gn.to(cfg.cd)])
        _, _, gs, gt = linear_distill_kernel(hs, Ws, bs, ht, Wt, bt, y, cfg, ctx.chunk, coefs, needs_s, needs_t,
                                             in_backward=True)

        def pick(g, needs, bit):
            return g if needs & bit else None

        return (pick(gs[0], needs_s, _lin.NEED_H), pick(gs[1], needs_s, _lin.NEED_W), pick(gs[2], needs_s, _lin.NEED_B),
                pick(gt[0], needs_t, _lin.NEED_H), pick(gt[1], needs_t, _lin.NEED_W), pick(gt[2], needs_t, _lin.NEED_B),
                None, None, None, None)


def _check_head(who: str, name: str, h: Tensor, W: Tensor, b: Optional[Tensor]) -> None:
    n = f"{name}_" if name else ""  # argument names: student_hidden, ... or hidden, ...
    if not isinstance(h, Tensor) or not isinstance(W, Tensor) or (b is not None and not isinstance(b, Tensor)):
        raise TypeError(f"{who}: {n}hidden, {n}weight and {n}bias must be tensors")
    if h.dim() < 1 or W.dim() != 2:
        raise ValueError(f"{who}: expected {n}hidden (..., H) and {n}weight (V, H), got "
                         f"{tuple(h.shape)} and {tuple(W.shape)}")
    if h.shape[-1] != W.shape[1]:
        raise ValueError(f"{who}: {n}hidden has {h.shape[-1]} features but {n}weight {tuple(W.shape)} "
                         f"expects {W.shape[1]}")
    if h.dtype not in _losses.LOGIT_DTYPES:
        raise TypeError(f"{who}: {n}hidden must be float16, bfloat16, float32 or float64, got {h.dtype}")
    if W.dtype != h.dtype or (b is not None and b.dtype != h.dtype):
        raise TypeError(f"{who}: {n}hidden, {n}weight and {n}bias must share a dtype")
    if b is not None and tuple(b.shape) != (W.shape[0],):
        raise ValueError(f"{who}: {n}bias must be (V,) = ({W.shape[0]},), got {tuple(b.shape)}")
    if W.device != h.device or (b is not None and b.device != h.device):
        raise ValueError(f"{who}: {n}hidden, {n}weight and {n}bias must be on one device")


def ger_linear_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    target: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    beta: float,
    temperature: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    convention: str = "jsd",
    chunk_size: Optional[int] = None,
) -> Tensor:
    """``ger_distill_loss(F.linear(student_hidden, student_weight, student_bias),
    F.linear(teacher_hidden, teacher_weight, teacher_bias), target, ...)`` without ever
    holding the (N, V) logits of either model: ``chunk_size`` tokens at a time (default:
    a ~256 MiB fp32 (chunk, V) buffer per model, as ``ger_linear_loss``).

    ``student_hidden`` (..., Hs) and ``teacher_hidden`` (..., Ht) share their leading
    dimensions; the weights are (V, Hs) and (V, Ht). The teacher may be frozen (no grad:
    its logits are formed, never differentiated) or trained (its hidden states, weight and
    bias get gradients when they require grad). With reduction 'mean' or 'sum' the
    forward forms the gradients chunk by chunk (like ``ger_linear_loss``) and
    ``ger::grad_carrier`` delivers them; with 'none' the backward sweeps the chunks again.
    A double backward is not supported.
    """
    who = "ger_linear_distill_loss"
    _check_head(who, "student", student_hidden, student_weight, student_bias)
    _check_head(who, "teacher", teacher_hidden, teacher_weight, teacher_bias)
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"{who}: student_weight {tuple(student_weight.shape)} and teacher_weight "
                         f"{tuple(teacher_weight.shape)} must have the same number of classes (rows)")
    if tuple(student_hidden.shape[:-1]) != tuple(teacher_hidden.shape[:-1]):
        raise ValueError(f"{who}: student_hidden {tuple(student_hidden.shape)} and teacher_hidden "
                         f"{tuple(teacher_hidden.shape)} must have the same leading (token) dimensions")
    if student_hidden.device != teacher_hidden.device:
        raise ValueError(f"{who}: student_hidden is on {student_hidden.device} but teacher_hidden on "
                         f"{teacher_hidden.device}")
    V = student_weight.shape[0]
    if V == 0:
        raise ValueError(f"{who}: the heads have 0 classes")
    rows_shape = tuple(student_hidden.shape[:-1])
    _check_target(who, target, rows_shape, student_hidden.device, "the hidden states without their last dimension")
    _check_chunk(who, chunk_size)
    cfg = _config(who, beta=beta, temperature=temperature, hard_weight=hard_weight, ignore_index=ignore_index,
                  reduction=reduction, convention=convention, has_target=target is not None,
                  dtypes=(student_hidden.dtype, teacher_hidden.dtype))
    y, valid = _rows_target(target, ignore_index)
    if cfg.hard:
        _check_target_range(who, target.reshape(-1).long(), V, ignore_index)
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    out_dtype = student_hidden.dtype
    heads = (hs, student_weight, student_bias, ht, teacher_weight, teacher_bias)

    if not _losses.is_compiling() and _compat.functorch_transformed(*heads, target):
        zs = F.linear(hs, student_weight, student_bias).to(cfg.cd)
        zt = F.linear(ht, teacher_weight, teacher_bias).to(cfg.cd)
        D, nll, _, _ = forward_rows(zs, zt, y, cfg)
        return combine(D, nll, valid, cfg, rows_shape, out_dtype)

    from .lm_head import needs_of

    needs_s = needs_of(hs, student_weight, student_bias)
    needs_t = needs_of(ht, teacher_weight, teacher_bias)
    if not (needs_s or needs_t):
        with torch.no_grad():
            D, nll, _, _ = linear_distill_kernel(*heads, y, cfg, chunk_size)
        return combine(D, nll, valid, cfg, rows_shape, out_dtype)
    if cfg.reduction == "none":
        D, nll = _LinearDistillRows.apply(*heads, y, cfg, chunk_size, target if cfg.hard else None)
        return combine(D, nll, valid, cfg, rows_shape, out_dtype)

    # precompute: the loss is sum_rows (cD D + cn nll), known coefficients; the forward
    # forms the gradients, grad_carrier (a zero added to the loss) delivers them
    N = hs.shape[0]
    cd = cfg.cd
    if cfg.reduction == "mean":
        n = valid.sum().to(cd) if valid is not None else torch.full((), float(N), dtype=cd, device=hs.device)
        scale = 1.0 / n
    else:
        scale = torch.ones((), dtype=cd, device=hs.device)
    # the mask after the scale: with every row ignored, 'mean' has scale 1/0 = inf, and
    # 0 * inf would make every gradient NaN where eager's are 0
    row = torch.ones(N, dtype=cd, device=hs.device) * scale
    if valid is not None:
        row = torch.where(valid, row, torch.zeros((), dtype=cd, device=hs.device))
    coefs = torch.stack([row * ((1.0 - cfg.hw) * cfg.T * cfg.T), row * cfg.hw])
    detached = tuple(None if t is None else t.detach() for t in heads)
    with torch.no_grad():
        D, nll, gs, gt = linear_distill_kernel(*detached, y, cfg, chunk_size, coefs, needs_s, needs_t)
        loss = combine(D, nll, valid, cfg, rows_shape, out_dtype)
    # the caller's target where a hard-label CE reads it, as eager's nll_loss saves it (y is
    # a copy no caller can write)
    keep = [target] if cfg.hard else []
    if needs_s:
        loss = loss + torch.ops.ger.grad_carrier(hs, student_weight, student_bias, *gs, keep).to(loss.dtype)
    if needs_t:
        loss = loss + torch.ops.ger.grad_carrier(ht, teacher_weight, teacher_bias, *gt, keep).to(loss.dtype)
    return loss


# ----------------------------------------------------------------------------- per-token RL statistics
class TokenStats(NamedTuple):
    """``ger_token_stats``: per token (target's shape, compute dtype: float32, or float64
    for float64 logits), all differentiable.

    logp:    log softmax(logits / T)[target]
    entropy: H(softmax(logits / T))
    kl:      the estimator of KL(pi || pi_ref) at the sampled token (None without ref_logprobs)
    """

    logp: Tensor
    entropy: Tensor
    kl: Optional[Tensor] = None


def token_forward(z: Tensor, y: Tensor, T: float):
    """(logp, entropy, lse) for rows of raw logits (compute dtype); differentiable torch."""
    b = z if T == 1.0 else z / T
    L = _lse(b)
    lp = b - L.unsqueeze(1)
    H = -xmul(torch.exp(lp), lp).sum(1)
    logp = b.gather(1, y.unsqueeze(1)).squeeze(1) - L
    return logp, H, L


def token_backward(z: Tensor, y: Tensor, T: float, L: Tensor, H: Tensor, g_lp: Optional[Tensor],
                   g_H: Optional[Tensor]) -> Tensor:
    """d/dz of sum(g_lp logp + g_H H):  [g_lp (onehot - p) - g_H p (log p + H)] / T."""
    b = z if T == 1.0 else z / T
    lp = b - L.unsqueeze(1)
    p = torch.exp(lp)
    dz = torch.zeros_like(z)
    if g_H is not None:
        dz = dz - xmul(g_H.unsqueeze(1), xmul(p, lp + H.unsqueeze(1)))
    if g_lp is not None:
        g = g_lp.unsqueeze(1)
        dz = (dz - xmul(g, p)).scatter_add(1, y.unsqueeze(1), g)
    return dz if T == 1.0 else dz / T


def kl_estimate(logp: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log pi(y) and log pi_ref(y), y ~ pi:
    k1 = logp - ref; k2 = (logp - ref)^2 / 2; k3 = exp(ref - logp) - (ref - logp) - 1
    (written expm1(d) - d, d = ref - logp: the same number, no cancellation for small d).
    No clamping (verl clamps k3's d to [-20, 20] and k3 to [-10, 10]; apply it yourself)."""
    if estimator == "k1":
        return logp - ref_logprobs
    if estimator == "k2":
        return 0.5 * (logp - ref_logprobs).square()
    d = ref_logprobs - logp
    return torch.expm1(d) - d


def _check_token_args(who, logits, target, temperature, ref_logprobs, kl_estimator, shard: bool = False):
    """``shard``: a vocabulary shard, which may hold no class (the vocabulary is checked
    after the ranks agree on it)."""
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{who}: logits and target must be tensors")
    if logits.dtype not in _losses.LOGIT_DTYPES:
        raise TypeError(f"{who}: logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.dim() == 0 or (logits.shape[-1] == 0 and not shard):
        raise ValueError(f"{who}: logits must be (..., V) with V >= 1, got {list(logits.shape)}")
    return _check_token_rest(who, tuple(logits.shape[:-1]), logits.device,
                             f"the logits {list(logits.shape)} without their last dimension", target, temperature,
                             ref_logprobs, kl_estimator)


def _check_token_rest(who, rows_shape, device, what, target, temperature, ref_logprobs, kl_estimator):
    """The checks of the target, temperature and KL arguments against rows of ``rows_shape``."""
    _check_target(who, target, rows_shape, device, what)
    T = _positive(who, "temperature", temperature)
    if kl_estimator is not None and kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"{who}: kl_estimator must be one of {KL_ESTIMATORS} (k1 = logp - ref, "
                         f"k3 = exp(ref - logp) - (ref - logp) - 1) or None, got {kl_estimator!r}")
    if (ref_logprobs is None) != (kl_estimator is None):
        raise ValueError(f"{who}: pass ref_logprobs and kl_estimator together (the KL to a reference policy needs "
                         "both), or neither")
    if ref_logprobs is not None:
        if not isinstance(ref_logprobs, Tensor) or not ref_logprobs.is_floating_point():
            raise TypeError(f"{who}: ref_logprobs must be a floating tensor")
        if tuple(ref_logprobs.shape) != tuple(target.shape):
            raise ValueError(f"{who}: ref_logprobs shape {list(ref_logprobs.shape)} must match target "
                             f"{list(target.shape)}")
        if ref_logprobs.device != device:
            raise ValueError(f"{who}: ref_logprobs is on {ref_logprobs.device} but the logits on {device}")
    return T, rows_shape


def ger_token_stats(
    logits: Tensor,
    target: Tensor,
    *,
    temperature: float = 1.0,
    ref_logprobs: Optional[Tensor] = None,
    kl_estimator: Optional[str] = None,
    chunk_size: Optional[int] = None,
) -> TokenStats:
    """Per-token policy-gradient statistics of ``logits`` (..., V) at the sampled tokens
    ``target`` (...): log p(y) and the entropy of softmax(logits / T), and with
    ``ref_logprobs`` (the reference policy's log-prob of the same token) the KL estimator
    ``kl_estimator`` ("k1": logp - ref, verl "kl"; "k2": (logp - ref)^2 / 2, verl "mse";
    "k3": exp(ref - logp) - (ref - logp) - 1, TRL GRPO / verl "low_var_kl"). Chunked over
    tokens; saves O(tokens) statistics; analytic backward to the logits (and to
    ``ref_logprobs`` if it requires grad). Every target must be a class (no ignore_index:
    mask the outputs).

    >>> import torch
    >>> z, y = torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))
    >>> st = ger_token_stats(z, y, temperature=0.7)
    >>> st.logp.shape, st.entropy.shape
    (torch.Size([2, 3]), torch.Size([2, 3]))
    """
    who = "ger_token_stats"
    T, rows_shape = _check_token_args(who, logits, target, temperature, ref_logprobs, kl_estimator)
    _check_chunk(who, chunk_size)
    V = logits.shape[-1]
    cd = _compute_dtype(logits.dtype)
    y = target.reshape(-1).long()
    _check_target_range(who, y, V, None)
    z = logits.reshape(-1, V)
    if not _losses.is_compiling() and _compat.functorch_transformed(logits, target):
        logp, H, _ = token_forward(z.to(cd), y, T)
    else:
        logp, H, _ = torch.ops.ger.token_fwd(z, y, T, chunk_size or 0, _ops_distill.REV)
    logp, H = logp.reshape(rows_shape), H.reshape(rows_shape)
    kl = None
    if ref_logprobs is not None:
        kl = kl_estimate(logp, ref_logprobs.to(cd), kl_estimator)
    return TokenStats(logp, H, kl)


class _LinearTokenRows(torch.autograd.Function):
    """(logp, H) per token of an lm head, ``chunk`` tokens at a time: only (chunk, V)
    logits exist at once. Saves h, W, b, the targets and O(tokens) statistics (L, H);
    the backward recomputes each chunk's logits (the loss downstream of the statistics -
    a PPO ratio, advantages, masks - is the user's, so its gradient is known only then)."""

    @staticmethod
    def forward(ctx, h, W, b, y, T, cd, chunk):
        N, V = h.shape[0], W.shape[0]
        compiling = _losses.is_compiling()
        logp = h.new_empty((N,), dtype=cd)
        H = torch.empty_like(logp)
        L = torch.empty_like(logp)
        for s, e in _head_chunks(N, chunk, V, compiling):
            z = F.linear(h[s:e], W, b)
            # the op (eager: token_forward chunk by chunk; compiled: its lowering, one read of
            # the chunk's logits, per-row outputs realised per chunk so each chunk's logits
            # are freed before the next chunk's matmul)
            logp[s:e], H[s:e], L[s:e] = torch.ops.ger.token_fwd(z, y[s:e], T, 0, _ops_distill.REV)
        ctx.save_for_backward(h, W, b, y, L, H)
        ctx.T, ctx.cd, ctx.chunk = T, cd, chunk
        ctx.set_materialize_grads(False)
        return logp, H

    @staticmethod
    def backward(ctx, g_lp, g_H):
        h, W, b, y, L, H = ctx.saved_tensors
        needs = _needs(ctx.needs_input_grad, 0, b is not None)
        none = (None,) * 7
        if not needs or (g_lp is None and g_H is None):
            return none
        if torch.is_grad_enabled():
            raise RuntimeError("ger_linear_token_stats: a double backward (backward(create_graph=True)) is not "
                               "supported; use ger_token_stats on materialised logits for higher-order gradients")
        T, cd = ctx.T, ctx.cd
        grads = _head_grads_init(h, W, b, needs, cd)
        dep = g_lp if g_lp is not None else g_H
        compiling = _losses.is_compiling()
        for s, e in _head_chunks(h.shape[0], ctx.chunk, W.shape[0], compiling):
            # compiled, the chunk's rows pass through ger::after_grad so that this matmul
            # stays in the backward (see ops/distill.py); the same numbers either way
            hc = torch.ops.ger.after_grad(h[s:e], dep) if compiling else h[s:e]
            z = F.linear(hc, W, b).to(cd)
            dz = torch.ops.ger.token_bwd(None if g_lp is None else g_lp[s:e].to(cd),
                                         None if g_H is None else g_H[s:e].to(cd), z, y[s:e], L[s:e], H[s:e], T, 0,
                                         _ops_distill.REV)
            del z
            _head_grads_add(grads, dz, h, W, s, e, needs)
        gh, gw, gb = _head_grads_done(grads, W, b)
        return (gh if needs & _lin.NEED_H else None, gw if needs & _lin.NEED_W else None,
                gb if needs & _lin.NEED_B else None, None, None, None, None)


def ger_linear_token_stats(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    ref_logprobs: Optional[Tensor] = None,
    kl_estimator: Optional[str] = None,
    chunk_size: Optional[int] = None,
) -> TokenStats:
    """``ger_token_stats(F.linear(hidden, weight, bias), target, ...)`` without the (N, V)
    logits: ``chunk_size`` tokens at a time (default: a ~256 MiB fp32 (chunk, V) buffer,
    as ``ger_linear_loss``). ``hidden`` (..., H), ``weight`` (V, H), ``target`` (...) the
    sampled tokens. The forward keeps O(tokens) statistics; the backward recomputes each
    chunk's logits (one more matmul than a materialised head) and forms grad_hidden,
    grad_weight and grad_bias chunk by chunk. A double backward is not supported.

    >>> import torch
    >>> h, W = torch.randn(2, 3, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    >>> st = ger_linear_token_stats(h, W, torch.randint(0, 11, (2, 3)), temperature=0.7)
    >>> (st.logp.sum() - 0.01 * st.entropy.mean()).backward()
    """
    who = "ger_linear_token_stats"
    _check_head(who, "", hidden, weight, bias)
    V = weight.shape[0]
    if V == 0:
        raise ValueError(f"{who}: the head has 0 classes")
    rows_shape = tuple(hidden.shape[:-1])
    if not isinstance(target, Tensor):
        raise TypeError(f"{who}: target must be a tensor")
    T, _ = _check_token_rest(who, rows_shape, hidden.device, "the hidden states without their last dimension", target,
                             temperature, ref_logprobs, kl_estimator)
    _check_chunk(who, chunk_size)
    cd = _compute_dtype(hidden.dtype)
    y = target.reshape(-1).long()
    _check_target_range(who, y, V, None)
    h = hidden.reshape(-1, hidden.shape[-1])
    if not _losses.is_compiling() and _compat.functorch_transformed(hidden, weight, bias, target):
        logp, H, _ = token_forward(F.linear(h, weight, bias).to(cd), y, T)
    else:
        logp, H = _LinearTokenRows.apply(h, weight, bias, y, T, cd, chunk_size)
    logp, H = logp.reshape(rows_shape), H.reshape(rows_shape)
    kl = None
    if ref_logprobs is not None:
        kl = kl_estimate(logp, ref_logprobs.to(cd), kl_estimator)
    return TokenStats(logp, H, kl)


def ger_token_stats_reference(
    logits: Tensor,
    target: Tensor,
    *,
    temperature: float = 1.0,
    ref_logprobs: Optional[Tensor] = None,
    kl_estimator: Optional[str] = None,
) -> TokenStats:
    """:func:`ger_token_stats` in plain float64 torch from the definitions (returns float64)."""
    who = "ger_token_stats_reference"
    T, rows_shape = _check_token_args(who, logits, target, temperature, ref_logprobs, kl_estimator)
    dt = torch.float64
    lp = torch.log_softmax(logits.to(dt) / T, -1)
    p = lp.exp()
    logp = lp.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    H = -torch.where(p == 0, torch.zeros((), dtype=dt), p * lp).sum(-1)
    kl = None
    if ref_logprobs is not None:
        r = ref_logprobs.to(dt)
        if kl_estimator == "k1":
            kl = logp - r
        elif kl_estimator == "k2":
            kl = 0.5 * (logp - r) ** 2
        else:
            kl = torch.exp(r - logp) - (r - logp) - 1
    return TokenStats(logp, H, kl)


__all__ = [
    "ger_distill_loss",
    "ger_distill_reference",
    "ger_linear_distill_loss",
    "ger_token_stats",
    "ger_token_stats_reference",
    "TokenStats",
    "CONVENTIONS",
    "KL_ESTIMATORS",
]
