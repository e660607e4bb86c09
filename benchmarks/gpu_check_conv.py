"""GPU check of the conv -> BN -> activation rewrites: correctness on CUDA against
float64 eager, and timings against Inductor and Inductor with freezing (CUDA events).

    run_conv_checks(dev, report, failures, quick)       # called by benchmarks/gpu_check.py
    python -m benchmarks.gpu_check_conv [--out DIR] [--quick]

Correctness (TF32 off, so that fp32 means fp32): every conv variant the pass rewrites
(conv1d/2d/3d, depthwise, grouped + dilated, transposed) x activations, compiled with
``ger`` (strict), in fp32 and bf16:
  * inference under no_grad, and with grad-enabled parameters (forward + backward),
  * a training step (forward + backward + running statistics);
each quantity within 1e-4 relative of float64 (fp32), or within 2x eager's own error in
bf16. Timings: models A and B (benchmarks/cases_conv.py; C as well without --quick),
inference no_grad / with grad-enabled parameters / training step, eager vs inductor vs
inductor(freezing) vs ger, medians of CUDA-event times after warm-up, and the activation
bytes saved for backward in training. Two times per variant: CUDA events around the
call (what a Python loop gets; launch-bound at these sizes on an H100) and the GPU time
of its kernels (profiler; what CUDA graphs would get). Runs on torch 2.11 (triton 3.6)
and 2.13; keeps to a time budget (under 90 s), recording what it skipped.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

TIME_BUDGET_S = 80.0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(0.1))


def _gpu_kernel_ms(fn, repeat: int = 5) -> float:
    """GPU time of the kernels ``fn`` launches (profiler, per call): what the call costs
    once launch overhead is gone (e.g. under CUDA graphs). At these sizes an H100 runs
    the kernels faster than Python launches them, so CUDA-event times measure launches."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeat):
            fn()
        torch.cuda.synchronize()
    cuda = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.self_device_time_total for e in cuda) / repeat / 1e3


def _median_ms(fn, warmup: int = 3, repeat: int = 10) -> float:
    from benchmarks.gpu_check import _median_ms as timed  # one CUDA-event timer for both checks

    return timed(fn, warmup, repeat)[0]


class _Variants(nn.Module):
    """One conv -> BN -> activation branch per (conv, activation) pair on shared inputs."""

    def __init__(self):
        super().__init__()
        self.c2 = nn.ModuleList([
            nn.Conv2d(8, 8, 3, padding=1, bias=False),             # relu
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),   # depthwise, relu6
            nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2),   # silu
            nn.Conv2d(8, 8, 3, stride=2, padding="valid"),         # gelu
            nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1, groups=2),  # relu
        ])  # fmt: skip
        self.bn2 = nn.ModuleList(nn.BatchNorm2d(8) for _ in self.c2)
        self.c1, self.bn1 = nn.Conv1d(8, 8, 3, padding=1), nn.BatchNorm1d(8)
        self.c3, self.bn3 = nn.Conv3d(8, 8, 3, padding=1, bias=False), nn.BatchNorm3d(8)
        self.acts = [torch.relu, nn.functional.relu6, nn.functional.silu, nn.functional.gelu, torch.relu]

    def forward(self, x):
        outs = [act(bn(conv(x))) for conv, bn, act in zip(self.c2, self.bn2, self.acts)]
        outs.append(torch.relu(self.bn1(self.c1(x.flatten(2)))))
        outs.append(nn.functional.hardtanh(self.bn3(self.c3(x.unsqueeze(2).expand(-1, -1, 3, -1, -1))), -1.0, 2.0))
        return tuple(outs)


def _errors(model, x, train: bool, grad: bool, backend, dtype):
    """Norm-wise relative errors vs float64 eager of outputs, input/parameter gradients
    and running statistics for ``model`` in ``dtype`` (backend None: eager)."""
    ref = copy.deepcopy(model).double().train(train)
    test = copy.deepcopy(model).to(dtype).train(train)
    x_ref = x.detach().double().requires_grad_(grad)
    x_test = x.detach().to(dtype, copy=True).requires_grad_(grad)
    f = test if backend is None else torch.compile(test, backend=backend)
    with torch.set_grad_enabled(grad):
        outs, refs = f(x_test), ref(x_ref)
    errors = {f"out{i}": _rel(o, r) for i, (o, r) in enumerate(zip(outs, refs))}
    if grad:
        sum((o.double() * (i + 1)).sum() for i, o in enumerate(outs)).backward()
        sum((r * (i + 1)).sum() for i, r in enumerate(refs)).backward()
        errors["grad x"] = _rel(x_test.grad, x_ref.grad)
        for (n, p), q in zip(test.named_parameters(), ref.parameters()):
            # a conv bias before training-mode BN has a zero gradient: rounding noise only
            if not (train and n.startswith("c") and n.endswith("bias")):
                errors[f"grad {n}"] = _rel(p.grad, q.grad)
    for (n, b), q in zip(test.named_buffers(), ref.buffers()):
        if b.is_floating_point():
            errors[n] = _rel(b, q)
    return errors


def _correctness(dev, report, failures, ger_backend, randomize):
    import ger_inductor

    torch.manual_seed(0)
    model = randomize(_Variants()).to(dev)
    x = torch.randn(4, 8, 12, 12, device=dev)
    modes = {"eval_no_grad": (False, False), "eval_grad": (False, True), "train": (True, True)}
    for dtype, mode in [(torch.float32, m) for m in modes] + [(torch.bfloat16, "eval_grad"), (torch.bfloat16, "train")]:
        train, grad = modes[mode]
        torch._dynamo.reset()
        t0 = time.time()
        rec = dict(check="conv_bn_act", mode=mode, dtype=str(dtype))
        try:
            ours = _errors(model, x, train, grad, ger_backend, dtype)
            rep = ger_inductor.last_report()
            eager = _errors(model, x, train, grad, None, dtype)
            if dtype == torch.float32:
                bad = {k: (v, eager[k]) for k, v in ours.items() if not (v <= 1e-4 or v <= 4 * eager[k])}
            else:  # bf16 errors are heavy-tailed quantity by quantity: compare typical and worst
                typical = statistics.median(ours.values()), statistics.median(eager.values())
                worst = max(ours.values()), max(eager.values())
                bad = {} if typical[0] <= 1.5 * typical[1] and worst[0] <= 2 * worst[1] else {"median": typical, "max": worst}
            matches = len(rep.matches) if rep else 0
            rec.update(worst=max(ours.values()), eager_worst=max(eager.values()), matches=matches,
                       fallbacks=[f.one_line() for f in rep.fallbacks] if rep else [], bad=bad,
                       ok=not bad and matches == 7, seconds=round(time.time() - t0, 1))  # fmt: skip
        except Exception as e:  # report, keep going
            rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
        report.setdefault("conv_checks", []).append(rec)
        print(f"conv check {mode:12s} {str(dtype):15s} worst {rec.get('worst', float('nan')):.1e} "
              f"(eager {rec.get('eager_worst', float('nan')):.1e}) matches {rec.get('matches')} "
              f"{'OK' if rec['ok'] else 'FAIL ' + str(rec.get('bad') or rec.get('error'))}", flush=True)
        if not rec["ok"]:
            failures.append(rec)


def _saved_bytes(fn, exclude) -> int:
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in excluded:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _timings(dev, report, ger_backend, randomize, models, deadline):
    from . import cases_conv

    for key in models:
        factory, shape, desc = cases_conv.MODELS[key]
        torch.manual_seed(0)
        base = randomize(factory()).to(dev)
        x = torch.randn(shape, device=dev)
        for mode in ("infer", "infer_grad", "train"):
            row = dict(model=key, mode=mode, desc=desc, dtype="float32")
            variants = ["eager", "inductor", "inductor(freezing)", "ger"] if mode == "infer" else ["eager", "inductor", "ger"]
            for name in variants:
                if time.time() > deadline:
                    row[name] = None
                    row.setdefault("skipped", []).append(name)
                    continue
                torch._dynamo.reset()
                model = copy.deepcopy(base).train(mode == "train")
                params = list(model.parameters())
                backend = {"eager": None, "inductor": "inductor", "inductor(freezing)": "inductor", "ger": ger_backend}[name]
                f = model if backend is None else torch.compile(model, backend=backend)
                if mode == "train":

                    def step(f=f):
                        for p in params:
                            p.grad = None
                        f(x).float().square().mean().backward()
                else:

                    def step(f=f, grad=(mode == "infer_grad")):
                        with torch.set_grad_enabled(grad):
                            f(x)

                try:
                    if name == "inductor(freezing)":
                        # freezing is read from the global config by some of Inductor's passes
                        from ger_inductor import _compat

                        with _compat.inductor_config().patch(freezing=True):
                            step()
                    row[name] = _median_ms(step)
                    row[name + "_gpu_ms"] = _gpu_kernel_ms(step)
                    if mode == "train" and name != "eager":
                        row[name + "_saved_mib"] = _saved_bytes(lambda f=f: f(x), [x, *params]) / 2**20
                except Exception as e:  # report, keep going
                    row[name] = None
                    row[name + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            for suffix in ("", "_gpu_ms"):
                builtin = [row.get(f"inductor{suffix}"), row.get(f"inductor(freezing){suffix}")]
                builtin = [v for v in builtin if v is not None]
                if builtin and row.get(f"ger{suffix}"):
                    row[f"ger_over_best_inductor{suffix}"] = row[f"ger{suffix}"] / min(builtin)
            if row.get("ger_saved_mib") and row.get("inductor_saved_mib"):
                row["saved_ratio"] = row["ger_saved_mib"] / row["inductor_saved_mib"]
            report.setdefault("conv_timings", []).append(row)
            print("conv timing " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in row.items() if k != "desc"), flush=True)  # fmt: skip


def run_conv_checks(dev: torch.device, report: dict, failures: list, quick: bool) -> None:
    """Correctness and timings of the conv -> BN -> activation rewrites on ``dev`` (CUDA;
    on a CPU device only the correctness part runs, to test this script)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from examples.resnet18_cnn import randomize_bn_statistics
    from ger_inductor.backend import ger

    def ger_backend(gm, example_inputs):  # this family only: what is checked here
        return ger(gm, example_inputs, options={"strict": True, "passes": ["conv_bn_act"]})

    deadline = time.time() + TIME_BUDGET_S
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        # TF32 off: fp32 checks mean fp32 (eager and Inductor alike)
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            _correctness(dev, report, failures, ger_backend, randomize_bn_statistics)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
    if dev.type == "cuda":
        _timings(dev, report, ger_backend, randomize_bn_statistics, ("a", "b") if quick else ("a", "b", "c"), deadline)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cpu-dry-run", action="store_true", help="run the correctness part on the CPU (to test this script)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("gpu_check_conv: skipped: no CUDA device (torch.cuda.is_available() is False)")
        return 0
    dev = torch.device("cpu" if args.cpu_dry_run else "cuda")
    name = "cpu" if args.cpu_dry_run else torch.cuda.get_device_name(dev)
    report: dict = {"device": name, "torch": torch.__version__}
    failures: list = []
    t0 = time.time()
    run_conv_checks(dev, report, failures, args.quick)
    report["seconds"] = round(time.time() - t0, 1)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check_conv.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"gpu_check_conv: {len(report.get('conv_checks', [])) - len(failures)}/{len(report.get('conv_checks', []))} "
          f"checks passed in {report['seconds']} s")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
