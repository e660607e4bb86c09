"""``python -m benchmarks zoo``: unmodified transformers / timm / torchvision models under
eager, Inductor, Inductor with freezing and ger, in interleaved rounds.

One process per model (``--worker``), so one model's compiles, caches and memory do not
touch the next one's; within that process every backend runs the same inputs from a copy
of the same weights, and the backends take turns round by round (the order rotating), so
drift of a shared machine lands on all of them alike. For each (model, mode, backend):

* time of one step: the median of each round's median, and the spread (min..max) of the
  round medians; the ratio to Inductor is taken round by round (same round, same load)
  and given as median and min..max;
* peak memory of one step beyond what is allocated before it: growth of the peak resident
  set under ``--alloc exact`` (glibc's mmap threshold fixed at 128 KiB, so the resident set
  follows the live bytes whatever ran before in the process); none under ``--alloc warm``,
  where freed blocks stay resident;
* compile time: the first call (Dynamo, AOTAutograd, Inductor, and ger's passes), with a
  fresh Inductor cache directory per run unless ``--keep-cache``;
* what ger rewrote (matches by pattern), its near-misses and fallbacks, and Dynamo's
  graph breaks during ger's compile;
* the deviation from eager after one step from the same state: max |a - b| / max |b| over
  the outputs, the parameters' gradients and (train mode) BN's running statistics.
  ger's is checked against Inductor's own: ``ok`` when it is at most 4x Inductor's or
  1e-4. A tensor's scale is floored at 1e-3 of the largest one's.

Modes. CNNs: ``eval_nograd`` (inference), ``eval_grad`` (eval-mode forward + backward:
frozen-BN fine-tuning, adversarial inputs, saliency), ``train`` (train-mode forward +
backward, BN statistics updated). LMs: ``eval_nograd`` (``model(ids, labels=labels)``
under no_grad), ``train_labels`` (the same with backward: transformers' own loss path),
``train_labels_nologits`` (the same after ``ger_inductor.integrations.transformers.
drop_logits_with_labels``, under every backend: no logits returned) and ``train_outside`` (transformers' ``LabelSmoother`` applied to ``model(ids)`` in the
compiled function, as Trainer does with ``label_smoothing_factor``). A train step is the
forward and backward with gradients set to None first, no optimizer step (it is the same
code under every backend). ``inductor_freezing`` runs only in ``eval_nograd``.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import torch

from ger_inductor.measure import peak_extra_bytes, time_step

from .compiling import compile_apart
from .harness import EXACT_ENV, WARM_ENV  # one definition of each allocator
from .zoo_models import MODELS, ZooModel

MODES = {"cnn": ("eval_nograd", "eval_grad", "train"),
         "lm": ("eval_nograd", "train_labels", "train_labels_nologits", "train_outside")}
BACKENDS = ("eager", "inductor", "inductor_freezing", "ger")
#: asked for by name (``--backends``): ger with measured selection off (the static table
#: decides), for compile times and choices with and without it
EXTRA_BACKENDS = ("ger_prior",)
#: (EXACT_ENV, from the harness: glibc's mmap threshold fixed at 128 KiB - the peak resident
#: set of a step is its peak live bytes whatever ran before it in the process; every large
#: tensor page-faults on first touch: cold-allocator times, ``--alloc warm`` for the others)
DEV_TOL = 1e-4


def _raise_recompile_limits() -> None:
    # 3 modes x 4 backends compile the same forward code object: more than Dynamo's default
    # of 8 cache entries per code object.
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))


def _warm_inductor() -> None:
    """Import and initialise Inductor once (a tiny compile), so that the first backend's
    compile time is not charged with the process's one-off start-up."""
    f = torch.compile(lambda x: (x * 2).sum(), backend="inductor")
    f(torch.randn(4))
    torch._dynamo.reset()


def _compile(model_or_fn, backend: str):
    """Each backend's graphs its own (``compile_apart``). Until stop 38 ``inductor_freezing``
    passed ``options={"freezing": True}``, which does not reach freezing on torch 2.13,
    and shared the ``inductor`` runner's graphs (same model class): its column timed
    Inductor's plain code (stop-38 review)."""
    if backend == "eager":
        return model_or_fn
    if backend == "inductor":
        return compile_apart(model_or_fn, "inductor")
    if backend == "inductor_freezing":
        return compile_apart(model_or_fn, "inductor", tag=backend, freezing=True)
    if backend == "ger":
        return compile_apart(model_or_fn, "ger")
    if backend == "ger_prior":
        return compile_apart(model_or_fn, "ger", tag=backend, options={"autotune": False})
    raise ValueError(backend)


class _Runner:
    """One (model, mode, backend): a model copy, its compiled callable and its step."""

    def __init__(self, zm: ZooModel, base: torch.nn.Module, mode: str, backend: str, inputs: dict[str, Any],
                 gout: torch.Tensor | None):
        self.backend, self.mode = backend, mode
        self.model = copy.deepcopy(base)
        self.inputs = inputs
        m = self.model
        m.train(mode.startswith("train"))
        grad = mode != "eval_nograd"
        for p in m.parameters():
            p.requires_grad_(grad)
        if zm.kind == "cnn":
            fn = _compile(m, backend)
            x = inputs["x"]

            def call():
                return fn(x)

            if grad:
                def step():
                    for p in m.parameters():
                        p.grad = None
                    out = call()
                    out.backward(gout)
                    return out
            else:
                def step():
                    with torch.no_grad():
                        return call()
        else:
            ids, labels = inputs["input_ids"], inputs["labels"]
            if mode == "train_outside":
                from transformers.trainer_pt_utils import LabelSmoother

                smoother = LabelSmoother(epsilon=0.1)

                def loss_fn(ids, labels):
                    return smoother(m(input_ids=ids), labels, shift_labels=True)

                fn = _compile(loss_fn, backend)

                def call():
                    return fn(ids, labels)
            else:
                if mode == "train_labels_nologits":  # the opt-in integration, under every backend
                    from ger_inductor.integrations.transformers import drop_logits_with_labels

                    drop_logits_with_labels(m)
                fm = _compile(m, backend)

                def call():
                    return fm(input_ids=ids, labels=labels).loss

            if grad:
                def step():
                    for p in m.parameters():
                        p.grad = None
                    loss = call()
                    loss.backward()
                    return loss
            else:
                def step():
                    with torch.no_grad():
                        return call()
        self.step = step

    def state(self, out: torch.Tensor) -> list[torch.Tensor]:
        """What is compared with eager after one step (copies: later steps write the BN
        statistics in place)."""
        ts = [out.detach().float().clone()]
        if self.mode != "eval_nograd":
            ts += [p.grad.float().clone() if p.grad is not None else torch.full((1,), float("nan"))
                   for p in self.model.parameters() if p.requires_grad]
        if self.mode == "train":
            ts += [b.float().clone() for n, b in self.model.named_buffers() if "running" in n]
        return ts


def _stochastic(model: torch.nn.Module) -> bool:
    """Whether a train-mode step of ``model`` draws random numbers (dropout, stochastic
    depth / drop path with a non-zero probability)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        if type(m).__name__ in ("StochasticDepth", "DropPath") and (getattr(m, "p", 0) or getattr(m, "drop_prob", 0)):
            return True
    return False


def _deviation(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """max over tensors of max |a - b| / max |b|, the scale floored at 1e-3 of the largest
    tensor's (a gradient that is zero in exact arithmetic - a conv bias before a train-mode
    BN - is rounding noise in every backend, and would otherwise dominate)."""
    if len(a) != len(b):
        return float("inf")
    if any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    scales = [y.abs().max().item() if y.numel() else 0.0 for y in b]
    floor = max([1e-6] + [1e-3 * s for s in scales if s == s])
    worst = 0.0
    for x, y, scale in zip(a, b, scales):
        d = (x - y).abs().max().item() if y.numel() else 0.0
        if d != d:  # NaN
            return float("inf")
        worst = max(worst, d / max(scale, floor))
    return worst


def _ger_summary(reports) -> dict[str, Any]:
    c = collections.Counter(f"{m.family}/{m.pattern}" for r in reports for m in r.matches)
    nm = collections.Counter(n.reason.split(":")[0][:60] for r in reports for n in r.near_misses)
    return {
        "matches": dict(c),
        "near_misses": sum(nm.values()),
        "near_miss_reasons": dict(nm.most_common(4)),
        "fallbacks": [f.one_line() for r in reports for f in r.fallbacks][:4],
        "graphs": len(reports),
        "decisions": [{"node": d["node"], "summary": d["summary"], "choice": d["choice"]} for r in reports
                      for d in r.decisions],
        "autotune_s": sum(r.autotune_seconds for r in reports),
    }


def run_model(name: str, *, modes: list[str] | None = None, backends: list[str] | None = None, rounds: int = 5,
              calls: int = 3, scale: float = 1.0, memory: bool = True, log=print,
              sink: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Every (mode, backend) of one model, in this process. Returns one dict per pair;
    ``sink`` gets the results so far after each mode (a crash then loses one mode only)."""
    import ger_inductor

    _raise_recompile_limits()
    _warm_inductor()
    zm = MODELS[name]
    torch.manual_seed(0)
    base = zm.build(scale)
    g = torch.Generator().manual_seed(0)
    inputs = zm.inputs(base, scale, g)
    results = []
    for mode in modes or MODES[zm.kind]:
        if mode not in MODES[zm.kind]:
            raise ValueError(f"{name}: unknown mode {mode!r}; {zm.kind} modes: {MODES[zm.kind]}")
        torch._dynamo.reset()
        gout = None
        if zm.kind == "cnn" and mode != "eval_nograd":
            with torch.no_grad():
                base.eval()
                shape = base(inputs["x"]).shape
            gout = torch.randn(shape, generator=g)
        runners: dict[str, _Runner] = {}
        rows: dict[str, dict[str, Any]] = {}
        ref_state = None
        for be in backends or BACKENDS:
            if be == "inductor_freezing" and mode != "eval_nograd":
                continue
            row = {"model": name, "library": zm.library, "kind": zm.kind, "style": zm.style, "mode": mode,
                   "backend": be, "error": None}
            rows[be] = row
            try:
                r = _Runner(zm, base, mode, be, inputs, gout)
                if be.startswith("ger"):
                    ger_inductor.clear_reports()
                    breaks0 = sum(torch._dynamo.utils.counters["graph_break"].values())
                t0 = time.perf_counter()
                out = r.step()
                row["compile_s"] = time.perf_counter() - t0
                state = r.state(out)
                if mode.startswith("train") and _stochastic(base):
                    # dropout / stochastic depth draw other masks in each backend (Inductor's
                    # RNG is not eager's): a deviation would compare random numbers, and any
                    # ger result would pass against Inductor's (stop-38 review)
                    row["deviation_note"] = "not compared: random (dropout / stochastic depth in train mode)"
                elif be == "eager":
                    ref_state = state
                elif ref_state is not None:
                    row["deviation"] = _deviation(state, ref_state)
                if be.startswith("ger"):
                    row["ger"] = _ger_summary(ger_inductor.reports())
                    row["ger"]["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values()) - breaks0
                r.step()  # a second call: recompiles (if any) and first-touch costs out of the rounds
                runners[be] = r
            except Exception as e:  # a backend that cannot run this model is reported, not fatal
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            log(f"  {name}/{mode}/{be}: first call {row.get('compile_s', float('nan')):.1f}s"
                + (f" ERROR {row['error']}" if row["error"] else ""))
        # interleaved rounds, the order rotating
        order = list(runners)
        per_round: dict[str, list[float]] = {be: [] for be in order}
        for k in range(rounds):
            rot = order[k % len(order):] + order[: k % len(order)]
            for be in rot:
                per_round[be].append(statistics.median(time_step(runners[be].step, torch.device("cpu"), 1, calls)))
        for be in order:
            row = rows[be]
            ts = per_round[be]
            row.update(median_ms=statistics.median(ts), min_ms=min(ts), max_ms=max(ts), rounds=rounds, calls=calls)
            if "inductor" in per_round:
                ratios = [a / b for a, b in zip(ts, per_round["inductor"])]
                row.update(ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
            if memory:
                peak = peak_extra_bytes(runners[be].step, torch.device("cpu"))
                row["peak_mib"] = None if peak is None else peak / 2**20
        if "inductor" in rows and "ger" in rows and "deviation" in rows["ger"]:
            ind = rows["inductor"].get("deviation")
            dg = rows["ger"]["deviation"]
            rows["ger"]["numbers_ok"] = bool(dg <= DEV_TOL or (ind is not None and dg <= 4 * ind))
        results += list(rows.values())
        del runners
        if sink is not None:
            sink(results)
    return results


# ----------------------------------------------------------------------------- table
def _fmt_ratio(r: dict[str, Any]) -> str:
    if "ratio" not in r:
        return ""
    return f"{r['ratio']:.2f} ({r['ratio_min']:.2f}..{r['ratio_max']:.2f})"


def format_table(results: list[dict[str, Any]]) -> str:
    """One row per (model, mode): each backend's median ms, ger / Inductor (and / the better
    of Inductor and freezing in eval_nograd), peak MiB, ger's coverage and compile times."""
    by = collections.defaultdict(dict)
    for r in results:
        by[(r["model"], r["mode"])][r["backend"]] = r
    head = ("model", "mode", "eager ms", "inductor ms", "freezing ms", "ger ms", "ger/ind (spread)",
            "ger/best", "peak MiB ind/ger", "compile s ind/ger", "ger rewrote", "near", "dev ind/ger")
    rows = [head]
    for (model, mode), d in by.items():
        def ms(be):
            r = d.get(be)
            if r is None:
                return ""
            if r.get("error"):
                return "error"
            return f"{r['median_ms']:.1f}" if "median_ms" in r else ""

        gr, ir, fr = d.get("ger", {}), d.get("inductor", {}), d.get("inductor_freezing", {})
        best = [x["median_ms"] for x in (ir, fr) if "median_ms" in x]
        vs_best = f"{gr['median_ms'] / min(best):.2f}" if best and "median_ms" in gr else ""
        peak = "/".join("" if x.get("peak_mib") is None else f"{x['peak_mib']:.0f}" for x in (ir, gr))
        comp = "/".join(f"{x['compile_s']:.0f}" if "compile_s" in x else "" for x in (ir, gr))
        g = gr.get("ger", {})
        rewrote = ", ".join(f"{k.split('/')[-1]}×{v}" for k, v in sorted(g.get("matches", {}).items()))
        if g.get("fallbacks"):
            rewrote += f" [{len(g['fallbacks'])} fallback]"
        if g.get("graph_breaks"):
            rewrote += f" [{g['graph_breaks']} break]"
        for dd in g.get("decisions", []):
            rewrote += f" [selected {dd['summary']}]"
        pr = d.get("ger_prior", {})
        if "median_ms" in pr:
            rewrote += (f" [selection off: {pr['median_ms']:.1f} ms ({_fmt_ratio(pr)}), compile "
                        f"{pr.get('compile_s', float('nan')):.0f}s]")
        dev = "/".join(f"{x['deviation']:.0e}" if "deviation" in x else "" for x in (ir, gr))
        if gr.get("deviation_note"):
            dev = "random"
        if gr.get("numbers_ok") is False:
            dev += " !"
        rows.append((model, mode, ms("eager"), ms("inductor"), ms("inductor_freezing"), ms("ger"), _fmt_ratio(gr),
                     vs_best if mode == "eval_nograd" else "", peak, comp, rewrote or "-",
                     str(g.get("near_misses", "")), dev))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    out = []
    for i, row in enumerate(rows):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if i == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def summary(results: list[dict[str, Any]]) -> str:
    """The done-when figures: medians of ger / Inductor per mode, worst ratios, memory."""
    lines = []
    by_mode = collections.defaultdict(list)
    for r in results:
        if r["backend"] == "ger" and "ratio" in r:
            by_mode[(r["kind"], r["mode"])].append(r)
    for (kind, mode), rs in sorted(by_mode.items()):
        ratios = [r["ratio"] for r in rs]
        worst = max(rs, key=lambda r: r["ratio"])
        lines.append(f"{kind} {mode}: ger/inductor median {statistics.median(ratios):.2f} over {len(rs)} models "
                     f"(min {min(ratios):.2f}, max {worst['ratio']:.2f} on {worst['model']})")
    mem = [(r, i) for r in results if r["backend"] == "ger" and r.get("peak_mib") is not None
           for i in results if i["backend"] == "inductor" and i["model"] == r["model"] and i["mode"] == r["mode"]
           and i.get("peak_mib")]
    heavier = [f"{r['model']}/{r['mode']} {r['peak_mib'] / i['peak_mib']:.2f}x" for r, i in mem
               if r["peak_mib"] > 1.05 * i["peak_mib"] + 1]
    lines.append("peak memory above Inductor's (>5% and >1 MiB): " + (", ".join(heavier) or "none"))
    bad = [f"{r['model']}/{r['mode']}" for r in results if r.get("numbers_ok") is False]
    lines.append("numbers beyond Inductor's own deviation: " + (", ".join(bad) or "none"))
    errs = [f"{r['model']}/{r['mode']}/{r['backend']}: {r['error']}" for r in results if r.get("error")]
    if errs:
        lines.append("errors: " + "; ".join(errs))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks zoo", description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", help=f"models (default: all): {', '.join(MODELS)}")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--kind", choices=("cnn", "lm"), default=None, help="only CNNs or only LMs")
    ap.add_argument("--modes", nargs="*", default=None)
    ap.add_argument("--backends", nargs="*", default=None, choices=BACKENDS + EXTRA_BACKENDS)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=3, help="timed calls per backend per round")
    ap.add_argument("--alloc", choices=("exact", "warm"), default="exact",
                    help="exact: glibc's mmap threshold fixed at 128 KiB, peak memory measured, large tensors "
                         "page-fault (cold times); warm: large blocks kept (no page faults, no memory figure)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--keep-cache", action="store_true", help="reuse Inductor's cache (compile times then warm)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.list:
        for m in MODELS.values():
            print(f"{m.name:24s} {m.library:12s} {m.kind:3s}  {m.style}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        def sink(res):
            with open(args.json + ".tmp", "w") as f:
                json.dump(res, f)
            os.replace(args.json + ".tmp", args.json)

        run_model(args.worker, modes=args.modes, backends=args.backends, rounds=args.rounds, calls=args.calls,
                  log=lambda s: print(s, file=sys.stderr, flush=True), sink=sink)
        return 0
    names = args.models or [m for m in MODELS if args.kind is None or MODELS[m].kind == args.kind]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; --list shows the zoo")
    env = dict(os.environ)
    for k in WARM_ENV:
        env.pop(k, None)
    env.update(WARM_ENV if args.alloc == "warm" else EXACT_ENV)
    cache = None if args.keep_cache else tempfile.mkdtemp(prefix="ger_zoo_cache_")
    results: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for i, name in enumerate(names):
        out = tempfile.mktemp(prefix=f"ger_zoo_{name}_", suffix=".json")
        cmd = [sys.executable, "-m", "benchmarks", "zoo", "--worker", name, "--json", out,
               "--rounds", str(args.rounds), "--calls", str(args.calls)]
        if args.modes:
            cmd += ["--modes", *args.modes]
        if args.backends:
            cmd += ["--backends", *args.backends]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        wenv = dict(env)
        if cache:
            wenv["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache, name)
        t0 = time.perf_counter()
        print(f"[{i + 1}/{len(names)}] {name} ({MODELS[name].style})", flush=True)
        rc = subprocess.call(cmd, env=wenv)
        if os.path.exists(out):  # the modes finished before a crash are kept
            with open(out) as f:
                results += json.load(f)
            os.unlink(out)
        if rc != 0:
            print(f"  {name}: worker exited {rc}", flush=True)
            results.append({"model": name, "mode": "-", "backend": "-", "kind": MODELS[name].kind,
                            "error": f"worker exited {rc} (signal {-rc})" if rc < 0 else f"worker exited {rc}"})
            _dump(args, results)
            continue
        print(f"  {name}: {time.perf_counter() - t0:.0f}s (all {time.perf_counter() - t_all:.0f}s)", flush=True)
        _dump(args, results)  # after every model: an interrupted run keeps what it measured
    ok = [r for r in results if r.get("mode") != "-"]
    print(f"\n== zoo, {args.alloc} allocator, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print(format_table(ok))
    print()
    print(summary(ok))
    _dump(args, results)
    return 0


def _dump(args, results: list[dict[str, Any]]) -> None:
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump({"torch": torch.__version__, "alloc": args.alloc, "results": results}, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
