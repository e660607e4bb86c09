"""conv -> BN -> activation on the Dynamo graph (torch IR, nn modules inlined).

Recognised spellings (arguments positional or keyword, normalised against the
signatures below):

* convolution: ``torch.conv1d/2d/3d`` (= ``F.conv*d``, what ``nn.Conv*d`` becomes; a
  ``padding_mode`` other than 'zeros' shows up as ``F.pad`` before it, padding may be
  a string) and ``torch.conv_transpose1d/2d/3d`` (= ``F.conv_transpose*d``);
* batch norm: ``F.batch_norm`` (what ``nn.BatchNorm*d`` becomes; ``training`` is an
  argument, ``num_batches_tracked += 1`` is a separate node that stays) and
  ``torch.batch_norm``;
* activation (optional): ``F.relu``, ``torch.relu(_)``, ``Tensor.relu(_)``,
  ``F.relu6``, ``F.hardtanh(_)`` (what ``nn.ReLU6`` / ``nn.Hardtanh`` become),
  ``F.silu``, ``F.gelu`` (both approximations), ``F.hardswish``, ``F.hardsigmoid``,
  ``F.leaky_relu(_)`` (a constant slope), ``F.mish`` (and their ``nn`` modules).

Rewrites:

* BN eval (``training=False``): the three nodes become ONE call of
  :func:`~ger_inductor.ops.conv_bn.conv_bn_act_eval` - BN applied at run time in fp32,
  one cast back, differentiable: folded into the conv's weight and bias, or, where the
  weights outweigh the conv's output, as one FMA on the output fused with the
  activation. On CPUs, when no gradient can be asked for, the folded conv is oneDNN's
  with the activation as a fused post-op (Inductor lowers it to an extern kernel
  writing channels_last); elsewhere the vendor convolution with the folded bias and the
  activation left to Inductor's fusion. Where the conv's output is read elsewhere too
  (``relu(bn(y)) + y``), folding would need the unfolded conv as well: the conv stays
  and BN + activation become :func:`~ger_inductor.ops.conv_bn.bn_act_eval` on its
  output.
* BN train (``training=True`` with running statistics; the conv's output may have other
  readers, since the conv stays): the conv stays; BN and the
  activation become ``update_batch_stats`` (``ger::batch_norm_train_stats`` + running
  buffer update) and ``ger::batch_norm_act``, whose output is recomputed in backward
  (one activation-sized tensor saved per block instead of two).

Anything not provably equivalent is left alone and reported as a near-miss with its
reason (see :data:`NEAR_MISS_REASONS`; docs/patterns.md lists them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import operator
from typing import Any

import torch
import torch.fx as fx

from .. import _compat, fleet, shapes
from . import graph
from ..ops import conv_bn as conv_bn_ops
from ..options import op_name

#: the Python functions this pass inserts into graphs (AOTAutograd may cache them)
GRAPH_FUNCTIONS = (conv_bn_ops.conv_bn_act_eval, conv_bn_ops.bn_act_eval, conv_bn_ops.update_batch_stats)

PATTERN_EVAL = "conv_bn_act.eval"
PATTERN_TRAIN = "conv_bn_act.train"
PATTERN_ACT = "conv_bn_act.activation"
#: a conv -> BN pair cut by a graph boundary (a DDP bucket boundary, a graph break)
PATTERN_SPLIT = "conv_bn_act.split"
#: eval conv -> BN branches of one input summed (RepVGG / MobileOne blocks), one conv
PATTERN_BRANCHES = "conv_bn_act.branches"

#: Every reason a candidate is refused, one source of truth for docs and tests.
NEAR_MISS_REASONS = {
    "no_running_stats": "batch norm without running statistics (track_running_stats=False): batch statistics in eval too",
    "training_flag": "batch norm's training flag is not a constant bool",
    "non_constant": "a conv or batch-norm hyper-parameter (stride, padding, momentum, eps, ...) is computed in the graph",
    "signature": "the call's arguments do not match the op's signature",
    "no_example_value": "no example value (fake tensor) on a node, so shapes and dtypes are unknown",
    "dtype": "a tensor is not floating point, or batch norm's output dtype differs from the conv's",
    "device": "conv and batch-norm tensors are on different devices",
    "other_norm": "the conv feeds a normalisation ger does not fuse",
    "activation": "the activation after batch norm is not one ger fuses",
    "hardtanh_bounds": "hardtanh bounds are not constants with min < max",
    "eager": "a node of the pattern must run eagerly",
    "sync_batch_norm": "SyncBatchNorm (cross-rank statistics): left alone",
    "conv_output_leaves_graph": "the conv output leaves this graph, so a batch norm after it cannot be folded or fused",
    "bn_input_from_other_graph": "batch norm's input comes from another graph, so a conv before it cannot be folded or fused",
    "branches": "summed conv -> BN branches of one input that cannot become one convolution",
    "reparameterize": "summed conv -> BN branches of one input, each pair folded: merged into one convolution, an "
                      "inf or NaN in the input would spread differently from eager (0 * inf at the zero-padded "
                      "taps); the option reparameterize=True merges them",
    "written_param": "a weight or running statistic the rewrite reads is written in place in this graph (the fused "
                     "op's backward could be computed from the value before the write)",
}

_REQUIRED = inspect.Parameter.empty

#: fused activations by op name (call_function) or method name (call_method)
_SIG_INPUT_INPLACE = (("input", _REQUIRED), ("inplace", False))
_ACTIVATION_FUNCTIONS: dict[str, tuple[str, tuple]] = {
    "torch.nn.functional.relu": ("relu", _SIG_INPUT_INPLACE),
    "torch.relu": ("relu", (("input", _REQUIRED),)),
    "torch.relu_": ("relu", (("input", _REQUIRED),)),
    "torch.nn.functional.relu6": ("relu6", _SIG_INPUT_INPLACE),
    "torch.nn.functional.hardtanh": (
        "hardtanh",
        (("input", _REQUIRED), ("min_val", -1.0), ("max_val", 1.0), ("inplace", False)),
    ),
    "torch.nn.functional.hardtanh_": (
        "hardtanh",
        (("input", _REQUIRED), ("min_val", -1.0), ("max_val", 1.0)),
    ),
    "torch.nn.functional.silu": ("silu", _SIG_INPUT_INPLACE),
    "torch.nn.functional.gelu": ("gelu", (("input", _REQUIRED), ("approximate", "none"))),
    "torch.nn.functional.hardswish": ("hardswish", _SIG_INPUT_INPLACE),
    "torch.nn.functional.hardsigmoid": ("hardsigmoid", _SIG_INPUT_INPLACE),
    "torch.nn.functional.mish": ("mish", _SIG_INPUT_INPLACE),
    "torch.nn.functional.leaky_relu": ("leaky_relu", (("input", _REQUIRED), ("negative_slope", 0.01), ("inplace", False))),
    "torch.nn.functional.leaky_relu_": ("leaky_relu", (("input", _REQUIRED), ("negative_slope", 0.01))),
}
#: what the near-miss of an unfused activation names as fused
_FUSED_NAMES = "relu, relu6, hardtanh, silu, gelu, hardswish, hardsigmoid, leaky_relu, mish"
_ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu"}

#: activations users put after BN that ger does not fuse (reported, not matched)
_UNFUSED_ACTIVATIONS = {
    "elu", "elu_", "selu", "celu", "sigmoid", "tanh", "softplus", "prelu", "rrelu", "logsigmoid", "clamp", "clamp_",
    "clip", "clip_", "threshold",
}  # fmt: skip

#: normalisations that may follow a conv but are not batch norm with its own statistics
_OTHER_NORMS = {
    "torch.batch_norm_stats": "SyncBatchNorm (cross-process statistics)",
    "torch.nn.functional.instance_norm": "instance norm",
    "torch.nn.functional.group_norm": "group norm",
    "torch.nn.functional.layer_norm": "layer norm",
}

def _signature(params) -> inspect.Signature:
    return inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d) for name, d in params]
    )


_CONV_SIG = _signature(
    [("input", _REQUIRED), ("weight", _REQUIRED), ("bias", None), ("stride", 1), ("padding", 0), ("dilation", 1),
     ("groups", 1)]
)  # fmt: skip
_CONV_TRANSPOSE_SIG = _signature(
    [("input", _REQUIRED), ("weight", _REQUIRED), ("bias", None), ("stride", 1), ("padding", 0),
     ("output_padding", 0), ("groups", 1), ("dilation", 1)]
)  # fmt: skip
#: spatial dims and transposed, by op name
_CONVS = {
    "torch.conv1d": (1, False),
    "torch.conv2d": (2, False),
    "torch.conv3d": (3, False),
    "torch.conv_transpose1d": (1, True),
    "torch.conv_transpose2d": (2, True),
    "torch.conv_transpose3d": (3, True),
}
_BATCH_NORMS = {
    "torch.nn.functional.batch_norm": _signature(
        [("input", _REQUIRED), ("running_mean", _REQUIRED), ("running_var", _REQUIRED), ("weight", None),
         ("bias", None), ("training", False), ("momentum", 0.1), ("eps", 1e-5)]
    ),
    "torch.batch_norm": _signature(
        [("input", _REQUIRED), ("weight", _REQUIRED), ("bias", _REQUIRED), ("running_mean", _REQUIRED),
         ("running_var", _REQUIRED), ("training", _REQUIRED), ("momentum", _REQUIRED), ("eps", _REQUIRED),
         ("cudnn_enabled", _REQUIRED)]
    ),
}  # fmt: skip


class NearMiss(Exception):
    """A candidate ger leaves alone: ``key`` into NEAR_MISS_REASONS, plus specifics."""

    def __init__(self, key: str, specifics: str = ""):
        self.key = key
        self.reason = NEAR_MISS_REASONS[key] + (f" ({specifics})" if specifics else "")
        super().__init__(self.reason)


# ----------------------------------------------------------------------------- matching
@dataclasses.dataclass
class Activation:
    name: str  # one of conv_bn_ops.ACTIVATIONS
    lo: float = 0.0
    hi: float = 0.0


@dataclasses.dataclass
class Candidate:
    conv: fx.Node
    bn: fx.Node
    act_node: fx.Node | None
    act: Activation
    conv_args: dict[str, Any]
    bn_args: dict[str, Any]
    spatial_dims: int
    transposed: bool
    #: the conv output is read elsewhere too: the conv stays, BN applies to its output
    shared_conv: bool = False

    @property
    def last(self) -> fx.Node:
        return self.act_node if self.act_node is not None else self.bn

    @property
    def nodes(self) -> list[fx.Node]:
        return [n for n in (self.conv, self.bn, self.act_node) if n is not None]


def _name(node: fx.Node) -> str | None:
    if node.op == "call_function":
        return op_name(node.target)
    if node.op == "call_method":
        return str(node.target)
    return None


def _bind(sig: inspect.Signature, node: fx.Node) -> dict[str, Any]:
    try:
        bound = sig.bind(*node.args, **node.kwargs)
    except TypeError as e:
        raise NearMiss("signature", f"{_name(node)}: {e}") from None
    bound.apply_defaults()
    return dict(bound.arguments)


def _value(node: Any):
    return graph.val(node) if isinstance(node, fx.Node) else None


def _ints(v: Any, n: int, what: str) -> tuple[int, ...]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v,) * n
    if isinstance(v, (tuple, list)) and all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        return tuple(v) * n if len(v) == 1 else tuple(v)
    raise NearMiss("non_constant", f"{what}={v!r}")


def _number(v: Any, what: str) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    raise NearMiss("non_constant", f"{what}={v!r}")


def _conv_args(conv: fx.Node, dims: int, transposed: bool) -> dict[str, Any]:
    a = _bind(_CONV_TRANSPOSE_SIG if transposed else _CONV_SIG, conv)
    a["stride"] = _ints(a["stride"], dims, "stride")
    a["dilation"] = _ints(a["dilation"], dims, "dilation")
    if isinstance(a["padding"], str) and not transposed:
        if a["padding"] not in ("same", "valid"):
            raise NearMiss("non_constant", f"padding={a['padding']!r}")
    else:
        a["padding"] = _ints(a["padding"], dims, "padding")
    a["output_padding"] = _ints(a.get("output_padding", 0), dims, "output_padding")
    if not isinstance(a["groups"], int) or isinstance(a["groups"], bool):
        raise NearMiss("non_constant", f"groups={a['groups']!r}")
    return a


def _bn_args(bn: fx.Node) -> dict[str, Any]:
    a = _bind(_BATCH_NORMS[_name(bn)], bn)
    if not isinstance(a["training"], bool):
        raise NearMiss("training_flag", f"training={a['training']!r}")
    a["momentum"] = _number(a["momentum"], "momentum")
    a["eps"] = _number(a["eps"], "eps")
    if a["running_mean"] is None or a["running_var"] is None:
        raise NearMiss("no_running_stats")
    return a


def _training_flag(bn: fx.Node) -> Any:
    try:
        return _bind(_BATCH_NORMS[_name(bn)], bn)["training"]
    except NearMiss:
        return None


def _activation(node: fx.Node, bn: fx.Node) -> Activation | None:
    """The fused activation ``node`` applies to ``bn``'s output; None if it is no activation.

    Raises NearMiss for an activation ger does not fuse.
    """
    name = _name(node)
    if node.op == "call_method" and name in _ACTIVATION_METHODS:
        if node.args[:1] != (bn,) or len(node.args) > 1 or node.kwargs:
            return None
        return Activation(_ACTIVATION_METHODS[name])
    if node.op == "call_function" and name in _ACTIVATION_FUNCTIONS:
        kind, params = _ACTIVATION_FUNCTIONS[name]
        a = _bind(_signature(params), node)
        if a["input"] is not bn:
            return None
        if kind == "relu6":
            return Activation("hardtanh", 0.0, 6.0)
        if kind == "hardtanh":
            lo, hi = a["min_val"], a["max_val"]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)) or not lo < hi:
                raise NearMiss("hardtanh_bounds", f"min_val={lo!r}, max_val={hi!r}")
            return Activation("hardtanh", float(lo), float(hi))
        if kind == "gelu":
            approx = a["approximate"]
            if approx not in ("none", "tanh"):
                raise NearMiss("non_constant", f"approximate={approx!r}")
            return Activation("gelu" if approx == "none" else "gelu_tanh")
        if kind == "leaky_relu":
            slope = a["negative_slope"]
            if not isinstance(slope, (int, float)) or isinstance(slope, bool) or not math.isfinite(slope):
                raise NearMiss("non_constant", f"negative_slope={slope!r}")
            return Activation("leaky_relu", float(slope))
        return Activation(kind)
    if name is not None and name.rsplit(".", 1)[-1] in _UNFUSED_ACTIVATIONS:
        raise NearMiss("activation", f"{name}; ger fuses {_FUSED_NAMES}")
    return None


def _check_dtypes_and_devices(conv_args: dict[str, Any], bn_args: dict[str, Any], conv: fx.Node, bn: fx.Node) -> None:
    """The conv's output dtype is the dtype it computes in; batch norm must keep it.

    Conv input and weight may be in another floating dtype only under autocast (eager
    raises otherwise); the fold then casts to the conv's compute dtype, as autocast
    would cast the weight.
    """
    tensors = {
        "conv input": conv_args["input"],
        "conv weight": conv_args["weight"],
        "conv bias": conv_args["bias"],
        "conv output": conv,
        "bn output": bn,
        "running_mean": bn_args["running_mean"],
        "running_var": bn_args["running_var"],
        "bn weight": bn_args["weight"],
        "bn bias": bn_args["bias"],
    }
    values = {}
    for what, n in tensors.items():
        if n is None:
            continue
        v = _value(n)
        if not isinstance(v, torch.Tensor):
            raise NearMiss("no_example_value", what)
        if not v.dtype.is_floating_point:
            raise NearMiss("dtype", f"{what} {v.dtype}")
        values[what] = v
    if values["bn output"].dtype != values["conv output"].dtype:
        raise NearMiss("dtype", f"conv output {values['conv output'].dtype}, bn output {values['bn output'].dtype}")
    devices = {v.device for v in values.values()}
    if len(devices) > 1:
        raise NearMiss("device", ", ".join(sorted(map(str, devices))))


def _is_sync_batch_norm(bn: fx.Node) -> bool:
    """Whether ``bn`` is the ``F.batch_norm`` call of an ``nn.SyncBatchNorm`` module (it
    calls F.batch_norm whenever it does not synchronise: eval, one rank, no process group)."""
    stack = bn.meta.get("nn_module_stack") or {}
    if not stack:
        return False
    _fqn, cls = list(stack.values())[-1]
    if isinstance(cls, type):
        return issubclass(cls, torch.nn.SyncBatchNorm)
    return str(cls).rsplit(".", 1)[-1].rstrip("'>") == "SyncBatchNorm"


def _split_near_misses(gm: fx.GraphModule, ctx) -> None:
    """Conv -> BN pairs a graph boundary cuts: a conv whose output leaves a graph that
    was split (DDP) or ends at a graph break, and - in DDP pieces - a batch norm whose
    input is another piece's output. Ordinary graph outputs and inputs are not reported."""
    split = _compat.graph_split_reason(gm)
    if split is None:
        return
    kind, why = split
    for node in gm.graph.nodes:
        name = _name(node)
        if name in _CONVS and not any(_name(u) in _BATCH_NORMS or _name(u) in _OTHER_NORMS for u in node.users):
            if any(u.op == "output" for u in node.users):
                ctx.near_miss(PATTERN_SPLIT, node, NEAR_MISS_REASONS["conv_output_leaves_graph"] + f" ({why})")
        elif name in _BATCH_NORMS and kind == "ddp":
            inp = node.args[0] if node.args else node.kwargs.get("input")
            if isinstance(inp, fx.Node) and inp.op == "placeholder" and _compat.is_intermediate_input(inp):
                ctx.near_miss(PATTERN_SPLIT, node, NEAR_MISS_REASONS["bn_input_from_other_graph"] + f" ({why})")


def _candidate(conv: fx.Node, bn: fx.Node, ctx) -> Candidate:
    dims, transposed = _CONVS[_name(conv)]
    for node in (conv, bn):
        if ctx.eager_reason(node):
            raise NearMiss("eager", f"{node.name}: {ctx.eager_reason(node)}")
    bn_args = _bn_args(bn)
    if bn_args["training"] and _is_sync_batch_norm(bn):
        # its batch statistics are meant to span all ranks: never fused as plain BN
        raise NearMiss("sync_batch_norm", "training")
    if bn_args["input"] is not conv:
        raise NearMiss("signature", "batch norm's input is not the conv output")
    conv_args = _conv_args(conv, dims, transposed)
    _check_dtypes_and_devices(conv_args, bn_args, conv, bn)
    act_node, act = None, Activation("none")
    if len(bn.users) == 1:
        user = next(iter(bn.users))
        try:
            found = _activation(user, bn)
            if found is not None and ctx.eager_reason(user):
                raise NearMiss("eager", f"{user.name}: {ctx.eager_reason(user)}")
            if (found is not None and found.name == "leaky_relu" and found.lo < 0 and _value(user).requires_grad
                    and graph.classify(user)[0] == "write"):
                # eager's in-place leaky_relu backward raises for a negative slope (it
                # reads its result, which a negative slope makes ambiguous); the fused op
                # recomputes it and would not (review, stop 38)
                raise NearMiss("activation", f"{_name(user)} in place with a negative slope ({found.lo}) where a "
                               "gradient is needed: eager's backward raises there; left as written")
        except NearMiss as miss:
            ctx.near_miss(PATTERN_ACT, user, miss.reason)
            found = None
        if found is not None:
            act_node, act = user, found
    return Candidate(conv, bn, act_node, act, conv_args, bn_args, dims, transposed, shared_conv=len(conv.users) > 1)


# ----------------------------------------------------------------------------- rewriting
def _fake_run(fn, args: tuple, like: fx.Node, requires_grad: bool):
    """fn on the example values of args, under their fake mode (for node meta).

    Run without autograd (a saved-tensor hook active around the compiling call must
    not see fake tensors); ``requires_grad`` is set on the result as the graph has it.
    """
    fake_mode = getattr(_value(like), "fake_mode", None) or contextlib.nullcontext()

    with fake_mode, torch.no_grad():
        out = fn(*fx.node.map_arg(args, _value))  # nodes inside tuples too
    if requires_grad:
        out.requires_grad_(True)
    return out


_copy_source_meta = graph.copy_meta


def _onednn_padding(c: Candidate) -> tuple[int, ...] | None:
    """Integer padding equal to c's padding, or None (asymmetric 'same' padding)."""
    padding = c.conv_args["padding"]
    if not isinstance(padding, str):
        return padding
    if padding == "valid":
        return (0,) * c.spatial_dims
    kernel = _value(c.conv_args["weight"]).shape[2:]
    total = [d * (k - 1) for d, k in zip(c.conv_args["dilation"], kernel)]
    if any(t % 2 for t in total):
        return None
    return tuple(t // 2 for t in total)


def _use_onednn(c: Candidate, strategy: dict[str, Any], profile) -> tuple[bool, str]:
    """Whether oneDNN's conv with a fused post-op serves c, and why (not)."""
    return _onednn_choice(_value(c.last), _value(c.conv_args["input"]).dtype, _value(c.conv_args["weight"]),
                          c.transposed, c.spatial_dims, c.act.name, lambda: _onednn_padding(c) is not None, strategy,
                          profile)


def _onednn_choice(out, in_dtype, weight, transposed: bool, spatial_dims: int, act: str, padding_ok,
                   strategy: dict[str, Any], profile) -> tuple[bool, str]:
    """Whether oneDNN's conv with ``act`` as post-op may compute ``out``, and why (not).
    ``padding_ok()`` is asked last (it reads static kernel sizes)."""
    if strategy["eval_conv"] != "onednn_post_op":
        return False, f"strategy of profile {profile.name}: {strategy['eval_conv']}"
    if not _compat.has_onednn_conv_fusion():
        return False, "this torch build has no oneDNN post-op convolution"
    if out.requires_grad:
        return False, "a gradient may be asked for (oneDNN's fused conv has no autograd)"
    if transposed or spatial_dims == 1:
        return False, "transposed or 1d convolution"
    if act not in conv_bn_ops.ONEDNN_POST_OPS:
        return False, f"oneDNN has no {act} post-op"
    if out.dtype not in (torch.float32, torch.bfloat16) or (out.dtype == torch.bfloat16 and not profile.bf16):
        return False, f"dtype {out.dtype}"
    if in_dtype != out.dtype:
        return False, "autocast casts the conv input (oneDNN's fused conv is not autocast-aware)"
    if shapes.is_symbolic(tuple(weight.shape)):
        return False, "symbolic weight sizes"  # oneDNN's fused conv takes symbolic activations only
    if not padding_ok():
        return False, "asymmetric 'same' padding"
    return True, "no gradient needed"


def _fold_into(c: Candidate) -> tuple[str, str]:
    """Where BN goes, and why: into the weights (a pass over the weights per call) unless
    they outweigh the conv's output (then one FMA on the output, fused with the
    activation). Symbolic shapes fold into the weights."""
    eps = c.bn_args["eps"]
    if isinstance(eps, (int, float)) and eps == 0:
        # scale = 1 / sqrt(running_var) is inf where a channel's variance is 0: w * inf puts
        # inf of both signs (and 0 * inf) into the kernel, whose sums read inf - inf (a
        # NaN channel; eager's y * inf + shift keeps its ±inf and NaN pattern; review, stop 38)
        return "output", "eps = 0: an infinite scale (a channel of variance 0) stays after the conv, as eager applies it"
    if _value(c.conv).dtype == torch.float16:
        # w * scale and (b - mean) * scale rounded to fp16 can overflow its range (65504) or
        # lose the mean's cancellation where eager subtracts it first, in fp32
        return "output", "fp16: BN's scale and shift stay in fp32, after the conv, as eager applies them"
    if _value(c.conv).dtype == torch.bfloat16 and _value(c.conv).requires_grad:
        # folded weights rounded to bf16 carry the gradients too: BN's fp32 weight and bias
        # got bf16-rounded gradients (bias 14.125 vs eager's 14.156), and the rounding moved
        # relu's mask (a bias gradient 12.3 vs 10.05)
        return "output", "bf16 with gradients: BN's scale and shift stay in fp32, after the conv, as eager applies them"
    weights, out = _value(c.conv_args["weight"]).numel(), _value(c.conv).numel()
    if isinstance(weights, int) and isinstance(out, int) and weights > out:
        return "output", f"weights ({weights} values) outweigh the output ({out})"
    return "weights", "output outweighs the weights" if isinstance(out, int) else "symbolic output size"


def _rewrite_eval(gm: fx.GraphModule, c: Candidate, ctx, strategy: dict[str, Any]) -> None:
    fold_into, fold_why = _fold_into(c)
    onednn, why = _use_onednn(c, strategy, ctx.profile) if fold_into == "weights" else (False, fold_why)
    ca, ba = c.conv_args, c.bn_args
    padding = _onednn_padding(c) if onednn else ca["padding"]
    args = (
        ca["input"], ca["weight"], ca["bias"], ba["running_mean"], ba["running_var"], ba["weight"], ba["bias"],
        ba["eps"], ca["stride"], padding, ca["dilation"], ca["groups"], c.transposed, ca["output_padding"],
        c.act.name, c.act.lo, c.act.hi, _value(c.conv).dtype, fold_into, onednn,
    )  # fmt: skip
    with gm.graph.inserting_before(c.bn):
        new = gm.graph.call_function(conv_bn_ops.conv_bn_act_eval, args)
    new.meta["example_value"] = _fake_run(conv_bn_ops.conv_bn_act_eval, args, c.conv, _value(c.last).requires_grad)
    _copy_source_meta(new, c.bn)
    _replace(gm, c, new)
    ctx.match(
        PATTERN_EVAL, c.nodes, conv=_name(c.conv), groups=ca["groups"], act=c.act.name, fold_into=fold_into,
        conv_impl="onednn post-op" if onednn else "aten conv", why=why,
        # SyncBatchNorm in eval is F.batch_norm with running statistics, no sync: a fold
        **({"norm": "SyncBatchNorm (eval: running statistics)"} if _is_sync_batch_norm(c.bn) else {}),
    )  # fmt: skip


def _rewrite_eval_shared_conv(gm: fx.GraphModule, c: Candidate, ctx) -> None:
    """Eval BN after a conv whose output is read elsewhere too: folding would need the
    unfolded conv as well, so the conv stays and BN + activation become one FMA per
    element on its output (``bn_act_eval``), at the batch norm's position."""
    ba = c.bn_args
    args = (c.conv, ba["running_mean"], ba["running_var"], ba["weight"], ba["bias"], ba["eps"], c.act.name, c.act.lo,
            c.act.hi)
    with gm.graph.inserting_before(c.bn):
        new = gm.graph.call_function(conv_bn_ops.bn_act_eval, args)
    new.meta["example_value"] = _fake_run(conv_bn_ops.bn_act_eval, args, c.conv, _value(c.last).requires_grad)
    _copy_source_meta(new, c.bn)
    _replace(gm, c, new, keep_conv=True)
    ctx.match(
        PATTERN_EVAL, c.nodes, conv=_name(c.conv), groups=c.conv_args["groups"], act=c.act.name, fold_into="output",
        conv_impl="aten conv, kept", why=f"the conv output has {len(c.conv.users)} other user(s): BN applied to it",
    )  # fmt: skip


def _version_guard_input(c: Candidate) -> str | None:
    """Which input of ``batch_norm_act`` carries the running statistics' version check:
    None where BN keeps no running statistics or nothing needs a gradient."""
    ba = c.bn_args
    if not any(isinstance(ba[k], fx.Node) for k in ("running_mean", "running_var")):
        return None
    for k in ("weight", "bias"):
        v = _value(ba[k]) if isinstance(ba[k], fx.Node) else None
        if isinstance(v, torch.Tensor) and v.requires_grad:
            return k
    v = _value(c.conv)
    return "x" if isinstance(v, torch.Tensor) and v.requires_grad else None


def _rewrite_train(gm: fx.GraphModule, c: Candidate, ctx) -> None:
    ba = c.bn_args
    stats_args = (c.conv, ba["running_mean"], ba["running_var"], ba["momentum"], ba["eps"])
    graph = gm.graph
    with graph.inserting_before(c.bn):
        stats = graph.call_function(conv_bn_ops.update_batch_stats, stats_args)
        mean = graph.call_function(operator.getitem, (stats, 0))
        invstd = graph.call_function(operator.getitem, (stats, 1))
        # eager's batch norm saves the running statistics (after updating them): a write to
        # them before the backward raises autograd's error. ``batch_norm_act`` does not
        # need them; a ``ger::version_guard`` on an input its backward differentiates
        # (the C-sized weight or bias where one needs a gradient, else the conv output)
        # saves them for the same check
        guard = _version_guard_input(c)
        act_in = {"x": c.conv, "weight": ba["weight"], "bias": ba["bias"]}
        if guard is not None:
            keep = [t for t in (ba["running_mean"], ba["running_var"]) if isinstance(t, fx.Node)]
            act_in[guard] = graph.call_function(torch.ops.ger.version_guard.default, (act_in[guard], keep))
        act_args = (act_in["x"], mean, invstd, act_in["weight"], act_in["bias"], c.act.name, c.act.lo, c.act.hi)
        y = graph.call_function(torch.ops.ger.batch_norm_act.default, act_args)
    if guard is not None:
        g_node = act_in[guard]
        g_node.meta["example_value"] = _fake_run(torch.ops.ger.version_guard.default, g_node.args, c.conv,
                                                 _value(g_node.args[0]).requires_grad)
        _copy_source_meta(g_node, c.bn)
    stats_val = _fake_run(conv_bn_ops.update_batch_stats, stats_args, c.conv, False)
    stats.meta["example_value"] = stats_val
    mean.meta["example_value"], invstd.meta["example_value"] = stats_val
    y.meta["example_value"] = _fake_run(
        torch.ops.ger.batch_norm_act.default, act_args, c.conv, _value(c.last).requires_grad
    )
    for n in (stats, mean, invstd, y):
        _copy_source_meta(n, c.bn)
    _compat.mark_recompute_in_backward(y)
    _replace(gm, c, y, keep_conv=True)
    ctx.match(
        PATTERN_TRAIN, c.nodes, conv=_name(c.conv), groups=c.conv_args["groups"], act=c.act.name,
        backward="saves the conv output; activation recomputed",
    )  # fmt: skip


def _replace(gm: fx.GraphModule, c: Candidate, new: fx.Node, keep_conv: bool = False) -> None:
    c.last.replace_all_uses_with(new)
    for n in (c.act_node, c.bn, None if keep_conv else c.conv):
        if n is not None:
            gm.graph.erase_node(n)


def _moved_reads_barrier(effects: graph.Effects, c: Candidate) -> fx.Node | None:
    """The fused op runs at the batch norm's position: in eval the conv's reads (input,
    weight, bias) move there, and the activation's read of the BN output moves up to
    it. The node that forbids it (a write to one of them, a mode switch), or None."""
    moved = [(c.bn, a) for a in c.bn.all_input_nodes if a is not c.conv]
    if not c.bn_args["training"] and not c.shared_conv:
        moved += [(c.conv, a) for a in c.conv.all_input_nodes]
    if c.act_node is not None:
        moved += [(c.act_node, a) for a in c.act_node.all_input_nodes if a is not c.bn]
    return effects.first_barrier(moved, c.bn, ignore=c.nodes)


# ----------------------------------------------------------------------------- summed branches
_EVAL_SIG = inspect.signature(conv_bn_ops.conv_bn_act_eval)


def _is_plain_add(node: Any) -> bool:
    """``a + b`` of two tensors (``operator.add``, ``+=`` on a tensor, ``torch.add``
    without ``alpha``)."""
    return (isinstance(node, fx.Node) and node.op == "call_function"
            and _name(node) in ("_operator.add", "_operator.iadd", "torch.add") and len(node.args) == 2
            and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args))


def _summands(node: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """(leaves, adds) of the tree of adds rooted at ``node``; an inner add (or an
    in-place add's first operand) joins the tree only when the add above is its only reader."""
    leaves, adds = [], [node]
    for a in node.args:
        if _is_plain_add(a) and len(a.users) == 1:
            sub_leaves, sub_adds = _summands(a)
            leaves += sub_leaves
            adds += sub_adds
        else:
            leaves.append(a)
    return leaves, adds


def _is_branch(leaf: fx.Node) -> bool:
    return leaf.op == "call_function" and leaf.target is conv_bn_ops.conv_bn_act_eval


def _branch_input(leaf: fx.Node) -> Any:
    """The tensor a summand convolves or normalises (None for other summands)."""
    if _is_branch(leaf):
        return _EVAL_SIG.bind(*leaf.args, **leaf.kwargs).arguments["x"]
    if _name(leaf) in _BATCH_NORMS:
        return leaf.args[0] if leaf.args else leaf.kwargs.get("input")
    return None


class _OtherTerms(Exception):
    """The sum holds terms besides the branches of one input (or a branch twice)."""


def _sub_sums(top: fx.Node):
    """``top`` and the adds below it that only it reads, outermost first."""
    yield top
    for a in top.args:
        if _is_plain_add(a) and len(a.users) == 1:
            yield from _sub_sums(a)


def _branch_plan(root: fx.Node, ctx) -> dict[str, Any] | None:
    """What :func:`conv_bn_ops.branches_conv_bn_act_eval` needs for the summed branches
    under ``root``; None where the sum holds fewer than two conv -> BN branches of one
    input (a residual add: nothing to fold); raises NearMiss where they cannot become
    one convolution."""
    leaves, adds = _summands(root)
    inputs = [_branch_input(leaf) for leaf in leaves]
    x = next((i for i, leaf in zip(inputs, leaves) if _is_branch(leaf)), None)
    if x is None or sum(i is x for i in inputs) < 2:
        return None
    if any(i is not x for i in inputs) or len(set(leaves)) != len(leaves):
        # a sub-sum may still be all branches (``(b1 + b2) + residual``): the caller tries it
        raise _OtherTerms()
    for n in adds:
        if ctx.eager_reason(n):
            raise NearMiss("eager", f"{n.name}: {ctx.eager_reason(n)}")
    convs, identity = [], None
    for leaf in leaves:
        if len(leaf.users) != 1:
            raise NearMiss("branches", f"{leaf.name} is read elsewhere too")
        if _is_branch(leaf):
            a = _EVAL_SIG.bind(*leaf.args, **leaf.kwargs).arguments
            if a["act"] != "none" or a["transposed"]:
                raise NearMiss("branches", f"{leaf.name}: an activation before the sum, or a transposed conv")
            convs.append((leaf, a))
            continue
        bn = _bn_args(leaf)
        if identity is not None or bn["training"] is not False or bn["running_mean"] is None or ctx.eager_reason(leaf):
            raise NearMiss("branches", f"{leaf.name}: a second batch norm of the input, or one not in eval mode "
                                       "with running statistics")
        identity = (leaf, bn)
    first = convs[0][1]
    w0 = _value(first["conv_weight"])
    if first["dtype"] == torch.float16:
        raise NearMiss("branches", "fp16: the summed, folded kernel and bias are rounded to fp16, whose range the "
                                   "scales of BN can exceed (eager adds the branches' BN outputs)")
    if any(_value(n).dtype != first["dtype"] for n in adds):
        # e.g. an fp32 BN of the input added to bf16 convs under autocast: ``a + b`` promotes
        # (``y += bn(x)`` keeps y's dtype, as one conv does)
        raise NearMiss("branches", "the sum's dtype differs from the convolutions' (type promotion)")
    for _, a in convs:
        for key in ("stride", "groups", "dtype"):
            if a[key] != first[key]:
                raise NearMiss("branches", f"the branches differ in {key}")
        if any(d != 1 for d in a["dilation"]) or isinstance(a["padding"], str):
            raise NearMiss("branches", "dilation or string padding")
        w = _value(a["conv_weight"])
        kernel = tuple(w.shape[2:])
        if shapes.is_symbolic(tuple(w.shape)) or any(k % 2 == 0 or p != (k - 1) // 2 for k, p in zip(kernel, a["padding"])):
            raise NearMiss("branches", "kernels that are not odd and centred (padding (k - 1) / 2)")
        if tuple(w.shape[:2]) != tuple(w0.shape[:2]):
            raise NearMiss("branches", "the branches differ in channels")
    if identity is not None and (any(st != 1 for st in first["stride"])
                                 or not shapes.known_equal(w0.shape[0], _value(x).shape[1])):
        raise NearMiss("branches", "a batch norm of the input beside convs with stride or as many outputs as inputs "
                                   "not 1 and equal")
    kernel = tuple(max(int(_value(a["conv_weight"]).shape[2 + d]) for _, a in convs) for d in range(w0.dim() - 2))
    return {"leaves": leaves, "adds": adds, "convs": convs, "identity": identity, "x": x, "first": first,
            "padding": tuple((k - 1) // 2 for k in kernel), "kernel": kernel}


def _fold_summed_branches(gm: fx.GraphModule, ctx, strategy: dict[str, Any]) -> bool:
    """Eval conv -> BN branches of one input summed (``bn1(conv3x3(x)) + bn2(conv1x1(x))
    [+ bn3(x)]``, an activation after the sum optional) become ONE convolution whose
    kernel is the sum of the folded, zero-padded kernels (RepVGG's re-parameterisation,
    done at run time). Runs after the pairs were rewritten: the branches are
    ``conv_bn_act_eval`` calls without an activation."""
    changed = False
    erased: set[fx.Node] = set()
    for top in list(gm.graph.nodes):
        if top in erased or not _is_plain_add(top) or (len(top.users) == 1 and _is_plain_add(next(iter(top.users)))):
            continue  # not the top of its tree of adds
        plan = None
        mixed = False
        for root in _sub_sums(top):  # the whole sum first, then its sub-sums
            try:
                plan = _branch_plan(root, ctx)
            except _OtherTerms:
                mixed = True
                continue
            except NearMiss as miss:
                ctx.near_miss(PATTERN_BRANCHES, root, miss.reason)
                break
            if plan is not None:
                break
        if plan is None:
            if mixed:
                ctx.near_miss(PATTERN_BRANCHES, top, NEAR_MISS_REASONS["branches"] + " (the branches are summed with "
                              "other terms, and no sub-sum (a + b) holds only branches: sum them first)")
            continue
        if not ctx.options.reparameterize:
            ctx.near_miss(PATTERN_BRANCHES, root, NEAR_MISS_REASONS["reparameterize"])
            continue
        act_node, act = None, Activation("none")
        if len(root.users) == 1:
            user = next(iter(root.users))
            try:
                found = _activation(user, root)
            except NearMiss:
                found = None
            if found is not None and not ctx.eager_reason(user):
                act_node, act = user, found
        replaced = plan["leaves"] + plan["adds"] + ([act_node] if act_node is not None else [])
        moved = [(leaf, a) for leaf in plan["leaves"] for a in leaf.all_input_nodes]
        if act_node is not None:
            moved += [(act_node, a) for a in act_node.all_input_nodes if a is not root]
        last = act_node if act_node is not None else root
        effects = graph.Effects(gm)
        barrier = effects.first_barrier(moved, root, ignore=replaced)
        if barrier is not None:
            ctx.near_miss(PATTERN_BRANCHES, root, graph.moved_reads_reason(barrier))
            continue
        if plan["identity"] is not None:
            bn = plan["identity"][1]
            writer = _written_param(effects, [bn["weight"], bn["bias"], bn["running_mean"], bn["running_var"]], replaced)
            if writer is not None:
                ctx.near_miss(PATTERN_BRANCHES, root, NEAR_MISS_REASONS["written_param"] + f" ({graph.describe(writer)})")
                continue
        first, x = plan["first"], plan["x"]
        onednn, why = _onednn_choice(_value(last), _value(x).dtype, _value(first["conv_weight"]), False,
                                     len(plan["kernel"]), act.name, lambda: True, strategy, ctx.profile)
        convs = tuple((a["conv_weight"], a["conv_bias"], a["running_mean"], a["running_var"], a["bn_weight"],
                       a["bn_bias"], a["eps"]) for _, a in plan["convs"])
        identity = None
        if plan["identity"] is not None:
            bn = plan["identity"][1]
            identity = (bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"], bn["eps"])
        args = (x, convs, identity, tuple(first["stride"]), plan["padding"], first["groups"], act.name, act.lo, act.hi,
                first["dtype"], onednn)
        with gm.graph.inserting_before(root):
            new = gm.graph.call_function(conv_bn_ops.branches_conv_bn_act_eval, args)
        new.meta["example_value"] = _fake_run(conv_bn_ops.branches_conv_bn_act_eval, args, root,
                                              _value(last).requires_grad)
        _copy_source_meta(new, root)
        last.replace_all_uses_with(new)
        for n in reversed([n for n in gm.graph.nodes if n in set(replaced)]):
            gm.graph.erase_node(n)
        erased.update(replaced)
        ctx.match(
            PATTERN_BRANCHES, [n for n in replaced], branches=len(convs), identity=identity is not None,
            kernel="x".join(map(str, plan["kernel"])), act=act.name,
            conv_impl="onednn post-op" if onednn else "aten conv", why=why,
        )  # fmt: skip
        changed = True
    return changed


def _written_param(effects: graph.Effects, tensors, ignore) -> fx.Node | None:
    """A node other than ``ignore`` that writes one of ``tensors`` in place anywhere in the
    graph (an eval BN's running statistics or weights, a conv's weights), or None.

    Eager BN saves what its backward needs when it runs. The rewrites compute BN in torch
    ops whose backward AOTAutograd may recompute from the graph's inputs - and an input
    written in place holds the written value by then: a fuzzed program
    (``with no_grad: bn.running_mean.add_(0.1)`` before a grad-enabled eval BN) gave BN's
    weight gradient from the running mean written twice. Such writes are rare in real
    models (eval BN does not update its statistics); ger leaves them alone."""
    skip = set(ignore)
    for t in tensors:
        if isinstance(t, fx.Node):
            for m in effects.writers_of(t):
                if m not in skip:
                    return m
    return None


def _train_refusal(effects: graph.Effects, c: Candidate) -> str | None:
    """Why a training candidate is left to eager's ops, or None:

    * an empty batch (a static 0: Dynamo specialises it): eager's batch norm returns early
      and leaves the running statistics alone; the fused update would blend the NaN
      statistics of no values into them (review, stop 37);
    * the activation's output written in place later, where a gradient is needed and
      eager's activation backward reads its saved result (relu in every spelling, an
      in-place leaky_relu): the write raises autograd's version error there; the fused op
      saves the conv output and recomputes the activation, so the write would pass
      unseen (review, stop 37). Where the activation saves its input (silu, gelu, ...)
      or there is none (``x = bn(conv(x)); x += shortcut``, the last BN of every residual
      block), eager raises nothing and neither does the fused op: rewritten."""
    n = _value(c.conv).numel()
    if isinstance(n, int) and n == 0:
        return "an empty batch: eager's batch norm leaves the running statistics as they are (the fused update would write NaN)"
    saves_result = c.act_node is not None and (
        c.act.name == "relu" or (c.act.name == "leaky_relu" and graph.classify(c.act_node)[0] == "write"))
    if saves_result and _value(c.last).requires_grad:
        # (a higher-order op - torch.cond, an autograd.Function - counts as writing what it
        # reads in the effect analysis; Dynamo admits no input mutation inside one, so it
        # is no writer here: refusing there cost the fusion of a conv -> BN -> relu whose
        # output feeds a custom autograd.Function)
        writer = next((m for m in effects.writers_of(c.last)
                       if m not in c.nodes and not _compat.is_higher_order_op(m.target)), None)
        if writer is not None:
            return ("the activation's output is written in place later (" + graph.describe(writer) + "): eager's "
                    "activation backward may read its saved result and raise autograd's version error; the fused op "
                    "recomputes it")
    return None


def _other_bn_of_the_same_statistics(gm: fx.GraphModule, bn: fx.Node, ba: dict[str, Any]) -> fx.Node | None:
    """Another batch norm of the graph that updates ``bn``'s running statistics (one BN
    module applied to two inputs in a training step), or None. The fused training op
    keeps the statistics it read for the backward through a version guard, as eager's BN
    saves them; the other BN's update then raises autograd's version error, where eager's
    own updates do not count as writes (review, stop 35)."""
    stats = {id(t) for t in (ba["running_mean"], ba["running_var"]) if isinstance(t, fx.Node)}
    for n in gm.graph.nodes:
        if n is bn or n.op != "call_function" or _name(n) not in _BATCH_NORMS:
            continue
        if any(id(a) in stats for a in n.all_input_nodes):
            return n
    return None


def run(gm: fx.GraphModule, ctx) -> bool:
    """Rewrite every conv -> BN [-> activation] of ``gm``; record matches and near-misses."""
    strategy = fleet.strategy("conv_bn_act", ctx.profile)
    ctx.strategy(**strategy)
    _split_near_misses(gm, ctx)
    changed = False
    for conv in list(gm.graph.nodes):
        if conv.op != "call_function" or _name(conv) not in _CONVS:
            continue
        bns = [u for u in conv.users if _name(u) in _BATCH_NORMS]
        if not bns:
            others = [u for u in conv.users if _name(u) in _OTHER_NORMS]
            for u in others:
                ctx.near_miss(PATTERN_EVAL, u, NEAR_MISS_REASONS["other_norm"] + f" ({_OTHER_NORMS[_name(u)]})")
            continue
        bn = bns[0]
        try:
            c = _candidate(conv, bn, ctx)
        except NearMiss as miss:
            ctx.near_miss(PATTERN_TRAIN if _training_flag(bn) is True else PATTERN_EVAL, bn, miss.reason)
            continue
        pattern = PATTERN_TRAIN if c.bn_args["training"] else PATTERN_EVAL
        effects = graph.Effects(gm)  # once per candidate: the graph changes with each rewrite
        barrier = _moved_reads_barrier(effects, c)
        if barrier is not None:
            ctx.near_miss(pattern, bn, graph.moved_reads_reason(barrier))
            continue
        ba = c.bn_args
        params = [ba["weight"], ba["bias"]] if ba["training"] else [
            ba["weight"], ba["bias"], ba["running_mean"], ba["running_var"], c.conv_args["weight"], c.conv_args["bias"]]
        writer = _written_param(effects, params, c.nodes)
        if writer is None and ba["training"]:
            writer = _other_bn_of_the_same_statistics(gm, bn, ba)
        if writer is not None:
            ctx.near_miss(pattern, bn, NEAR_MISS_REASONS["written_param"] + f" ({graph.describe(writer)})")
            continue
        if c.bn_args["training"]:
            why = _train_refusal(effects, c)
            if why is not None:
                ctx.near_miss(pattern, bn, why)
                continue
            _rewrite_train(gm, c, ctx)
        elif c.shared_conv:
            _rewrite_eval_shared_conv(gm, c, ctx)
        else:
            _rewrite_eval(gm, c, ctx, strategy)
        changed = True
    if changed:
        changed = _fold_summed_branches(gm, ctx, strategy) or changed
    return changed
