"""``python -m ger_inductor``: env | demo | dump SCRIPT | fleet | decisions.

    python -m ger_inductor env               versions, devices, detected profiles (for bug reports)
    python -m ger_inductor demo [--quick] [--only WORD] [--scale F]
                                             eager / inductor / ger: LM train step, CNN steps, a loss (time, memory)
    python -m ger_inductor dump [--out DIR] SCRIPT [ARGS...]
                                             run a script; every graph ger compiles is dumped
    python -m ger_inductor fleet [--json]    the strategy each pattern family uses per device profile
    python -m ger_inductor decisions list|export FILE|import FILE|clear
                                             the measured strategy decisions of this machine's store
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import runpy
import sys


def cmd_env(args) -> int:
    import torch

    import ger_inductor
    from ger_inductor import fleet

    lines = [
        f"ger_inductor {ger_inductor.__version__} ({os.path.dirname(ger_inductor.__file__)})",
        f"python {platform.python_version()} on {platform.platform()}",
        f"torch {torch.__version__} (cuda {torch.version.cuda}, hip {torch.version.hip})",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton not installed")
    lines.append(f"cpu: {platform.machine()}, capability {torch.backends.cpu.get_cpu_capability()}, "
                 f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        for i in range(torch.cuda.device_count()):
            lines.append(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
    else:
        lines.append("cuda: not available")
    from ger_inductor import _compat

    cfg = _compat.inductor_config()
    lines.append(f"inductor: fx_graph_cache={cfg.fx_graph_cache}, cpp_wrapper={cfg.cpp_wrapper}, freezing={cfg.freezing}")
    for d in devices:
        p = fleet.profile_for_device(d)
        lines.append(f"profile for {d}: {p.name} (vendor {p.vendor}, arch {p.arch}, warp {p.warp_size}, "
                     f"units {p.multiprocessors}, codegen {p.inductor_codegen})")
    print("\n".join(lines))
    return 0


def cmd_demo(args) -> int:
    import time

    import torch

    from ger_inductor.demo import format_table, run_demo, workloads

    torch.set_num_threads(args.threads or torch.get_num_threads())
    print("ger demo: eager / inductor / ger in one process on the same inputs (CPU, "
          f"{torch.get_num_threads()} threads). ms/step: median of {args.repeat} steps (eager: at most 3); peak: the extra memory one "
          "step needs (resident set; n/a under a warm allocator); saved: what autograd holds for backward "
          "beyond inputs and parameters; max rel err: the largest difference from eager, values and gradients")
    names = [w.name for w in workloads()]
    only = ("LM train step", "CE - 0.1 H(p) loss") if args.quick else ()
    if args.only:
        picked = []
        for word in args.only:
            hits = [n for n in names if word.lower() in n.lower()]
            if not hits:
                print(f"ger demo: --only {word!r} names no workload; the workloads: {names}", file=sys.stderr)
                return 2
            picked += [n for n in hits if n not in picked]
        only = tuple(n for n in picked if not args.quick or n in only)
        if not only:
            print(f"ger demo: --only {args.only} and --quick leave no workload", file=sys.stderr)
            return 2
    for w in workloads(args.scale):
        if not only or w.name in only:
            print(f"  {w.name}: {w.what}")
    t0 = time.perf_counter()

    def progress(msg):
        print(f"  [{time.perf_counter() - t0:5.1f} s] {msg}", file=sys.stderr, flush=True)

    rows = run_demo(progress=progress, repeat=args.repeat, only=only, scale=args.scale)
    print()
    print(format_table(rows))
    bad = [r for r in rows if r.max_err > 1e-3]
    if bad:
        print(f"\nFAILED: {len(bad)} result(s) differ from eager by more than 1e-3: {[(r.workload, r.backend) for r in bad]}")
        return 1
    print(f"\nall results match eager ({time.perf_counter() - t0:.0f} s)")
    return 0


def cmd_dump(args) -> int:
    import ger_inductor
    from ger_inductor import debug

    out = os.path.abspath(args.out)
    if not os.path.isfile(args.script):
        raise SystemExit(f"python -m ger_inductor dump: no script {args.script!r}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"python -m ger_inductor dump: --out {args.out!r} is a file, not a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"python -m ger_inductor dump: cannot make --out {args.out!r}: {e}") from None
    env_before, argv_before = os.environ.get("GER_DUMP_DIR"), sys.argv
    os.environ["GER_DUMP_DIR"] = out
    sys.argv = [args.script, *args.script_args]
    script_dir = os.path.dirname(os.path.abspath(args.script))
    sys.path.insert(0, script_dir)  # as `python SCRIPT` does
    before = debug.report_count()
    try:
        runpy.run_path(args.script, run_name="__main__")
    finally:
        # (main() may run in a process that goes on: put back what the script's run set)
        if env_before is None:
            os.environ.pop("GER_DUMP_DIR", None)
        else:
            os.environ["GER_DUMP_DIR"] = env_before
        sys.argv = argv_before
        if script_dir in sys.path:
            sys.path.remove(script_dir)
        n = debug.report_count() - before
        reps = ger_inductor.reports()[-n:] if n > 0 else []
        shown = f" (the last {len(reps)} listed)" if len(reps) < n else ""
        print(f"\nger dump: {n} graph(s) compiled with backend='ger', dumps in {out}{shown}")
        for r in reps:
            errors = f", {len(r.dump_errors)} dump file(s) not written" if r.dump_errors else ""
            print(f"  {r.name}: {len(r.matches)} match(es), {len(r.near_misses)} near-miss(es), "
                  f"{len(r.fallbacks)} fallback(s){errors} -> {r.dump_path}")
    return 0


def cmd_fleet(args) -> int:
    from ger_inductor import fleet

    table = fleet.strategy_table(include_local=not args.no_local)
    if args.json:
        print(json.dumps(table, indent=2))
    else:
        print(fleet.format_strategy_table(table))
    return 0


def cmd_decisions(args) -> int:
    try:
        return _decisions(args)
    except (OSError, ValueError) as e:  # a missing / unreadable / foreign file: one line, no traceback
        raise SystemExit(f"python -m ger_inductor decisions {args.action}: {e}") from None


def _decisions(args) -> int:
    from ger_inductor import autotune

    store = args.store or autotune.default_store_path()
    if args.action == "list":
        rows = autotune.decisions(store)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"ger measured decisions in {store}: {len(rows)}")
        for r in rows:
            site = ", ".join(f"{k}={v}" for k, v in r.get("site", {}).items() if k != "loss")
            print(f"  {r.get('family')} on {r.get('profile')} (torch {r.get('torch')}): {site}\n"
                  f"    -> {r['choice']}: ger {autotune.Timing(**r['ger'])} vs inductor {autotune.Timing(**r['inductor'])}")
    elif args.action == "export":
        if not args.path:
            raise SystemExit("python -m ger_inductor decisions export: give the file to write")
        print(f"exported {autotune.export_decisions(args.path, store)} decision(s) from {store} to {args.path}")
    elif args.action == "import":
        if not args.path:
            raise SystemExit("python -m ger_inductor decisions import: give the file to read")
        print(f"imported {autotune.import_decisions(args.path, store)} decision(s) from {args.path} into {store}")
    else:
        autotune.clear_decisions(store)
        print(f"cleared {store}")
    return 0


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _scale(text: str) -> float:
    f = float(text)
    if not 0.0 < f <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return f


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ger_inductor", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env", help="versions, devices and detected profiles").set_defaults(fn=cmd_env)
    d = sub.add_parser("demo", help="eager / inductor / ger on an LM step, CNN steps and an entropy-regularised loss")
    d.add_argument("--quick", action="store_true", help="the LM step and the loss only")
    d.add_argument("--only", action="append", metavar="WORD",
                   help="the workloads whose name contains WORD (case-insensitive; repeatable)")
    d.add_argument("--repeat", type=_positive_int, default=5, help="timed steps per backend (median reported)")
    d.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's)")
    d.add_argument("--scale", type=_scale, default=1.0, metavar="F",
                   help="shrink each workload's batch (tokens, images, logit rows) by F in (0, 1]: checks the numbers "
                        "quickly; the times are then not the demo's")
    d.set_defaults(fn=cmd_demo)
    du = sub.add_parser("dump", help="run a script, dumping every graph ger compiles")
    du.add_argument("--out", default="ger_dump")
    du.add_argument("script")
    du.add_argument("script_args", nargs=argparse.REMAINDER)
    du.set_defaults(fn=cmd_dump)
    fl = sub.add_parser("fleet", help="strategy per device profile")
    fl.add_argument("--json", action="store_true")
    fl.add_argument("--no-local", action="store_true", help="pinned profiles only")
    fl.set_defaults(fn=cmd_fleet)
    de = sub.add_parser("decisions", help="measured strategy decisions: list, export, import, clear")
    de.add_argument("action", choices=("list", "export", "import", "clear"))
    de.add_argument("path", nargs="?", help="file to export to / import from")
    de.add_argument("--store", default=None, help="decision store (default: <Inductor cache dir>/ger/decisions.json)")
    de.add_argument("--json", action="store_true")
    de.set_defaults(fn=cmd_decisions)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
