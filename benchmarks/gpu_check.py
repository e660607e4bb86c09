"""GPU check: correctness and timing of every ger lowering on CUDA, in ONE run.

    python -m benchmarks.gpu_check [--out DIR] [--quick]

On a machine without CUDA it prints why it skips and exits 0. Runs on torch 2.11 /
triton 3.6 and on 2.13. Works from a checkout without installation (the backend is
passed as a callable, so the entry point is not needed).

For each GER variant (plain CE, label smoothing, confidence penalty, general alpha):
  1. correctness vs the float64 reference (ger_loss_reference) on random inputs,
     fp32 and bf16 logits, forward and backward, compiled with ger;
  2. timing (CUDA events, median of repeats after warm-up) of forward+backward for
     eager reference / inductor(reference) / ger, at N x V = 8192 x 128256 bf16 and
     4096 x 32000 fp32;
  3. a device-to-device copy of the logits in the same run: the bandwidth ceiling;
     achieved bandwidth of ger = (logits read forward + read backward + gradient
     written) / time, as a fraction of the copy's.
Writes gpu_check.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def _median_ms(fn, warmup=3, repeat=15):
    """(median, min, max) ms over ``repeat`` calls on the current CUDA device (CUDA events:
    ``ger_inductor.measure.time_step``, the harness's timer)."""
    from ger_inductor.measure import time_step

    ts = time_step(fn, torch.device("cuda", torch.cuda.current_device()), warmup, repeat)
    return statistics.median(ts), min(ts), max(ts)


def _kernel_breakdown(step, top=6):
    """(kernel name, ms per call) of the device kernels one step launches."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t and e.key and not e.key.startswith("Memcpy") and "ProfilerStep" not in e.key:
            rows.append((e.key[:60], t / 3 / 1e3))
    rows.sort(key=lambda r: -r[1])
    return rows[:top]


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    ap.add_argument("--cpu-dry-run", action="store_true", help="run the correctness part on the CPU (to test this script)")
    ap.add_argument("--skip-conv", action="store_true", help="leave out the conv -> BN -> activation checks")
    ap.add_argument("--big-only", action="store_true", help="time only the 8192 x 128256 bf16 size")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("gpu_check: skipped: no CUDA device (torch.cuda.is_available() is False)")
        return 0
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import ger_inductor
    from ger_inductor import ger_loss, ger_loss_reference
    from ger_inductor.backend import ger as ger_backend

    dev = torch.device("cpu" if args.cpu_dry_run else "cuda")
    dev_name = "cpu" if args.cpu_dry_run else torch.cuda.get_device_properties(dev).name
    print(f"device: {dev_name}, torch {torch.__version__}, triton "
          f"{__import__('triton').__version__ if _has('triton') else 'n/a'}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    report: dict = {"device": dev_name, "torch": torch.__version__, "checks": [], "timings": []}
    failures = []

    variants = {
        "ce": dict(alpha=1.0, beta=0.0),
        "ls0.1": dict(label_smoothing=0.1),
        "cp0.1": dict(alpha=0.0, beta=0.1),
        "ger0.5": dict(alpha=0.5, beta=0.7),
        "ger0.999": dict(alpha=0.999, beta=0.3),
    }

    # ---- 1. correctness, compiled with ger, vs float64 reference
    torch.manual_seed(0)
    for dtype, tol, names in ((torch.float32, 1e-5, list(variants)), (torch.bfloat16, 2e-2, ["ce", "ls0.1", "ger0.5"])):
        for name in names:
            kw = variants[name]
            torch._dynamo.reset()
            N, V = (64, 1000) if args.cpu_dry_run else (1024, 32000)
            z = (torch.randn(N, V, device=dev) * 3).to(dtype).requires_grad_()
            y = torch.randint(0, V, (N,), device=dev)
            y[::7] = -100
            f = torch.compile(lambda z, y: ger_loss(z, y, **kw), backend=ger_backend, options={"strict": True})
            t0 = time.time()
            loss = f(z, y)
            (g,) = torch.autograd.grad(loss, z)
            z64 = z.detach().double().requires_grad_()
            ref = ger_loss_reference(z64, y, **kw)
            (g64,) = torch.autograd.grad(ref, z64)
            el, eg = _rel(loss.float(), ref), _rel(g.float(), g64)
            ok = el <= tol and eg <= tol and math.isfinite(el) and math.isfinite(eg)
            rep = ger_inductor.last_report()
            kernels = [i.get("kernels") for i in rep.inductor] if rep else []
            rec = dict(variant=name, dtype=str(dtype), loss_rel=el, grad_rel=eg, ok=ok, kernels=kernels,
                       compile_s=round(time.time() - t0, 1), fallbacks=[f.one_line() for f in rep.fallbacks] if rep else [])
            report["checks"].append(rec)
            print(f"check {name:9s} {str(dtype):15s} loss rel {el:.1e} grad rel {eg:.1e} kernels {kernels} "
                  f"{'OK' if ok else 'FAIL'}", flush=True)
            if not ok:
                failures.append(rec)

    # ---- 1b. the loss rewrite of unmodified code, on the GPU
    try:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        import spellings
    except ImportError:
        spellings = None
    if spellings is not None:
        for name in ("ce_label_smoothing", "cp_softmax_logsoftmax", "cp_categorical", "ls_fairseq", "ls_transformers",
                     "kl_uniform_u_p", "ger_reference_torch", "ce_upcast_bf16"):
            fn = spellings.RECOGNISED[name][0]
            torch._dynamo.reset()
            ger_inductor.clear_reports()
            N, V = (64, 1000) if args.cpu_dry_run else (2048, 32000)
            z = (torch.randn(N, V, device=dev) * 3).requires_grad_()
            y = torch.randint(0, V, (N,), device=dev)
            y[::7] = 3
            out = torch.compile(fn, backend=ger_backend, options={"strict": True})(z, y)
            (g,) = torch.autograd.grad(out, z)
            z2 = z.detach().double().requires_grad_()
            ref = fn(z2, y)
            (g2,) = torch.autograd.grad(ref, z2)
            tol = 1e-2 if name == "ce_upcast_bf16" else 1e-5
            el, eg = _rel(out.float(), ref), _rel(g.float(), g2)
            matched = sorted({m.pattern for r in ger_inductor.reports() for m in r.matches})
            ok = el <= tol and eg <= tol and bool(matched)
            rec = dict(variant="rewrite:" + name, dtype="float32", loss_rel=el, grad_rel=eg, ok=ok, matches=matched)
            report["checks"].append(rec)
            print(f"check rewrite {name:24s} loss rel {el:.1e} grad rel {eg:.1e} {matched} {'OK' if ok else 'FAIL'}", flush=True)
            if not ok:
                failures.append(rec)

    # ---- 1b'. log p(y) as the raw target logit minus torch.logsumexp (the op's lse_inf
    # convention, stop 33): +inf and -inf rows, NaN positions and values equal eager's
    def raw_logp(z, y):
        sel = torch.gather(z, -1, y.unsqueeze(-1)).squeeze(-1)
        logp = sel - torch.stack([torch.logsumexp(row, dim=-1) for row in z])
        ratio = torch.exp(logp + 2.0)
        return -torch.minimum(ratio * 0.5, torch.clamp(ratio, 0.8, 1.2) * 0.5).mean()

    torch._dynamo.reset()
    ger_inductor.clear_reports()
    B, S, V = (2, 8, 1000) if args.cpu_dry_run else (4, 512, 32000)
    z = torch.randn(B, S, V, device=dev) * 3
    z[0, 1, 3] = math.inf
    z[1, 2, :] = -math.inf
    y = torch.randint(0, V, (B, S), device=dev)
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    out = torch.compile(raw_logp, backend=ger_backend, options={"strict": True})(z1, y)
    (g1,) = torch.autograd.grad(out, z1)
    ref = raw_logp(z2, y)
    (g2,) = torch.autograd.grad(ref, z2)
    matched = sorted({m.pattern for r in ger_inductor.reports() for m in r.matches})
    same_nan = bool(torch.equal(torch.isnan(g1), torch.isnan(g2)))
    both_nan = bool(torch.isnan(out).item() and torch.isnan(ref).item())  # the -inf row: NaN in both
    el = 0.0 if both_nan else _rel(out.float(), ref.double())
    fin = ~torch.isnan(g2)
    eg = _rel(g1[fin].float(), g2[fin].double())
    ok = same_nan and el <= 1e-5 and eg <= 1e-5 and "target_log_prob(logsumexp)" in matched
    rec = dict(variant="rewrite:raw_logp_inf_rows", dtype="float32", loss_rel=el, grad_rel=eg, ok=ok,
               matches=matched, nan_positions_equal=same_nan)
    report["checks"].append(rec)
    print(f"check rewrite raw_logp_inf_rows        loss rel {el:.1e} grad rel {eg:.1e} NaN positions equal "
          f"{same_nan} {matched} {'OK' if ok else 'FAIL'}", flush=True)
    if not ok:
        failures.append(rec)

    # ---- 1c. conv -> BN -> activation lowerings and rewrites
    try:
        from benchmarks.gpu_check_conv import run_conv_checks
    except ImportError as e:
        print(f"conv checks: not available ({e})")
    else:
        if not args.cpu_dry_run and not args.skip_conv:
            run_conv_checks(dev, report, failures, args.quick)

    # ---- 2./3. timing and bandwidth
    sizes = [(8192, 128256, torch.bfloat16, ["ce", "ls0.1", "cp0.1", "ger0.5"]),
             (4096, 32000, torch.float32, ["ls0.1", "cp0.1"])]
    if args.quick:
        sizes = [(4096, 128256, torch.bfloat16, ["ls0.1", "cp0.1"])]
    if args.big_only:
        sizes = sizes[:1]
    if args.cpu_dry_run:
        sizes = []
    refs = {
        "ce": lambda z, y: F.cross_entropy(z.float(), y),
        "ls0.1": lambda z, y: F.cross_entropy(z.float(), y, label_smoothing=0.1),
        "cp0.1": lambda z, y: _hand_cp(z.float(), y, 0.1),
        "ger0.5": lambda z, y: ger_loss_reference(z, y, alpha=0.5, beta=0.7),
    }
    for N, V, dtype, names in sizes:
        torch.manual_seed(0)
        z = (torch.randn(N, V, device=dev) * 3).to(dtype).requires_grad_()
        y = torch.randint(0, V, (N,), device=dev)
        nbytes = z.numel() * z.element_size()
        buf = torch.empty_like(z)
        copy_ms, _, _ = _median_ms(lambda: buf.copy_(z.detach()))
        copy_bw = 2 * nbytes / copy_ms / 1e6  # GB/s, read + write
        print(f"size {N}x{V} {dtype}: logits {nbytes / 2**30:.2f} GiB; copy {copy_ms:.3f} ms = {copy_bw:.0f} GB/s", flush=True)
        del buf
        for name in names:
            ref, kw = refs[name], variants[name]
            row = dict(N=N, V=V, dtype=str(dtype), variant=name, copy_gbs=copy_bw)
            for label, fn, backend in (("eager", ref, None), ("inductor", ref, "inductor"),
                                       ("ger", lambda z, y, kw=kw: ger_loss(z, y, **kw), ger_backend)):
                torch._dynamo.reset()
                try:
                    f = fn if backend is None else torch.compile(fn, backend=backend)

                    def step():
                        loss = f(z, y)
                        torch.autograd.grad(loss, z)

                    if label == "eager" and N * V > 4096 * 128256 and name == "ger0.5":
                        row[label] = None  # the plain-torch GER reference needs ~8 N x V fp32 temporaries
                        continue
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    med, lo, hi = _median_ms(step, repeat=10 if not args.quick else 5)
                    row[label] = med
                    row[label + "_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
                except Exception as e:  # report, keep going
                    row[label] = None
                    row[label + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(f"  {name} {label}: ERROR {row[label + '_error']}", flush=True)
            if row.get("ger") and N * V >= 8192 * 128256:
                torch._dynamo.reset()
                f = torch.compile(lambda z, y, kw=kw: ger_loss(z, y, **kw), backend=ger_backend)

                def gstep():
                    torch.autograd.grad(f(z, y), z)

                row["ger_kernels"] = _kernel_breakdown(gstep)
                for kname, ms in row["ger_kernels"]:
                    print(f"      {ms:7.3f} ms  {kname}", flush=True)
            if row.get("ger"):
                row["ger_gbs"] = 3 * nbytes / row["ger"] / 1e6
                row["ger_frac_of_copy"] = row["ger_gbs"] / copy_bw
            if row.get("ger") and row.get("inductor"):
                row["ger_over_inductor"] = row["ger"] / row["inductor"]
            report["timings"].append(row)
            print(f"  {name:7s} eager {_f(row.get('eager'))} inductor {_f(row.get('inductor'))} ger {_f(row.get('ger'))} ms"
                  f" | ger/inductor {_f(row.get('ger_over_inductor'), 2)} | ger {_f(row.get('ger_gbs'), 0)} GB/s"
                  f" = {_f(100 * row['ger_frac_of_copy'] if row.get('ger_frac_of_copy') else None, 0)}% of copy"
                  f" | peak GiB ind {_f(row.get('inductor_peak_gib'), 2)} ger {_f(row.get('ger_peak_gib'), 2)}", flush=True)
        del z, y
        torch.cuda.empty_cache()

    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"gpu_check: {len(report['checks']) - len(failures)}/{len(report['checks'])} checks passed; "
          f"wrote {os.path.join(args.out, 'gpu_check.json')}")
    return 1 if failures else 0


def _hand_cp(z, y, beta):
    lp = torch.log_softmax(z, dim=-1)
    return F.cross_entropy(z, y) - beta * (-(lp.exp() * lp).sum(-1).mean())


def _f(v, nd=3):
    return "-" if v is None else f"{v:.{nd}f}"


def _has(mod):
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
