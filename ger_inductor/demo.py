"""Small models for ``python -m ger_inductor demo``, the examples and the benchmarks.

* :class:`SmallCNN` - conv->BN->ReLU blocks (a conv->BN->activation stack).
* :class:`TinyLM`   - embedding -> MLP blocks -> lm head, trained with an unmodified
  ``F.cross_entropy(..., label_smoothing=0.1, ignore_index=-100)``.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
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
@dataclasses.dataclass
class Row:
    workload: str
    backend: str
    ms: float
    max_err: float
    rewrites: str


def _time(step: Callable[[], object], warmup: int = 3, repeat: int = 7) -> float:
    for _ in range(warmup):
        step()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def _rewrites(reports) -> str:
    from collections import Counter

    c = Counter(f"{m.family}/{m.pattern}" for r in reports for m in r.matches)
    fb = sum(len(r.fallbacks) for r in reports)
    text = ", ".join(f"{k} x{v}" for k, v in sorted(c.items())) or "nothing"
    return text + (f"; {fb} fallback(s)" if fb else "")


def run_demo(print_fn=print, quick: bool = False) -> list[Row]:
    """Compile the demo workloads with eager / inductor / ger; check ger against eager."""
    import ger_inductor
    from ger_inductor import _compat

    torch.manual_seed(0)
    rows: list[Row] = []
    batch = 4 if quick else 16
    x = torch.randn(batch, 3, 32, 32)
    tokens = torch.randint(0, 8000, (batch, 64))
    targets = torch.randint(0, 8000, (batch, 64))
    targets[:, -5:] = -100  # padding

    def eval_step(runner):
        def step():
            with torch.no_grad():
                return runner(x)

        return step

    def cnn_train_step(runner):
        def step():
            out = runner(x)
            out.square().mean().backward()
            return out

        return step

    def lm_train_step(runner):
        def step():
            loss = runner(tokens, targets)
            loss.backward()
            return loss

        return step

    workloads = [
        ("cnn eval (no_grad)", SmallCNN, False, eval_step),
        ("cnn train step", SmallCNN, True, cnn_train_step),
        ("lm train step", TinyLM, True, lm_train_step),
    ]
    for name, make, training, make_step in workloads:
        torch.manual_seed(0)
        base = make()
        ref_out = None
        for backend in ("eager", "inductor", "ger"):
            _compat.dynamo_reset()
            ger_inductor.clear_reports()
            model = make()
            model.load_state_dict(base.state_dict())
            model.train(training)
            step = make_step(model if backend == "eager" else torch.compile(model, backend=backend))
            out = step().detach()  # the first call compiles; its output is checked against eager
            ms = _time(step)
            if ref_out is None:
                ref_out = out
            err = float((out - ref_out).abs().max() / ref_out.abs().max().clamp_min(1e-12))
            rows.append(Row(name, backend, ms, err, _rewrites(ger_inductor.reports()) if backend == "ger" else ""))
            print_fn(f"  {name:20s} {backend:9s} {ms:8.2f} ms/step  max rel err vs eager {err:.1e}  {rows[-1].rewrites}")
    return rows
