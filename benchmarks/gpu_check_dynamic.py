"""GPU check of dynamic shapes, in ONE run (what tests/test_dynamic.py checks on the CPU):

    python -m benchmarks.gpu_check_dynamic [--out DIR] [--cpu-dry-run]

1. ``ger_loss`` with ``dynamic=True``: rows and classes symbolic, the profile's chunked
   split reduction (Triton) with a chunk count computed from the symbolic V; one graph
   for several (N, V), forward and backward vs float64.
2. demo.TinyLM (cross-entropy with label smoothing minus a hand-written entropy) trained
   over lengths 37..200 with automatic dynamic shapes: compiles, the rewrite on the
   dynamic graph, losses vs eager.
3. demo.SmallCNN trained over image and batch sizes: compiles, outputs and gradients vs
   float64.
4. Timing: the ``dyn_lm_train`` and ``dyn_loss_cp`` benchmark cases (static graph vs the
   dynamic graph, same tokens).

Works from a checkout without installation. Exits 0 without CUDA (unless
``--cpu-dry-run``). Writes gpu_check_dynamic.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch
import torch._dynamo


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--cpu-dry-run", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("gpu_check_dynamic: skipped: no CUDA device")
        return 0
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import ger_inductor
    from ger_inductor import _compat, ger_loss, ger_loss_reference
    from ger_inductor.backend import ger
    from ger_inductor.demo import SmallCNN, TinyLM

    if "ger" not in torch._dynamo.list_backends():
        torch._dynamo.register_backend(compiler_fn=ger, name="ger")
    dev = torch.device("cpu" if args.cpu_dry_run else "cuda")
    print(f"device: {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}", flush=True)
    report: dict = {"torch": torch.__version__, "checks": []}

    def graphs():
        return _compat.counters()["stats"]["unique_graphs"]

    def check(name, ok, **info):
        report["checks"].append({"name": name, "ok": bool(ok), **info})
        print(f"check {name:28s} {'OK' if ok else 'FAIL'} {info}", flush=True)

    def fresh():
        _compat.dynamo_reset()
        _compat.counters().clear()
        ger_inductor.clear_reports()

    # ---- 1. ger_loss, rows and classes symbolic
    fresh()
    fn = lambda z, y: ger_loss(z, y, alpha=0.5, beta=0.3, ignore_index=-100)  # noqa: E731
    f = torch.compile(fn, backend=ger, dynamic=True, options={"strict": True})
    worst = 0.0
    for N, V in [(64, 1000), (37, 3001), (5, 50257)]:
        z = (torch.randn(N, V, device=dev) * 2).requires_grad_()
        y = torch.randint(0, V, (N,), device=dev)
        y[1] = -100
        out = f(z, y)
        (g,) = torch.autograd.grad(out, z)
        zd = z.detach().double().requires_grad_()
        ref = ger_loss_reference(zd, y, alpha=0.5, beta=0.3)
        (gd,) = torch.autograd.grad(ref, zd)
        worst = max(worst, _rel(out, ref), _rel(g, gd))
    strategy = [p.strategy for p in ger_inductor.last_report().passes if p.name == "loss_entropy"]
    check("ger_loss dynamic", worst <= 1e-5 and graphs() == 1, worst=f"{worst:.1e}", graphs=graphs(), strategy=strategy)

    # ---- 2. a small LM over changing lengths
    fresh()
    torch.manual_seed(0)
    base = TinyLM(vocab=512, d=32, layers=1, entropy_beta=0.05).to(dev)
    models = {"eager": copy.deepcopy(base), "ger": copy.deepcopy(base)}
    runs = {"eager": models["eager"], "ger": torch.compile(models["ger"], backend=ger, options={"strict": True})}
    g = torch.Generator().manual_seed(1)
    losses: dict = {"eager": [], "ger": []}
    compiles = []
    for T in (37, 64, 91, 128, 200):
        tok = torch.randint(0, 512, (4, T), generator=g).to(dev)
        tgt = torch.randint(0, 512, (4, T), generator=g).to(dev)
        tgt[:, -1] = -100
        for k in ("eager", "ger"):
            models[k].zero_grad()
            loss = runs[k](tok, tgt)
            loss.backward()
            with torch.no_grad():
                for p in models[k].parameters():
                    p -= 0.3 * p.grad
            losses[k].append(loss.item())
        compiles.append(graphs())
    dyn = [r for r in ger_inductor.reports() if r.symbolic_inputs]
    patterns = sorted({m.pattern for r in dyn for m in r.matches})
    err = max(abs(a - b) / abs(b) for a, b in zip(losses["ger"], losses["eager"]))
    check("lm lengths 37..200", compiles == [1, 2, 2, 2, 2] and "entropy" in patterns and err <= 1e-4,
          compiles=compiles, patterns=patterns, loss_rel=f"{err:.1e}")

    # ---- 3. a CNN over image and batch sizes, training
    fresh()
    torch.manual_seed(0)
    cnn = SmallCNN(width=8).to(dev).train()
    ref = copy.deepcopy(cnn).double()
    run = torch.compile(cnn, backend=ger, options={"strict": True})
    compiles, worst = [], 0.0
    for shape in [(4, 3, 32, 36), (3, 3, 40, 48), (2, 3, 22, 26), (5, 3, 18, 16)]:
        x = torch.randn(shape, device=dev)
        cnn.zero_grad()
        ref.zero_grad()
        out, expect = run(x), ref(x.double())
        out.square().mean().backward()
        expect.square().mean().backward()
        worst = max([worst, _rel(out, expect)] + [_rel(p.grad, q.grad) for p, q in zip(cnn.parameters(), ref.parameters())])
        compiles.append(graphs())
    dyn = [r for r in ger_inductor.reports() if r.symbolic_inputs]
    check("cnn train sizes", compiles == [1, 2, 2, 2] and worst <= 1e-3 and dyn and dyn[-1].match_count("conv_bn_act") == 4,
          compiles=compiles, worst=f"{worst:.1e}", dynamic_shapes=dyn[-1].dynamic_shapes if dyn else None)

    # ---- 4. timing
    if not args.skip_timing:
        from benchmarks.cases import CASES  # registers cases_dynamic's too
        from benchmarks.harness import format_table, run_case

        results = []
        for name in ("dyn_lm_train", "dyn_loss_cp"):
            results += run_case(CASES[name], dev, warmup=3, repeat=20, allocator="caching" if dev.type == "cuda" else "default")
        print(format_table(results), flush=True)
        report["timings"] = [r.__dict__ for r in results]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check_dynamic.json"), "w") as fh:
        json.dump(report, fh, indent=2, default=str)
    failures = [c for c in report["checks"] if not c["ok"]]
    print(f"gpu_check_dynamic: {len(report['checks']) - len(failures)}/{len(report['checks'])} checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
