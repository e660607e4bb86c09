"""Symbolic sizes (dynamic shapes): how ger keeps them symbolic.

Dynamo hands ger graphs whose sizes are ``SymInt`` s (sympy expressions of ``s0``,
``s1``, ...) after a second distinct size (automatic dynamic shapes), with
``torch.compile(..., dynamic=True)`` or after ``torch._dynamo.mark_dynamic``. A pass
that compares such sizes with Python's ``==`` or calls ``int()`` on them adds a guard
(another size recompiles) or specialises the graph; ger does neither:

* Passes compare sizes with :func:`known_true` / :func:`known_equal`: true only where
  the shape environment proves it *without adding a guard* (otherwise the candidate is
  a near-miss). A rewrite valid only under a condition on sizes asks for it through
  ``PassContext.guard`` (``torch._check``), which records the condition.
  :class:`GuardAudit` records every guard a pass added besides (none, in ger's
  passes), so the report lists all conditions ger put on the sizes.
* Lowerings build their IR from sympy sizes (``V.graph.sizevars``, ``CeilDiv``); see
  ``lowerings/``.
* Inductor specialisations ger can avoid are avoided here, with the reason in the
  report's ``dynamic_shapes`` (:func:`inductor_patches`,
  :func:`keep_conv_backward_symbolic`).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from . import _compat


def is_symbolic(size: Any) -> bool:
    """Whether ``size`` (an int, a SymInt or a sequence of them) has a symbolic part."""
    if isinstance(size, (list, tuple, torch.Size)):
        return any(is_symbolic(s) for s in size)
    return isinstance(size, (torch.SymInt, torch.SymFloat, torch.SymBool))


def hint(size: Any):
    """The value of a size at the example inputs (an int's own; a SymInt's hint), adding
    no guard; None where it has none. Sequences map element-wise (None if any is)."""
    if isinstance(size, (list, tuple, torch.Size)):
        out = [hint(s) for s in size]
        return None if any(v is None for v in out) else tuple(out)
    if isinstance(size, int):
        return size
    if isinstance(size, torch.SymInt):
        h = size.node.hint
        return int(h) if h is not None else None
    return None


def known_true(cond: Any) -> bool:
    """True where ``cond`` (a bool or SymBool) holds for every size the guards admit;
    never adds a guard (unknown is False)."""
    if isinstance(cond, bool):
        return cond
    return _compat.statically_known_true(cond)


def known_equal(a: Any, b: Any) -> bool:
    """Sizes (or sequences of sizes) equal for every admitted size; never adds a guard."""
    if isinstance(a, (list, tuple, torch.Size)) or isinstance(b, (list, tuple, torch.Size)):
        if not isinstance(a, (list, tuple, torch.Size)) or not isinstance(b, (list, tuple, torch.Size)):
            return False
        return len(a) == len(b) and all(known_equal(x, y) for x, y in zip(a, b))
    if a is b:
        return True
    return known_true(a == b)


def shape_env_of(values: Iterable[Any]):
    """The ShapeEnv of the fake tensors among ``values`` (None for static graphs traced
    without one)."""
    fake = _compat.detect_fake_mode(_compat.tree_leaves(list(values)))
    return getattr(fake, "shape_env", None) if fake is not None else None


def graph_shape_env(gm: torch.fx.GraphModule):
    return shape_env_of(n.meta["example_value"] for n in gm.graph.nodes if "example_value" in n.meta)


class GuardAudit:
    """The guards added to ``shape_env`` since this object was made (as sympy text)."""

    def __init__(self, shape_env) -> None:
        self.shape_env = shape_env
        self.start = len(shape_env.guards) if shape_env is not None else 0

    def added(self) -> list[str]:
        if self.shape_env is None:
            return []
        return [str(getattr(g, "expr", g)) for g in self.shape_env.guards[self.start:]]


def symbolic_inputs(gm: torch.fx.GraphModule) -> list[str]:
    """Placeholders with symbolic sizes, as ``name: [s0, 3, s1]`` (for the report)."""
    out = []
    for node in gm.graph.find_nodes(op="placeholder"):
        v = node.meta.get("example_value")
        if isinstance(v, torch.Tensor) and is_symbolic(tuple(v.shape)):
            out.append(f"{node.name}: {list(v.shape)}")
        elif isinstance(v, torch.SymInt):
            out.append(f"{node.name}: {v}")
    return out


def needs_backward(example_inputs: Sequence[Any]) -> bool:
    """Whether AOTAutograd will build a backward for a graph with these inputs."""
    return torch.is_grad_enabled() and any(
        isinstance(v, torch.Tensor) and v.requires_grad for v in example_inputs
    )


#: why ger turns Inductor's layout optimisation off for dynamic training graphs
LAYOUT_OPT_WHY = (
    "off: symbolic sizes and a backward; with channels_last activations AOTAutograd restrides the saved "
    "tensors with concrete strides when it compiles the backward, which pins the sizes (a recompile per "
    "new size; Inductor already does this on GPUs, not on CPUs)"
)
CONV_BACKWARD_WHY = (
    "eager ATen kernel: Inductor's convolution_backward lowering turns symbolic strides into ints "
    "(guard_int_seq), which specialises the sizes"
)


def has_convolution(gm: torch.fx.GraphModule) -> bool:
    return any(
        n.op == "call_function" and getattr(n.target, "__name__", "").startswith("conv") for n in gm.graph.nodes
    )


def inductor_patches(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Inductor config patches for a graph (and the report's reasons)."""
    if symbolic_inputs(gm) and needs_backward(example_inputs) and has_convolution(gm):
        return {"layout_optimization": False}, {"layout_optimization": LAYOUT_OPT_WHY}
    return {}, {}


def keep_conv_backward_symbolic(graph: torch.fx.Graph) -> int:
    """Post-grad: have Inductor call the eager kernel for ``convolution_backward`` nodes
    with symbolic sizes instead of its lowering. Returns how many."""
    n = 0
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.convolution_backward.default:
            continue
        vals = [a.meta.get("val") for a in node.args[:3] if isinstance(a, torch.fx.Node)]
        if any(isinstance(v, torch.Tensor) and is_symbolic(tuple(v.shape)) for v in vals):
            _compat.force_eager_kernel(node)
            n += 1
    return n
