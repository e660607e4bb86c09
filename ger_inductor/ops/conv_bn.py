"""conv -> BN -> activation: what the ``conv_bn_act`` pass puts into the graph.

Inference (BN with running statistics): :func:`conv_bn_act_eval` applies BN at run
time, in fp32 (fp64 for fp64 models) with one cast back to the conv's dtype: folded
into the convolution's weight and bias (one convolution, the activation after it), or,
for convs whose weights outweigh their output, as one per-channel FMA on the conv's
output fused with the activation. Plain differentiable torch ops: it works with and
without grad-enabled parameters, under ``torch.no_grad()`` or not, and AOTAutograd
derives gradients that match eager's. With ``onednn=True`` (CPU, no gradient needed)
the folded convolution is oneDNN's, with the activation as a fused post-op.

Training (BN with batch statistics), two ``ger::`` ops::

    mean, invstd = update_batch_stats(x, running_mean, running_var, momentum, eps)
    y = ger::batch_norm_act(x, mean, invstd, weight, bias, act, act_min, act_max)

``ger::batch_norm_train_stats`` computes the per-channel batch statistics (one pass
over x) and the new running statistics, which :func:`update_batch_stats` copies into
the buffers exactly as ``F.batch_norm`` does (momentum, unbiased variance;
``num_batches_tracked`` is incremented by the module's own code, which stays in the
graph). ``ger::batch_norm_act`` normalises, scales, shifts and activates (one pass);
its backward, ``ger::batch_norm_act_backward``, is the FULL batch-norm training
gradient, through the statistics included. That is valid because ``mean`` and
``invstd`` are x's own batch statistics; the statistics op therefore sees a detached
x and contributes no gradient of its own.

The backward needs x (the conv output), never y: the derivative of the activation is
evaluated at the recomputed pre-activation. The pass marks the ``batch_norm_act``
node "recompute in backward", so AOTAutograd's partitioner saves x and recomputes y
where the next convolution's backward needs it: one activation-sized tensor saved
per block instead of two. (Recovering x-hat from y instead, InPlace-ABN's way, only
works for invertible activations: BN's input gradient needs x-hat at EVERY position,
also where ReLU clipped; see docs/patterns.md.)
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .ger_loss import OPS_NAMESPACE, compute_dtype

#: Activations the pass fuses, by the name the ops take. relu6 is hardtanh(0, 6). The
#: ops' two scalars ``act_min`` / ``act_max`` are hardtanh's bounds; leaky_relu's
#: negative slope travels in ``act_min``; the other activations ignore them.
ACTIVATIONS = ("none", "relu", "hardtanh", "silu", "gelu", "gelu_tanh", "hardswish", "hardsigmoid", "leaky_relu", "mish")

#: oneDNN post-op (attr, algorithm) per activation it has; scalars: see :func:`onednn_scalars`
ONEDNN_POST_OPS = {
    "none": ("none", ""),
    "relu": ("relu", ""),
    "hardtanh": ("hardtanh", ""),
    "silu": ("swish", ""),
    "gelu": ("gelu", "none"),
    "gelu_tanh": ("gelu", "tanh"),
    "hardswish": ("hardswish", ""),
    "hardsigmoid": ("hardsigmoid", ""),
    "leaky_relu": ("leaky_relu", ""),
    # mish: oneDNN has no such post-op here ("Fusion behavior undefined")
}

#: post-ops whose oneDNN kernels give a number for a NaN input (relu 0, hardtanh and
#: hardsigmoid a bound), where eager's activation keeps the NaN: oneDNN's conv runs with
#: no post-op and the activation follows as its own op (eager's NaN kept). leaky_relu with
#: a slope of 0 is oneDNN's relu too (``_onednn_conv_then_act``; review, stop 38)
ONEDNN_POST_OP_DROPS_NAN = frozenset({"relu", "hardtanh", "hardsigmoid"})


def onednn_scalars(act: str, act_min: float, act_max: float) -> list[float]:
    """The scalars of oneDNN's post-op: hardtanh's (min, max), leaky_relu's slope."""
    if act == "hardtanh":
        return [act_min, act_max]
    if act == "leaky_relu":
        return [act_min]
    return []

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_TANH_CUBIC = 0.044715


def check_activation(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"ger conv_bn: unknown activation {act!r}; known: {', '.join(ACTIVATIONS)}")


def activation(z: Tensor, act: str, act_min: float, act_max: float) -> Tensor:
    """The activation as eager torch ops (the reference the lowerings are tested against)."""
    if act == "none":
        return z
    if act == "relu":
        return torch.relu(z)
    if act == "hardtanh":
        return F.hardtanh(z, act_min, act_max)
    if act == "silu":
        return F.silu(z)
    if act == "gelu":
        return F.gelu(z)
    if act == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if act == "hardswish":
        return F.hardswish(z)
    if act == "hardsigmoid":
        return F.hardsigmoid(z)
    if act == "leaky_relu":
        return F.leaky_relu(z, act_min)
    if act == "mish":
        return F.mish(z)
    check_activation(act)
    raise AssertionError("unreachable")


def activation_derivative(z: Tensor, act: str, act_min: float, act_max: float) -> Tensor:
    """d act / dz at z, with eager's conventions at the kinks (0 at relu's 0 and at
    hardtanh's bounds, as ``threshold_backward`` / ``hardtanh_backward`` give; hardswish
    z/3 + 1/2 on (-3, 3) and 1 from 3 on, hardsigmoid 1/6 on (-3, 3), leaky_relu the slope at 0, as
    their ATen backwards give) and at NaN: relu's and hardtanh's backwards zero the
    gradient where z <= bound, so a NaN z passes it (1 here), hardswish's too,
    hardsigmoid's does not, leaky_relu scales it by the slope."""
    if act == "none":
        return torch.ones_like(z)
    if act == "relu":
        return (~(z <= 0)).to(z.dtype)
    if act == "hardtanh":
        return (~((z <= act_min) | (z >= act_max))).to(z.dtype)
    if act == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if act == "gelu":
        cdf = 0.5 * (1 + torch.erf(z * math.sqrt(0.5)))
        pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        return cdf + z * pdf
    if act == "gelu_tanh":
        t = torch.tanh(SQRT_2_OVER_PI * (z + GELU_TANH_CUBIC * z * z * z))
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * SQRT_2_OVER_PI * (1 + 3 * GELU_TANH_CUBIC * z * z)
    if act == "hardswish":
        return torch.where(z <= -3, 0.0, torch.where(z < 3, z / 3 + 0.5, 1.0)).to(z.dtype)
    if act == "hardsigmoid":
        return torch.where((z > -3) & (z < 3), 1.0 / 6.0, 0.0).to(z.dtype)
    if act == "leaky_relu":
        return torch.where(z > 0, 1.0, act_min).to(z.dtype)
    if act == "mish":
        t = torch.tanh(F.softplus(z))
        return t + z * torch.sigmoid(z) * (1 - t * t)
    check_activation(act)
    raise AssertionError("unreachable")


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    """(C,) -> (1, C, 1, ...) for broadcasting against an (N, C, *spatial) tensor."""
    return t.view([1, -1] + [1] * (ndim - 2))


# ----------------------------------------------------------------------------- inference
def bn_eval_scale_shift(
    conv_bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    eps: float,
    compute: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Per output channel, in ``compute``: BN_eval(y + conv_bias) = y * scale + shift,
    scale = bn_weight / sqrt(running_var + eps), shift = (conv_bias - running_mean) * scale + bn_bias."""
    scale = torch.rsqrt(running_var.to(compute) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(compute)
    centre = -running_mean.to(compute) if conv_bias is None else conv_bias.to(compute) - running_mean.to(compute)
    shift = centre * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(compute)
    return scale, shift


def fold_bn_into_conv(
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    eps: float,
    transposed: bool,
    groups: int,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """(weight, bias) of the convolution that equals conv followed by eval-mode BN:
    the weight scaled by :func:`bn_eval_scale_shift`'s scale over its OUTPUT-channel
    dimension, the shift as bias.

    A transposed convolution's weight is laid out (in, out / groups, *k): output channel
    g * (out / groups) + j lives at [g * (in / groups) + i, j]. Scaling dimension 0, as
    Inductor's freezing does, scales INPUT channels - wrong unless in == out and scale
    is constant. Computed in fp32 (fp64 for fp64 weights) and cast once to ``dtype``, the
    dtype the convolution computes in (the weight's, or autocast's).
    """
    cd = compute_dtype(conv_weight.dtype)
    scale, bias = bn_eval_scale_shift(conv_bias, running_mean, running_var, bn_weight, bn_bias, eps, cd)
    w = conv_weight.to(cd)
    kernel_dims = [1] * (w.dim() - 2)
    if transposed:
        c_in, c_out_per_group = w.shape[0], w.shape[1]
        w = w.reshape(groups, c_in // groups, c_out_per_group, *w.shape[2:])
        w = (w * scale.view(groups, 1, c_out_per_group, *kernel_dims)).reshape(conv_weight.shape)
    else:
        w = w * scale.view(-1, 1, *kernel_dims)
    return w.to(dtype), bias.to(dtype)


#: where the eval-mode BN goes: into the conv's weight and bias, or onto its output
FOLD_INTO = ("weights", "output")


_CONV_FNS = {
    (1, False): F.conv1d,
    (2, False): F.conv2d,
    (3, False): F.conv3d,
    (1, True): F.conv_transpose1d,
    (2, True): F.conv_transpose2d,
    (3, True): F.conv_transpose3d,
}


def conv_bn_act_eval(
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    eps: float,
    stride: Sequence[int],
    padding: Union[Sequence[int], str],
    dilation: Sequence[int],
    groups: int,
    transposed: bool,
    output_padding: Sequence[int],
    act: str,
    act_min: float,
    act_max: float,
    dtype: torch.dtype,
    fold_into: str,
    onednn: bool,
) -> Tensor:
    """act(BN_eval(conv(x))) with BN applied at run time, where it costs least.

    ``fold_into="weights"``: ONE convolution with the folded weight and bias (a pass over
    the weights per call; nothing after the conv but the activation). ``"output"``: the
    conv with its own weights, then ``y * scale + shift`` per channel in fp32 and the
    activation, one pointwise pass Inductor fuses with its neighbours (for convs whose
    weights outweigh their output: the late stages of a ResNet). ``onednn=True`` (with
    ``"weights"``): :func:`onednn_conv_act` (CPU, no autograd: the pass picks it only
    when no gradient can be asked for, for 2d/3d convs with integer padding). Otherwise
    the framework's convolution.
    """
    conv = _CONV_FNS[(conv_weight.dim() - 2, transposed)]
    if x.dtype != dtype:
        # the conv ran under autocast (its output dtype differs from its input's): cast
        # as autocast does, so the op gives eager's dtype with or without autocast active
        x = x.to(dtype)

    def run_conv(w, b):
        if transposed:
            return conv(x, w, b, stride, padding, output_padding, groups, dilation)
        return conv(x, w, b, stride, padding, dilation, groups)

    if fold_into == "weights":
        w, b = fold_bn_into_conv(
            conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias, eps, transposed, groups, dtype
        )
        if onednn:
            return _onednn_conv_then_act(x, w, b, padding, stride, dilation, groups, act, act_min, act_max)
        y = run_conv(w, b)
    elif fold_into == "output":
        y = run_conv(conv_weight.to(dtype), None if conv_bias is None else conv_bias.to(dtype))
        return bn_act_eval(y, running_mean, running_var, bn_weight, bn_bias, eps, act, act_min, act_max)
    else:
        raise ValueError(f"ger conv_bn: fold_into={fold_into!r}; valid: {', '.join(FOLD_INTO)}")
    return _eval_activation(y, act, act_min, act_max)


def branches_conv_bn_act_eval(
    x: Tensor,
    convs: Sequence[tuple],
    identity: Optional[tuple],
    stride: Sequence[int],
    padding: Sequence[int],
    groups: int,
    act: str,
    act_min: float,
    act_max: float,
    dtype: torch.dtype,
    onednn: bool,
) -> Tensor:
    """act(sum_i BN_i(conv_i(x)) [+ BN_id(x)]) in eval mode as ONE convolution: the
    re-parameterisation of RepVGG / MobileOne-style blocks, at run time and
    differentiable like :func:`conv_bn_act_eval`.

    ``convs``: per branch ``(weight, bias, running_mean, running_var, bn_weight, bn_bias,
    eps)``, all with ``stride``, dilation 1, ``groups`` and centred odd kernels (padding
    (k - 1) / 2 per dimension), so that each branch's folded kernel, zero-padded to the
    largest one, sees the same input window. ``identity``: a BN of ``x`` itself,
    ``(running_mean, running_var, bn_weight, bn_bias, eps)``, as a kernel that is 1 at the
    centre on each channel's own input (stride 1, as many outputs as inputs). The sum of
    the folded kernels and biases is formed in fp32 (fp64 for fp64 weights) and cast
    once to ``dtype``; ``padding`` is the largest kernel's.
    """
    cd = compute_dtype(convs[0][0].dtype)
    size = [max(c[0].shape[2 + d] for c in convs) for d in range(convs[0][0].dim() - 2)]
    weight = bias = None
    for w, b, rm, rv, bw, bb, eps in convs:
        fw, fb = fold_bn_into_conv(w, b, rm, rv, bw, bb, eps, False, groups, cd)
        pad = []
        for d in reversed(range(len(size))):
            p = (size[d] - fw.shape[2 + d]) // 2
            pad += [p, p]
        fw = F.pad(fw, pad) if any(pad) else fw
        weight, bias = (fw, fb) if weight is None else (weight + fw, bias + fb)
    if identity is not None:
        rm, rv, bw, bb, eps = identity
        scale, shift = bn_eval_scale_shift(None, rm, rv, bw, bb, eps, cd)
        channels, per_group = weight.shape[0], weight.shape[1]
        centre = torch.zeros(weight.shape, dtype=cd, device=weight.device)
        c = torch.arange(channels, device=weight.device)
        centre[(c, c % per_group, *(torch.full_like(c, k // 2) for k in size))] = 1.0
        weight = weight + centre * scale.view(-1, *([1] * (weight.dim() - 1)))
        bias = bias + shift
    weight, bias = weight.to(dtype), bias.to(dtype)
    if x.dtype != dtype:
        x = x.to(dtype)  # as conv_bn_act_eval: the convs ran under autocast
    if onednn:
        return _onednn_conv_then_act(x, weight, bias, padding, stride, [1] * len(size), groups, act, act_min, act_max)
    y = _CONV_FNS[(len(size), False)](x, weight, bias, stride, padding, 1, groups)
    return _eval_activation(y, act, act_min, act_max)


def bn_act_eval(
    y: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    eps: float,
    act: str,
    act_min: float,
    act_max: float,
) -> Tensor:
    """act(BN_eval(y)) on a conv's output ``y``: one FMA per element in fp32 (``y * scale +
    shift``), cast back once, and the activation - one pointwise pass Inductor fuses with
    its neighbours. What ``conv_bn_act_eval(fold_into="output")`` applies after its conv,
    and what the pass inserts where the conv's output is also read elsewhere (the conv
    then stays as it is)."""
    cd = compute_dtype(y.dtype)
    scale, shift = bn_eval_scale_shift(None, running_mean, running_var, bn_weight, bn_bias, eps, cd)
    z = (y.to(cd) * _channel_view(scale, y.dim()) + _channel_view(shift, y.dim())).to(y.dtype)
    return _eval_activation(z, act, act_min, act_max)


def _onednn_conv_then_act(x, w, b, padding, stride, dilation, groups, act, act_min, act_max) -> Tensor:
    """oneDNN's conv with ``act`` as post-op, or (``ONEDNN_POST_OP_DROPS_NAN``) with none
    and the activation after it."""
    post = "none" if act in ONEDNN_POST_OP_DROPS_NAN or (act == "leaky_relu" and act_min == 0.0) else act
    y = onednn_conv_act(x, w, b, list(padding), list(stride), list(dilation), groups, post, act_min, act_max)
    return y if post == act else _eval_activation(y, act, act_min, act_max)


def _eval_activation(y: Tensor, act: str, act_min: float, act_max: float) -> Tensor:
    if act == "relu":
        return clamp_activation(y, 0.0, None)
    if act == "hardtanh":
        return clamp_activation(y, act_min, act_max)
    return activation(y, act, act_min, act_max)


@torch.library.custom_op(f"{OPS_NAMESPACE}::clamp_activation", mutates_args=())
def clamp_activation(x: Tensor, min_val: float, max_val: Optional[float]) -> Tensor:
    """ReLU (``max_val=None``, ``min_val=0``) or hardtanh / ReLU6, with a backward that
    reads the OUTPUT, through an opaque op.

    The backwards of ``torch.relu`` / ``F.hardtanh`` need a mask of their input or output;
    AOTAutograd's partitioner saves such masks, computed at the end of the forward, and
    Inductor wrote them in the contiguous layout of channels_last activations: a strided
    scatter of bytes that made model B (ReLU6) and ResNet-18 (ReLU) with grad-enabled
    parameters 1.4-5x slower than Inductor. Here the backward
    (``ger::clamp_activation_backward``) takes the output, which the next convolution
    saves anyway: no mask, nothing extra saved.
    """
    return torch.clamp(x, min_val, max_val)


@clamp_activation.register_fake
def _clamp_activation_fake(x, min_val, max_val):
    return torch.empty_like(x)


@torch.library.custom_op(f"{OPS_NAMESPACE}::clamp_activation_backward", mutates_args=())
def clamp_activation_backward(grad_out: Tensor, out: Tensor, min_val: float, max_val: Optional[float]) -> Tensor:
    """grad where min < out (< max), else 0: the set where min < input (< max), as
    ``threshold_backward`` and ``hardtanh_backward`` give - they zero where out <= min
    (>= max), so a NaN output passes the gradient."""
    outside = out <= min_val
    if max_val is not None:
        outside = outside | (out >= max_val)
    inside = ~outside
    return torch.where(inside, grad_out, torch.zeros((), dtype=grad_out.dtype, device=grad_out.device))


@clamp_activation_backward.register_fake
def _clamp_activation_backward_fake(grad_out, out, min_val, max_val):
    return torch.empty_like(grad_out)


def _clamp_activation_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output)
    ctx.bounds = inputs[1:]


def _clamp_activation_backward(ctx, grad):
    (y,) = ctx.saved_tensors
    return clamp_activation_backward(grad, y, *ctx.bounds), None, None


clamp_activation.register_autograd(_clamp_activation_backward, setup_context=_clamp_activation_setup_context)


@torch.library.custom_op(f"{OPS_NAMESPACE}::onednn_conv_act", mutates_args=())
def onednn_conv_act(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    padding: list[int],
    stride: list[int],
    dilation: list[int],
    groups: int,
    act: str,
    act_min: float,
    act_max: float,
) -> Tensor:
    """act(conv(x)): oneDNN's convolution with the activation as a fused post-op.

    A ger op rather than ``mkldnn._convolution_pointwise`` itself because that op's
    fake implementation claims a channels_last output whatever the input, while the
    kernel (and eager's conv) return the input's memory format: traced views and graph
    outputs would see strides eager never produces. This op's fake is eager's conv,
    and its lowering is Inductor's for the oneDNN op (channels_last inside the graph;
    Inductor restrides what leaves it).
    """
    attr, algorithm = ONEDNN_POST_OPS[act]
    scalars = onednn_scalars(act, act_min, act_max)
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, dilation, groups, attr, scalars, algorithm)


@onednn_conv_act.register_fake
def _onednn_conv_act_fake(x, weight, bias, padding, stride, dilation, groups, act, act_min, act_max):
    check_activation(act)
    return _CONV_FNS[(weight.dim() - 2, False)](x, weight, bias, stride, padding, dilation, groups)


# ----------------------------------------------------------------------------- training
def _reduce_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _values_per_channel(x: Tensor) -> int:
    return x.numel() // x.shape[1]


@torch.library.custom_op(f"{OPS_NAMESPACE}::batch_norm_train_stats", mutates_args=())
def batch_norm_train_stats(
    x: Tensor, running_mean: Tensor, running_var: Tensor, momentum: float, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-channel batch statistics and the updated running statistics.

    Returns (mean, invstd) in the compute dtype and (running_mean', running_var') in the
    buffers' dtype: running' = (1 - momentum) running + momentum * batch, with the
    unbiased (Bessel-corrected) batch variance, as ``F.batch_norm`` updates them.
    """
    cd = compute_dtype(x.dtype)
    xc = x.to(cd)
    var, _ = torch.var_mean(xc, _reduce_dims(x), correction=0)
    # the mean as a sum over the count, as eager's batch norm forms it: var_mean's running
    # update reads -inf - (-inf) = NaN where an input holds -inf (eager: a -inf mean, and
    # so a -inf running mean; review, stop 38)
    mean = xc.mean(_reduce_dims(x))
    invstd = torch.rsqrt(var + eps)
    n = _values_per_channel(x)
    new_mean = (1 - momentum) * running_mean.to(cd) + momentum * mean
    new_var = (1 - momentum) * running_var.to(cd) + momentum * var * (n / (n - 1))
    return mean, invstd, new_mean.to(running_mean.dtype), new_var.to(running_var.dtype)


@batch_norm_train_stats.register_fake
def _batch_norm_train_stats_fake(x, running_mean, running_var, momentum, eps):
    cd = compute_dtype(x.dtype)
    c = x.shape[1]
    return (
        x.new_empty((c,), dtype=cd),
        x.new_empty((c,), dtype=cd),
        torch.empty_like(running_mean),
        torch.empty_like(running_var),
    )


def update_batch_stats(
    x: Tensor, running_mean: Tensor, running_var: Tensor, momentum: float, eps: float
) -> tuple[Tensor, Tensor]:
    """Batch statistics of x for ``batch_norm_act``; updates the running buffers in place.

    x is detached: ``batch_norm_act``'s backward carries the gradient through the
    statistics itself.
    """
    mean, invstd, new_mean, new_var = batch_norm_train_stats(x.detach(), running_mean, running_var, momentum, eps)
    running_mean.copy_(new_mean)
    running_var.copy_(new_var)
    return mean, invstd


def _normalized(x: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    cd = mean.dtype
    return (x.to(cd) - _channel_view(mean, x.dim())) * _channel_view(invstd, x.dim())


def _scale_shift(x_hat: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    z = x_hat
    if weight is not None:
        z = z * _channel_view(weight.to(x_hat.dtype), x_hat.dim())
    if bias is not None:
        z = z + _channel_view(bias.to(x_hat.dtype), x_hat.dim())
    return z


@torch.library.custom_op(f"{OPS_NAMESPACE}::batch_norm_act", mutates_args=())
def batch_norm_act(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    act: str,
    act_min: float,
    act_max: float,
) -> Tensor:
    """act((x - mean) * invstd * weight + bias), computed in mean's dtype, returned in x's.

    Contract: mean and invstd are x's own batch statistics (``batch_norm_train_stats``);
    the backward is batch norm's training gradient, which differentiates through them.
    """
    check_activation(act)
    z = _scale_shift(_normalized(x, mean, invstd), weight, bias)
    return activation(z, act, act_min, act_max).to(x.dtype)


@batch_norm_act.register_fake
def _batch_norm_act_fake(x, mean, invstd, weight, bias, act, act_min, act_max):
    check_activation(act)
    return torch.empty_like(x)


@torch.library.custom_op(f"{OPS_NAMESPACE}::batch_norm_act_backward", mutates_args=())
def batch_norm_act_backward(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    act: str,
    act_min: float,
    act_max: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias) of ``batch_norm_act`` in training mode.

    With M values per channel, x_hat = (x - mean) invstd, z = weight x_hat + bias and
    g = grad_out * act'(z):
        grad_bias = sum g,  grad_weight = sum g x_hat,
        grad_x = weight invstd (g - grad_bias / M - x_hat grad_weight / M).
    grad_weight / grad_bias come in the compute dtype (the caller casts or drops them).
    """
    check_activation(act)
    dims = _reduce_dims(x)
    x_hat = _normalized(x, mean, invstd)
    z = _scale_shift(x_hat, weight, bias)
    g = grad_out.to(mean.dtype) * activation_derivative(z, act, act_min, act_max)
    sum_g = g.sum(dims)
    sum_g_xhat = (g * x_hat).sum(dims)
    m = _values_per_channel(x)
    k = invstd if weight is None else invstd * weight.to(mean.dtype)
    ndim = x.dim()
    grad_x = _channel_view(k, ndim) * (
        g - _channel_view(sum_g / m, ndim) - x_hat * _channel_view(sum_g_xhat / m, ndim)
    )
    return grad_x.to(x.dtype), sum_g_xhat, sum_g


@batch_norm_act_backward.register_fake
def _batch_norm_act_backward_fake(grad_out, x, mean, invstd, weight, bias, act, act_min, act_max):
    c = x.shape[1]
    return torch.empty_like(x), mean.new_empty((c,)), mean.new_empty((c,))


def _batch_norm_act_setup_context(ctx, inputs, output):
    x, mean, invstd, weight, bias, act, act_min, act_max = inputs
    # x, not the output: the next convolution keeps the output alive only in the
    # forward; the backward recomputes it from x (see the module docstring)
    ctx.save_for_backward(x, mean, invstd, weight, bias)
    ctx.act = (act, act_min, act_max)


def _batch_norm_act_backward(ctx, grad_out):
    x, mean, invstd, weight, bias = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = batch_norm_act_backward(grad_out, x, mean, invstd, weight, bias, *ctx.act)
    needs = ctx.needs_input_grad
    return (
        grad_x if needs[0] else None,
        None,
        None,
        grad_weight.to(weight.dtype) if weight is not None and needs[3] else None,
        grad_bias.to(bias.dtype) if bias is not None and needs[4] else None,
        None,
        None,
        None,
    )


batch_norm_act.register_autograd(_batch_norm_act_backward, setup_context=_batch_norm_act_setup_context)
