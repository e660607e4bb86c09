"""Small models for ``python -m ger_inductor demo``, the examples and the benchmarks,
and the demo itself (:func:`run_demo`, :func:`format_table`).

* :class:`SmallCNN` - conv->BN->ReLU blocks (a conv->BN->activation stack).
* :class:`TinyLM`   - embedding -> MLP blocks -> lm head, trained with an unmodified
  ``F.cross_entropy(..., label_smoothing=0.1, ignore_index=-100)``.
* :class:`ConvStack`, :class:`DepthwiseStack`, :func:`confidence_penalty_loss` - the
  demo's CNN stages (ResNet- and MobileNet-style) and a hand-written entropy-regularised
  loss.

The demo's workloads are sized so that what ger changes shows beside Inductor on a
2-core CPU (the lm head's logits are 500 MiB: larger than one of ger's ~256 MiB chunks).
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        )


class SmallCNN(nn.Module):
    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.blocks = nn.Sequential(
            ConvBNReLU(3, width), ConvBNReLU(width, width), ConvBNReLU(width, 2 * width, stride=2),
            ConvBNReLU(2 * width, 2 * width),
        )
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.head(self.blocks(x).mean((2, 3)))


class MLPBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class TinyLM(nn.Module):
    """A small language model whose loss is written the usual way, with no ger API.

    ``entropy_beta > 0`` subtracts a hand-written entropy bonus, beta * mean H(p) over
    the positions the cross-entropy keeps (a confidence-penalty style regulariser)."""

    def __init__(self, vocab: int = 8000, d: int = 128, layers: int = 2, entropy_beta: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(MLPBlock(d) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.entropy_beta = entropy_beta

    def forward(self, tokens, targets):
        h = self.embed(tokens)
        for b in self.blocks:
            h = b(h)
        logits = self.head(self.norm(h)).flatten(0, 1)
        y = targets.flatten()
        loss = F.cross_entropy(logits, y, label_smoothing=0.1, ignore_index=-100)
        if self.entropy_beta:
            lp = logits.log_softmax(-1)
            keep = (y != -100).float()
            entropy = -(lp.exp() * lp).sum(-1)
            loss = loss - self.entropy_beta * (entropy * keep).sum() / keep.sum()
        return loss


# ----------------------------------------------------------------------------- the demo
class ConvStack(nn.Sequential):
    """4x conv3x3 -> BN -> ReLU at constant width: the demo's CNN (a ResNet stage)."""

    def __init__(self, width: int = 64, blocks: int = 4):
        super().__init__(*(ConvBNReLU(width, width) for _ in range(blocks)))


class DepthwiseStack(nn.Sequential):
    """[depthwise 3x3 -> BN -> ReLU6 -> 1x1 -> BN -> ReLU6] x 3 (a MobileNet stage)."""

    def __init__(self, width: int = 128, blocks: int = 3):
        layers = []
        for _ in range(blocks):
            layers += [nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False), nn.BatchNorm2d(width), nn.ReLU6(),
                       nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU6()]
        super().__init__(*layers)


class RepVGGStage(nn.Sequential):
    """RepVGG blocks as trained: relu(bn(conv3x3(x)) + bn(conv1x1(x)) + bn(x)), per block."""

    class Block(nn.Module):
        def __init__(self, width: int):
            super().__init__()
            self.conv3, self.bn3 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
            self.conv1, self.bn1 = nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width)
            self.identity = nn.BatchNorm2d(width)

        def forward(self, x):
            y = self.bn3(self.conv3(x)) + self.bn1(self.conv1(x))
            y += self.identity(x)
            return torch.relu(y)

    def __init__(self, width: int = 64, blocks: int = 4):
        super().__init__(*(RepVGGStage.Block(width) for _ in range(blocks)))


def confidence_penalty_loss(z, y, beta: float = 0.1):
    """CE - beta * H(p), written the way users write it (no ger API)."""
    lp = torch.log_softmax(z, dim=-1)
    return F.cross_entropy(z, y) - beta * (-(lp.exp() * lp).sum(-1).mean())


@dataclasses.dataclass
class Row:
    workload: str
    backend: str
    ms: float
    peak_mib: float | None
    saved_mib: float
    max_err: float
    rewrites: str


@dataclasses.dataclass
class Workload:
    name: str
    #: () -> (module or function, inputs); called once per backend, same seed
    build: Callable[[], tuple]
    #: (fn, inputs) -> the step: runs fn once and returns the tensors checked against eager
    step: Callable
    what: str


def _rewrites(reports) -> str:
    from collections import Counter

    c = Counter(f"{m.family}/{m.pattern}" for r in reports for m in r.matches)
    fb = sum(len(r.fallbacks) for r in reports)
    text = ", ".join(f"{k} x{v}" for k, v in sorted(c.items())) or "nothing"
    # measured selection (autotune): ger's form against Inductor's, timed at compile time
    sel = [f"{d['family']} measured {d['ratio']:.2f}x -> {d['choice']}" if "ratio" in d
           else f"{d['family']} -> {d['choice']}" for r in reports for d in r.decisions]
    return text + (f"; {fb} fallback(s)" if fb else "") + (f" [{'; '.join(sel)}]" if sel else "")


def _max_rel_err(got: list, ref: list) -> float:
    return max(float((g - r).abs().max() / r.abs().max().clamp_min(1e-12)) for g, r in zip(got, ref))


def _train_step(model, inputs):
    loss = model(*inputs)
    if loss.dim():
        loss = loss.square().mean()
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [loss.detach()] + [p.grad for p in model.parameters()]


def _grad_eval_step(model, inputs):
    return [model(*inputs).detach()]  # parameters require grad: Inductor cannot fold BN


def _loss_step(fn, inputs):
    z, y = inputs
    loss = fn(z, y)
    (g,) = torch.autograd.grad(loss, z)
    return [loss.detach(), g]


def workloads(scale: float = 1.0) -> list[Workload]:
    """The demo's workloads; ``scale`` (0 < scale <= 1) shrinks the batch of each (tokens,
    images, logit rows), for a quick check of the numbers rather than of the speed."""
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"demo: scale must be in (0, 1], got {scale}")

    def n(full: int) -> int:
        return max(1, round(full * scale))

    seq, imgs, rows = n(512), n(8), n(2048)

    def lm():
        model = TinyLM(vocab=32000, d=64, layers=2)
        tokens = torch.randint(0, 32000, (8, seq))
        targets = torch.randint(0, 32000, (8, seq))
        if seq > 1:
            targets[:, -min(16, seq - 1):] = -100  # padding (a single token keeps its target)
        return model, (tokens, targets)

    def cnn_train():
        return ConvStack(64).train(), (torch.randn(max(2, imgs), 64, 56, 56),)  # batch >= 2: BN's batch statistics

    def cnn_grad_eval():
        return DepthwiseStack(128).eval(), (torch.randn(imgs, 128, 56, 56),)

    def loss():
        z = (torch.randn(rows, 32000) * 2).requires_grad_()
        return confidence_penalty_loss, (z, torch.randint(0, 32000, (rows,)))

    return [
        Workload("LM train step", lm, _train_step,
                 f"{8 * seq} tokens, V=32000 ({8 * seq * 32000 * 4 / 2**20:.0f} MiB of fp32 logits), unmodified "
                 "F.cross_entropy(label_smoothing=0.1): ger fuses the lm head with the loss, chunked over the tokens"),
        Workload("CNN train step", cnn_train, _train_step,
                 f"4x conv3x3->BN->ReLU, {max(2, imgs)}x64x56x56: BN+ReLU fused, the activation recomputed in backward"),
        Workload("CNN eval, grad on", cnn_grad_eval, _grad_eval_step,
                 f"[depthwise->BN->ReLU6->1x1->BN->ReLU6] x3, {imgs}x128x56x56, model.eval() without no_grad: "
                 "BN folded at run time (Inductor folds only under no_grad + freezing)"),
        Workload("CE - 0.1 H(p) loss", loss, _loss_step,
                 f"{rows}x32000 fp32 logits, fwd+bwd, hand-written entropy: one fused read of the logits"),
    ]


def run_demo(progress=None, warmup: int = 2, repeat: int = 5, only: tuple = (), scale: float = 1.0) -> list[Row]:
    """eager / inductor / ger on each workload (or those named in ``only``) in this
    process, on the same inputs: time per step (median), peak extra memory of one step,
    bytes saved for backward beyond inputs and parameters, the largest relative
    difference from eager (values and gradients) and what ger rewrote.
    ``progress(msg)`` is told what runs (compiles take seconds)."""
    import ger_inductor
    from ger_inductor import _compat
    from ger_inductor.measure import peak_extra_bytes, saved_for_backward, time_step

    progress = progress or (lambda msg: None)
    cpu = torch.device("cpu")
    rows: list[Row] = []
    for w in workloads(scale):
        if only and w.name not in only:
            continue
        ref = None
        for backend in ("eager", "inductor", "ger"):
            progress(f"{w.name}: {backend}")
            _compat.dynamo_reset()
            ger_inductor.clear_reports()
            torch.manual_seed(0)
            fn, inputs = w.build()
            run = fn if backend == "eager" else torch.compile(fn, backend=backend)
            out = w.step(run, inputs)  # the first call compiles
            ref = out if ref is None else ref
            # the first call above warmed eager, which is the slowest: no more warm-up, at most 3 steps
            steps = (0, min(3, repeat)) if backend == "eager" else (min(warmup, repeat), repeat)
            times = time_step(lambda: w.step(run, inputs), cpu, *steps)
            peak = peak_extra_bytes(lambda: w.step(run, inputs), cpu)
            params = list(fn.parameters()) if isinstance(fn, nn.Module) else []
            _, saved = saved_for_backward(lambda: w.step(run, inputs), [*inputs, *params])
            rows.append(Row(w.name, backend, statistics.median(times), None if peak is None else peak / 2**20,
                            saved / 2**20, _max_rel_err(out, ref),
                            _rewrites(ger_inductor.reports()) if backend == "ger" else ""))
    return rows


def format_table(rows: list[Row]) -> str:
    """One table: per workload eager / inductor / ger, with ratios to inductor."""
    head = ("workload", "backend", "ms/step", "x inductor", "peak MiB", "x inductor", "saved MiB", "x inductor",
            "max rel err", "ger rewrote")

    def ratio(a, b, floor=0.0):
        # no ratio to a baseline too small to measure (a resident set that grew by a few MiB
        # says little: small blocks come from the heap the process already holds)
        return "" if a is None or b is None or b <= floor else f"{a / b:.2f}"

    lines = [head]
    for r in rows:
        ind = next(x for x in rows if x.workload == r.workload and x.backend == "inductor")
        lines.append((r.workload, r.backend, f"{r.ms:.1f}", ratio(r.ms, ind.ms),
                      "n/a" if r.peak_mib is None else f"{r.peak_mib:.0f}", ratio(r.peak_mib, ind.peak_mib, 32.0),
                      f"{r.saved_mib:.1f}", ratio(r.saved_mib, ind.saved_mib, 1.0), f"{r.max_err:.1e}", r.rewrites))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line[:-1], widths)) + "  " + line[-1] for line in lines).rstrip()
