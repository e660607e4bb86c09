"""Measured strategy selection: time a rewrite site's fused form against the form
Inductor would compile without it, on the site's shapes and device, at compile time,
and keep the faster one (a tie within noise goes to the leaner form; the family says
which that is).

* A **site** is described by its family and a *shape class* (the family chooses it: for
  the lm head the rows rounded up to a power of two, the chunks, H, V, dtypes and the
  loss's form).
  Identical sites of a graph, and of later graphs, share one measurement.
* Each form is a small graph compiled by Inductor exactly as ger's backend compiles
  (same lowerings, same config patches), called on random inputs of the site's shapes,
  forward and backward when the site needs gradients, in interleaved rounds: the
  medians decide, the spread is reported.
* Decisions are kept in a JSON store keyed by family, device profile (name, arch,
  device type), torch version and shape class. Default place:
  ``<Inductor cache dir>/ger/decisions.json``; ``GER_AUTOTUNE_STORE`` or the option
  ``autotune_store`` move it. :func:`export_decisions` / :func:`import_decisions` (and
  ``python -m ger_inductor decisions``) carry one machine's decisions to a fleet of the
  same device kind.
* A decision changes the graph handed to Inductor (fused op or not), so Inductor's and
  AOTAutograd's caches, keyed by that graph, never serve code of the other choice.
* Without a measurement (switched off, symbolic sizes - except the lm head's symbolic
  rows where its fused form would recompute the logits, timed at the example's sizes -
  a site below the family's size floor, a measurement that failed) the static strategy
  table in ``fleet`` decides, as before; the report says which.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import statistics
import time
from typing import Any, Callable, Iterator

import torch

from . import _compat
from .fleet import DeviceProfile
from .measure import peak_alloc_bytes, time_step

log = logging.getLogger("ger_inductor")

AUTOTUNE_ENV = "GER_AUTOTUNE"
STORE_ENV = "GER_AUTOTUNE_STORE"
#: version of the store's format and of the measurement method (a change invalidates)
FORMAT = 1
#: two medians within this fraction tie (noise on these machines); a tie goes to the
#: leaner form
TOLERANCE = 0.03
#: interleaved rounds per measurement, and the wall time one form's calls aim at per round
ROUNDS = 5
ROUND_SECONDS = 0.05
#: most calls of one form in one round
MAX_REPEAT = 20

CHOICES = ("ger", "inductor")


class NotMeasured(Exception):
    """Raised by a measurement that must not run now (the reason is its message): the
    caller keeps its prior, nothing is stored."""


@dataclasses.dataclass(frozen=True)
class Timing:
    """Milliseconds of one form's step: median, min and max of the interleaved rounds."""

    median_ms: float
    min_ms: float
    max_ms: float
    calls: int
    #: peak MiB one call allocates (None: not measured; the lm head's sites are not)
    peak_mib: float | None = None

    def to_json_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        mem = "" if self.peak_mib is None else f", peak {self.peak_mib:.3g} MiB"
        return f"{self.median_ms:.3g} ms ({self.min_ms:.3g}-{self.max_ms:.3g}){mem}"


@dataclasses.dataclass(frozen=True)
class Decision:
    """What a site's measurement chose, and from where (``measured`` now, ``stored``
    on disk, ``memo``: an identical site earlier in this process)."""

    family: str
    key: str
    choice: str  # "ger" | "inductor"
    ger: Timing
    inductor: Timing
    source: str
    seconds: float = 0.0  # compile + timing spent on it (0 when not measured now)

    @property
    def ratio(self) -> float:
        return self.ger.median_ms / self.inductor.median_ms if self.inductor.median_ms > 0 else math.inf

    def to_json_dict(self) -> dict[str, Any]:
        return {"family": self.family, "key": self.key, "choice": self.choice, "ger": self.ger.to_json_dict(),
                "inductor": self.inductor.to_json_dict(), "ratio": round(self.ratio, 4), "source": self.source,
                "seconds": round(self.seconds, 3)}

    def one_line(self) -> str:
        return (f"ger {self.ger} vs inductor {self.inductor}, {self.ratio:.2f}x -> {self.choice} "
                f"({self.source}{f', {self.seconds:.1f}s' if self.seconds else ''})")


#: where both peaks are measured, ger's form may allocate at most this fraction, plus
#: MEMORY_SLACK_MIB, above Inductor's (never heavier: rule 2)
MEMORY_TOLERANCE = 0.05
MEMORY_SLACK_MIB = 1.0


def heavier(ger: Timing, inductor: Timing) -> bool:
    """ger's form measured to allocate more than Inductor's beyond the memory tolerance."""
    if ger.peak_mib is None or inductor.peak_mib is None:
        return False
    return ger.peak_mib > inductor.peak_mib * (1.0 + MEMORY_TOLERANCE) + MEMORY_SLACK_MIB


def choose(ger: Timing, inductor: Timing, tolerance: float = TOLERANCE, fused_leaner: bool = True) -> str:
    """The faster form; within ``tolerance`` (a tie) the leaner one: the fused form when
    ``fused_leaner`` (the family knows it holds less memory at this site), else
    Inductor's (then the fused form must be faster beyond the tolerance). Where both
    forms' peaks were measured, a fused form that allocates more (:func:`heavier`) is
    never kept."""
    if heavier(ger, inductor):
        return "inductor"
    if fused_leaner:
        return "ger" if ger.median_ms <= inductor.median_ms * (1.0 + tolerance) else "inductor"
    return "ger" if ger.median_ms < inductor.median_ms * (1.0 - tolerance) else "inductor"


# ----------------------------------------------------------------------------- keys and store
def enabled_by_default() -> bool:
    v = os.environ.get(AUTOTUNE_ENV, "1").strip().lower()
    return v not in ("0", "false", "off", "no", "")


def store_path(option: str | None) -> str:
    """The store a compile uses: the option ``autotune_store`` (made absolute: a later
    compile from another working directory finds the same file), else the default."""
    return os.path.abspath(option) if option else default_store_path()


def default_store_path() -> str:
    env = os.environ.get(STORE_ENV)
    if env:
        return os.path.abspath(env)
    return os.path.join(_compat.inductor_cache_dir(), "ger", "decisions.json")


def site_key(family: str, profile: DeviceProfile, shape_class: dict[str, Any]) -> str:
    """The store's key: family, device kind, torch version and the site's shape class."""
    return json.dumps({"format": FORMAT, "family": family, "profile": profile.name, "arch": profile.arch,
                       "device_type": profile.device_type, "torch": torch.__version__, "site": shape_class},
                      sort_keys=True, default=str)


def _timing_from(d: Any) -> Timing:
    """A stored timing, checked: finite non-negative milliseconds, a positive count of
    calls, a peak that is a number or None (ValueError otherwise: the entry is not used)."""
    if not isinstance(d, dict):
        raise ValueError(f"a timing must be an object, got {type(d).__name__}")
    t = Timing(**d)
    ms = (t.median_ms, t.min_ms, t.max_ms) + (() if t.peak_mib is None else (t.peak_mib,))
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0 for x in ms):
        raise ValueError(f"a timing's figures must be finite non-negative numbers, got {d!r}")
    if not isinstance(t.calls, int) or isinstance(t.calls, bool) or t.calls < 1:
        raise ValueError(f"a timing's calls must be a positive int, got {t.calls!r}")
    return t


def _decision_from(entry: Any, key: str, source: str) -> Decision:
    """A stored entry as a Decision (KeyError / TypeError / ValueError where it is not one)."""
    if not isinstance(entry, dict) or entry.get("choice") not in CHOICES or not isinstance(entry.get("family"), str):
        raise ValueError(f"not a decision: {entry!r}"[:200])
    return Decision(entry["family"], key, entry["choice"], _timing_from(entry["ger"]), _timing_from(entry["inductor"]),
                    source)


def load(path: str) -> dict[str, dict[str, Any]]:
    """The decisions stored at ``path`` ({} when there is no store). A store written by
    another format version is ignored, not misread."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as e:
        log.warning("ger autotune: cannot read the decision store %s (%s); measuring afresh", path, e)
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("decisions"), dict):
        return {}
    return dict(data["decisions"])


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: last writer wins
        yield
        return
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def save(path: str, entries: dict[str, dict[str, Any]]) -> None:
    """Merge ``entries`` into the store at ``path`` (atomically: a reader sees the old or
    the new file)."""
    with _locked(path):
        merged = load(path)
        merged.update(entries)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"format": FORMAT, "decisions": merged}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)


def decisions(store: str | None = None) -> list[dict[str, Any]]:
    """The stored decisions, each with its key unpacked (family, profile, arch, torch,
    site) beside the choice and both timings."""
    out = []
    for k, e in sorted(load(store or default_store_path()).items()):
        try:
            meta = json.loads(k)
        except ValueError:
            meta = {"key": k}
        out.append({**meta, **e})
    return out


def export_decisions(path: str, store: str | None = None) -> int:
    """Write the decisions of ``store`` (default: this machine's) to ``path``, for
    :func:`import_decisions` on other machines of the same device kind. Returns how
    many were written."""
    entries = load(store or default_store_path())
    with open(path, "w") as f:
        json.dump({"format": FORMAT, "decisions": entries}, f, indent=1, sort_keys=True)
    return len(entries)


def import_decisions(path: str, store: str | None = None) -> int:
    """Merge the decisions exported to ``path`` into ``store`` (default: this
    machine's). Keys name the device kind and torch version, so decisions of another
    kind are kept but never used here. Returns how many were imported."""
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path} is not a ger decision export: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("decisions"), dict):
        raise ValueError(f"{path} is not a ger decision export of format {FORMAT}")
    for k, e in data["decisions"].items():
        try:
            _decision_from(e, k, "stored")
        except (KeyError, TypeError, ValueError) as why:
            raise ValueError(f"{path}: entry {k!r} is not a decision ({why})") from None
    save(store or default_store_path(), data["decisions"])
    _memo.clear()
    return len(data["decisions"])


def clear_decisions(store: str | None = None) -> None:
    """Forget every decision (the store and this process's memo)."""
    path = store or default_store_path()
    with _locked(path):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    _memo.clear()


def fits(device: torch.device, nbytes: int) -> bool:
    """Whether ``nbytes`` more can be allocated on ``device`` now (free device memory on
    CUDA, MemAvailable on Linux CPUs; True where neither is known): a measurement must
    never run a model out of the memory a fused form saves it."""
    try:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return nbytes <= free
        if device.type == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return nbytes <= int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        pass
    return True


# ----------------------------------------------------------------------------- deciding
_memo: dict[tuple[str, str], Decision] = {}


def lookup(key: str, store: str) -> Decision | None:
    """The decision for ``key`` from this process's memo or the store (an entry that is
    not a well-formed decision is ignored: measured afresh), or None."""
    hit = _memo.get((store, key))
    if hit is not None:
        return dataclasses.replace(hit, source="memo", seconds=0.0)
    entry = load(store).get(key)
    if entry is None:
        return None
    try:
        d = _decision_from(entry, key, "stored")
    except (KeyError, TypeError, ValueError) as e:
        log.warning("ger autotune: ignoring a malformed entry of %s (%s); measuring afresh", store, e)
        return None
    _memo[(store, key)] = d
    return d


def decide(family: str, key: str, measure: Callable[[], tuple[Timing, Timing]], store: str,
           fused_leaner: bool = True) -> Decision:
    """The decision for ``key``: from this process's memo, the store, or ``measure()``
    (which returns the two forms' timings, or raises: the caller falls back to its
    prior) and :func:`choose`. A new measurement is saved to the store. (``key`` must
    determine ``fused_leaner``: a stored decision is reused as it is.)"""
    d = lookup(key, store)
    if d is not None:
        return d
    t0 = time.perf_counter()
    ger, ind = measure()
    d = Decision(family, key, choose(ger, ind, fused_leaner=fused_leaner), ger, ind, "measured",
                 time.perf_counter() - t0)
    _memo[(store, key)] = d
    try:
        save(store, {key: {k: v for k, v in d.to_json_dict().items() if k not in ("key", "source", "seconds", "ratio")}})
    except OSError as e:
        log.warning("ger autotune: cannot write the decision store %s (%s)", store, e)
    log.info("ger autotune %s: %s", family, d.one_line())
    return d


def time_forms(steps: dict[str, Callable[[], Any]], device: torch.device, rounds: int = ROUNDS) -> dict[str, Timing]:
    """Each step timed in ``rounds`` interleaved rounds after two warm-up calls (the
    first compiles a lazily compiled backward), with ``measure.time_step`` (CUDA events
    on CUDA); per round as many calls as fit ``ROUND_SECONDS`` (at least one). Two forms
    whose samples are far apart after ``MIN_ROUNDS`` rounds stop there (``_decided``).
    Where every step takes a round of its own (one call of at least ``ROUND_SECONDS``),
    the estimating calls are the first round (a large lm head's step takes seconds: one
    call fewer per form)."""
    est_ms = {name: time_step(step, device, 1, 1)[0] for name, step in steps.items()}
    est = {n: t / 1e3 for n, t in est_ms.items()}
    repeat = {n: max(1, min(MAX_REPEAT, int(ROUND_SECONDS / max(t, 1e-6)))) for n, t in est.items()}
    # slow steps: fewer rounds (at least 3), so one measurement stays within ~4 s of calls
    per_round = sum(repeat[n] * est[n] for n in steps)
    rounds = max(3, min(rounds, int(4.0 / max(per_round, 1e-6))))
    slow = all(r == 1 for r in repeat.values())
    samples: dict[str, list[float]] = {n: [est_ms[n]] if slow else [] for n in steps}
    for r in range(1 if slow else 0, rounds):
        for name, step in steps.items():
            samples[name] += time_step(step, device, 0, repeat[name])
        if r + 1 >= MIN_ROUNDS and r + 1 < rounds and _decided(samples):
            break
    return {n: Timing(statistics.median(s), min(s), max(s), len(s)) for n, s in samples.items()}


#: rounds before a measurement may stop early, and the gap that stops it: every call of
#: the faster form beat every call of the slower, and the medians differ by more than
#: this fraction (three times the tie tolerance): more rounds would not change the choice
MIN_ROUNDS = 3
DECIDED_GAP = 3 * TOLERANCE


def _decided(samples: dict[str, list[float]]) -> bool:
    """Whether two forms' samples so far leave no doubt which is faster (see DECIDED_GAP)."""
    if len(samples) != 2:
        return False
    a, b = sorted(samples.values(), key=statistics.median)
    return max(a) < min(b) and statistics.median(a) < statistics.median(b) * (1.0 - DECIDED_GAP)


def compile_and_time(forms: dict[str, tuple], device: torch.device, config_patches: dict[str, Any]) -> dict[str, Timing]:
    """Compile each form ``(graph, inputs, finish[, wrap])`` with Inductor
    (``config_patches`` as ger's backend uses them) and time
    ``finish(wrap(compiled)(*inputs))`` (``finish`` runs the backward, or nothing;
    ``wrap``, when given and not None, is what the backend applies to the compiled graph).
    Runs inside the backend's own compile, isolated from it."""
    with _compat.isolated_compile(), _compat.no_compiled_autograd():
        steps = {}
        for name, (gm, inputs, finish, *rest) in forms.items():
            fn = _compat.compile_fx_standalone(gm, inputs, config_patches)
            if rest and rest[0] is not None:
                fn = rest[0](fn)

            def step(fn=fn, inputs=inputs, finish=finish):
                finish(fn(*inputs))

            steps[name] = step
        return time_forms(steps, device)


# ----------------------------------------------------------------------------- whole graphs
#: the family of a whole-graph decision (an inference graph whose rewrites interact
#: through Inductor's fusions across sites, so they are timed together)
GRAPH_FAMILY = "graph"


def compile_context(config_patches: dict[str, Any]) -> dict[str, Any]:
    """What besides the graph shapes the compiled code and its speed, for a decision's key:
    Inductor's settings as the backend patches them (the mode's, the option
    ``inductor_config``; functions and the list of cacheable helpers left out), the
    autocast state and the thread count."""
    skip = {_compat.mark_cacheable_functions_key()}  # (ger's helpers for the caches: its sources hash is keyed apart)
    cfg = {k: repr(v) for k, v in sorted(config_patches.items()) if not callable(v) and k not in skip}
    return {"config": cfg, "autocast": _compat.autocast_state(), "threads": torch.get_num_threads()}


def graph_shape_class(code: str, example_inputs, options_key: str, sources: str,
                      context: dict[str, Any] | None = None) -> dict[str, Any]:
    """The shape class of a whole graph: a hash of its code (before ger's passes), of its
    inputs' shapes, strides, dtypes and requires_grad, of the grad mode (the same code
    compiles to an inference graph or a forward and a backward), of ``context``
    (:func:`compile_context`), of the options that
    shape ger's rewrites and of ger's sources (a changed ger measures again)."""
    import hashlib

    meta = [(tuple(x.shape), tuple(x.stride()), str(x.dtype), x.device.type, x.requires_grad)
            if isinstance(x, torch.Tensor) else repr(x) for x in example_inputs]
    grad = torch.is_grad_enabled()
    digest = hashlib.sha256(json.dumps([code, meta, grad, options_key, sources, context or {}], default=str,
                                       sort_keys=True).encode()).hexdigest()
    return {"graph": digest[:32], "inputs": len(meta), "grad": grad}


def _twin(x: Any) -> Any:
    """A written tensor input's stand-in for the timing calls: the same sizes, strides,
    dtype, device and requires_grad, the same values, its own storage (a graph that
    writes its inputs - a train BN's running statistics - writes the twin; a backward
    accumulates into the twin's .grad). An input whose elements overlap (a stride-0
    ``expand``) gets a copy of the memory its elements span, viewed alike."""
    if not isinstance(x, torch.Tensor):
        return x
    with torch.no_grad():
        if x.numel() and _compat.has_internal_overlap(x):
            extent = 1 + sum((n - 1) * st for n, st in zip(x.size(), x.stride()))
            flat = torch.empty(extent, dtype=x.dtype, device=x.device)
            flat.copy_(x.as_strided((extent,), (1,), x.storage_offset()))
            t = flat.as_strided(x.size(), x.stride())
        else:
            t = torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=x.device)
            t.copy_(x)
    return t.requires_grad_(x.requires_grad)


def _alias(x: Any) -> Any:
    """An input the graph does not write: the timing calls read its storage (no copy) as
    a leaf of its own, so a backward accumulates into the stand-in's .grad, never the
    user's."""
    if not isinstance(x, torch.Tensor):
        return x
    return x.detach().requires_grad_(x.requires_grad)


def twin_bytes(example_inputs: list, written: set[int] | None) -> int:
    """Bytes the timing calls' copies of the written inputs take (``written``: their
    indices; None: every input)."""
    return sum(x.numel() * x.element_size() for i, x in enumerate(example_inputs)
               if isinstance(x, torch.Tensor) and (written is None or i in written))


def compile_and_time_graphs(forms: dict[str, Any], example_inputs: list, device: torch.device,
                            compile_fn: Callable[[str, Any, list], Callable[..., Any]],
                            on_call: Callable[[str], None] = lambda name: None,
                            written: set[int] | None = None,
                            ) -> tuple[dict[str, Timing], dict[str, Callable[..., Any]]]:
    """Whole graphs: compile each form with ``compile_fn(name, graph, example_inputs)``
    (the real example inputs, so the compiled code's assumptions are the graph's own)
    and time a call on stand-ins of the inputs, with a backward (of ones) of every output
    that requires grad, in interleaved rounds. The forms share one set of stand-ins:
    copies (:func:`_twin`) of the inputs a form may write (``written``: their indices;
    None: all), the others read in place (:func:`_alias`). ``on_call(name)`` runs after
    each compile and each call (a lazily compiled backward belongs to that form).
    Then one more call of each with its allocations recorded (``peak_mib``: a form that
    allocates more than the other beyond the memory tolerance is not kept, see
    :func:`choose`). Returns the timings and the compiled callables. Inside the
    backend's compile, isolated from it, with the RNG states forked."""
    with _compat.isolated_compile(), _compat.fork_rng(device), _compat.no_compiled_autograd():
        compiled: dict[str, Callable[..., Any]] = {}
        for name, gm in forms.items():
            compiled[name] = compile_fn(name, gm, list(example_inputs))
            on_call(name)
        stand_ins = [_twin(x) if written is None or i in written else _alias(x)
                     for i, x in enumerate(example_inputs)]

        def step(name: str) -> None:
            out = compiled[name](*stand_ins)
            leaves = [o for o in _compat.tree_leaves(out) if isinstance(o, torch.Tensor) and o.requires_grad]
            if leaves:
                torch.autograd.backward(leaves, [torch.ones_like(o) for o in leaves])
                for t in stand_ins:
                    if isinstance(t, torch.Tensor):
                        t.grad = None
            on_call(name)

        timings = time_forms({name: (lambda name=name: step(name)) for name in forms}, device)
        for name in forms:  # one more call each, its allocations recorded
            peak = peak_alloc_bytes(lambda name=name: step(name), device)
            if peak is not None:
                timings[name] = dataclasses.replace(timings[name], peak_mib=peak / 2**20)
    return timings, compiled
