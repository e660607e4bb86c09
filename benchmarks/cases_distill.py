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
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ger_inductor import ger_distill_loss

from .cases import register
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
        f = loss_fn if backend is None else torch.compile(loss_fn, backend=backend)
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


_spellings()
