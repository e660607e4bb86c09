"""Dynamic shapes: the same step on the static graph and on the dynamic one.

A training loop whose sequence length changes every step runs on the graph Dynamo
compiles after the second distinct length (automatic dynamic shapes, symbolic length).
Each ``(dynamic)`` variant compiles the way such a loop does - two warm-up calls at
other lengths, the second of which compiles the dynamic graph - and is then timed at
the case's size, beside the variant compiled for that size alone. Same tokens, so the
ratio of the medians is the ratio of the times per token.

    dyn_lm_train   TinyLM (vocab 8000, d 128, 2 blocks), a training step (fwd+bwd) on
                   8 x 256 tokens: F.cross_entropy(label_smoothing=0.1)
    dyn_loss_cp    CE - 0.1 H(p) written by hand, 2048 x 32000 fp32 logits, fwd+bwd
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch

from ger_inductor.demo import TinyLM

from .compiling import compile_apart
from .cases import _check_close, _loss_setup, hand_written_confidence_penalty, register
from .harness import Case, Variant


#: ger with the loss family alone (the lm-head family, which replaces the lm head and
#: the loss together, is measured in cases_lm_head.py)
LOSS_ONLY = {"passes": ["conv_bn_act", "loss_entropy"]}


def _compile(fn: Callable, backend: str, warmups: list[tuple], options: dict | None = None) -> Callable:
    """``fn`` compiled by ``backend`` with graphs of its own (``compile_apart``: the static
    variant never runs the dynamic one's graph), first called on ``warmups`` (other
    sizes: the second compiles Dynamo's dynamic graph)."""
    compiled = compile_apart(fn, backend, tag=f"{backend}_{'dyn' if warmups else 'static'}", options=options)
    for args in warmups:
        out = compiled(*args)
        if out.requires_grad:
            out.backward()
    return compiled


# ----------------------------------------------------------------------------- the LM
B, T, VOCAB = 8, 256, 8000


def _lm_setup(device):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (B, T), generator=g).to(device)
    targets = torch.randint(0, VOCAB, (B, T), generator=g).to(device)
    targets[:, -8:] = -100
    return {"model": TinyLM(vocab=VOCAB, d=128, layers=2).to(device), "tokens": tokens, "targets": targets}


def _lm_warmups(inp, lengths=(97, 161)) -> list[tuple]:
    g = torch.Generator().manual_seed(1)
    dev = inp["tokens"].device
    return [(torch.randint(0, VOCAB, (B, n), generator=g).to(dev), torch.randint(0, VOCAB, (B, n), generator=g).to(dev))
            for n in lengths]


def _lm_step(backend: str | None, dynamic: bool, options: dict | None = None) -> Callable[[dict[str, Any]], Callable[[], Any]]:
    def build(inp):
        model = copy.deepcopy(inp["model"])
        run: Callable = model
        if backend is not None:
            run = _compile(model, backend, _lm_warmups(inp) if dynamic else [], options)
        tokens, targets = inp["tokens"], inp["targets"]

        def step():
            model.zero_grad(set_to_none=True)
            loss = run(tokens, targets)
            loss.backward()
            return loss.detach(), model.head.weight.grad

        return step

    return build


register(Case(
    "dyn_lm_train", f"TinyLM training step on {B}x{T} tokens: static graph vs the dynamic graph of a loop "
    "with changing lengths (same tokens: ratio = time per token)",
    _lm_setup,
    [
        Variant("eager", _lm_step(None, False)),
        Variant("inductor", _lm_step("inductor", False), "compiled for this length"),
        Variant("inductor(dynamic)", _lm_step("inductor", True), "dynamic graph (symbolic length)"),
        Variant("ger[loss]", _lm_step("ger", False, LOSS_ONLY), "loss family only; compiled for this length"),
        Variant("ger[loss](dynamic)", _lm_step("ger", True, LOSS_ONLY), "loss family only; dynamic graph"),
        Variant("ger", _lm_step("ger", False), "every family; compiled for this length"),
        Variant("ger(dynamic)", _lm_step("ger", True), "every family; dynamic graph (symbolic length)"),
    ],
    check=_check_close, baseline="ger[loss]",
))


# ----------------------------------------------------------------------------- the loss alone
N, V = 2048, 32000


def _loss_step(backend: str, dynamic: bool, options: dict | None = None) -> Callable[[dict[str, Any]], Callable[[], Any]]:
    def build(inp):
        z, y = inp["z"], inp["y"]
        warm = []
        if dynamic:
            for n in (N // 2, N // 3):
                zw = torch.randn(n, V, device=z.device, requires_grad=True)
                warm.append((zw, torch.randint(0, V, (n,), device=z.device)))
        f = _compile(hand_written_confidence_penalty, backend, warm, options)

        def step():
            loss = f(z, y)
            (g,) = torch.autograd.grad(loss, z)
            return loss.detach(), g

        return step

    return build


register(Case(
    "dyn_loss_cp", f"CE - 0.1 H(p) by hand, {N}x{V} fp32, fwd+bwd: static graph vs the dynamic graph (symbolic rows)",
    _loss_setup(N, V, torch.float32),
    [
        Variant("inductor", _loss_step("inductor", False), "compiled for this size"),
        Variant("inductor(dynamic)", _loss_step("inductor", True), "dynamic graph (symbolic rows)"),
        Variant("ger", _loss_step("ger", False), "compiled for this size"),
        Variant("ger(dynamic)", _loss_step("ger", True), "dynamic graph (symbolic rows)"),
    ],
    check=_check_close, baseline="ger",
))
