"""The ordered pipeline of ger's graph passes.

Pattern families run on the Dynamo graph (torch IR) before AOTAutograd, one module
per family (``passes/<family>.py`` exposing ``run(gm, ctx) -> bool``), in the order of
:data:`ger_inductor.options.PASS_FAMILIES`. Each pass records matches and near-misses
in the report through its :class:`PassContext`; the graph is dumped after every pass.
A pass that raises has its changes dropped (the graph is restored from a copy) and
the failure recorded; ``strict`` re-raises.

:class:`GerPostGradPass` is the ``CustomGraphPass`` ger installs in Inductor's
post-grad hook: it runs the named :data:`POST_GRAD_PASSES` (dynamic-shape
convolution backward kept as ATen's kernel), dumps the ATen graphs Inductor lowers, and its ``uuid()`` - a hash
of ger's codegen-relevant sources, the options and the device profile - keys
Inductor's FX graph and AOTAutograd caches, so an edit to a lowering never serves
stale code and equal options hit the cache.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import json
import os
from typing import Any

import torch
import torch.fx as fx

from .. import _compat, shapes
from ..debug import Guard, GraphDumper, GraphReport, Match, NearMiss, PassRecord, Timer
from ..fleet import DeviceProfile
from ..options import PASS_FAMILIES, GerOptions


@dataclasses.dataclass
class PassContext:
    """What a pattern pass may read (options, profile) and where it records."""

    options: GerOptions
    profile: DeviceProfile
    report: GraphReport
    record: PassRecord | None = None
    #: nodes that must run eagerly (eager_ops, devices without Inductor) -> why;
    #: passes leave them alone
    eager: dict = dataclasses.field(default_factory=dict)
    #: Inductor settings the backend's mode implies (a measurement compiles with them)
    mode_patches: dict = dataclasses.field(default_factory=dict)

    def eager_reason(self, node) -> str | None:
        return self.eager.get(node)

    def match(self, pattern: str, nodes, **detail: Any) -> None:
        assert self.record is not None
        self.record.matches.append(
            Match(self.record.name, pattern, [getattr(n, "name", str(n)) for n in nodes], {k: _jsonable(v) for k, v in detail.items()})
        )

    def near_miss(self, pattern: str, node, reason: str) -> None:
        assert self.record is not None
        self.record.near_misses.append(NearMiss(self.record.name, pattern, getattr(node, "name", str(node)), reason))

    def decision(self, node, decision) -> None:
        """Record a measured selection (``autotune.Decision``) made at ``node``."""
        self.report.add_decision(getattr(node, "name", str(node)), decision)

    def strategy(self, **choices: Any) -> None:
        assert self.record is not None
        self.record.strategy.update({k: _jsonable(v) for k, v in choices.items()})

    def guard(self, cond: Any, why: str) -> bool:
        """Require a condition on sizes (a bool or SymBool) for a rewrite: True when it
        holds for every admitted size (nothing added); for symbolic sizes whose current
        values satisfy it, a guard through the shape environment (``torch._check``),
        recorded in the report; False when the current sizes violate it (no rewrite)."""
        assert self.record is not None
        if shapes.known_true(cond):
            return True
        if not isinstance(cond, torch.SymBool):
            return bool(cond)
        if not _compat.guard_hint(cond):
            return False
        audit = shapes.GuardAudit(cond.node.shape_env)
        torch._check(cond)
        for text in audit.added() or [str(cond.node.expr)]:
            self.record.guards.append(Guard(self.record.name, text, why))
        return True


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


def snapshot_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` to restore if a pass fails (node meta shared, not copied).

    ``Graph`` deep copies drop attributes Dynamo sets on nodes (``_dynamo_source`` on
    placeholders, which AOTAutograd needs); they are carried over here.
    """
    new = copy.deepcopy(graph)
    for old_node, new_node in zip(graph.nodes, new.nodes):
        for k, v in vars(old_node).items():
            if k not in vars(new_node):
                setattr(new_node, k, v)
    return new


def fill_example_values(gm: fx.GraphModule) -> None:
    """Fake values (``meta["example_value"]``) for the nodes a pass inserted, computed
    under the graph's fake mode: dumps show their shapes and dtypes, and AOTAutograd's
    cache sees tensors where it checks for them."""
    vals = [n.meta["example_value"] for n in gm.graph.nodes if "example_value" in n.meta]
    fake_mode = _compat.fake_mode_of(_compat.tree_leaves(vals))
    if fake_mode is None:
        return
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method") or "example_value" in n.meta:
            continue
        try:
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: a.meta["example_value"])
            with fake_mode:
                if n.op == "call_function":
                    n.meta["example_value"] = n.target(*args, **kwargs)
                else:
                    n.meta["example_value"] = getattr(args[0], n.target)(*args[1:], **kwargs)
        except Exception:  # a value we cannot fake: the node simply has no meta
            continue


def graph_functions() -> list:
    """The Python functions the pattern passes insert into graphs (``GRAPH_FUNCTIONS``
    of each family module): marked cacheable for AOTAutograd, keyed by ger's sources."""
    out = []
    for name in PASS_FAMILIES:
        out.extend(getattr(family_module(name), "GRAPH_FUNCTIONS", ()))
    return out


def cacheable_functions_patch() -> dict:
    """``config_patches`` entry that lets AOTAutograd cache graphs holding ger's helpers."""
    key = _compat.mark_cacheable_functions_key()
    cfg = _compat.inductor_config()
    if not hasattr(cfg, key):
        return {}
    marked = dict(getattr(cfg, key))
    for fn in graph_functions():
        marked[f"{fn.__module__}.{fn.__name__}"] = _sources_hash()
    return {key: marked}


def family_module(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def run_pipeline(gm: fx.GraphModule, ctx: PassContext, dumper: GraphDumper) -> None:
    dumper.graph("input", gm)
    shape_env = shapes.graph_shape_env(gm)
    for name in PASS_FAMILIES:
        if not ctx.options.pass_enabled(name):
            continue
        record = PassRecord(name=name, seconds=0.0, changed=False)
        ctx.report.passes.append(record)
        ctx.record = record
        snapshot = snapshot_graph(gm.graph)
        audit = shapes.GuardAudit(shape_env)
        timer = Timer()
        try:
            record.changed = bool(family_module(name).run(gm, ctx))
            if record.changed:
                fill_example_values(gm)
            gm.graph.lint()
            gm.recompile()
        except Exception as e:
            if ctx.options.strict:
                raise
            gm.graph = snapshot
            gm.recompile()
            record.matches.clear()
            record.near_misses.clear()
            record.strategy.clear()
            ctx.report.add_fallback(f"pass:{name}", f"pass {name} raised; its rewrites were dropped", exc=e)
        record.seconds = timer.elapsed()
        # guards the pass added besides the ones it asked for: the report lists them all
        asked = {g.condition for g in record.guards}
        for cond in audit.added():
            if cond not in asked:
                record.guards.append(Guard(name, cond, "added while the pass ran (a size comparison)"))
        ctx.record = None
        dumper.graph(name, gm)
    _protect_saved_logits(gm, ctx)
    _note_subgraph_patterns(gm, ctx)


#: parts of op names that mark a family's pattern inside a higher-order op's subgraph
_SUBGRAPH_MARKS = {
    "conv_bn_act": ("batch_norm",),
    "loss_entropy": ("cross_entropy", "softmax", "kl_div", "nll_loss"),
}


def _note_subgraph_patterns(gm: fx.GraphModule, ctx: PassContext) -> None:
    """A near-miss for each family whose ops sit inside a higher-order op's subgraph (an
    activation-checkpointed region, a ``torch.cond`` branch, ...): the passes rewrite
    the graph's own nodes only, so those run as Inductor compiles them; said rather than
    left silent (review, stop 37)."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or not _compat.is_higher_order_op(node.target):
            continue
        subs = [getattr(gm, a.target, None) for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"]
        names = [n.target if isinstance(n.target, str) else _compat.op_display_name(n.target)
                 for sub in subs if isinstance(sub, fx.GraphModule)
                 for n in sub.graph.nodes if n.op in ("call_function", "call_method")]
        hop = _compat.op_display_name(node.target)
        for family, marks in _SUBGRAPH_MARKS.items():
            rec = next((r for r in ctx.report.passes if r.name == family), None)
            if rec is None or not any(m in name for name in names for m in marks):
                continue
            rec.near_misses.append(NearMiss(family, "subgraph", node.name,
                                            f"ops of this family inside a higher-order op's subgraph ({hop}: an "
                                            "activation-checkpointed region, a torch.cond branch, ...): ger's passes "
                                            "rewrite the graph's own nodes only; they run as Inductor compiles them"))


def _protect_saved_logits(gm: fx.GraphModule, ctx: PassContext) -> None:
    """After every family ran (the lm head pass may have fused a loss whose logits are
    returned): the loss ops that would save logits the graph also returns read a copy
    (``loss_entropy.protect_saved_logits``); recorded in the loss pass's strategy."""
    record = next((r for r in ctx.report.passes if r.name == "loss_entropy"), None)
    if record is None:
        return
    copied = family_module("loss_entropy").protect_saved_logits(gm)
    if copied:
        gm.graph.lint()
        gm.recompile()
        record.strategy["saved_logits"] = (f"copied for {', '.join(copied)}: the graph returns (or takes) the logits, and a write "
                                           "to them before the backward must not change the loss's gradient")


def detach_outputs(gm: fx.GraphModule):
    """Graph outputs whose autograd a pass attaches outside the compiled graph (the logits
    a fused lm head writes and returns: ``lm_head.detach_logits_outputs``): takes them out
    of ``gm`` and returns the function that wraps the compiled graph to attach it (None
    when there are none)."""
    return family_module("lm_head").detach_logits_outputs(gm)


# ----------------------------------------------------------------------------- inductor hook
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: files that cannot change generated code (CLI, reports/dumps)
_NOT_CODEGEN = {"__main__.py", "debug.py"}


@functools.cache
def codegen_source_files() -> tuple[str, ...]:
    out = []
    for root, _dirs, files in os.walk(_PKG_DIR):
        for f in sorted(files):
            if f.endswith(".py") and not (root == _PKG_DIR and f in _NOT_CODEGEN):
                out.append(os.path.join(root, f))
    return tuple(sorted(out))


@functools.cache
def _sources_hash() -> str:
    return _compat.get_hash_for_files(codegen_source_files()).hex()


#: passes on Inductor's post-grad ATen graphs, in order: (name, fn(graph) -> changed)
POST_GRAD_PASSES = (("convolution_backward", shapes.keep_conv_backward_symbolic),)
POST_GRAD_WHY = {"convolution_backward": shapes.CONV_BACKWARD_WHY}


def make_post_grad_pass(options: GerOptions, profile: DeviceProfile, dumper: GraphDumper):
    base = _compat.custom_graph_pass_base()

    class GerPostGradPass(base):  # type: ignore[misc, valid-type]
        """Dumps Inductor's post-grad graphs; keys Inductor's caches to ger's sources."""

        def __init__(self) -> None:
            self.count = 0

        def __call__(self, graph: fx.Graph) -> None:
            for name, fn in POST_GRAD_PASSES:
                if fn(graph):
                    dumper.report.dynamic_shapes[name] = POST_GRAD_WHY[name]
            if dumper.enabled:
                dumper.write(f"post_grad_{self.count}.py", str(graph))
            self.count += 1

        def uuid(self) -> Any:
            extra = json.dumps(
                {"options": options.cache_key(), "profile": profile.to_json_dict()}, sort_keys=True, default=str
            )
            return _sources_hash() + ":" + _compat.get_hash_for_files((), extra).hex()

    return GerPostGradPass()


# ----------------------------------------------------------------------------- whole-graph selection
def sources_hash() -> str:
    """A hash of ger's code-generating sources (keys caches and stored decisions)."""
    return _sources_hash()


def _graph_measured_patterns() -> frozenset:
    from . import conv_bn_act

    return frozenset({conv_bn_act.PATTERN_EVAL, conv_bn_act.PATTERN_BRANCHES, conv_bn_act.PATTERN_TRAIN})


def graph_selection_scope(gm: fx.GraphModule, example_inputs, options: GerOptions, report: GraphReport) -> str | None:
    """Whether the backend times this graph whole, with and without ger's rewrites
    (``backend._select_graph``): None when the conv family rewrote nothing in it
    (nothing to decide), "" when it is measured, else why not (the rewrites stay: the
    prior).

    Measured: graphs rewritten only by the conv family (eval and train), static sizes,
    real inputs on one device that share no storage, and no module attribute written in
    place (the timing calls run on twins of the inputs, so writes to inputs - a train
    BN's running statistics - and gradients land on the twins)."""
    from . import graph

    measured = _graph_measured_patterns()
    matches = report.matches
    if not any(m.pattern in measured for m in matches):
        return None
    if not options.autotune:
        return "autotune is off"
    if options.compiler != "inductor":
        return "not compiled by Inductor"
    others = sorted({f"{m.family}/{m.pattern}" for m in matches if m.pattern not in measured})
    if others:
        return f"the graph also holds {', '.join(others)} rewrites"
    inputs = list(example_inputs)
    if report.symbolic_inputs or not all(isinstance(x, (torch.Tensor, int, float, bool)) for x in inputs):
        return "symbolic sizes"
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    if any(_compat.is_traced_tensor(x) for x in tensors):
        return "no real inputs to time"
    if len({x.device for x in tensors}) != 1:
        return "inputs on several devices, or none"
    if len({_compat.storage_key(x) for x in tensors}) != len(tensors):
        return "inputs that share storage (their twins for the timing calls would not)"
    eff = graph.Effects(gm)
    if any(isinstance(r, tuple) for w in eff.writes.values() for r in w):
        return "the graph writes a module attribute in place (the timing calls would write it too)"
    return ""


def written_inputs(gms: list[fx.GraphModule]) -> set[int]:
    """Indices of the placeholders that any of ``gms`` (forms of one graph, placeholders
    alike) may write in place, through any alias (``graph.Effects``: an op of unknown
    effect counts as writing all it reads)."""
    from . import graph

    out: set[int] = set()
    for gm in gms:
        eff = graph.Effects(gm)
        written = frozenset().union(*eff.writes.values()) if eff.writes else frozenset()
        for i, p in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
            if eff.roots.get(p, frozenset()) & written:
                out.add(i)
    return out


def _conv_record(report: GraphReport) -> PassRecord | None:
    return next((r for r in report.passes if r.name == "conv_bn_act"), None)


def note_graph_selection(report: GraphReport, text: str) -> None:
    rec = _conv_record(report)
    if rec is not None:
        rec.strategy["graph_selection"] = text


def record_graph_decision(gm: fx.GraphModule, pristine: fx.Graph, report: GraphReport, decision, profile) -> None:
    """Record a whole-graph decision; where Inductor's form won, revert ``gm`` to the
    graph before ger's passes and turn the measured matches into near-misses."""
    from .. import autotune

    # (described first: nothing changes where a decision cannot be)
    why = (f"measured on {profile.name}, the whole graph: ger's conv rewrites are "
           + ("heavier (they allocate more)" if autotune.heavier(decision.ger, decision.inductor)
              else "slower" if decision.ratio > 1.0 else "not faster beyond noise")
           + f" here ({decision.one_line()}); Inductor's form is kept (option autotune=False keeps the rewrites)")
    report.add_decision("(graph)", decision)
    note_graph_selection(report, f"the whole graph, {decision.source}: {decision.choice}")
    if decision.choice == "ger":
        return
    gm.graph = snapshot_graph(pristine)
    gm.recompile()
    measured = _graph_measured_patterns()
    for rec in report.passes:
        kept = []
        for m in rec.matches:
            if m.pattern in measured:
                rec.near_misses.append(NearMiss(rec.name, m.pattern, m.nodes[0] if m.nodes else "(graph)", why))
            else:
                kept.append(m)
        rec.matches = kept
