"""The ``ger`` torch.compile backend: orchestration only.

    options -> profile -> rewrite passes -> eager cut -> Inductor -> report

No pattern, kernel or fallback logic lives here; see passes/, lowerings/, fallback.py.
Registered through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="ger")`` needs no import of ger_inductor.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch.fx as fx

from . import _compat, debug, fallback, fleet, passes, shapes
from .options import GerOptions

log = logging.getLogger("ger_inductor")

__all__ = ["ger", "rewrite"]


def _mode_patches(mode: str | None) -> dict[str, Any]:
    if mode is None or mode == "default":
        return {}
    if mode not in _compat.mode_names():
        raise ValueError(f"ger: unknown mode {mode!r}; valid modes: {', '.join(_compat.mode_names())}")
    return _compat.list_mode_options(mode)


def ger(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    mode: str | None = None,
    options: dict[str, Any] | GerOptions | None = None,
) -> Callable[..., Any]:
    """Compile a Dynamo graph: ger's pattern rewrites, then Inductor; eager on failure.

    >>> import torch
    >>> f = torch.compile(lambda x: torch.relu(x) * 2, backend="ger", options={"strict": True})
    >>> f(torch.ones(2)).tolist()
    [2.0, 2.0]
    """
    settings = GerOptions.parse(options)  # bad options raise here, before any work
    mode_patches = _mode_patches(mode)

    from . import lowerings

    lowerings.ensure_registered()

    devices = fleet.devices_of(_example_values(gm, example_inputs))
    report = debug.new_report(
        name=_graph_name(gm), devices=[str(d) for d in devices], options=settings.to_json_dict(), mode=mode
    )
    dumper = debug.GraphDumper(settings.dump_dir, report, strict=settings.strict)
    timer = debug.Timer()
    pristine = passes.snapshot_graph(gm.graph)
    functorch_depth = _compat.functorch_layer_depth()
    try:
        # (ger's compile-time work - fake runs of inserted ops, measurements - out of the
        # caller's saved-tensor hooks: a non-reentrant checkpoint around the first call
        # counted ger's fake tensors as its region's and raised at the backward)
        with _compat.neutral_saved_tensors_hooks():
            profile = _rewrite(gm, example_inputs, settings, report, dumper, devices, mode_patches)
        # graph outputs whose autograd must be attached outside the compiled graph
        reattach = passes.detach_outputs(gm)
        shape_patches, report.dynamic_shapes = shapes.inductor_patches(gm, example_inputs)

        config_patches = {
            **mode_patches,
            **fleet.inductor_patches(profile),
            **shape_patches,
            **passes.cacheable_functions_patch(),
            **dict(settings.inductor_config),
            "post_grad_custom_post_pass": passes.make_post_grad_pass(settings, profile, dumper),
        }
        inner = fallback.guarded_inner_compile(report, settings, dumper)

        def compile_region(region: fx.GraphModule, inputs: Sequence[Any]):
            if settings.compiler == "aot_eager":
                return _compat.aot_eager(region, list(inputs))
            return _compat.compile_fx(region, list(inputs), inner_compile=inner, config_patches=config_patches)

        eager_nodes = fallback.plan_eager_nodes(gm, settings)
        transform = fallback.functorch_node(gm) if eager_nodes else None
        blocker = fallback.cut_blocker(gm) if eager_nodes and transform is None else None
        measured = None
        if reattach is None and not eager_nodes:
            with _compat.neutral_saved_tensors_hooks():
                measured = _select_graph(gm, pristine, example_inputs, settings, profile, report, config_patches,
                                         inner, dumper)
        if measured is not None:
            compiled = measured  # the measurement compiled the chosen form already
        elif transform is not None:
            # a torch.func transform's levels span the whole graph: it cannot be cut
            # into regions compiled one by one, and the eager nodes must stay eager
            report.add_fallback(
                "functorch", "the graph holds torch.func transforms and nodes that must run eagerly; "
                "it cannot be cut into regions, so the whole graph runs eagerly", node=transform.name,
            )
            report.eager_nodes = [f"{n.name} ({reason})" for n, reason in eager_nodes.items()]
            compiled = gm.forward
        elif blocker is not None:
            node, what = blocker
            report.add_fallback("eager_cut", fallback.CUT_BLOCKED_WHY.format(what=what, node=node.name), node=node.name)
            report.eager_nodes = [f"{n.name} ({reason})" for n, reason in eager_nodes.items()]
            for rec in report.passes:  # the rewrites do not run: no match stands
                rec.matches = []
            gm.graph = pristine  # as written: eager's numbers, none of ger's rewrites
            gm.recompile()
            compiled = gm.forward
            reattach = None  # (the pristine graph returns its outputs with their autograd)
        elif eager_nodes:
            compiled: Callable[..., Any] = fallback.split_into_regions(
                gm, eager_nodes, compile_region, report, settings, dumper
            )
            dumper.graph("regions", compiled)  # type: ignore[arg-type]
        else:
            compiled = compile_region(gm, example_inputs)
        if reattach is not None:
            compiled = reattach(compiled)
    except _compat.dynamo_restart_exceptions():
        # Dynamo traces the frame again (e.g. with dynamic=True, after specialising float
        # hyper-parameters it first passed as symbols): not a failure, and this attempt's
        # report describes a graph that is thrown away
        _compat.restore_functorch_layer_depth(functorch_depth)
        debug.drop_report(report)
        dumper.discard()
        raise
    except Exception as e:
        # a trace that failed inside a torch.func transform leaves its levels pushed
        _compat.restore_functorch_layer_depth(functorch_depth)
        if settings.strict:
            raise
        gm.graph = pristine
        gm.recompile()
        for rec in report.passes:  # the graph runs as written: no rewrite stands
            rec.matches = []
        report.decisions = []
        report.add_fallback("graph", "compiling the graph failed; the whole graph runs eagerly", exc=e)
        compiled = gm.forward
    report.compile_seconds = timer.elapsed()
    dumper.finish()
    log.info(debug.summary_line(report))
    return compiled


def _select_graph(gm: fx.GraphModule, pristine: fx.Graph, example_inputs: Sequence[Any], settings: GerOptions,
                  profile: fleet.DeviceProfile, report, config_patches: dict[str, Any],
                  inner: Callable[..., Any], dumper) -> Callable[..., Any] | None:
    """Measured selection of a whole graph that only the conv family's rewrites changed:
    their gains and losses interact through Inductor's fusions across sites, so the
    graph is timed with and without them (``autotune.decide``; a tie keeps Inductor's
    form; a backward is timed with the forward where the graph needs one) and the slower
    form is dropped: ``gm`` reverts to the graph before ger's passes, the matches become
    near-misses. Both forms compile as the backend compiles (``inner``: the fallback
    guard, the report's Inductor entries, code dumps; the dropped form's code files are
    renamed ``*.rejected_<form>_form.py``, the graph that runs is dumped as the
    ``selection`` step); the timing calls run on twins of the inputs with the RNG states
    forked (``autotune.compile_and_time_graphs``), so no
    user tensor, gradient, running statistic or random stream is touched. Returns the
    chosen form's compiled callable when measured now (the caller uses it), else None
    (compile ``gm`` as it is)."""
    from . import autotune

    why = passes.graph_selection_scope(gm, example_inputs, settings, report)
    if why is None:
        return None
    if not why and config_patches.get("triton.cudagraphs"):
        why = "CUDA graphs (mode reduce-overhead) record the compiled graph at its first calls"
    if why:
        passes.note_graph_selection(report, f"prior ({why})")
        return None
    device = fleet.devices_of(list(example_inputs))[0]
    baseline = fx.GraphModule(gm, passes.snapshot_graph(pristine))
    rewritten = fx.GraphModule(gm, passes.snapshot_graph(gm.graph))
    shape_class = autotune.graph_shape_class(baseline.code, example_inputs, settings.cache_key(), passes.sources_hash(),
                                             autotune.compile_context(config_patches))
    key = autotune.site_key(autotune.GRAPH_FAMILY, profile, shape_class)
    store = autotune.store_path(settings.autotune_store)
    # the timing calls copy only the inputs a form may write (a train BN's statistics)
    written = passes.written_inputs([baseline, rewritten])
    compiled: dict[str, Callable[..., Any]] = {}
    n0 = len(report.inductor)

    def compile_form(name: str, form: fx.GraphModule, inputs: list) -> Callable[..., Any]:
        return _compat.compile_fx(form, inputs, inner_compile=inner, config_patches=config_patches)

    def tag(name: str) -> None:  # the report's Inductor entries (forward, lazy backward) by form
        for entry in report.inductor[n0:]:
            entry.setdefault("_form", name)

    def measure():
        # (only where no decision is stored or remembered)
        if not autotune.fits(device, autotune.twin_bytes(list(example_inputs), written)):
            raise autotune.NotMeasured("not enough free memory for the timing calls' copies of the inputs the "
                                       "graph writes")
        if device.type == "cpu" and _compat.profiler_active():
            raise autotune.NotMeasured("a profiler is recording: the timing calls would join its profile, and "
                                       "measuring memory would end its session")
        t, fns = autotune.compile_and_time_graphs({"ger": rewritten, "inductor": baseline}, list(example_inputs),
                                                  device, compile_form, tag, written)
        compiled.update(fns)
        return t["ger"], t["inductor"]

    try:
        d = autotune.decide(autotune.GRAPH_FAMILY, key, measure, store, fused_leaner=False)
        passes.record_graph_decision(gm, pristine, report, d, profile)
    except autotune.NotMeasured as e:
        passes.note_graph_selection(report, f"prior ({e})")
        return None
    except Exception as e:  # noqa: BLE001 - a failed measurement keeps the rewrites (the prior)
        if settings.strict:
            raise
        del report.inductor[n0:]
        report.add_fallback("autotune", "timing the graph with and without ger's conv rewrites failed; the "
                            "rewrites are kept (the prior)", exc=e)
        return None
    dumper.graph("selection", gm)  # the graph that runs (the one before ger's passes where Inductor's won)
    # measured now: only the kept form's Inductor entries describe this graph's code
    kept = []
    for e in report.inductor[n0:]:
        if e.pop("_form", d.choice) == d.choice:
            kept.append(e)
        elif e.get("dump_file"):
            dumper.set_aside(e["dump_file"], "ger" if d.choice == "inductor" else "inductor")
    report.inductor[n0:] = kept
    return compiled.get(d.choice)


def _rewrite(gm, example_inputs, settings: GerOptions, report, dumper, devices,
             mode_patches: dict[str, Any] | None = None) -> fleet.DeviceProfile:
    profile = fleet.select_profile(devices, settings.device_profile)
    report.profile = profile.to_json_dict()
    report.symbolic_inputs = shapes.symbolic_inputs(gm)
    transform = fallback.functorch_node(gm)
    if transform is not None:
        report.add_fallback("functorch", fallback.FUNCTORCH_WHY.format(op=transform.name), node=transform.name)
        return profile
    # nodes the user forces to eager (or devices without Inductor) are not rewritten
    ctx = passes.PassContext(settings, profile, report, eager=fallback.plan_eager_nodes(gm, settings),
                             mode_patches=dict(mode_patches or {}))
    passes.run_pipeline(gm, ctx, dumper)
    return profile


def rewrite(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    options: dict[str, Any] | GerOptions | None = None,
) -> tuple[fx.GraphModule, debug.GraphReport]:
    """ger's pattern passes alone, on a Dynamo graph, in place: the rewritten graph and
    the report of what matched, what was refused and why. The graph is not compiled (a
    measured selection compiles its small site graphs, unless ``autotune=False``); the
    backend runs exactly this before handing the graph to Inductor. ``strict`` re-raises
    a pass's error (else its rewrites are dropped and the failure is in the report)."""
    settings = GerOptions.parse(options)
    from . import lowerings

    lowerings.ensure_registered()
    devices = fleet.devices_of(_example_values(gm, example_inputs))
    report = debug.new_report(
        name=_graph_name(gm), devices=[str(d) for d in devices], options=settings.to_json_dict(), mode=None
    )
    _rewrite(gm, example_inputs, settings, report, debug.GraphDumper(settings.dump_dir, report, strict=settings.strict), devices)
    return gm, report


def _example_values(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[Any]:
    vals = list(example_inputs)
    for node in gm.graph.nodes:
        v = node.meta.get("example_value")
        if v is not None:
            vals.extend(_compat.tree_leaves(v))
    return vals


def _graph_name(gm: fx.GraphModule) -> str:
    cid = gm.meta.get("dynamo_compile_id") if hasattr(gm, "meta") else None
    return str(cid) if cid is not None else type(gm).__name__
