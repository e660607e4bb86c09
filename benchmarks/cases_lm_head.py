"""lm head + loss cases: h (N, H) @ W.T (V, H) then the loss, forward + backward
(grad_h and grad_W), at a large-vocabulary size (N=4096, H=1024, V=128256 like Llama 3).

Variants, same inputs, one process:
  eager         F.cross_entropy(F.linear(h, W).float(), y, ...)
  inductor      the same under torch.compile(backend="inductor")
  torch_chunked F.linear_cross_entropy(..., options=LinearCrossEntropyOptions()) (torch's
                opt-in chunked path; plain cross-entropy only: no label smoothing there)
  ger           the same unmodified code under torch.compile(backend="ger") (the lm_head
                rewrite: ger::linear_loss_fwd, gradients in the forward sweep, where the
                measured selection keeps it)
  ger_prior     the same with options={"autotune": False} (the profile's static table)
  ger_linear_loss  the public API called eagerly (no compile)
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from ger_inductor import ger_linear_loss

from .cases import register
from .compiling import compile_apart
from .harness import Case, Variant

N, H, V = 4096, 1024, 128256


def _setup(dtype: torch.dtype, n=N, h=H, v=V):
    def setup(device):
        g = torch.Generator().manual_seed(0)
        hh = torch.randn((n, h), generator=g).to(device=device, dtype=dtype).requires_grad_()
        W = torch.randn((v, h), generator=g).mul_(h ** -0.5).to(device=device, dtype=dtype).requires_grad_()
        y = torch.randint(0, v, (n,), generator=g)
        y[torch.rand(n, generator=g) < 0.1] = -100  # padding
        return {"h": hh, "W": W, "y": y.to(device)}

    return setup


def _step(loss_fn: Callable, backend: str | None, **compile_kw) -> Callable[[dict], Callable[[], Any]]:
    def build(inp):
        f = loss_fn if backend is None else compile_apart(loss_fn, backend, **compile_kw)
        h, W, y = inp["h"], inp["W"], inp["y"]

        def step():
            loss = f(h, W, y)
            gh, gW = torch.autograd.grad(loss, (h, W))
            return loss.detach(), gh, gW

        return step

    return build


def _check(inp, out) -> str:
    names = list(out)
    ref = [t.double() for t in out[names[0]]]
    msgs = []
    for n in names[1:]:
        errs = [float((t.double() - r).norm() / r.norm()) for t, r in zip(out[n], ref)]
        msgs.append(f"{n}: loss {errs[0]:.1e}, grad_h {errs[1]:.1e}, grad_W {errs[2]:.1e} (norm-wise rel.)")
    return "; ".join(msgs)


def _case(name: str, dtype: torch.dtype, label_smoothing: float, n=N, h=H, v=V) -> Case:
    ls = label_smoothing

    def ref(hh, W, y):
        return F.cross_entropy(F.linear(hh, W).float(), y, ignore_index=-100, label_smoothing=ls)

    variants = [
        Variant("eager", _step(ref, None), "F.linear + F.cross_entropy, plain torch"),
        Variant("inductor", _step(ref, "inductor")),
    ]
    if not ls and hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        opts = torch.nn.LinearCrossEntropyOptions()
        variants.append(Variant(
            "torch_chunked",
            _step(lambda hh, W, y: F.linear_cross_entropy(hh, W, y, ignore_index=-100, options=opts), None),
            "F.linear_cross_entropy with LinearCrossEntropyOptions() (chunked, gradients in forward)",
        ))
        opts512 = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=512, chunking_method=None)
        variants.append(Variant(
            "torch_chunked_512",
            _step(lambda hh, W, y: F.linear_cross_entropy(hh, W, y, ignore_index=-100, options=opts512), None),
            "the same with 512-row chunks (ger's CPU chunk at V=128256)",
        ))
    variants += [
        Variant("ger", _step(ref, "ger"), "the same code under backend=ger (measured selection: the lm_head "
                "rewrite where it times faster, within 3 %)"),
        Variant("ger_prior", _step(ref, "ger", options={"autotune": False}),
                "backend=ger with measured selection off: the profile's table (fused above min_vocab)"),
        Variant("ger_linear_loss",
                _step(lambda hh, W, y: ger_linear_loss(hh, W, y, ignore_index=-100, label_smoothing=ls), None),
                "ger_linear_loss called eagerly"),
        Variant("ger_linear_loss_256",
                _step(lambda hh, W, y: ger_linear_loss(hh, W, y, ignore_index=-100, label_smoothing=ls, chunk=256), None),
                "ger_linear_loss called eagerly, 256-row chunks"),
    ]
    desc = (f"lm head + {'label-smoothed ' if ls else ''}cross-entropy, h {n}x{h} @ W {v}x{h}, "
            f"{str(dtype).replace('torch.', '')}, fwd+bwd (grad_h, grad_W), 10% ignored")
    return register(Case(name, desc, _setup(dtype, n, h, v), variants, check=_check))


_case("lmhead_ce_fp32", torch.float32, 0.0)
_case("lmhead_ce_bf16", torch.bfloat16, 0.0)
_case("lmhead_ls_fp32", torch.float32, 0.1)
_case("lmhead_ls_bf16", torch.bfloat16, 0.1)
# a small size for a quick look (and the CPU dry run of the GPU script)
_case("lmhead_ce_small", torch.float32, 0.0, n=1024, h=256, v=32000)


# ----------------------------------------------------------------------------- logits returned
def _hf_loss_and_logits(hh, W, y):
    """transformers' causal-LM path: the head's logits returned beside the loss
    (``ForCausalLMLoss``: upcast, labels shifted by padding, a sum over the tokens divided
    by their count)."""
    logits = F.linear(hh, W)
    labels = F.pad(y, (0, 1), value=-100)[1:]
    loss = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum") / (labels != -100).sum()
    return loss, logits


def _step_returned(backend: str | None, **compile_kw) -> Callable[[dict], Callable[[], Any]]:
    def build(inp):
        f = _hf_loss_and_logits if backend is None else compile_apart(_hf_loss_and_logits, backend, **compile_kw)
        h, W, y = inp["h"], inp["W"], inp["y"]

        def step():
            loss, logits = f(h, W, y)  # the caller holds the logits through the backward
            gh, gW = torch.autograd.grad(loss, (h, W))
            return loss.detach(), gh, gW

        return step

    return build


def _case_returned(name: str, dtype: torch.dtype, n: int, h: int, v: int) -> Case:
    variants = [
        Variant("eager", _step_returned(None), "the loss and the logits it returns, plain torch"),
        Variant("inductor", _step_returned("inductor")),
        Variant("ger", _step_returned("ger"), "backend=ger: the head fused, the op writes the returned logits "
                "(where the measured selection keeps it)"),
        Variant("ger_prior", _step_returned("ger", options={"autotune": False}),
                "backend=ger with measured selection off"),
    ]
    desc = (f"lm head + cross-entropy with the logits returned (transformers' labels= path), h {n}x{h} @ W {v}x{h}, "
            f"{str(dtype).replace('torch.', '')}, fwd+bwd of the loss only")
    return register(Case(name, desc, _setup(dtype, n, h, v), variants, check=_check))


_case_returned("lmhead_returned_fp32", torch.float32, 2048, 512, 32000)
_case_returned("lmhead_returned_bf16", torch.bfloat16, 2048, 512, 32000)
