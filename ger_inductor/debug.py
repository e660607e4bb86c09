"""Reports, graph dumps, TORCH_LOGS / TORCH_TRACE integration.

* :class:`GraphReport` - one per graph ``ger`` compiles: device profile, passes run,
  matches and near-misses per pattern, fallbacks with their causes, timings. The
  latest is :func:`last_report`; :func:`reports` keeps the last :data:`MAX_REPORTS`.
* :class:`GraphDumper` - with ``dump_dir`` set, each compiled graph gets a folder
  holding the graph before/after every pass (readable FX text + unified diff), the
  report as JSON and Inductor's output code.
* Logging: the module logger ``ger_inductor`` (``TORCH_LOGS="+ger_inductor"``) logs a
  one-line summary per graph at INFO and the graphs at DEBUG. The artifact
  ``ger_graphs`` (registered when ger_inductor is imported) logs the graphs alone; torch
  parses ``TORCH_LOGS`` at ``import torch``, before any package can register an artifact,
  so it is enabled from Python: ``torch._logging.set_logs(modules={"ger_graphs": True,
  "ger_inductor": logging.INFO})``. Every graph and report is also a ``TORCH_TRACE``
  artifact (``ger_<stage>_graph``, ``ger_report``) that tlparse shows beside Inductor's.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import itertools
import json
import logging
import os
import re
import shutil
import threading
import time
from typing import Any

import torch

from . import _compat

log = logging.getLogger("ger_inductor")

GRAPHS_ARTIFACT = "ger_graphs"
MAX_REPORTS = 64

_artifact_log: logging.Logger | None = None


def _graphs_log() -> logging.Logger:
    global _artifact_log
    if _artifact_log is None:
        _compat.register_log_artifact(GRAPHS_ARTIFACT, "ger_inductor: graphs before/after each ger pass")
        _artifact_log = _compat.artifact_logger(__name__, GRAPHS_ARTIFACT)
    return _artifact_log


_graphs_log()  # register the artifact now, so set_logs can name it before the first compile


# ----------------------------------------------------------------------------- report
@dataclasses.dataclass
class Match:
    family: str
    pattern: str
    nodes: list[str]
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class NearMiss:
    family: str
    pattern: str
    node: str
    reason: str


@dataclasses.dataclass
class Guard:
    """A condition on symbolic sizes that a ger pass added to Dynamo's shape environment
    (a guard: a size that violates it compiles another graph)."""

    family: str
    condition: str  # the sympy expression, e.g. "Eq(s1, s0)"
    why: str


@dataclasses.dataclass
class Fallback:
    stage: str  # graph | forward | inference | backward | region | pass:<name>
    reason: str
    node: str | None = None
    op: str | None = None
    exc_type: str | None = None
    message: str | None = None

    def one_line(self) -> str:
        where = f" node={self.node}" if self.node else ""
        op = f" op={self.op}" if self.op else ""
        exc = f" [{self.exc_type}: {self.message}]" if self.exc_type else ""
        return f"{self.stage}:{where}{op} {self.reason}{exc}"


@dataclasses.dataclass
class PassRecord:
    name: str
    seconds: float
    changed: bool
    matches: list[Match] = dataclasses.field(default_factory=list)
    near_misses: list[NearMiss] = dataclasses.field(default_factory=list)
    strategy: dict[str, Any] = dataclasses.field(default_factory=dict)
    guards: list[Guard] = dataclasses.field(default_factory=list)


_graph_counter = itertools.count()


@dataclasses.dataclass
class GraphReport:
    """What ger did with one graph. Print it for a table; ``to_json()`` for tools."""

    graph_id: int
    name: str
    devices: list[str]
    profile: dict[str, Any] | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    mode: str | None = None
    passes: list[PassRecord] = dataclasses.field(default_factory=list)
    fallbacks: list[Fallback] = dataclasses.field(default_factory=list)
    eager_nodes: list[str] = dataclasses.field(default_factory=list)
    regions: int = 0
    compile_seconds: float = 0.0
    backward_compile_seconds: float = 0.0
    region_compile_seconds: float = 0.0  # regions around eager nodes compile at their first call
    inductor: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    symbolic_inputs: list[str] = dataclasses.field(default_factory=list)
    #: what ger changed in Inductor's settings or lowering for a graph with symbolic
    #: sizes, and why (shapes.py): {setting: reason}
    dynamic_shapes: dict[str, str] = dataclasses.field(default_factory=dict)
    dump_path: str | None = None
    #: dump files that could not be written (the compile goes on without them)
    dump_errors: list[str] = dataclasses.field(default_factory=list)
    #: measured strategy selection (autotune.py): one entry per site, with both timings
    decisions: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    #: compile time spent measuring (included in compile_seconds)
    autotune_seconds: float = 0.0

    # ---- recording
    @property
    def matches(self) -> list[Match]:
        return [m for p in self.passes for m in p.matches]

    @property
    def near_misses(self) -> list[NearMiss]:
        return [m for p in self.passes for m in p.near_misses]

    @property
    def guards(self) -> list[Guard]:
        """Conditions on symbolic sizes ger's passes added (none where a rewrite is
        valid for every size)."""
        return [g for p in self.passes for g in p.guards]

    def match_count(self, family: str | None = None, pattern: str | None = None) -> int:
        return sum(
            1
            for m in self.matches
            if (family is None or m.family == family) and (pattern is None or m.pattern == pattern)
        )

    def add_decision(self, node: str, decision: Any) -> None:
        """Record a measured selection (``autotune.Decision``) made at ``node``."""
        self.decisions.append({"family": decision.family, "node": node, "summary": decision.one_line(),
                               **decision.to_json_dict()})
        self.autotune_seconds += decision.seconds

    def add_fallback(self, stage: str, reason: str, exc: BaseException | None = None, node=None, op=None) -> Fallback:
        fb = Fallback(
            stage=stage,
            reason=reason,
            node=None if node is None else str(node),
            op=None if op is None else str(op),
            exc_type=None if exc is None else type(exc).__name__,
            message=None if exc is None else _short(str(exc)),
        )
        self.fallbacks.append(fb)
        log.warning("ger fell back to eager (graph %s): %s", self.name, fb.one_line())
        return fb

    # ---- output
    def to_json_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["match_count"] = len(self.matches)
        d["near_miss_count"] = len(self.near_misses)
        d["guards"] = [dataclasses.asdict(g) for g in self.guards]
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_json_dict(), indent=indent, default=str, sort_keys=False)

    def table(self) -> str:
        prof = self.profile or {}
        lines = [
            f"ger report: graph {self.name} on {', '.join(self.devices) or '?'}"
            f" (profile {prof.get('name', '?')}, {self.compile_seconds:.2f}s"
            + (f" + backward {self.backward_compile_seconds:.2f}s" if self.backward_compile_seconds else "")
            + (f", measuring {self.autotune_seconds:.2f}s" if self.autotune_seconds else "")
            + ")",
        ]
        rows = [("pass", "matches", "near-misses", "time")]
        for p in self.passes:
            rows.append((p.name, str(len(p.matches)), str(len(p.near_misses)), f"{p.seconds * 1e3:.1f} ms"))
        lines += _format_rows(rows)
        for m in self.matches:
            det = ", ".join(f"{k}={v}" for k, v in m.detail.items())
            lines.append(f"  match     {m.family}/{m.pattern} at {', '.join(m.nodes[:4])}{'…' if len(m.nodes) > 4 else ''}" + (f" ({det})" if det else ""))
        for n in self.near_misses:
            lines.append(f"  near-miss {n.family}/{n.pattern} at {n.node}: {n.reason}")
        if self.symbolic_inputs:
            lines.append(f"  symbolic  {'; '.join(self.symbolic_inputs)}")
        for g in self.guards:
            lines.append(f"  guard     {g.family}: {g.condition} ({g.why})")
        for k, why in self.dynamic_shapes.items():
            lines.append(f"  dynamic   {k}: {why}")
        for p in self.passes:
            if p.strategy:
                lines.append(f"  strategy  {p.name}: " + ", ".join(f"{k}={v}" for k, v in p.strategy.items()))
        for d in self.decisions:
            lines.append(f"  selected  {d['family']} at {d['node']}: {d['summary']}")
        if self.eager_nodes:
            lines.append(f"  eager     {len(self.eager_nodes)} node(s) in {self.regions} compiled region(s): {', '.join(self.eager_nodes[:6])}")
        for f in self.fallbacks:
            lines.append(f"  fallback  {f.one_line()}")
        if not self.fallbacks:
            lines.append("  fallbacks none")
        for i in self.inductor:
            lines.append(f"  inductor  {i.get('kind')}: cache {i.get('cache', '?')}" + (f", {i['kernels']} kernel(s)" if i.get("kernels") is not None else ""))
        if self.dump_path:
            lines.append(f"  dumps     {self.dump_path}")
        for e in self.dump_errors:
            lines.append(f"  dump      not written: {e}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _format_rows(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _short(msg: str, limit: int = 500) -> str:
    msg = msg.strip()
    return msg if len(msg) <= limit else msg[:limit] + "…"


_reports: collections.deque[GraphReport] = collections.deque(maxlen=MAX_REPORTS)
_reports_lock = threading.Lock()
_kept_count = 0  # reports made and not dropped, all of them (the deque keeps the last MAX_REPORTS)


def new_report(name: str, devices: list[str], options: dict[str, Any], mode: str | None) -> GraphReport:
    rep = GraphReport(graph_id=next(_graph_counter), name=name, devices=devices, options=options, mode=mode)
    global _kept_count
    with _reports_lock:
        _reports.append(rep)
        _kept_count += 1
    return rep


def drop_report(rep: GraphReport) -> None:
    """Forget the report of a compile attempt Dynamo throws away (it restarts tracing)."""
    global _kept_count
    with _reports_lock:
        _kept_count -= 1
        try:
            _reports.remove(rep)
        except ValueError:
            pass


def last_report() -> GraphReport | None:
    """The report of the graph ger compiled last in this process (None before any).

    >>> import torch, ger_inductor
    >>> f = torch.compile(lambda x: x.relu() + 1, backend="ger")
    >>> _ = f(torch.randn(4))
    >>> ger_inductor.last_report().fallbacks
    []
    """
    with _reports_lock:
        return _reports[-1] if _reports else None


def report_count() -> int:
    """How many graphs ger has compiled in this process (:func:`reports` keeps the last
    :data:`MAX_REPORTS` of them)."""
    with _reports_lock:
        return _kept_count


def reports() -> list[GraphReport]:
    """Reports of the last graphs ger compiled in this process, oldest first."""
    with _reports_lock:
        return list(_reports)


def clear_reports() -> None:
    with _reports_lock:
        _reports.clear()


# ----------------------------------------------------------------------------- dumps
def graph_text(gm: torch.fx.GraphModule) -> str:
    """Readable FX text, stable across runs (no object ids)."""
    text = gm.print_readable(print_output=False)
    return re.sub(r" +\n", "\n", text)


class GraphDumper:
    """Writes one folder per graph under ``dump_dir``; a no-op without it.

    Layout: ``graph_<id>_<name>/00_input.py``, ``NN_<pass>.py`` (after each pass),
    ``NN_<pass>.diff``, ``report.json``, ``inductor_<kind>_<n>.py``; under
    ``rank<r>/`` in a process group of more than one rank.

    The folder is made at the first write, emptied of an earlier run's files. A file
    that cannot be written (a full disk, a ``dump_dir`` that is a file) never changes
    the compile: it is logged and listed in the report's ``dump_errors``, and the rest
    of that graph's dump is skipped; with ``strict`` the error is raised.
    """

    def __init__(self, root: str | None, report: GraphReport, strict: bool = False):
        self.report = report
        self.strict = strict
        self.step = 0
        self.last_text: str | None = None
        self.last_name = "input"
        self.path: str | None = None
        self._made = False
        if root:
            rank = _rank()
            if rank is not None:  # the ranks of a job number their graphs alike: one folder each
                root = os.path.join(root, f"rank{rank}")
            self.path = os.path.join(root, f"graph_{report.graph_id:03d}_{_safe(report.name)}")
            report.dump_path = self.path

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def _want_text(self) -> bool:
        return self.enabled or log.isEnabledFor(logging.DEBUG) or _graphs_log().isEnabledFor(logging.DEBUG)

    def graph(self, stage: str, gm: torch.fx.GraphModule) -> None:
        """Record the graph after ``stage`` (``input`` first), with a diff to the previous."""
        _compat.trace_structured(f"ger_{stage}_graph", lambda: graph_text(gm))
        if not self._want_text():
            return
        text = graph_text(gm)
        _graphs_log().debug("ger graph %s after %s:\n%s", self.report.name, stage, text)
        log.debug("ger graph %s after %s:\n%s", self.report.name, stage, text)
        if self.enabled:
            self.write(f"{self.step:02d}_{_safe(stage)}.py", text)
            if self.last_text is not None:
                diff = "".join(
                    difflib.unified_diff(
                        self.last_text.splitlines(keepends=True),
                        text.splitlines(keepends=True),
                        fromfile=f"before_{self.last_name}",
                        tofile=f"after_{stage}",
                    )
                )
                self.write(f"{self.step:02d}_{_safe(stage)}.diff", diff or "(no change)\n")
        self.last_text, self.last_name = text, stage
        self.step += 1

    def inductor_code(self, kind: str, source: str | None, cache_key: str | None) -> str | None:
        """Write Inductor's output code; the file's name (None where nothing was written)."""
        if not self.enabled or source is None:
            return None
        n = sum(1 for i in self.report.inductor if i.get("kind") == kind)
        name = f"inductor_{kind}_{n}.py"
        self.write(name, f"# Inductor output code ({kind}), FX graph cache key {cache_key}\n" + source)
        return name if self.enabled else None

    def set_aside(self, name: str, form: str) -> str | None:
        """Rename a written file ``x.py`` to ``x.rejected_<form>_form.py`` (a measured form
        that was not kept)."""
        if not self.enabled:
            return None
        stem, ext = os.path.splitext(name)
        new = f"{stem}.rejected_{form}_form{ext}"
        try:
            os.replace(os.path.join(self.path, name), os.path.join(self.path, new))
        except OSError as e:
            if self.strict:
                raise
            self.report.dump_errors.append(f"renaming {name}: {type(e).__name__}: {e}")
            return None
        return new

    def finish(self) -> None:
        _compat.trace_structured("ger_report", lambda: self.report.to_json(), encoding="json")
        if self.enabled:
            self.write("report.json", self.report.to_json())
            self.write("report.txt", self.report.table() + "\n")

    def write(self, name: str, text: str) -> None:
        """Write ``name`` in this graph's folder (nothing once a write has failed)."""
        if self.path is None:
            return
        try:
            if not self._made:
                _fresh_dir(self.path)
                self._made = True
            with open(os.path.join(self.path, name), "w") as f:
                f.write(text)
        except OSError as e:
            if self.strict:
                raise
            self.report.dump_errors.append(f"{os.path.join(self.path, name)}: {type(e).__name__}: {e}")
            log.warning("ger could not write its dump of graph %s (%s); the rest of it is skipped",
                        self.report.name, e)
            self.path = None  # (the report keeps dump_path: where it would have been)

    def discard(self) -> None:
        """Remove this graph's folder: Dynamo threw the graph away (it traces again)."""
        if self.path is not None and self._made:
            shutil.rmtree(self.path, ignore_errors=True)
        self.path = None


def _rank() -> int | None:
    """This process's rank in an initialised process group of more than one rank."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank()
    return None


def _fresh_dir(path: str) -> None:
    """Make ``path``; remove the files an earlier run left in it (a graph folder is one
    compile's, and graph ids restart with each process)."""
    os.makedirs(path, exist_ok=True)
    for entry in os.scandir(path):
        if entry.is_file(follow_symlinks=False) or entry.is_symlink():
            os.unlink(entry.path)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60] or "graph"


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def summary_line(report: GraphReport) -> str:
    return (
        f"ger compiled graph {report.name}: {len(report.matches)} match(es), "
        f"{len(report.near_misses)} near-miss(es), {len(report.fallbacks)} fallback(s), "
        f"{report.compile_seconds:.2f}s"
    )
