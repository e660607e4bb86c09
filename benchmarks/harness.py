"""The benchmark harness: named cases, each run as eager / inductor / [inductor with
freezing] / ger (plus case-specific variants) in ONE process on the SAME inputs.

Per variant: warm-up calls (compilation and the first slow calls excluded); then
``repeat`` timed calls per variant, spread over ``--rounds`` interleaved rounds whose
order rotates (drift of a shared machine falls on every variant alike); we report the median and the spread (min..max), the ratio to
the case's baseline variant (``inductor`` unless the case names another), and the
peak extra memory of one call:

* CPU: growth of the process's peak resident set (VmHWM, reset through
  /proc/self/clear_refs) over the resident set before the call. Meaningful with the
  default glibc allocator, which returns large blocks to the OS - run with its mmap
  threshold fixed at the initial 128 KiB (``EXACT_ENV``), so that what ran before in the
  process does not decide which blocks stay resident; under the warm allocator freed
  blocks stay resident, so memory is reported from default-allocator runs only.
* CUDA: torch.cuda.max_memory_allocated() over memory_allocated() before the call.

Allocators (CPU): ``--alloc default|warm|both``; the process re-runs itself with
exactly the named allocator's settings when it did not start with them. ``warm`` sets
MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ high, as jemalloc/tcmalloc give
CPU deployments (and the caching allocator gives GPUs): a fresh 250 MiB tensor then
costs no page faults. Kernels are judged warm; both are reported.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch
import torch._dynamo

from ger_inductor.measure import peak_extra_bytes, time_step  # one definition, shared with the demo

WARM_ENV = {"MALLOC_MMAP_THRESHOLD_": "1000000000000", "MALLOC_TRIM_THRESHOLD_": "1000000000000"}
#: the default allocator with glibc's mmap threshold fixed at its initial 128 KiB: glibc
#: raises it each time a large block is freed (up to 32 MiB), after which blocks of that
#: size stay on the heap, so a peak (and the page faults a call pays) depended on what ran
#: before it in the process (the same graph read 12 MiB, then 0 MiB measured next; stop-38
#: review). Fixed, every block above 128 KiB is a fresh mapping, in every variant alike.
EXACT_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


@dataclasses.dataclass
class Variant:
    """One way to run a case. ``build(inputs)`` returns a zero-argument step."""

    name: str
    build: Callable[[dict[str, Any]], Callable[[], Any]]
    note: str = ""


@dataclasses.dataclass
class Case:
    name: str
    description: str
    setup: Callable[[torch.device], dict[str, Any]]
    variants: list[Variant]
    #: bytes a perfect implementation must move (for achieved-bandwidth figures)
    min_bytes: Callable[[dict[str, Any]], int] | None = None
    check: Callable[[dict[str, Any], dict[str, Any]], str] | None = None
    devices: tuple[str, ...] = ("cpu", "cuda")
    #: the variant ratios are taken against
    baseline: str = "inductor"


@dataclasses.dataclass
class Result:
    case: str
    variant: str
    device: str
    allocator: str
    median_ms: float
    min_ms: float
    max_ms: float
    repeat: int
    peak_mib: float | None
    ratio_to_baseline: float | None = None
    baseline: str = "inductor"
    note: str = ""
    error: str | None = None


# ----------------------------------------------------------------------------- running
def run_case(case: Case, device: torch.device, warmup: int, repeat: int, allocator: str, log=print,
             rounds: int = 5) -> list[Result]:
    """Every variant built and warmed up first (compilation excluded), then timed in
    ``rounds`` interleaved rounds of ``ceil(repeat / rounds)`` calls each, the order
    rotating from round to round: drift of the machine (other load, frequency) falls on
    every variant alike instead of on whichever ran last. Peak memory and the outputs
    the check compares are taken after the timing, one variant at a time."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    inputs = case.setup(device)
    steps: dict[str, Callable[[], Any]] = {}
    errors: dict[str, str] = {}
    for v in case.variants:
        t0 = time.perf_counter()
        try:
            steps[v.name] = v.build(inputs)
            time_step(steps[v.name], device, warmup, 0)
        except Exception as e:  # a variant that cannot run is reported, not fatal
            steps.pop(v.name, None)
            errors[v.name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        log(f"  {case.name}/{v.name}: built and warmed up in {time.perf_counter() - t0:.1f}s"
            + (f" ERROR {errors[v.name]}" if v.name in errors else ""))
    times: dict[str, list[float]] = {n: [] for n in steps}
    names = list(steps)
    rounds = max(1, min(rounds, repeat))
    per_round = -(-repeat // rounds)
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)] if names else []:
            try:
                times[n] += time_step(steps[n], device, 0, per_round)
            except Exception as e:
                errors[n] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                names.remove(n)
    results: list[Result] = []
    outputs: dict[str, Any] = {}
    for v in case.variants:
        err = errors.get(v.name)
        if err is None:
            try:
                peak = peak_extra_bytes(steps[v.name], device)
                outputs[v.name] = steps[v.name]()
            except Exception as e:
                err = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if err is not None:
            res = Result(case.name, v.name, str(device), allocator, float("nan"), float("nan"), float("nan"), 0, None,
                         note=v.note, error=err)
        else:
            ts = times[v.name]
            res = Result(case.name, v.name, str(device), allocator, statistics.median(ts), min(ts), max(ts), len(ts),
                         None if peak is None else peak / 2**20, note=v.note)
        log(f"  {case.name}/{v.name}: {res.median_ms:.2f} ms" + (f" ERROR {res.error}" if res.error else ""))
        results.append(res)
    base = next((r.median_ms for r in results if r.variant == case.baseline and r.error is None), None)
    for r in results:
        r.baseline = case.baseline
        if base and r.error is None:
            r.ratio_to_baseline = r.median_ms / base
    if case.check is not None and outputs:
        msg = case.check(inputs, outputs)
        if msg:
            log(f"  {case.name}: check: {msg}")
    return results


def format_table(results: list[Result]) -> str:
    rows = [("case", "variant", "alloc", "median ms", "min..max", "× baseline", "peak MiB")]
    for r in results:
        rows.append((
            r.case, r.variant, r.allocator,
            "error" if r.error else f"{r.median_ms:.2f}",
            "" if r.error else f"{r.min_ms:.1f}..{r.max_ms:.1f}",
            "" if r.ratio_to_baseline is None else f"{r.ratio_to_baseline:.2f}" + ("" if r.baseline == "inductor" else f" ({r.baseline})"),
            "" if r.peak_mib is None else f"{r.peak_mib:.0f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for i, row in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(cases: dict[str, Case], argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m benchmarks", description="eager / inductor / ger, side by side")
    ap.add_argument("cases", nargs="*", help="case names (default: all); --list shows them")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--alloc", choices=("default", "warm", "both"), default="both")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=10, help="timed calls per variant")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds the timed calls are spread over")
    ap.add_argument("--json", default=None, help="write results here (JSON)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--variants", nargs="*", default=None, help="run only these variants (default: all)")
    args = ap.parse_args(argv)
    if args.list:
        for name, c in cases.items():
            print(f"{name:24s} {c.description}")
        return 0
    names = args.cases or list(cases)
    unknown = [n for n in names if n not in cases]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {', '.join(cases)}")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    if device.type == "cpu" and args.alloc == "both":
        results: list[dict[str, Any]] = []
        for alloc in ("default", "warm"):
            env = _alloc_env(alloc)
            tmp = f"/tmp/ger_bench_{os.getpid()}_{alloc}.json"
            cmd = [sys.executable, "-m", "benchmarks", *names, "--device", args.device, "--alloc", alloc,
                   "--warmup", str(args.warmup), "--repeat", str(args.repeat), "--rounds", str(args.rounds),
                   "--json", tmp]
            if args.variants:
                cmd += ["--variants", *args.variants]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            print(f"== allocator: {alloc}", flush=True)
            rc = subprocess.call(cmd, env=env)
            if rc != 0:
                return rc
            with open(tmp) as f:
                results += json.load(f)["results"]
            os.unlink(tmp)
        res_objs = [Result(**r) for r in results]
        print("\n== both allocators\n" + format_table(res_objs))
        _write(args.json, res_objs, device)
        return 0

    alloc = args.alloc
    if device.type == "cpu" and not _runs_with(alloc):
        # (glibc reads these at start: the process runs again with exactly the allocator named)
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks", *sys.argv[1:]], _alloc_env(alloc))
    all_results: list[Result] = []
    for name in names:
        case = cases[name]
        if device.type not in case.devices:
            print(f"  {name}: skipped on {device.type}")
            continue
        if args.variants:
            case = dataclasses.replace(case, variants=[v for v in case.variants if v.name in args.variants])
        print(f"case {name}: {case.description}", flush=True)
        all_results += run_case(case, device, args.warmup, args.repeat, alloc if device.type == "cpu" else "caching",
                                rounds=args.rounds)
    print(format_table(all_results))
    _write(args.json, all_results, device)
    return 0


def _alloc_env(alloc: str) -> dict[str, str]:
    """This process's environment with exactly the allocator ``alloc`` names: WARM_ENV
    for ``warm``, EXACT_ENV for ``default`` (an inherited setting of either replaced,
    never mixed in)."""
    out = {k: v for k, v in os.environ.items() if k not in WARM_ENV}
    out.update(WARM_ENV if alloc == "warm" else EXACT_ENV)
    return out


def _runs_with(alloc: str) -> bool:
    """Whether this process started with exactly that allocator's settings."""
    want = WARM_ENV if alloc == "warm" else EXACT_ENV
    return {k: os.environ[k] for k in WARM_ENV if k in os.environ} == want


def _write(path: str | None, results: list[Result], device: torch.device) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    meta = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": [dataclasses.asdict(r) for r in results]}, f, indent=1)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------- GPU check scripts
def gpu_check_main(name: str, argv, correctness, out_file: str, after_correctness=None, timing=None) -> int:
    """The frame of a ``benchmarks.gpu_check_*`` script: ``--out``, ``--cpu-dry-run``,
    ``--skip-timing``; without CUDA (and no dry run) it says so and returns 0. Runs
    ``correctness(device)`` (rows with an ``ok`` key, the bad ones printed), then
    ``after_correctness(device, report)`` and, on CUDA unless skipped,
    ``timing(device, report)``; writes the report as JSON to ``<out>/<out_file>``.
    Returns 1 when a correctness row failed."""
    import argparse
    import json
    import os

    ap = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--cpu-dry-run", action="store_true", help="run the checks on the CPU, to test the script")
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print(f"{name}: no CUDA device here; nothing to do (use --cpu-dry-run to test the script)")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import torch._dynamo as dynamo

    if "ger" not in dynamo.list_backends(exclude_tags=()):  # a checkout without the entry point
        from ger_inductor.backend import ger

        dynamo.register_backend(compiler_fn=ger, name="ger")
    os.makedirs(args.out, exist_ok=True)
    report = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    t0 = time.time()
    report["correctness"] = rows = correctness(device)
    bad = [r for r in rows if not r["ok"]]
    print(f"correctness: {len(rows) - len(bad)}/{len(rows)} ok ({time.time() - t0:.0f}s)", flush=True)
    for r in bad:
        print("  BAD", r, flush=True)
    if after_correctness is not None:
        after_correctness(device, report)
    if timing is not None and not args.skip_timing and device.type == "cuda":
        timing(device, report)
    with open(os.path.join(args.out, out_file), "w") as f:
        json.dump(report, f, indent=1, default=str)
    return 1 if bad else 0
