"""Distillation losses on given logits (student and teacher rows), forward + backward of
the student, at (8, 256, 32000) fp32 (B, T, V).

Variants, same inputs, one process:
  eager             the trainer's code (tests/distill_spellings.py), plain torch
  inductor          the same under torch.compile(backend="inductor")
  ger(trainer code) the same unmodified code under backend="ger"
  ger_distill_loss  the public API (ger::distill_fwd / distill_bwd, lowered by Inductor)
                    under backend="ger"
  ger_distill_loss eager   the public API without compile (the ops' chunked eager kernels)
  floor2            the in-run floor for reading two logit rows: one exp pass of each
                    into a reused buffer + one max pass of each

Cases: distill_jsd (TRL's JSD), distill_kd (Hinton KD with the hard CE), distill_kl_rows
(a per-token KL to a reference policy kept per row, then a masked mean: the user's code
works on the op's per-row output).

With the lm heads (h (N, H) @ W.T (V, H), N=1024, H=1024, V=32000 fp32 on CPU by
default; GER_BENCH_HEADS="4096,1024,128256" gives the issue's size, ~50 s a step on 2 cores):
  distill_two_heads  TRL's JSD on F.linear logits of a trained student and a frozen
                     teacher (eager / inductor) vs ger_linear_distill_loss (no N x V
                     logits of either model) under backend="ger"
  rl_token_head      a PPO/GRPO-style objective from the per-token log p(y), entropy and
                     k3 KL of F.linear logits (eager / inductor / the unmodified code
                     under ger, variant "ger(trainer code)") vs ger_linear_token_stats
                     under backend="ger"
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

import torch.nn.functional as F

from ger_inductor import ger_distill_loss, ger_linear_distill_loss, ger_linear_token_stats, ger_token_stats

from .cases import register
from .compiling import compile_apart
from .harness import Case, Variant

B, T, V = 8, 256, 32000


def _setup(dtype: torch.dtype = torch.float32, with_labels: bool = False):
    def setup(device):
        g = torch.Generator().manual_seed(0)
        zs = torch.randn((B, T, V), generator=g).mul_(2).to(device=device, dtype=dtype).requires_grad_()
        zt = torch.randn((B, T, V), generator=g).mul_(2).add_(zs.detach()).to(device=device, dtype=dtype)
        out = {"zs": zs, "zt": zt, "bufs": torch.empty_like(zs, requires_grad=False),
               "buft": torch.empty_like(zt)}
        if with_labels:
            out["y"] = torch.randint(0, V, (B, T), generator=g).to(device)
        return out

    return setup


def _step(loss_fn: Callable, backend: str | None) -> Callable[[dict], Callable[[], Any]]:
    def build(inp):
        f = loss_fn if backend is None else compile_apart(loss_fn, backend)
        zs, zt, y = inp["zs"], inp["zt"], inp.get("y")

        def step():
            loss = f(zs, zt) if y is None else f(zs, zt, y)
            (g,) = torch.autograd.grad(loss, zs)
            return loss.detach(), g

        return step

    return build


def _floor2(inp):
    zs, zt, bs, bt = inp["zs"].detach(), inp["zt"], inp["bufs"], inp["buft"]

    def step():
        torch.exp(zs, out=bs)
        torch.exp(zt, out=bt)
        return zs.amax(-1), zt.amax(-1)

    return step


def _bytes(inp) -> int:
    z = inp["zs"]
    return 5 * z.numel() * z.element_size()  # both rows read forward and backward + the gradient written


def _check(inp, out) -> str:
    names = [n for n in out if n != "floor2"]
    ref_l, ref_g = out[names[0]]
    msgs = []
    for n in names[1:]:
        l, g = out[n]
        dl = float((l.double() - ref_l.double()).abs() / ref_l.double().abs().clamp_min(1e-12))
        dg = float((g.double() - ref_g.double()).abs().max() / ref_g.double().abs().max())
        msgs.append(f"{n}: loss rel {dl:.1e}, grad rel {dg:.1e}")
    return "; ".join(msgs)


def _case(name: str, desc: str, trainer_fn: Callable, api_fn: Callable, with_labels: bool = False):
    variants = [
        Variant("eager", _step(trainer_fn, None), "the trainer's code, plain torch"),
        Variant("inductor", _step(trainer_fn, "inductor")),
        Variant("ger(trainer code)", _step(trainer_fn, "ger"), "unmodified trainer code under backend=ger"),
        Variant("ger_distill_loss", _step(api_fn, "ger"), "the public API, fused ops lowered by Inductor"),
        Variant("ger_distill_loss eager", _step(api_fn, None), "the public API, chunked eager kernels"),
        Variant("floor2", _floor2, "exp pass of each row into a reused buffer + max pass of each"),
    ]
    return register(Case(name, desc, _setup(with_labels=with_labels), variants, min_bytes=_bytes, check=_check))


def _spellings():
    from tests import distill_spellings as sp

    _case("distill_jsd", f"TRL generalized_jsd_loss beta=0.5, ({B}, {T}, {V}) fp32, fwd+bwd of the student",
          lambda zs, zt: sp.trl_generalized_jsd_loss(zs, zt, beta=0.5),
          lambda zs, zt: ger_distill_loss(zs, zt, beta=0.5))
    _case("distill_kd", f"Hinton KD: 0.5 T^2 KL(p_t||p_s) T=2 + 0.5 CE, ({B}, {T}, {V}) fp32, fwd+bwd of the student",
          lambda zs, zt, y: sp.hinton_kd_loss(zs.flatten(0, 1), zt.flatten(0, 1), y.flatten(), temperature=2.0),
          lambda zs, zt, y: ger_distill_loss(zs, zt, y, beta=0.0, temperature=2.0, hard_weight=0.5),
          with_labels=True)

    def kl_rows(zs, zt, y):  # a per-token KL to a reference policy (RL), masked mean over tokens
        lp, ref = zs.log_softmax(-1), zt.log_softmax(-1)
        per_token = (lp.exp() * (lp - ref)).sum(-1)
        mask = (y % 7 != 0).float()
        return (per_token * mask).sum() / mask.sum()

    def kl_rows_api(zs, zt, y):
        mask = (y % 7 != 0).float()
        return (ger_distill_loss(zs, zt, beta=1.0, reduction="none") * mask).sum() / mask.sum()

    _case("distill_kl_rows", f"per-token KL(pi||pi_ref) kept per row, masked mean, ({B}, {T}, {V}) fp32, fwd+bwd of "
          "the student", kl_rows, kl_rows_api, with_labels=True)


_spellings()

# ----------------------------------------------------------------------------- with the lm heads
#: GER_BENCH_HEADS="4096,1024,128256" runs the heads at the issue's size (~50 s a step on 2 cores)
NH, HH, VH = (int(v) for v in os.environ.get("GER_BENCH_HEADS", "1024,1024,32000").split(","))


def _head_setup(two: bool):
    def setup(device):
        g = torch.Generator().manual_seed(0)
        out = {"h": torch.randn((NH, HH), generator=g).to(device).requires_grad_(),
               "W": torch.randn((VH, HH), generator=g).mul_(HH ** -0.5).to(device).requires_grad_(),
               "y": torch.randint(0, VH, (NH,), generator=g).to(device)}
        if two:  # a frozen teacher
            out["ht"] = torch.randn((NH, HH), generator=g).to(device)
            out["Wt"] = torch.randn((VH, HH), generator=g).mul_(HH ** -0.5).to(device)
        else:  # what a PPO step reads besides the policy: old / reference log-probs, advantages, a mask
            out["old"] = (torch.randn(NH, generator=g) - 10).to(device)
            out["ref"] = (torch.randn(NH, generator=g) - 10).to(device)
            out["adv"] = torch.randn(NH, generator=g).to(device)
            out["mask"] = (torch.rand(NH, generator=g) > 0.1).float().to(device)
        return out

    return setup


def _head_step(fn: Callable, backend: str | None) -> Callable[[dict], Callable[[], Any]]:
    def build(inp):
        f = fn if backend is None else compile_apart(fn, backend)
        h, W = inp["h"], inp["W"]

        def step():
            loss = f(inp)
            gh, gW = torch.autograd.grad(loss, (h, W))
            return loss.detach(), gh, gW

        return step

    return build


def _head_check(inp, out) -> str:
    names = list(out)
    ref = [t.double() for t in out[names[0]]]
    msgs = []
    for n in names[1:]:
        got = [t.double() for t in out[n]]
        rel = [float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(got, ref)]
        msgs.append(f"{n}: loss rel {rel[0]:.1e}, grad_h rel {rel[1]:.1e}, grad_W rel {rel[2]:.1e}")
    return "; ".join(msgs)


def _trl_two_heads(inp):
    from tests import distill_spellings as sp

    zs = F.linear(inp["h"], inp["W"])
    with torch.no_grad():
        zt = F.linear(inp["ht"], inp["Wt"])
    return sp.trl_generalized_jsd_loss(zs.unsqueeze(0), zt.unsqueeze(0), beta=0.5)


def _api_two_heads(inp):
    return ger_linear_distill_loss(inp["h"], inp["W"], inp["ht"], inp["Wt"], beta=0.5)


def _ppo_objective(logp, entropy, kl, inp):
    ratio = torch.exp(logp - inp["old"])
    clipped = torch.clamp(ratio, 0.8, 1.2)
    pg = -torch.minimum(ratio * inp["adv"], clipped * inp["adv"])
    per_token = pg - 0.01 * entropy + 0.04 * kl
    return (per_token * inp["mask"]).sum() / inp["mask"].sum()


def _rl_unmodified(inp, T: float = 0.9):
    """verl/TRL-style: logits / T, log_softmax, gather at the sampled tokens, entropy from
    softmax * log_softmax, the k3 KL to the reference policy."""
    logits = F.linear(inp["h"], inp["W"]) / T
    lp = F.log_softmax(logits, dim=-1)
    logp = lp.gather(-1, inp["y"].unsqueeze(-1)).squeeze(-1)
    entropy = -(lp.exp() * lp).sum(-1)
    d = inp["ref"] - logp
    kl = torch.exp(d) - d - 1
    return _ppo_objective(logp, entropy, kl, inp)


def _rl_api(inp, T: float = 0.9):
    st = ger_linear_token_stats(inp["h"], inp["W"], inp["y"], temperature=T, ref_logprobs=inp["ref"],
                                kl_estimator="k3")
    return _ppo_objective(st.logp, st.entropy, st.kl, inp)


def _head_case(name: str, desc: str, two: bool, trainer_fn: Callable, api_name: str, api_fn: Callable) -> Case:
    variants = [Variant("eager", _head_step(trainer_fn, None), "the trainer-style code on F.linear logits"),
                Variant("inductor", _head_step(trainer_fn, "inductor")),
                Variant("ger(trainer code)", _head_step(trainer_fn, "ger"), "unmodified code under backend=ger"),
                Variant(api_name, _head_step(api_fn, "ger"), "the public API: no N x V logits"),
                Variant(f"{api_name} eager", _head_step(api_fn, None))]
    return register(Case(name, desc, _head_setup(two), variants, check=_head_check))


def _trl_selective_log_softmax_fp32(logits, index):
    """TRL's selective_log_softmax for fp32 logits: the raw target logit minus per-row
    logsumexps from a loop over the batch (to save memory)."""
    sel = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
    return sel - torch.stack([torch.logsumexp(lg, dim=-1) for lg in logits])


def _grpo_trl_loss(logp, adv, mask):
    """TRL's GRPO loss (one iteration: old = logp.detach()), torch.min of the clipped terms."""
    coef_1 = torch.exp(logp - logp.detach())
    coef_2 = torch.clamp(coef_1, 0.8, 1.2)
    per_token = -torch.min(coef_1 * adv.unsqueeze(1), coef_2 * adv.unsqueeze(1))
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


GRPO_B = 4  # sequences per batch of the head case (N = GRPO_B x N / GRPO_B tokens)


def _grpo_trl_head(inp, T: float = 0.9):
    h = inp["h"].view(GRPO_B, -1, inp["h"].shape[-1])
    logits = F.linear(h, inp["W"]) / T
    logp = _trl_selective_log_softmax_fp32(logits, inp["y"].view(GRPO_B, -1))
    return _grpo_trl_loss(logp, inp["adv"][:GRPO_B], inp["mask"].view(GRPO_B, -1))


def _grpo_trl_head_api(inp, T: float = 0.9):
    st = ger_linear_token_stats(inp["h"], inp["W"], inp["y"], temperature=T)
    return _grpo_trl_loss(st.logp.view(GRPO_B, -1), inp["adv"][:GRPO_B], inp["mask"].view(GRPO_B, -1))


def _grpo_trl_logits(zs, zt, y):
    """TRL's GRPO on given fp32 logits (B, T, V) (zt: unused)."""
    adv = torch.linspace(0.2, 1.0, zs.shape[0], device=zs.device)
    mask = (y % 7 != 0).float()
    return _grpo_trl_loss(_trl_selective_log_softmax_fp32(zs / 0.9, y), adv, mask)


def _grpo_trl_logits_api(zs, zt, y):
    adv = torch.linspace(0.2, 1.0, zs.shape[0], device=zs.device)
    mask = (y % 7 != 0).float()
    return _grpo_trl_loss(ger_token_stats(zs, y, temperature=0.9).logp, adv, mask)


_head_case("distill_two_heads",
           f"JSD beta=0.5 of a trained student head and a frozen teacher head, N={NH} H={HH} V={VH} fp32, fwd+bwd",
           True, _trl_two_heads, "ger_linear_distill_loss", _api_two_heads)
_case("grpo_trl_fp32", f"TRL's GRPO on fp32 logits / 0.9: selective_log_softmax's raw target logit minus a loop of "
      f"per-row logsumexps, ({B}, {T}, {V}), fwd+bwd (variant ger_distill_loss: ger_token_stats)",
      _grpo_trl_logits, _grpo_trl_logits_api, with_labels=True)
_head_case("grpo_trl_head",
           f"TRL's GRPO (fp32 selective_log_softmax, torch.min) on F.linear logits / 0.9, {GRPO_B} sequences, "
           f"N={NH} H={HH} V={VH} fp32, fwd+bwd", False, _grpo_trl_head, "ger_linear_token_stats", _grpo_trl_head_api)
_head_case("rl_token_head",
           f"PPO-style objective from log p(y), entropy and k3 KL at T=0.9, N={NH} H={HH} V={VH} fp32, fwd+bwd",
           False, _rl_unmodified, "ger_linear_token_stats", _rl_api)
