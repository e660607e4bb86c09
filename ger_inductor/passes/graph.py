"""The graph layer every pattern family stands on: node accessors, metadata copying,
op tables, and the alias and mutation analysis that decides whether a rewrite may move
or merge reads.

Why it exists. A rewrite replaces several nodes by one op at one position. Every tensor
the removed nodes read is then read *there* instead of where the user's code read it.
If any node in between writes that tensor's storage (an in-place op on it or on a view
of it, ``out=``, ``setitem``, ``copy_``, a batch norm updating its running statistics,
a call whose effect is unknown), or switches grad mode or autocast, the rewritten graph
computes something else than eager. :meth:`Effects.first_barrier` answers, for every
family, the one question: *may these reads be moved to that position?* - and names the
node that forbids it, which the pass reports as a near-miss.

The analysis follows storage roots through every op that can return a view of its
input (``view``/``reshape``/``transpose``/slicing/``getitem``/``expand``/``.T``/
``detach``/a cast that may return ``self``...), derived from ATen's alias annotations
where the op has an ATen counterpart and from a table for Python-level spellings; an
op whose aliasing or effect is unknown is assumed to alias and write all its inputs.
Graph inputs whose example values share storage share a root.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any, Iterable

import torch
import torch.fx as fx

from .. import _compat

# ----------------------------------------------------------------------------- accessors
def target_of(node: fx.Node):
    return node.target if node.op in ("call_function", "call_method") else None


def is_op(node, names) -> bool:
    """``node`` calls one of ``names`` (functions, or method names as str)."""
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and target_of(node) in names


def arg(node: fx.Node, i: int, name: str, default=None):
    """Positional argument ``i`` or keyword ``name`` of ``node``."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def val(node) -> Any:
    """The fake value Dynamo (or a pass) recorded for ``node``; a constant is itself."""
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else node


def shape(node) -> tuple | None:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def dtype(node):
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def op_args(node: fx.Node) -> dict[str, Any]:
    """The arguments of a call by parameter name: from the op's schema (``ger::`` and
    ATen ops) or the Python function's signature (the helpers passes insert), defaults
    filled in - so no pass reads ``args[7]``."""
    t = node.target.default if _compat.is_op_packet(node.target) else node.target
    if _compat.is_op_overload(t):
        names = [a.name for a in t._schema.arguments]
        out = {a.name: a.default_value for a in t._schema.arguments if a.has_default_value()}
        out.update(zip(names, node.args))
        out.update(node.kwargs)
        return out
    import inspect

    bound = inspect.signature(t).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def set_op_arg(node: fx.Node, name: str, value: Any) -> bool:
    """Set one argument of a call by parameter name; True when it changed."""
    t = node.target.default if _compat.is_op_packet(node.target) else node.target
    names = [a.name for a in t._schema.arguments] if _compat.is_op_overload(t) else None
    if names is None:
        import inspect

        names = list(inspect.signature(t).parameters)
    i = names.index(name)
    if i < len(node.args):
        if node.args[i] is value or node.args[i] == value:
            return False
        args = list(node.args)
        args[i] = value
        node.args = tuple(args)
        return True
    if node.kwargs.get(name, object()) == value:
        return False
    node.kwargs = {**node.kwargs, name: value}
    return True


#: the meta keys that describe where a node came from (kept on inserted nodes)
SOURCE_META = ("stack_trace", "nn_module_stack", "source_fn_stack")


def copy_meta(new: fx.Node, old: fx.Node, values: bool = False) -> None:
    """Give an inserted node the source meta of the node it replaces (and its fake value
    when ``values``: same shape, dtype and device)."""
    keys = SOURCE_META + (("example_value", "val") if values else ())
    for key in keys:
        if key in old.meta:
            new.meta[key] = old.meta[key]


# ----------------------------------------------------------------------------- op tables
#: ops that change only the view of their input (no data)
VIEWS = {"view", "reshape", "flatten", "contiguous", torch.reshape, torch.flatten}
#: dtype conversions
CASTS = {"float", "to", "type", "double", "half", "bfloat16"}
#: ops that read only the shape of a tensor
SHAPE_ONLY = {"size", "dim", "numel", torch.numel}

#: Python-level spellings whose result may share storage with their first argument
#: (ATen alias annotations cover the rest, see :func:`_aten_aliases`)
_ALIASING_NAMES = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "contiguous", "expand", "expand_as",
    "unsqueeze", "squeeze", "transpose", "permute", "t", "T", "mT", "H", "mH", "select", "narrow", "split",
    "chunk", "unbind", "movedim", "swapaxes", "swapdims", "diagonal", "unfold", "as_strided", "detach", "data",
    "real", "imag", "view_as_real", "view_as_complex", "float", "double", "half", "bfloat16", "int", "long",
    "bool", "type", "to", "cpu", "cuda", "type_as", "requires_grad_", "align_as", "tensor_split", "hsplit",
    "vsplit", "split_with_sizes", "__getitem__",
}
_ALIASING_FUNCTIONS = {operator.getitem, torch.Tensor.__getitem__, torch.detach, getattr}  # getattr: x.T, x.data

#: in-place Python operators (write their first argument)
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul, operator.setitem}
#: pure Python builtins that appear in Dynamo graphs
_PURE_MODULES = ("torch", "math", "operator", "builtins", "_operator")
#: functions run for their effect on global state: moving a read across them changes
#: the autograd recording or the dtype of what is computed
_MODE_SWITCHES = ("_set_grad_enabled", "set_grad_enabled", "_enter_autocast", "_exit_autocast",
                  "_enter_inference_mode", "_exit_inference_mode", "_set_fwd_grad_enabled",
                  "_enable_torch_function", "_disable_torch_function")
#: functions known to be pure beyond torch's namespace (ger's own helpers are, by rule)
_PURE_HELPERS: set = set()


def _name(t) -> str:
    return t if isinstance(t, str) else getattr(t, "__name__", "") or ""


@functools.lru_cache(maxsize=None)
def _aten_aliases(name: str) -> bool | None:
    """Whether ATen's op of this name returns an alias of an input (None: no such op)."""
    packet = getattr(torch.ops.aten, name, None)
    if packet is None:
        return None
    try:
        for ov in packet.overloads():
            schema = getattr(packet, ov)._schema
            if any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
                return True
    except Exception:  # an op we cannot read: assume the worst
        return True
    return False


def snapshot_reads(start, stop) -> list:
    """The reads ``(node, its input)`` along the chain from ``start`` down to ``stop``
    through first arguments (views, casts, a temperature's division): each node reads
    its input at its own position, and a copy among them (a dtype cast, ``z / T``, a
    ``reshape`` that copies) keeps the values it read there. A rewrite that reads
    ``stop`` itself somewhere else must be allowed to move every one of these reads
    (``Effects.first_barrier``): an in-place write of ``stop`` after a copy is otherwise
    invisible to eager's loss but not to the fused op. [] where the chain does not reach
    ``stop``."""
    out = []
    m = start
    while isinstance(m, fx.Node) and m is not stop:
        if m.op not in ("call_function", "call_method") or not m.args or not isinstance(m.args[0], fx.Node):
            return []
        out.append((m, m.args[0]))
        m = m.args[0]
    return out if m is stop else []


def hoist_before(g: fx.Graph, first: fx.Node, operands, apply: bool = True, forbid=()) -> bool:
    """Move the code that computes ``operands`` after ``first`` up to just before it (a
    target reshaped inline, ``y.view(-1)``, after a statistic that needs it), when it is
    pure code and nothing between mutates anything. False (nothing moved) otherwise:
    also where that code reads ``first`` itself or a node of ``forbid`` (the nodes the
    rewrite replaces: a target computed from the loss it sits beside). ``apply=False``
    only asks."""
    pos = {n: i for i, n in enumerate(g.nodes)}
    late: set = set()
    stop = set(forbid) | {first}

    def collect(n) -> bool:
        if isinstance(n, fx.Node) and n in stop:
            return False
        if not isinstance(n, fx.Node) or pos[n] < pos[first] or n in late:
            return True
        if n.op not in ("call_function", "call_method") or mutates(n):
            return False
        late.add(n)
        return all(collect(a) for a in n.all_input_nodes)

    if not all(collect(o) for o in operands):
        return False
    last = max((pos[n] for n in late), default=-1)
    if any(mutates(n) for n in g.nodes if pos[first] <= pos[n] <= last and n not in late):
        return False
    if apply:
        for n in sorted(late, key=pos.get):
            first.prepend(n)
    return True


def mutates(n: fx.Node) -> bool:
    """``n`` may write into one of its inputs (in-place op, ``out=``, ``setitem``,
    running-statistics update, or a call of unknown effect)."""
    return classify(n)[0] in ("write", "unknown")


def is_mode_switch(n: fx.Node) -> bool:
    return n.op == "call_function" and not isinstance(n.target, str) and _name(n.target).startswith(_MODE_SWITCHES)


def _kw_or_arg(n: fx.Node, name: str, i: int | None = None):
    if name in n.kwargs:
        return n.kwargs[name]
    if i is not None and len(n.args) > i:
        return n.args[i]
    return None


#: torch.nn.functional functions that take ``inplace`` (its positional index)
_INPLACE_FLAG_POS = {"relu": 1, "relu6": 1, "elu": 2, "selu": 1, "celu": 2, "leaky_relu": 2, "hardtanh": 3,
                     "rrelu": 4, "dropout": 3, "alpha_dropout": 3, "feature_alpha_dropout": 3, "dropout1d": 3,
                     "dropout2d": 3, "dropout3d": 3, "silu": 1, "mish": 1, "hardswish": 1, "hardsigmoid": 1,
                     "threshold": 3}


def _fn_batch_norm_writes(n: fx.Node) -> list:
    """F.batch_norm / instance_norm in training mode update their running statistics."""
    name = _name(n.target)
    if name == "batch_norm" or name == "instance_norm":
        training = _kw_or_arg(n, "training" if name == "batch_norm" else "use_input_stats", 5)
        if name == "instance_norm" and training is None:
            training = True
        if training is not False:
            return [a for a in (_kw_or_arg(n, "running_mean", 1), _kw_or_arg(n, "running_var", 2)) if isinstance(a, fx.Node)]
    return []


def classify(n: fx.Node, gm: fx.GraphModule | None = None) -> tuple[str, list]:
    """What ``n`` does to memory: ``("pure", [])`` (fresh outputs), ``("alias", [])`` (its
    output may be a view of its tensor inputs), ``("write", [inputs written])`` (its
    output may alias them too), or ``("unknown", [])`` (assumed to alias and write all its
    inputs)."""
    if n.op in ("placeholder", "get_attr", "output"):
        return "pure", []
    t = n.target
    first = n.args[0] if n.args else None
    if n.op == "call_module":
        mod = gm.get_submodule(t) if gm is not None else None
        if mod is not None and any(True for _ in mod.buffers()) and mod.training:
            return "unknown", []
        return "pure", []
    out_kw = n.kwargs.get("out")
    outs = [o for o in (out_kw if isinstance(out_kw, (list, tuple)) else [out_kw]) if isinstance(o, fx.Node)]
    if n.op == "call_method":
        if t.endswith("_") and not t.endswith("__"):
            return "write", [first] + outs
        if t in ("__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__"):
            return "write", [first]
        if outs:
            return "write", outs
        if t in _ALIASING_NAMES:
            return "alias", []
        aliases = _aten_aliases(t)
        return ("alias" if aliases else "pure"), []
    # call_function
    if t in _INPLACE_OPERATORS:
        return "write", [first]
    if t in _ALIASING_FUNCTIONS:
        return "alias", []
    if t in _PURE_HELPERS or (getattr(t, "__module__", None) or "").startswith("ger_inductor."):
        return "pure", []  # what ger's passes insert is functional
    if _compat.is_op_overload(t) or _compat.is_op_packet(t):
        schema = t._schema if _compat.is_op_overload(t) else None
        if schema is None:
            return "unknown", []
        written = [a for a, s in zip(n.args, schema.arguments) if s.alias_info is not None and s.alias_info.is_write]
        if written:
            return "write", [a for a in written if isinstance(a, fx.Node)]
        if any(r.alias_info is not None for r in schema.returns):
            return "alias", []
        return "pure", []
    mod = getattr(t, "__module__", None) or ""
    name = _name(t)
    if is_mode_switch(n):
        return "pure", []
    if not (mod.split(".")[0] in _PURE_MODULES or isinstance(t, type(math.exp)) and mod in ("", None)):
        return "unknown", []
    if mod.startswith("torch._higher_order_ops") or "higher_order" in mod:
        return "unknown", []
    if name.endswith("_") and not name.endswith("__"):
        return "write", [first] + outs
    flag = _INPLACE_FLAG_POS.get(name)
    if flag is not None and mod.startswith("torch.nn.functional") or (flag is not None and mod.startswith("torch._C._nn")):
        if _kw_or_arg(n, "inplace", flag) is True:
            return "write", [first]
    bn = _fn_batch_norm_writes(n)
    if bn:
        return "write", bn + outs
    if outs:
        return "write", outs
    if name in _ALIASING_NAMES:
        return "alias", []
    if mod.split(".")[0] == "torch":
        aliases = _aten_aliases(name)
        if aliases:
            return "alias", []
    return "pure", []


def _storage_key(v) -> Any:
    try:
        return _compat.storage_key(v)
    except Exception:
        return None


class Effects:
    """Storage roots and writes of every node of a graph (computed once per pass run;
    recompute after the graph changes)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.order: dict[fx.Node, int] = {}
        self.roots: dict[fx.Node, frozenset] = {}
        self.writes: dict[fx.Node, frozenset] = {}
        self.kinds: dict[fx.Node, str] = {}
        by_storage: dict[Any, Any] = {}
        for i, n in enumerate(gm.graph.nodes):
            self.order[n] = i
            kind, written = classify(n, gm)
            self.kinds[n] = kind
            ins = [a for a in n.all_input_nodes]
            if n.op == "placeholder":
                key = _storage_key(val(n))
                root = by_storage.setdefault(key, n) if key is not None else n
                self.roots[n] = frozenset({root})
            elif n.op == "get_attr":
                self.roots[n] = frozenset({("attr", n.target)})
            elif kind == "alias":
                self.roots[n] = frozenset().union(*(self.roots.get(a, frozenset()) for a in ins))
            elif kind in ("write", "unknown"):
                # an in-place op returns (an alias of) what it wrote; unknown: anything
                src = ins if kind == "unknown" else written
                self.roots[n] = frozenset({n}).union(*(self.roots.get(a, frozenset()) for a in src))
            else:
                self.roots[n] = frozenset({n})
            if kind == "unknown":
                self.writes[n] = frozenset().union(*(self.roots.get(a, frozenset()) for a in ins))
                if n.op == "call_module":
                    self.writes[n] |= {("attr", f"{n.target}.{b}") for b, _ in self.gm.get_submodule(n.target).named_buffers()}
            elif kind == "write":
                self.writes[n] = frozenset().union(*(self.roots.get(a, frozenset()) for a in written))
            else:
                self.writes[n] = frozenset()

    def roots_of(self, x) -> frozenset:
        return self.roots.get(x, frozenset()) if isinstance(x, fx.Node) else frozenset()

    def is_barrier_for(self, m: fx.Node, roots: frozenset) -> bool:
        return bool(self.writes.get(m, frozenset()) & roots) or is_mode_switch(m)

    def first_barrier(self, reads: Iterable[tuple[fx.Node, Any]], to: fx.Node, ignore: Iterable[fx.Node] = ()) -> fx.Node | None:
        """The first node that forbids moving every read ``(reader, tensor)`` - ``reader``
        reads ``tensor`` at its own position - to just before ``to``: a node between the
        two positions that writes the tensor's storage (through any alias) or switches
        grad mode / autocast. None when every read may move. ``ignore``: nodes the
        rewrite replaces (their effects are the rewrite's)."""
        skip = set(ignore)
        nodes = list(self.order)
        pt = self.order[to]
        worst: fx.Node | None = None
        for reader, tensor in reads:
            roots = self.roots_of(tensor)
            pr = self.order[reader]
            lo, hi = (pr + 1, pt) if pr < pt else (pt, pr)
            for m in nodes[lo:hi]:
                if m in skip or m is reader:
                    continue
                if (roots and self.writes.get(m, frozenset()) & roots) or is_mode_switch(m):
                    if worst is None or self.order[m] < self.order[worst]:
                        worst = m
                    break
        return worst

    def writers_of(self, x) -> list[fx.Node]:
        """Every node that may write ``x``'s storage."""
        roots = self.roots_of(x)
        return [m for m, w in self.writes.items() if w & roots] if roots else []


def describe(m: fx.Node) -> str:
    """A node for a near-miss reason: its name and what it calls."""
    t = target_of(m)
    what = t if isinstance(t, str) else (_compat.op_display_name(t) if t is not None else m.op)
    if is_mode_switch(m):
        return f"{m.name} ({what}: switches grad mode / autocast)"
    return f"{m.name} ({what})"


def moved_reads_reason(m: fx.Node) -> str:
    return (f"{describe(m)} writes a tensor the rewrite would read at another position (in-place op, out=, "
            "setitem, running-stat update or a call of unknown effect) or changes the mode between: fusing "
            "would change the numbers")


def drop_dead(g: fx.Graph, nodes: set) -> None:
    """Remove the nodes of ``nodes`` that a rewrite left without users (and those only
    they used), in reverse order; ``nodes`` loses them."""
    removed = True
    while removed:
        removed = False
        for n in reversed(list(g.nodes)):
            if n in nodes and not n.users:
                g.erase_node(n)
                nodes.discard(n)
                removed = True


def apply_views(g: fx.Graph, base: fx.Node, views: tuple) -> fx.Node:
    """``views`` ((target, args, kwargs), ...) re-applied to ``base``: free views, no data."""
    cur = base
    for target, args, kwargs in views:
        if isinstance(target, str):
            cur = g.call_method(target, (cur, *args), dict(kwargs))
        else:
            cur = g.call_function(target, (cur, *args), dict(kwargs))
    return cur
