"""conv -> BN -> activation cases: models A, B, C x (inference under no_grad, inference
with grad-enabled parameters, training step) x (eager, inductor, inductor with
freezing where it applies, ger).

    A  4 x [conv3x3 64->64 (no bias) -> BN -> ReLU] on 16x64x56x56      compute-bound
    B  3 x [depthwise 3x3 -> BN -> ReLU6 -> 1x1 -> BN -> ReLU6], C=128,  memory-bound
       16x128x56x56
    C  ResNet-18 (examples/resnet18_cnn.py), 8x3x224x224

Inference checks compare each variant's output with a float64 eager reference; training
cases report the parameter-gradient error against float64 and the activation memory
saved for backward (unique storages seen by ``torch.autograd.graph.saved_tensors_hooks``
in one step: all, and without the input's and the parameters' storages).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn as nn

from examples.resnet18_cnn import randomize_bn_statistics, resnet18
from ger_inductor import _compat
from ger_inductor.demo import RepVGGStage
from ger_inductor.measure import saved_for_backward

from .cases import register
from .compiling import compile_apart
from .harness import Case, Variant


class ModelA(nn.Module):
    """4 x conv3x3(64 -> 64, no bias) -> BN -> ReLU."""

    def __init__(self, channels: int = 64, blocks: int = 4):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1, bias=False) for _ in range(blocks))
        self.bns = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(blocks))

    def forward(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = torch.relu(bn(conv(x)))
        return x


class ModelB(nn.Module):
    """3 x [depthwise 3x3 -> BN -> ReLU6 -> 1x1 -> BN -> ReLU6] (MobileNet's separable block);
    ``act``: another activation module class (MobileNetV3's Hardswish in model H)."""

    def __init__(self, channels: int = 128, blocks: int = 3, act=None):
        super().__init__()
        act = act or (lambda: nn.ReLU6(inplace=True))
        layers: list[nn.Module] = []
        for _ in range(blocks):
            layers += [
                nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
                nn.BatchNorm2d(channels),
                act(),
                nn.Conv2d(channels, channels, 1, bias=False),
                nn.BatchNorm2d(channels),
                act(),
            ]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], str]] = {
    "a": (ModelA, (16, 64, 56, 56), "A: 4x conv3x3(64->64)->BN->ReLU, 16x64x56x56"),
    "b": (ModelB, (16, 128, 56, 56), "B: 3x [dw3x3->BN->ReLU6->1x1->BN->ReLU6], 16x128x56x56"),
    "c": (lambda: resnet18(num_classes=1000), (8, 3, 224, 224), "C: ResNet-18, 8x3x224x224"),
    "h": (lambda: ModelB(act=nn.Hardswish), (16, 128, 56, 56),
          "H: 3x [dw3x3->BN->Hardswish->1x1->BN->Hardswish], 16x128x56x56"),
    "r": (RepVGGStage, (16, 64, 56, 56), "R: 4x RepVGG block relu(BN(conv3x3) + BN(conv1x1) + BN(x)), 16x64x56x56"),
}


def _setup(model_key: str):
    factory, shape, _ = MODELS[model_key]

    def setup(device):
        torch.manual_seed(0)
        model = randomize_bn_statistics(factory()).to(device)
        return {"model": model, "x": torch.randn(shape, device=device), "saved": {}}

    return setup


def _compile(model: nn.Module, backend: str | None, freezing: bool, example: Callable[[], Any]):
    """``model`` compiled (and run once, so that freezing applies at compile time)."""
    if backend is None:
        return model
    # (compile_apart: graphs of its own - a freezing variant built after the plain one
    # ran the plain one's graph, stop-38 review)
    if backend == "ger_prior":  # the rewrites always: no whole-graph measurement
        compiled = compile_apart(model, "ger", tag=backend, options={"autotune": False})
    elif backend == "ger_reparam":  # summed branches merged into one conv (opt-in since stop 35)
        compiled = compile_apart(model, "ger", tag=backend, options={"reparameterize": True})
    else:
        compiled = compile_apart(model, backend, tag=backend + ("_freezing" if freezing else ""))
    if freezing:
        # freezing is read from the global config by some of Inductor's passes (the
        # ``options`` dict does not reach them): set it for the compiling call only
        with _compat.inductor_config().patch(freezing=True):
            example(compiled)
    return compiled


def _inference(backend: str | None, grad: bool, freezing: bool = False):
    def build(inp):
        model = copy.deepcopy(inp["model"]).eval()
        x = inp["x"]

        def run(f):
            with torch.set_grad_enabled(grad):
                return f(x)

        f = _compile(model, backend, freezing, run)

        def step():
            return run(f).detach()

        return step

    return build


def _training(name: str, backend: str | None):
    def build(inp):
        model = copy.deepcopy(inp["model"]).train()
        params = list(model.parameters())
        x = inp["x"]
        f = _compile(model, backend, False, lambda f: f(x))

        def forward():
            return f(x)

        def step():
            for p in params:
                p.grad = None
            out = forward()
            out.float().square().mean().backward()
            return out.detach(), [p.grad for p in params]

        step()  # compile forward and backward before measuring what is saved
        inp["saved"][name] = saved_for_backward(forward, [x, *params])
        return step

    return build


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _check_inference(inp, outputs) -> str:
    ref = copy.deepcopy(inp["model"]).double().eval()
    with torch.no_grad():
        expected = ref(inp["x"].double())
    return "; ".join(f"{name}: rel err vs float64 {_rel(out, expected):.1e}" for name, out in outputs.items())


def _check_training(inp, outputs) -> str:
    ref = copy.deepcopy(inp["model"]).double().train()
    ref(inp["x"].double()).square().mean().backward()
    expected = [p.grad for p in ref.parameters()]
    msgs = []
    base = inp["saved"].get("inductor")
    for name, (_out, grads) in outputs.items():
        worst = max(_rel(g, e) for g, e in zip(grads, expected))
        msg = f"{name}: worst param-grad rel err vs float64 {worst:.1e}"
        if name in inp["saved"]:
            total, acts = inp["saved"][name]
            msg += f", saved {total / 2**20:.1f} MiB ({acts / 2**20:.1f} MiB without input/params)"
            if base:
                msg += f" = {total / base[0]:.2f}x / {acts / base[1]:.2f}x inductor"
        msgs.append(msg)
    return "; ".join(msgs)


def _register(model_key: str) -> None:
    _, _, desc = MODELS[model_key]
    setup = _setup(model_key)
    register(Case(
        f"conv_{model_key}_infer", f"{desc}; eval, under torch.no_grad()", setup,
        [
            Variant("eager", _inference(None, False)),
            Variant("inductor", _inference("inductor", False)),
            Variant("inductor(freezing)", _inference("inductor", False, freezing=True), "torch._inductor.config.freezing"),
            Variant("ger", _inference("ger", False), "the graph timed with and without the rewrites at compile time"),
            Variant("ger_prior", _inference("ger_prior", False), "runtime fold, oneDNN post-op conv on CPU (autotune=False)"),
            Variant("ger(freezing)", _inference("ger", False, freezing=True),
                    "backend=ger with torch._inductor.config.freezing: the parameters are constants"),
            *([Variant("ger(reparameterize)", _inference("ger_reparam", False), "summed branches merged into one conv")]
              if model_key == "r" else []),
        ],
        check=_check_inference,
    ))  # fmt: skip
    register(Case(
        f"conv_{model_key}_infer_grad", f"{desc}; plain model.eval(), grad-enabled parameters", setup,
        [
            Variant("eager", _inference(None, True)),
            Variant("inductor", _inference("inductor", True), "cannot fold: BN parameters require grad"),
            Variant("ger", _inference("ger", True), "the graph timed with and without the rewrites at compile time"),
            Variant("ger_prior", _inference("ger_prior", True), "runtime fold, differentiable (autotune=False)"),
            *([Variant("ger(reparameterize)", _inference("ger_reparam", True), "summed branches merged into one conv")]
              if model_key == "r" else []),
        ],
        check=_check_inference,
    ))  # fmt: skip
    register(Case(
        f"conv_{model_key}_train", f"{desc}; training step (forward + backward, BN batch statistics)", setup,
        [
            Variant("eager", _training("eager", None)),
            Variant("inductor", _training("inductor", "inductor")),
            Variant("ger", _training("ger", "ger"), "the graph timed with and without the rewrites at compile time"),
            Variant("ger_prior", _training("ger_prior", "ger_prior"),
                    "fused BN ops, activation recomputed in backward (autotune=False)"),
        ],
        check=_check_training,
    ))  # fmt: skip


for _key in MODELS:
    _register(_key)
