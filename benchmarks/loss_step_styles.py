"""How the gradient is taken changes the loss cases' figures: ``torch.autograd.grad``
(what the harness times), ``.backward()`` into a cleared ``.grad``, and ``.backward()``
accumulating into an existing ``.grad``; label smoothing and the confidence penalty,
Inductor and ger (library call and unmodified code), and the floor F, every variant
interleaved in rotating rounds, one process, the same inputs.

    MALLOC_MMAP_THRESHOLD_=1000000000000 MALLOC_TRIM_THRESHOLD_=1000000000000 \
        python -m benchmarks.loss_step_styles [rounds]
"""

from __future__ import annotations

import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from ger_inductor import ger_loss

from .cases import hand_written_confidence_penalty


def main() -> None:
    torch.set_num_threads(2)
    N, V = 2048, 32000
    g = torch.Generator().manual_seed(0)
    z = torch.randn((N, V), generator=g).mul_(2).requires_grad_(True)
    y = torch.randint(0, V, (N,), generator=g)
    buf = torch.empty_like(z, requires_grad=False)
    ls = lambda z, y: F.cross_entropy(z, y, label_smoothing=0.1)
    fns = {
        "ls/inductor": torch.compile(ls, backend="inductor"),
        "ls/ger(ger_loss)": torch.compile(lambda z, y: ger_loss(z, y, label_smoothing=0.1), backend="ger"),
        "ls/ger(F.ce)": torch.compile(ls, backend="ger"),
        "cp/inductor": torch.compile(hand_written_confidence_penalty, backend="inductor"),
        "cp/ger(ger_loss)": torch.compile(lambda z, y: ger_loss(z, y, alpha=0.0, beta=0.1) - 0.1 * math.log(z.shape[-1]), backend="ger"),
        "cp/ger(hand)": torch.compile(hand_written_confidence_penalty, backend="ger"),
    }
    def style(f, s):
        if s == "grad":
            def step():
                loss = f(z, y); (gr,) = torch.autograd.grad(loss, z); return gr
        elif s == "bwd_none":
            def step():
                z.grad = None; f(z, y).backward(); return z.grad
        else:
            def step():
                f(z, y).backward(); return z.grad
        return step
    def floor():
        zd = z.detach(); torch.exp(zd, out=buf); return zd.amax(-1)
    steps = {"floor": floor}
    for k, f in fns.items():
        for s in ("grad", "bwd_none", "bwd_acc"):
            steps[f"{k} [{s}]"] = style(f, s)
    for k, st in steps.items():  # compile + warm-up
        t0 = time.perf_counter()
        for _ in range(3): st()
        z.grad = None
        print(f"warm {k}: {time.perf_counter()-t0:.1f}s", file=sys.stderr, flush=True)
    times = {k: [] for k in steps}
    R = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    names = list(steps)
    for r in range(R):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            # bwd_acc: every timed call accumulates into an existing .grad (a None before
            # the block made its first call allocate instead; stop-38 review)
            z.grad = torch.zeros_like(z) if k.endswith("[bwd_acc]") else None
            for _ in range(3):
                t0 = time.perf_counter(); steps[k](); times[k].append((time.perf_counter() - t0) * 1e3)
    F_ = statistics.median(times["floor"])
    print(f"floor F = {F_:.1f} ms (min {min(times['floor']):.1f}, max {max(times['floor']):.1f})")
    for k in names[1:]:
        m = statistics.median(times[k]); fam, rest = k.split("/", 1); st = rest.split("[")[1][:-1]
        ind = statistics.median(times[f"{fam}/inductor [{st}]"])
        print(f"{k:32s} {m:7.1f} ms  {m/F_:5.2f} F  {m/ind:5.2f}x inductor  (min {min(times[k]):.1f} max {max(times[k]):.1f})")



if __name__ == "__main__":
    main()
