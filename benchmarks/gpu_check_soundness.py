"""GPU check of ger's rewrites under execution modes, in ONE run: correctness against
eager (and float64) on CUDA, the report's record of what fired, and timings.

    python -m benchmarks.gpu_check_soundness [--out PATH.json] [--quick]
    python -m benchmarks.gpu_check_soundness --device cpu    # dry run (bf16 autocast)

Without CUDA (and without ``--device cpu``) it prints why it skips and exits 0. Runs on
torch 2.11 (triton 3.6) and 2.13; works from a checkout without installation (the
backend is passed as a callable). Every check compiles with ``ger`` (strict):

* ``conv_eval_<dtype>``: conv -> BN -> ReLU, ``model.eval()`` under
  ``torch.autocast(device, dtype)`` (fp16 and bf16 on CUDA, bf16 on CPU), no_grad:
  the output dtype equals eager's, its max error vs float64 is within 2x eager's own
  (plus a small floor), and the report shows ``conv_bn_act.eval``;
* ``conv_train_<dtype>``: the same block in training mode under autocast, forward +
  backward: output, parameter and input gradients and running statistics within 2x
  eager's error vs float64, gradient dtypes equal, ``conv_bn_act.train`` matched;
* ``loss_write_no_grad``: ``ce = F.cross_entropy(q, y); q.mul_(3); H = entropy(q)``
  under no_grad: equal to eager (fp32), the logits written the same, the loss rewrite
  refused with a near-miss naming the write;
* ``loss_neg_inf``: ``F.cross_entropy(q, y, reduction="none") - 0.1 * H`` with -inf
  logits in some rows, forward + backward: NaN pattern of the loss and of the gradient
  equal to eager's, finite values close, the loss rewrite matched.

Timings (``ger_inductor.measure.time_step``: CUDA events on CUDA, median of 20 after
warm-up; on the CPU wall clock): eager / inductor / ger for each check's step. A time
budget (:data:`TIME_BUDGET_S`) bounds the timings; skipped ones are recorded.
Writes one JSON file (``--out``) and exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.gpu_check_conv import _rel  # noqa: E402  (norm-wise relative error)
from ger_inductor.measure import time_step  # noqa: E402  (CUDA events / wall clock)
from examples.resnet18_cnn import randomize_bn_statistics  # noqa: E402

TIME_BUDGET_S = 90.0
REPEAT = 20
WARMUP = 3


# ----------------------------------------------------------------------------- cases
class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def _entropy(q):
    p = q.softmax(-1)
    return -(p * q.log_softmax(-1)).sum(-1)


def loss_write(q, y):
    ce = F.cross_entropy(q, y)
    q.mul_(3.0)
    return ce - 0.1 * _entropy(q).mean()


def loss_rows(q, y):
    return F.cross_entropy(q, y, reduction="none") - 0.1 * _entropy(q)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def _ger_backend():
    from ger_inductor.backend import ger

    def backend(gm, example_inputs):
        return ger(gm, example_inputs, options={"strict": True})

    return backend


def _reports():
    import ger_inductor

    return ger_inductor.reports()


def _matched(patterns: set[str]) -> list[str]:
    return sorted({m.pattern for r in _reports() for m in r.matches if m.pattern in patterns})


def _near_misses(family: str) -> list[str]:
    return [f"{n.node}: {n.reason}" for r in _reports() for n in r.near_misses if n.family == family]


def _fallbacks() -> list[str]:
    return [f.one_line() for r in _reports() for f in r.fallbacks]


def _amp(dev: torch.device, dtype: torch.dtype):
    return torch.autocast(dev.type, dtype=dtype)


# ---- conv -> BN -> ReLU
def _conv_setup(dev, sizes):
    cin, cout, n, hw = sizes
    torch.manual_seed(0)
    model = randomize_bn_statistics(ConvBNReLU(cin, cout)).to(dev)
    x = torch.randn(n, cin, hw, hw, device=dev)
    return model, x


def check_conv(dev, amp_dtype, train: bool, sizes) -> tuple[dict, dict[str, Callable[[], Any]]]:
    """One conv check; returns its record and the steps to time (eager/inductor/ger)."""
    model, x = _conv_setup(dev, sizes)
    model.train(train)
    ref64 = copy.deepcopy(model).double()
    eager_m, ger_m = copy.deepcopy(model), copy.deepcopy(model)
    ger_f = torch.compile(ger_m, backend=_ger_backend())
    x64 = x.double().requires_grad_(train)
    xe, xg = x.clone().requires_grad_(train), x.clone().requires_grad_(train)
    g = torch.randn(x.shape[0], model.bn.num_features, *x.shape[2:], device=dev,
                    generator=torch.Generator(dev).manual_seed(1))
    rec: dict[str, Any] = {}
    with torch.set_grad_enabled(train):
        with _amp(dev, amp_dtype):
            out_e, out_g = eager_m(xe), ger_f(xg)
        out64 = ref64(x64)
    errs = {"out": (_max_err(out_g, out64), _max_err(out_e, out64))}
    rec.update(dtype_eager=str(out_e.dtype), dtype_ger=str(out_g.dtype), max_err_vs_eager=_max_err(out_g, out_e))
    dtypes_ok = out_e.dtype == out_g.dtype
    if train:
        (out_e.float() * g).sum().backward()
        (out_g.float() * g).sum().backward()
        (out64 * g.double()).sum().backward()
        pairs = {"grad x": (xg.grad, xe.grad, x64.grad)}
        for (k, pe), pg, p64 in zip(eager_m.named_parameters(), ger_m.parameters(), ref64.parameters()):
            pairs[f"grad {k}"] = (pg.grad, pe.grad, p64.grad)
            dtypes_ok &= pg.grad.dtype == pe.grad.dtype
        for (k, be), bg, b64 in zip(eager_m.named_buffers(), ger_m.buffers(), ref64.buffers()):
            if be.is_floating_point():
                pairs[k] = (bg, be, b64)
        dtypes_ok &= xg.grad.dtype == xe.grad.dtype
        for k, (a, e, r) in pairs.items():
            errs[k] = (_rel(a, r), _rel(e, r))  # norm-wise: gradients are heavy-tailed in 16 bits
    # a floor of two roundings of the largest output (outputs), 1e-3 (norm-wise errors)
    floor = 1e-3 if train else 2 * torch.finfo(amp_dtype).eps * float(out64.abs().max())
    bad = {k: v for k, v in errs.items() if not (math.isfinite(v[0]) and v[0] <= 2 * v[1] + floor)}
    pattern = "conv_bn_act.train" if train else "conv_bn_act.eval"
    matched = _matched({pattern})
    rec.update(errors={k: {"ger": v[0], "eager": v[1]} for k, v in errs.items()}, bad=bad, dtypes_equal=dtypes_ok,
               matched=matched, fallbacks=_fallbacks())
    rec["ok"] = dtypes_ok and not bad and matched == [pattern] and not rec["fallbacks"]

    ind_f = torch.compile(copy.deepcopy(model), backend="inductor")

    def step(f):
        if train:
            def run():
                with _amp(dev, amp_dtype):
                    out = f(x)
                out.float().square().mean().backward()
        else:
            def run():
                with torch.no_grad(), _amp(dev, amp_dtype):
                    f(x)
        return run

    return rec, {"eager": step(eager_m), "inductor": step(ind_f), "ger": step(ger_f)}


# ---- losses
def _logits(dev, sizes, neg_inf: bool):
    n, v = sizes
    g = torch.Generator(dev).manual_seed(2)
    q = torch.randn(n, v, device=dev, generator=g) * 2
    y = torch.randint(0, v, (n,), device=dev, generator=g)
    if neg_inf:
        rows = torch.arange(0, n, 3, device=dev)
        cols = (y[rows] + 1) % v  # never the target: the cross-entropy stays finite
        q[rows, cols] = float("-inf")
    return q, y


def check_loss_write(dev, sizes) -> tuple[dict, dict[str, Callable[[], Any]]]:
    q, y = _logits(dev, sizes, False)
    ger_f = torch.compile(loss_write, backend=_ger_backend())
    qe, qg = q.clone(), q.clone()
    with torch.no_grad():
        ref, out = loss_write(qe, y), ger_f(qg, y)
    err = _max_err(out, ref)
    tol = 1e-5 * max(1.0, float(ref.abs()))
    misses = _near_misses("loss_entropy")
    rec = dict(max_err_vs_eager=err, logits_written_equal=bool(torch.equal(qg, qe)), dtype_eager=str(ref.dtype),
               dtype_ger=str(out.dtype), near_misses=misses, matched=_matched({"cross_entropy", "entropy"}),
               fallbacks=_fallbacks())
    rec["ok"] = (err <= tol and rec["logits_written_equal"] and ref.dtype == out.dtype and not rec["matched"]
                 and any("mul_" in m for m in misses) and not rec["fallbacks"])
    ind_f = torch.compile(loss_write, backend="inductor")

    def step(f):
        def run():
            with torch.no_grad():
                f(q.clone(), y)
        return run

    return rec, {"eager": step(loss_write), "inductor": step(ind_f), "ger": step(ger_f)}


def _nan_pattern_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.isinf(a), torch.isinf(b)))


def _finite_close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max error over the entries finite in both, relative to the largest (at least 1)."""
    a, b = a.detach(), b.detach()
    m = torch.isfinite(a) & torch.isfinite(b)
    if not bool(m.any()):
        return 0.0
    return float((a[m].double() - b[m].double()).abs().max() / b[m].double().abs().max().clamp_min(1.0))


def check_loss_neg_inf(dev, sizes) -> tuple[dict, dict[str, Callable[[], Any]]]:
    q, y = _logits(dev, sizes, True)
    ger_f = torch.compile(loss_rows, backend=_ger_backend())
    qe, qg = q.clone().requires_grad_(), q.clone().requires_grad_()
    ref, out = loss_rows(qe, y), ger_f(qg, y)
    w = torch.rand(ref.shape, device=dev, generator=torch.Generator(dev).manual_seed(3))
    (ref * w).sum().backward()
    (out * w).sum().backward()
    rec = dict(nan_rows_eager=int(torch.isnan(ref).sum()), nan_rows_ger=int(torch.isnan(out).sum()),
               loss_pattern_equal=_nan_pattern_equal(out, ref), grad_pattern_equal=_nan_pattern_equal(qg.grad, qe.grad),
               loss_rel_err=_finite_close(out, ref), grad_rel_err=_finite_close(qg.grad, qe.grad),
               dtype_eager=str(ref.dtype), dtype_ger=str(out.dtype), matched=_matched({"cross_entropy", "entropy"}),
               fallbacks=_fallbacks())
    rec["ok"] = (rec["loss_pattern_equal"] and rec["grad_pattern_equal"] and rec["loss_rel_err"] <= 1e-4
                 and rec["grad_rel_err"] <= 1e-4 and rec["matched"] == ["cross_entropy", "entropy"]
                 and ref.dtype == out.dtype and not rec["fallbacks"])
    ind_f = torch.compile(loss_rows, backend="inductor")

    def step(f):
        def run():
            z = q.detach().requires_grad_()
            f(z, y).sum().backward()
        return run

    return rec, {"eager": step(loss_rows), "inductor": step(ind_f), "ger": step(ger_f)}


# ----------------------------------------------------------------------------- driver
def _plan(dev: torch.device, quick: bool) -> list[tuple[str, Callable[[], tuple[dict, dict]]]]:
    cpu = dev.type == "cpu"
    conv = (8, 8, 2, 8) if cpu else ((32, 64, 8, 28) if quick else (64, 64, 16, 56))
    loss = (64, 100) if cpu else ((1024, 8192) if quick else (4096, 32000))
    amp_dtypes = [torch.bfloat16] if cpu else [torch.float16, torch.bfloat16]
    plan: list = []
    for dt in amp_dtypes:
        name = str(dt).replace("torch.", "")
        plan.append((f"conv_eval_{name}", lambda dt=dt: check_conv(dev, dt, False, conv)))
    for dt in amp_dtypes:
        name = str(dt).replace("torch.", "")
        plan.append((f"conv_train_{name}", lambda dt=dt: check_conv(dev, dt, True, conv)))
    plan.append(("loss_write_no_grad", lambda: check_loss_write(dev, loss)))
    plan.append(("loss_neg_inf", lambda: check_loss_neg_inf(dev, loss)))
    return plan


def _time(steps: dict[str, Callable[[], Any]], dev: torch.device, deadline: float, repeat: int) -> dict:
    row: dict[str, Any] = {}
    for name in ("eager", "inductor", "ger"):
        if time.time() > deadline:
            row.setdefault("skipped", []).append(name)
            continue
        try:
            row[f"{name}_ms"] = statistics.median(time_step(steps[name], dev, WARMUP, repeat))
        except Exception as e:  # report, keep going
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    if row.get("ger_ms") and row.get("inductor_ms"):
        row["ger_over_inductor"] = row["ger_ms"] / row["inductor_ms"]
    return row


def run_checks(dev: torch.device, quick: bool = False, timings: bool = True, repeat: int = REPEAT,
               budget_s: float = TIME_BUDGET_S) -> dict:
    import ger_inductor

    report: dict[str, Any] = {"device": str(dev), "torch": torch.__version__, "checks": [], "timings": []}
    if dev.type == "cuda":
        report["device"] = torch.cuda.get_device_name(dev)
    deadline = time.time() + budget_s
    with contextlib.ExitStack() as stack:
        if dev.type == "cuda":  # fp32 means fp32: the float64 comparisons are not about TF32
            stack.enter_context(torch.backends.cudnn.flags(enabled=True, allow_tf32=False))
        for name, fn in _plan(dev, quick):
            torch._dynamo.reset()
            ger_inductor.clear_reports()
            t0 = time.time()
            try:
                rec, steps = fn()
            except Exception as e:  # report, keep going
                rec, steps = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:500]}"}, None
            rec = {"check": name, **rec, "seconds": round(time.time() - t0, 1)}
            report["checks"].append(rec)
            print(f"check {name:20s} {'OK' if rec['ok'] else 'FAIL'} "
                  + ", ".join(f"{k}={v}" for k, v in rec.items() if k not in ("check", "ok", "errors")), flush=True)
            if timings and steps is not None:
                row = {"check": name, **_time(steps, dev, deadline, repeat)}
                report["timings"].append(row)
                print("timing " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in row.items()), flush=True)  # fmt: skip
    report["failed"] = [c["check"] for c in report["checks"] if not c["ok"]]
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "bench_out"), "gpu_check_soundness.json"),
                    help="JSON file to write")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a dry run of the same checks with bf16 autocast (to test this script)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--no-timings", action="store_true", help="correctness only")
    ap.add_argument("--repeat", type=int, default=REPEAT, help="timed repeats per variant (median)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check_soundness: skipped: no CUDA device (torch.cuda.is_available() is False); "
              "--device cpu runs the checks on the CPU")
        return 0
    dev = torch.device(args.device)
    t0 = time.time()
    report = run_checks(dev, quick=args.quick, timings=not args.no_timings, repeat=args.repeat)
    report["seconds"] = round(time.time() - t0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    n = len(report["checks"])
    print(f"gpu_check_soundness: {n - len(report['failed'])}/{n} checks passed in {report['seconds']} s "
          f"-> {args.out}" + (f"; FAILED: {', '.join(report['failed'])}" if report["failed"] else ""))
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
