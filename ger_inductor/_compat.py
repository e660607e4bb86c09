"""Every private torch import of the package lives here.

Private APIs of TorchInductor / Dynamo move between releases; a release bump should
touch this file only. Imports are lazy (inside functions) so that ``import
ger_inductor`` stays light: no Inductor import, no CUDA initialisation.

Supported: torch >= 2.11 (GPU machines carry 2.11 with triton 3.6; CI pins 2.13.0).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Sequence

import torch

TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


# --------------------------------------------------------------------------- inductor
def inductor_config():
    import torch._inductor.config as config

    return config


def compile_fx(gm, example_inputs, *, inner_compile, config_patches, decompositions=None):
    from torch._inductor.compile_fx import compile_fx as _compile_fx

    kwargs: dict[str, Any] = dict(inner_compile=inner_compile, config_patches=config_patches)
    if decompositions is not None:
        kwargs["decompositions"] = decompositions
    return _compile_fx(gm, example_inputs, **kwargs)


def compile_fx_standalone(gm, example_inputs, config_patches):
    """Inductor's ``compile_fx`` with its default inner compile: for the measurement
    graphs ger compiles inside a backend call (run under :func:`isolated_compile`)."""
    from torch._inductor.compile_fx import compile_fx as _compile_fx

    return _compile_fx(gm, list(example_inputs), config_patches=config_patches)


def fork_rng(device: torch.device):
    """The global RNG states (the CPU's, and ``device``'s when it is an accelerator) saved
    on entry and restored on exit: code run inside leaves the user's random stream as
    it found it."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    index = device.index if device.index is not None else getattr(torch, device.type).current_device()
    return torch.random.fork_rng(devices=[index], device_type=device.type)


@contextlib.contextmanager
def isolated_compile():
    """Compile (and run, backward included) another graph while Dynamo compiles this one:
    no tracing or compile context (the outer graph's fake mode and shape environment are
    not touched) and a fresh compile-metrics context (Dynamo allows each metric once per
    compile). Same thread: Dynamo's compile lock is re-entrant, a second thread would
    wait on it."""
    from torch._dynamo import utils as dutils
    from torch._dynamo.metrics_context import MetricsContext
    from torch._guards import compile_context, tracing

    tls = dutils._metrics_context_tls
    had = hasattr(tls, "metrics_context")
    saved = getattr(tls, "metrics_context", None)
    tls.metrics_context = MetricsContext(on_exit=lambda *a, **k: None)
    try:
        with tracing(None), compile_context(None):
            yield
    finally:
        if had:
            tls.metrics_context = saved
        else:
            del tls.metrics_context


def inductor_cache_dir() -> str:
    """Inductor's on-disk cache folder (``TORCHINDUCTOR_CACHE_DIR`` or its default)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


def aot_eager(gm, example_inputs):
    """AOTAutograd with eager kernels: the rewritten graph run without code generation."""
    from torch._dynamo.backends.debugging import aot_eager as _aot_eager

    return _aot_eager(gm, example_inputs)


def compile_fx_inner(gm, example_inputs, **kwargs):
    from torch._inductor.compile_fx import compile_fx_inner as _inner

    return _inner(gm, example_inputs, **kwargs)


def list_mode_options(mode: str, dynamic: bool | None = None) -> dict[str, Any]:
    from torch._inductor import list_mode_options as _lmo

    return dict(_lmo(mode, dynamic))


def mode_names() -> tuple[str, ...]:
    # the modes torch.compile documents; list_mode_options raises on others
    return ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@functools.cache
def eager_output_code_class():
    """An ``OutputCode`` that runs an FX graph eagerly (boxed calling convention).

    Returned by ger's ``inner_compile`` when Inductor fails on a forward or backward
    graph, so AOTAutograd keeps working and the graph runs in eager ATen.
    """
    from torch._inductor.output_code import OutputCode

    @dataclasses.dataclass
    class EagerGraphOutputCode(OutputCode):  # type: ignore[misc]
        gm: Any = None

        def __post_init__(self) -> None:
            self._boxed_call = True

        def __call__(self, inputs: Sequence[Any]) -> Any:
            args = list(inputs)
            if isinstance(inputs, list):
                inputs.clear()  # boxed convention: the callee frees its inputs
            return self.gm(*args)

        def post_compile(self, example_inputs, constants, graph_kwargs) -> None:
            pass

        def prepare_for_serialization(self) -> None:
            pass

        def set_triton_bundle(self, triton_bundle: Any) -> None:
            pass

    return EagerGraphOutputCode


def custom_graph_pass_base():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    return CustomGraphPass


def get_hash_for_files(paths: Sequence[str], extra: str = "") -> bytes:
    from torch._inductor.custom_graph_pass import get_hash_for_files as _h

    return _h(tuple(paths), extra)


def register_lowering(op, **kwargs):
    from torch._inductor.lowering import register_lowering as _rl

    return _rl(op, **kwargs)


def inductor_lowerings() -> dict:
    from torch._inductor.lowering import lowerings

    return lowerings


def inductor_fallback(kernel):
    """Inductor's lowering that calls ``kernel`` as an extern kernel (never fused)."""
    from torch._inductor.lowering import fallback_handler

    return fallback_handler(kernel, add_to_fallback_set=False)


def inductor_ir():
    import torch._inductor.ir as ir

    return ir


def inductor_ops():
    from torch._inductor.virtualized import V, ops

    return V, ops


def online_softmax_ok(device, dtype, inner_fn, ranges, reduction_ranges) -> bool:
    """Whether ``ir.OnlineSoftmaxReduction`` can serve this reduction unsplit.

    Inductor's C++ backend has no ``online_softmax_reduce``; torch 2.11's Triton
    backend cannot split it (2.13 can), so we only use it when it is not split.
    """
    import sympy
    from torch._inductor import config, ir
    from torch._inductor.utils import is_gpu, sympy_product
    from torch._inductor.virtualized import V

    if not hasattr(ir, "OnlineSoftmaxReduction") or not is_gpu(device.type):
        return False
    if device.type == "cuda" and getattr(config, "cuda_backend", "triton") != "triton":
        return False
    rnumel = V.graph.sizevars.simplify(sympy_product(reduction_ranges))
    if not V.graph.sizevars.statically_known_geq(rnumel, config.unroll_reductions_threshold):
        return False
    _hint, split = ir.Reduction.num_splits(
        device, dtype, dtype, inner_fn, ranges, reduction_ranges,
        reduction_type="online_softmax_reduce", reduction_numel=rnumel,
    )
    return split == 1 or (isinstance(split, sympy.Integer) and int(split) == 1)


def ceil_div(a, b):
    from torch.utils._sympy.functions import CeilDiv

    if isinstance(a, int) or getattr(a, "is_Integer", False):
        return -(-int(a) // int(b))
    return CeilDiv(a, b)


def reduction_hint_inner():
    from torch._inductor.ir import ReductionHint

    return ReductionHint.INNER


def fresh_cache():
    from torch._inductor import utils

    fn = getattr(utils, "fresh_cache", None) or getattr(utils, "fresh_inductor_cache")
    return fn()


def run_and_get_code(fn: Callable, *args, **kwargs):
    from torch._inductor.utils import run_and_get_code as _r

    return _r(fn, *args, **kwargs)


def has_inductor_backend(device_type: str) -> bool:
    """Whether Inductor can generate code for ``device_type`` in this process."""
    if device_type == "meta":
        return False
    try:
        from torch._inductor.codegen.common import get_scheduling_for_device, init_backend_registration

        init_backend_registration()
        return get_scheduling_for_device(device_type) is not None
    except Exception:  # pragma: no cover - very old/new torch: be conservative
        return device_type in ("cpu", "cuda")


def mark_recompute_in_backward(node) -> None:
    """Ask AOTAutograd's partitioner to recompute ``node`` in the backward, never save it.

    Selective activation checkpointing's tag: AOTAutograd copies the ``recompute`` meta
    of each Dynamo node onto the ATen nodes traced from it (torch.fx.proxy's
    ``_COPY_META_FIELDS``, 2.11 and 2.13), and the min-cut partitioner recomputes
    nodes tagged MUST_RECOMPUTE.
    """
    from torch.utils.checkpoint import CheckpointPolicy

    node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE


def has_onednn_conv_fusion() -> bool:
    """Whether oneDNN's convolution with fused post-ops (and its Inductor lowering) exists."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def is_op_overload(x) -> bool:
    return isinstance(x, torch._ops.OpOverload)


def is_op_packet(x) -> bool:
    return isinstance(x, torch._ops.OpOverloadPacket)


def tree_leaves(value):
    import torch.utils._pytree as pytree

    return pytree.tree_leaves(value)


def special_entr_c_function():
    """How Dynamo records ``torch.special.entr`` (a C function) in its graphs."""
    return getattr(getattr(torch._C, "_special", None), "special_entr", None)


def inner_exception(exc: BaseException):
    """Inductor wraps lowering errors (InductorError.inner_exception); the original."""
    return getattr(exc, "inner_exception", None)


def mark_cacheable_functions_key() -> str:
    return "unsafe_marked_cacheable_functions"


# --------------------------------------------------------------------------- dynamo
def counters():
    from torch._dynamo.utils import counters as _c

    return _c


def graph_break_reasons() -> list[str]:
    """The reasons of the graph breaks Dynamo has counted in this process (its
    ``counters["graph_break"]`` keys: the break's message and debug context)."""
    return [str(k) for k in counters()["graph_break"]]


def dynamo_reset() -> None:
    import torch._dynamo

    torch._dynamo.reset()


def graph_split_reason(gm) -> tuple[str, str] | None:
    """Why the Dynamo graph ``gm`` ends where it does, when that may cut a pattern:
    ``("ddp", ...)`` for a piece of Dynamo's DDPOptimizer split (bucket boundaries),
    ``("graph_break", ...)`` for a graph a graph break ends; None otherwise.

    Reads ``gm.compile_subgraph_reason`` (a ``GraphCompileReason`` Dynamo sets on every
    graph, and DDPOptimizer on each piece; 2.11 and 2.13)."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None:
        return None
    text = str(getattr(reason, "reason", "") or "")
    if "DDPOptimizer" in text:
        return (
            "ddp",
            "DDPOptimizer split the graph at a DDP bucket boundary; a different bucket_cap_mb or "
            "torch._dynamo.config.optimize_ddp = False keeps the pair in one graph",
        )
    if getattr(reason, "graph_break", False):
        first = text.strip().splitlines()[0] if text.strip() else "unknown reason"
        return ("graph_break", f"a graph break ends this graph: {first[:200]}")
    return None


def is_intermediate_input(placeholder) -> bool:
    """Whether a placeholder of a DDPOptimizer piece is another piece's output rather
    than a user input, parameter or buffer: DDPOptimizer gives the pieces' placeholders
    the Dynamo source of the original graph's input (``_dynamo_source``), None for values
    computed by an earlier piece."""
    if not hasattr(placeholder, "_dynamo_source"):
        return True  # no sources recorded: cannot tell, report
    return placeholder._dynamo_source is None


def normalize_gm(text: str) -> str:
    from torch._dynamo.testing import normalize_gm as _n

    return _n(text)


def detect_fake_mode(inputs=None):
    from torch._guards import detect_fake_mode as _d

    return _d(inputs)


def new_fake_mode():
    """A fresh fake-tensor mode of its own (measurement graphs built outside Dynamo)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


def fake_mode_of(values):
    """The fake mode the fake tensors among ``values`` belong to (None if there are none).

    Not ``detect_fake_mode``: in a backend that returns the TracingContext's mode, which
    Dynamo creates afresh for the backend, while ``meta["example_value"]`` holds tensors
    of the mode Dynamo traced with; running ops on those under the other raises
    "Mixing fake modes"."""
    from torch._subclasses.fake_tensor import FakeTensor

    for v in values:
        if isinstance(v, FakeTensor):
            return v.fake_mode
    return None


def functorch_layer_depth() -> int:
    """Depth of functorch's dynamic layer stack (torch.func transform levels)."""
    return torch._C._functorch.get_dynamic_layer_stack_depth()


def restore_functorch_layer_depth(depth: int) -> None:
    """Pop transform levels a failed trace pushed and never popped (Dynamo's frames do
    the same after user code raises): else Dynamo's guards see a foreign functorch state."""
    torch._C._functorch.pop_dynamic_layer_stack_and_undo_to_depth(depth)


def capability_partitioner():
    from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
    from torch.fx.passes.operator_support import OperatorSupportBase

    return CapabilityBasedPartitioner, OperatorSupportBase


# --------------------------------------------------------------------------- logging
def register_log_artifact(name: str, description: str) -> None:
    from torch._logging._internal import register_artifact

    register_artifact(name, description, off_by_default=True)


def artifact_logger(module: str, name: str):
    import torch._logging

    return torch._logging.getArtifactLogger(module, name)


def trace_structured(name: str, payload_fn: Callable[[], str], encoding: str = "string") -> None:
    from torch._logging import trace_structured as _ts

    _ts("artifact", metadata_fn=lambda: {"name": name, "encoding": encoding}, payload_fn=payload_fn)


# --------------------------------------------------------------------------- symbolic sizes
def statically_known_true(cond) -> bool:
    """True where the shape environment proves ``cond`` without adding a guard."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true as _skt

    return bool(_skt(cond))


def force_eager_kernel(node) -> None:
    """Have Inductor call ``node``'s eager (ATen) kernel instead of lowering it
    (``GraphLowering`` reads ``meta["should_fallback"]``; 2.11 and 2.13)."""
    node.meta["should_fallback"] = True


def guard_hint(cond) -> bool:
    """The value of a SymBool at the current sizes (its hint), adding no guard."""
    hint = cond.node.hint
    return bool(hint) if hint is not None else False


def dynamo_restart_exceptions() -> tuple[type[BaseException], ...]:
    """Exceptions by which Dynamo restarts tracing a frame (raised from inside a backend,
    e.g. AOTAutograd's ``TensorifyScalarRestartAnalysis`` under ``dynamic=True``): a
    backend must let them through, never fall back on them."""
    from torch._dynamo.exc import RestartAnalysis

    return (RestartAnalysis,)


def size_oblivious_dynamic_shapes():
    """A context in which Dynamo does not specialise sizes 0 and 1 of symbolic dims
    (``backed_size_oblivious``): a size of 1 runs through the dynamic graph."""
    from torch.fx.experimental import _config

    return _config.patch(backed_size_oblivious=True)


def no_duck_sizing():
    """A context in which Dynamo gives equal input sizes distinct symbols."""
    from torch.fx.experimental import _config

    return _config.patch(use_duck_shape=False)


def is_traced_tensor(t) -> bool:
    """Whether ``t`` is a tracing stand-in (fake or functional tensor, as AOTAutograd traces
    a backward with) rather than real data."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(t, (FakeTensor, FunctionalTensor)) or torch._is_functional_tensor(t)


def storage_key(t) -> Any:
    """A hashable key equal for tensors sharing storage (fake tensors included)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    if not isinstance(t, torch.Tensor):
        return None
    return StorageWeakRef(t.untyped_storage())


def op_display_name(t) -> str:
    """``torch.mul``, ``aten.add_.Tensor``, ``my_fn``: how a node's target is named in reports."""
    from .options import op_name

    return op_name(t)


def functorch_transformed(*tensors) -> bool:
    """Whether any of ``tensors`` is wrapped by a torch.func transform (grad, vmap, jvp,
    jacrev, ...) or carries a forward-AD tangent: custom ops' autograd formulas do not
    compose with those (grad raises, jvp drops the tangent)."""
    from torch.autograd import forward_ad

    fc = torch._C._functorch
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        if fc.is_functorch_wrapped_tensor(t) or fc.is_batchedtensor(t):
            return True
        if forward_ad._current_level >= 0 and forward_ad.unpack_dual(t).tangent is not None:
            return True
    return False


def autograd_function_hop():
    """``torch.ops.higher_order.autograd_function_apply`` (how Dynamo records a custom
    ``torch.autograd.Function`` it traced: forward and backward bodies as submodules), or
    None where this torch has none."""
    return getattr(torch.ops.higher_order, "autograd_function_apply", None)


def profiler_active() -> bool:
    """Whether a torch profiler session (the user's ``torch.profiler.profile``) is
    recording in this thread: ger must not start or stop one of its own then."""
    try:
        return bool(torch._C._autograd._profiler_enabled())
    except AttributeError:  # another layout: assume one is, and leave it alone
        return True


def has_internal_overlap(t: torch.Tensor) -> bool:
    """Whether elements of ``t`` share memory (a stride-0 ``expand``): such a tensor
    cannot be copied into with ``copy_`` (2: torch cannot tell; counted as overlapping)."""
    return torch._debug_has_internal_overlap(t) != 0


def autocast_state() -> dict[str, Any]:
    """The autocast state compiled code depends on: enabled and its dtype, per device
    type that has one here."""
    out: dict[str, Any] = {}
    for dt in ("cpu", "cuda"):
        try:
            if torch.is_autocast_enabled(dt):
                out[dt] = str(torch.get_autocast_dtype(dt))
        except (RuntimeError, TypeError, AttributeError):
            continue
    return out


def donated_buffers_on() -> bool:
    """``torch._functorch.config.donated_buffer``: AOTAutograd lets a compiled backward
    reuse saved buffers in place and raises on ``retain_graph`` (True where unknown)."""
    try:
        return bool(torch._functorch.config.donated_buffer)
    except AttributeError:
        return True


def no_compiled_autograd():
    """A context in which backward calls run autograd's own engine, not compiled autograd
    (the timing calls of a measurement: with ``torch._dynamo.config.compiled_autograd``
    on, their backwards would be captured and compiled as the user's)."""
    try:
        from torch._dynamo import compiled_autograd

        return compiled_autograd._disable()
    except (ImportError, AttributeError):
        return contextlib.nullcontext()


def _same(t):
    return t


def neutral_saved_tensors_hooks():
    """A context in which autograd saves tensors as they are, whatever saved-tensor hooks
    the caller pushed (a non-reentrant ``torch.utils.checkpoint`` counts what its region
    saves; ``save_on_cpu``): ger's own compile-time work - fake runs of the ops it
    inserts, a measurement's timing calls - must not be seen by them. A no-op where no
    hooks are pushed or where they are disabled."""
    try:
        if torch._C._autograd._top_saved_tensors_default_hooks(False) is None:
            return contextlib.nullcontext()
        if not torch._C._autograd._saved_tensors_hooks_is_enabled():
            return contextlib.nullcontext()
    except AttributeError:
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_same, _same)


def is_higher_order_op(target) -> bool:
    """Whether an FX call target is a higher-order op (``tag_activation_checkpoint``,
    ``cond``, ``invoke_subgraph``, ...), whose subgraphs are attributes of the module."""
    try:
        from torch._ops import HigherOrderOperator
    except ImportError:
        return False
    return isinstance(target, HigherOrderOperator)
