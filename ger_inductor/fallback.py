"""Never a crash where eager would have run.

Three mechanisms, each recording its cause in the graph's report:

1. **Eager nodes, compiled regions.** Nodes the user lists in ``eager_ops`` and nodes
   on a device Inductor cannot generate code for are cut out of the graph; the rest
   is split into regions (``CapabilityBasedPartitioner``), each compiled by Inductor
   on its first call (per input signature). Eager nodes run between the regions, in
   plain PyTorch, so autograd flows across the cuts.
2. **Inductor failures.** ``guarded_inner_compile`` wraps Inductor's inner compiler,
   which compiles the forward graph at ``torch.compile`` time and the backward graph
   lazily at the first ``.backward()``. If it raises, that AOT graph runs eagerly
   (ATen ops, ger ops through their eager kernels).
3. **Anything else** (a pass crashing, AOT tracing failing) is handled in backend.py:
   the pass's changes are dropped, or the whole Dynamo graph runs eagerly.

``strict=True`` re-raises the original exception in every case.
"""

from __future__ import annotations

import copy
import logging
import operator
import threading
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from . import _compat
from .debug import GraphDumper, GraphReport, Timer
from .options import GerOptions, op_name

log = logging.getLogger("ger_inductor")

CompileFn = Callable[[fx.GraphModule, Sequence[Any]], Callable[..., Any]]


# ----------------------------------------------------------------------------- support
def node_op_aliases(node: fx.Node) -> set[str]:
    """Names a user may use for this node's op in ``eager_ops``."""
    names: set[str] = set()
    t = node.target
    if node.op == "call_function":
        if _compat.is_op_overload(t):
            names |= {f"{t.namespace}.{t._opname}", f"{t.namespace}.{t._opname}.{t._overloadname}", t._opname, str(t)}
        else:
            full = op_name(t)
            short = full.rsplit(".", 1)[-1]
            names |= {full, short, f"aten.{short}", f"torch.{short}"}
            if full.startswith("torch.nn.functional.") and hasattr(torch.Tensor, short):
                names |= {f"Tensor.{short}", f"torch.Tensor.{short}"}  # F.softmax(x) = x.softmax()
    elif node.op == "call_method":
        names |= {str(t), f"Tensor.{t}", f"torch.Tensor.{t}", f"aten.{t}", f"torch.{t}"}
        if hasattr(torch.nn.functional, str(t)):
            names.add(f"torch.nn.functional.{t}")  # x.log_softmax() = F.log_softmax(x)
    elif node.op == "call_module":
        names |= {str(t)}
    return names


def _tensor_devices(value: Any) -> set[torch.device]:
    out: set[torch.device] = set()
    for v in _compat.tree_leaves(value):
        if isinstance(v, torch.Tensor):
            out.add(v.device)
    return out


def eager_reason(node: fx.Node, options: GerOptions) -> str | None:
    """Why this node must run eagerly, or None if Inductor may compile it."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return None
    listed = node_op_aliases(node) & options.eager_ops
    if listed:
        return f"listed in eager_ops ({sorted(listed)[0]})"
    devices = _tensor_devices(node.meta.get("example_value", node.meta.get("val")))
    for arg in node.all_input_nodes:
        devices |= _tensor_devices(arg.meta.get("example_value", arg.meta.get("val")))
    for d in sorted(devices, key=str):
        if not _compat.has_inductor_backend(d.type):
            return f"device {d} has no Inductor code generator"
    return None


#: modules of the functions torch.func transforms (grad, vmap, jvp, jacrev, ...) leave
#: in a Dynamo graph: transform levels pushed and popped, tensors wrapped and unwrapped
_FUNCTORCH_MODULES = ("torch._C._functorch", "torch._functorch")

FUNCTORCH_WHY = (
    "the graph holds torch.func transforms ({op}): ger's rewrites are skipped (their ops do not "
    "compose with grad/vmap levels); the graph is compiled unchanged"
)


def functorch_node(gm: fx.GraphModule) -> fx.Node | None:
    """A node of ``gm`` that is part of a torch.func transform (the first that enters a
    transform level, else the first), or None."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_function":
            mod = getattr(node.target, "__module__", None) or ""
            if mod == _FUNCTORCH_MODULES[0] or mod.startswith(_FUNCTORCH_MODULES[1] + "."):
                found.append(node)
    entering = [n for n in found if "increment_nesting" in getattr(n.target, "__name__", "")]
    return (entering or found or [None])[0]


CUT_BLOCKED_WHY = (
    "the graph {what} ({node}): cutting it into regions around the eager nodes orders the regions by data edges "
    "only, which could move that past an eager node (a read of a written tensor, an op outside its grad or "
    "autocast block); the whole graph runs eagerly"
)


def cut_blocker(gm: fx.GraphModule) -> tuple[fx.Node, str] | None:
    """The first node of ``gm`` that makes an eager cut unsafe, and what it does: an
    in-place write (or a call of unknown effect) or a grad/autocast mode switch. The
    partitioner (``split_into_regions``) keeps data dependencies only; such a node could
    end up on the other side of an eager node that reads what it wrote or that ran
    inside its block (found by the stop-36 review: ``x.add_(1)`` before an eager ``sin``
    of x gave sin of the old x; an eager ``mm`` inside ``torch.autocast`` ran in fp32)."""
    from .passes import graph as _graph

    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method", "call_module"):
            continue
        if _graph.is_mode_switch(n):
            return n, "switches grad or autocast mode"
        if _graph.mutates(n):
            return n, "writes a tensor in place (or calls something of unknown effect)"
    return None


def plan_eager_nodes(gm: fx.GraphModule, options: GerOptions) -> dict[fx.Node, str]:
    out = {}
    for node in gm.graph.nodes:
        reason = eager_reason(node, options)
        if reason is not None:
            out[node] = reason
    return out


# ----------------------------------------------------------------------------- regions
class LazyRegion(torch.nn.Module):
    """A compiled region of a partitioned graph.

    Compiled on first call for each input signature (shapes, strides, dtypes, devices,
    requires_grad, grad mode) with real inputs, as a standalone Inductor graph. A
    region whose compile fails runs eagerly (recorded; re-raised under ``strict``).
    """

    def __init__(self, name: str, gm: fx.GraphModule, compile_fn: CompileFn, report: GraphReport, options: GerOptions,
                 dumper: GraphDumper):
        super().__init__()
        self.region_name = name
        self.gm = gm
        self._compile_fn = compile_fn
        self._report = report
        self._options = options
        self._dumper = dumper
        self._compiled: dict[tuple, Callable[..., Any]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _signature(args: Sequence[Any]) -> tuple:
        sig: list[Any] = [torch.is_grad_enabled()]
        for a in args:
            if isinstance(a, torch.Tensor):
                sig.append((tuple(a.shape), a.stride(), a.dtype, a.device, a.requires_grad))
            else:
                sig.append(("const", type(a).__name__, a if isinstance(a, (int, float, bool, str)) else id(a)))
        return tuple(sig)

    def forward(self, *args):
        key = self._signature(args)
        fn = self._compiled.get(key)
        if fn is None:
            with self._lock:
                fn = self._compiled.get(key)
                if fn is None:
                    fn = self._compile(list(args))
                    self._compiled[key] = fn
        return fn(*args)

    def _compile(self, args: list[Any]) -> Callable[..., Any]:
        timer = Timer()
        try:
            gm = copy.deepcopy(self.gm)
            if not _returns_tuple(gm):
                # compilers take graphs that return tuples, as Dynamo's do (AOTAutograd
                # alone insists; Inductor rewrites them): a region with one output
                # returns it bare
                out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
                out.args = ((out.args[0],),)
                gm.recompile()
                fn = self._compile_fn(gm, args)
                return lambda *a: fn(*a)[0]
            return self._compile_fn(gm, args)
        except Exception as e:
            if self._options.strict:
                raise
            self._report.add_fallback("region", f"region {self.region_name} failed to compile; it runs eagerly", exc=e)
            return self.gm
        finally:
            self._report.region_compile_seconds += timer.elapsed()
            self._dumper.finish()  # the report on disk now includes this region


def _structure_literal(graph: fx.Graph, node: fx.Node, value: Any) -> Any:
    """``value``'s structure rebuilt from ``operator.getitem`` reads of ``node`` (nested
    for nested tuples), None where the value holds None; None if it is not a (named)
    tuple or list (a dict, a dataclass: left as it is)."""
    if not isinstance(value, (tuple, list)):
        return None
    fields = []
    for i, v in enumerate(value):
        item = graph.call_function(operator.getitem, (node, i))
        item.meta["example_value"] = v
        if isinstance(v, (tuple, list)):
            inner = _structure_literal(graph, item, v)
            if inner is None:
                return None
            fields.append(inner)
        elif v is None:
            graph.erase_node(item)
            fields.append(None)
        else:
            fields.append(item)
    if hasattr(value, "_fields"):  # a namedtuple, e.g. losses.RowStats
        return type(value)(*fields)
    return list(fields) if isinstance(value, list) else tuple(fields)


def flatten_structured_values(gm: fx.GraphModule) -> int:
    """Pass (named) tuples between regions as their tensors.

    Regions exchange tensors (and sizes) only: a structure a ger helper returns, e.g.
    ``losses.row_stats``' ``RowStats``, whose producer and consumer land in different
    regions (or one runs eagerly) would be a region output AOTAutograd cannot describe.
    Every reader of such a value other than ``getitem`` reads, instead, the structure
    rebuilt in its own arguments from ``getitem`` reads of its fields: the reads go to the
    producer's region (the partitioner keeps ``getitem`` with its producer), the
    rebuilt structure to the reader's. Returns how many values were flattened."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        value = node.meta.get("example_value", node.meta.get("val"))
        if not isinstance(value, (tuple, list)):
            continue
        readers = [u for u in node.users if not (u.op == "call_function" and u.target is operator.getitem)]
        if not readers:
            continue
        before = set(node.users)
        with gm.graph.inserting_after(node):
            literal = _structure_literal(gm.graph, node, value)
        if literal is None:
            _erase_unused(gm.graph, [u for u in node.users if u not in before])
            continue
        for u in readers:
            u.args = fx.node.map_aggregate(u.args, lambda a: literal if a is node else a)
            u.kwargs = fx.node.map_aggregate(u.kwargs, lambda a: literal if a is node else a)
        count += 1
    if count:
        gm.recompile()
    return count


def _erase_unused(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase ``nodes`` (getitem reads, possibly nested) and their readers, none used elsewhere."""
    for n in nodes:
        _erase_unused(graph, list(n.users))
        graph.erase_node(n)


def _returns_tuple(gm: fx.GraphModule) -> bool:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return isinstance(out.args[0], (tuple, list))


def split_into_regions(
    gm: fx.GraphModule,
    eager: dict[fx.Node, str],
    compile_fn: CompileFn,
    report: GraphReport,
    options: GerOptions,
    dumper: GraphDumper,
) -> fx.GraphModule:
    """Cut ``eager`` nodes out of ``gm``; the rest becomes lazily compiled regions."""
    Partitioner, OperatorSupportBase = _compat.capability_partitioner()

    eager_names = {n.name for n in eager}
    flatten_structured_values(gm)

    class Support(OperatorSupportBase):  # type: ignore[misc, valid-type]
        def is_node_supported(self, submodules, node):
            return node.op in ("call_function", "call_method", "call_module") and node.name not in eager_names

    partitioner = Partitioner(gm, Support(), allows_single_node_partition=True)
    partitions = partitioner.propose_partitions()
    split = partitioner.fuse_partitions(partitions)
    n_regions = 0
    for node in list(split.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("fused_"):
            sub = split.get_submodule(node.target)
            setattr(split, node.target, LazyRegion(str(node.target), sub, compile_fn, report, options, dumper))
            n_regions += 1
    split.recompile()
    report.regions = n_regions
    report.eager_nodes = [f"{n.name} ({reason})" for n, reason in eager.items()]
    return split


# ----------------------------------------------------------------------------- inductor failures
def _pristine_copy(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


def _causes(exc: BaseException):
    """exc and what it wraps (InductorError.inner_exception, __cause__, __context__)."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack += [_compat.inner_exception(e), e.__cause__, e.__context__]


def _failing_op(exc: BaseException) -> str | None:
    # Inductor's LoweringException carries the op it was lowering
    for e in _causes(exc):
        v = getattr(e, "target", None)
        if v is not None:
            return str(v)
    return None


def _failing_node(exc: BaseException) -> str | None:
    for e in _causes(exc):
        node = getattr(e, "node", None)
        if node is not None:
            return getattr(node, "name", str(node))
    return None


def guarded_inner_compile(report: GraphReport, options: GerOptions, dumper: GraphDumper) -> Callable[..., Any]:
    """Inductor's inner compiler, made to fall back to eager per AOT graph."""
    counters = _compat.counters()

    def inner(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any):
        kind = "backward" if kwargs.get("is_backward") else ("inference" if kwargs.get("is_inference") else "forward")
        timer = Timer()
        pristine = None if options.strict else _pristine_copy(gm)
        hits0 = counters["inductor"]["fxgraph_cache_hit"]
        miss0 = counters["inductor"]["fxgraph_cache_miss"]
        byp0 = counters["inductor"]["fxgraph_cache_bypass"]
        try:
            out = _compat.compile_fx_inner(gm, example_inputs, **kwargs)
        except _compat.dynamo_restart_exceptions():
            raise  # Dynamo's control flow, not a failure
        except Exception as e:
            if options.strict:
                raise
            report.add_fallback(
                kind,
                f"Inductor failed to compile the {kind} graph; it runs eagerly",
                exc=e,
                node=_failing_node(e),
                op=_failing_op(e),
            )
            return _compat.eager_output_code_class()(gm=pristine)
        cache = (
            "hit" if counters["inductor"]["fxgraph_cache_hit"] > hits0
            else "miss" if counters["inductor"]["fxgraph_cache_miss"] > miss0
            else "bypass" if counters["inductor"]["fxgraph_cache_bypass"] > byp0
            else "off"
        )
        source = getattr(out, "source_code", None)
        key = getattr(out, "cache_key", None)
        dumped = dumper.inductor_code(kind, source, key)
        report.inductor.append(
            {
                "kind": kind,
                "cache": cache,
                "cache_key": key,
                "kernels": None if source is None else _count_kernels(source),
                "seconds": round(timer.elapsed(), 3),
                **({"dump_file": dumped} if dumped else {}),
            }
        )
        if kind == "backward":
            report.backward_compile_seconds += timer.elapsed()
            dumper.finish()  # refresh report.json with the backward's record
        return out

    return inner


def _count_kernels(source: str) -> int:
    # C++ kernels are declared through cpp_fused_* / Triton kernels as triton_* defs
    import re

    return len(set(re.findall(r"\b(cpp_fused_\w+|triton_\w+_fused_\w+|triton_(?:poi|red|per)_\w+)\s*=", source)))
