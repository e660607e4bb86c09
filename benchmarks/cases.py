"""Benchmark cases. Each case: one set of inputs, several variants run on them."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ger_inductor import ger_loss, ger_loss_reference

from .compiling import compile_apart
from .harness import Case, Variant

CASES: dict[str, Case] = {}


def register(case: Case) -> Case:
    CASES[case.name] = case
    return case


def _compiled(fn: Callable, backend: str, **kw) -> Callable:
    return compile_apart(fn, backend, **kw)


# ----------------------------------------------------------------------------- losses
def hand_written_confidence_penalty(z, y, beta=0.1):
    """CE - beta * H(p), the way users write it."""
    lp = torch.log_softmax(z, dim=-1)
    ent = -(lp.exp() * lp).sum(-1).mean()
    return F.cross_entropy(z, y) - beta * ent


def _loss_setup(N: int, V: int, dtype: torch.dtype, shape=None, ignore_frac: float = 0.0):
    def setup(device):
        g = torch.Generator().manual_seed(0)
        z = torch.randn((N, V), generator=g, dtype=torch.float32).mul_(2).to(device=device, dtype=dtype)
        y = torch.randint(0, V, (N,), generator=g).to(device)
        if ignore_frac:
            y[torch.rand(N, generator=g).to(device) < ignore_frac] = -100
        if shape is not None:
            z = z.view(*shape, V)
            y = y.view(*shape)
        z.requires_grad_(True)
        return {"z": z, "y": y, "buf": torch.empty_like(z, requires_grad=False)}

    return setup


def _fwd_bwd(loss_fn: Callable, backend: str | None) -> Callable[[dict], Callable[[], Any]]:
    def build(inp):
        f = loss_fn if backend is None else _compiled(loss_fn, backend)
        z, y = inp["z"], inp["y"]

        def step():
            loss = f(z, y)
            (g,) = torch.autograd.grad(loss, z)
            return loss.detach(), g

        return step

    return build


def _floor(inp):
    """One exp pass from the logits into a reused buffer + one max pass: the in-run floor F."""
    z, buf = inp["z"].detach(), inp["buf"]

    def step():
        torch.exp(z, out=buf)
        return z.amax(-1)

    return step


def _loss_bytes(inp) -> int:
    z = inp["z"]
    return 3 * z.numel() * z.element_size()  # logits read forward + read backward + gradient written


def _check_close(inp, out) -> str:
    """Compare every variant's loss and gradient with the first (the eager reference)."""
    names = [n for n in out if n != "floor"]
    ref_l, ref_g = out[names[0]]
    msgs = []
    for n in names[1:]:
        l, g = out[n]
        dl = float((l.float() - ref_l.float()).abs() / ref_l.float().abs().clamp_min(1e-12))
        dg = float((g.float() - ref_g.float()).abs().max() / ref_g.float().abs().max())
        msgs.append(f"{n}: loss rel {dl:.1e}, grad rel {dg:.1e}")
    return "; ".join(msgs)


def _loss_case(name, desc, ref_fn, ger_fn, setup, extra: list[Variant] | None = None):
    variants = [
        Variant("eager", _fwd_bwd(ref_fn, None), "reference in plain torch"),
        Variant("inductor", _fwd_bwd(ref_fn, "inductor")),
        Variant("ger", _fwd_bwd(ger_fn, "ger"), "ger_loss, fused op"),
        *(extra or []),
        Variant("floor", _floor, "exp pass into a reused buffer + max pass"),
    ]
    return register(Case(name, desc, setup, variants, min_bytes=_loss_bytes, check=_check_close))


N, V = 2048, 32000
_loss_case(
    "loss_ls", f"F.cross_entropy(label_smoothing=0.1), {N}x{V} fp32, fwd+bwd",
    lambda z, y: F.cross_entropy(z, y, label_smoothing=0.1),
    lambda z, y: ger_loss(z, y, label_smoothing=0.1),
    _loss_setup(N, V, torch.float32),
    extra=[Variant("ger(F.cross_entropy)", _fwd_bwd(lambda z, y: F.cross_entropy(z, y, label_smoothing=0.1), "ger"),
                   "unmodified F.cross_entropy under backend=ger")],
)
_loss_case(
    "loss_cp", f"CE - 0.1 H(p) (confidence penalty), {N}x{V} fp32, fwd+bwd",
    hand_written_confidence_penalty,
    # KL(p||u) = log V - H(p): the same gradient; the loss differs by the constant 0.1 log V
    lambda z, y: ger_loss(z, y, alpha=0.0, beta=0.1) - 0.1 * math.log(z.shape[-1]),
    _loss_setup(N, V, torch.float32),
    extra=[Variant("ger(hand-written)", _fwd_bwd(hand_written_confidence_penalty, "ger"),
                   "unmodified hand-written CE - beta H under backend=ger")],
)
_loss_case(
    "loss_ger", f"GER alpha=0.5 beta=0.7, {N}x{V} fp32, fwd+bwd (reference: plain-torch GER)",
    lambda z, y: ger_loss_reference(z, y, alpha=0.5, beta=0.7),
    lambda z, y: ger_loss(z, y, alpha=0.5, beta=0.7),
    _loss_setup(N, V, torch.float32),
)
_loss_case(
    "loss_ls_bf16", f"F.cross_entropy(label_smoothing=0.1), {N}x{V} bf16 logits, fwd+bwd",
    lambda z, y: F.cross_entropy(z.float(), y, label_smoothing=0.1),
    lambda z, y: ger_loss(z, y, label_smoothing=0.1),
    _loss_setup(N, V, torch.bfloat16),
)
def _spellings_case():
    from tests import spellings

    variants = [Variant("fused_ce", _fwd_bwd(lambda z, y: ger_loss(z, y, alpha=1.0, beta=0.0), "ger"),
                        "ger_loss plain cross-entropy, the fused op called directly"),
                Variant("fused_cp", _fwd_bwd(lambda z, y: ger_loss(z, y, alpha=0.0, beta=0.1), "ger"),
                        "ger_loss confidence penalty, the fused op called directly"),
                Variant("fused_ger", _fwd_bwd(lambda z, y: ger_loss(z, y, alpha=0.5, beta=0.7), "ger"),
                        "ger_loss general alpha, the fused op called directly")]
    for name, (fn, _patterns) in spellings.RECOGNISED.items():
        variants.append(Variant(f"inductor:{name}", _fwd_bwd(fn, "inductor")))
        variants.append(Variant(f"ger:{name}", _fwd_bwd(fn, "ger"), "unmodified code under backend=ger"))
    return register(Case(
        "loss_spellings", f"every recognised loss spelling, {N}x{V} fp32, fwd+bwd: inductor vs ger vs the fused CE",
        _loss_setup(N, V, torch.float32), variants, baseline="fused_ce",
    ))


_spellings_case()
_loss_case(
    "loss_btv_ignore", "F.cross_entropy(label_smoothing=0.1) on (8, 256, 32000) fp32, 25% ignored, fwd+bwd",
    lambda z, y: F.cross_entropy(z.flatten(0, 1), y.flatten(), label_smoothing=0.1, ignore_index=-100),
    lambda z, y: ger_loss(z, y, label_smoothing=0.1, ignore_index=-100),
    _loss_setup(N, V, torch.float32, shape=(8, 256), ignore_frac=0.25),
)
from . import cases_conv  # noqa: E402,F401
from . import cases_lm_head  # noqa: E402,F401
from . import cases_dynamic  # noqa: E402,F401
from . import cases_distill  # noqa: E402,F401
