"""Inductor IR lowerings of the conv -> BN -> activation ops (``ops/conv_bn.py``).

Written once in Inductor IR (``ir.Pointwise`` / ``ir.Reduction`` and the ``ops``
handlers; the statistics compose Inductor's own ``var_mean`` lowering, which picks a
Welford or two-step reduction and splits it for GPUs), so the same code becomes
C++/OpenMP on CPU and Triton on GPUs:

* ``batch_norm_train_stats``: one reduction over (N, *spatial) per channel reading x
  once; the running-statistics update is a C-sized epilogue.
* ``batch_norm_act``: one pointwise pass (read x, write y), fused by the scheduler
  with whatever consumes y when it can.
* ``batch_norm_act_backward``: two per-channel sums in one reduction loop (read
  grad_out and x), then one pointwise pass for grad_x (read grad_out and x, write
  grad_x). The pre-activation is recomputed from x in registers; nothing else is
  read.

The inference fold is plain torch ops around the convolution; ``onednn_conv_act``
lowers to Inductor's own lowering of oneDNN's post-op convolution, ``clamp_activation``
(ReLU, hardtanh) and its backward to one pointwise expression each.
The math is the eager kernels' (ops/conv_bn.py); tests compare the two.
"""

from __future__ import annotations

import math

import sympy
import torch

from .. import _compat
from ..ops.conv_bn import GELU_TANH_CUBIC, ONEDNN_POST_OPS, SQRT_2_OVER_PI, check_activation, onednn_scalars
from ..ops.ger_loss import compute_dtype

aten = torch.ops.aten
prims = torch.ops.prims


class _Channels:
    """Loaders for an (N, C, *spatial) tensor and per-channel (C,) vectors."""

    def __init__(self, x, mean, invstd, weight, bias):
        self.ir = _compat.inductor_ir()
        _, self.ops = _compat.inductor_ops()
        self.size = list(x.get_size())
        self.device = x.get_device()
        self.in_dtype = x.get_dtype()
        self.cdt = mean.get_dtype()
        self._x = x.make_loader()
        self._mean = mean.make_loader()
        self._invstd = invstd.make_loader()
        self._weight = weight.make_loader() if weight is not None else None
        self._bias = bias.make_loader() if bias is not None else None

    def const(self, v: float):
        return self.ops.constant(v, self.cdt)

    def per_channel(self, loader, c):
        return self.ops.to_dtype(loader([c]), self.cdt)

    def x_hat(self, idx):
        ops = self.ops
        c = idx[1]
        x = ops.to_dtype(self._x(idx), self.cdt)
        return ops.mul(ops.sub(x, self.per_channel(self._mean, c)), self.per_channel(self._invstd, c))

    def gain(self, c):
        """invstd * weight: d z / d x at fixed statistics."""
        k = self.per_channel(self._invstd, c)
        if self._weight is not None:
            k = self.ops.mul(k, self.per_channel(self._weight, c))
        return k

    def scale_shift(self, x_hat, c):
        ops = self.ops
        z = x_hat
        if self._weight is not None:
            z = ops.mul(z, self.per_channel(self._weight, c))
        if self._bias is not None:
            z = ops.add(z, self.per_channel(self._bias, c))
        return z

    def full_index(self, c, ridx):
        """(n, c, *spatial) from a channel and a reduction index (n, *spatial)."""
        return [ridx[0], c, *ridx[1:]]

    @property
    def reduction_ranges(self):
        return [self.size[0], *self.size[2:]]

    def values_per_channel(self):
        """M = N * prod(spatial) as a compute-dtype value (a literal when static)."""
        m = sympy.Mul(*self.reduction_ranges)
        if isinstance(m, (int, sympy.Integer)):
            return self.const(float(int(m)))
        return self.ops.index_expr(m, self.cdt)

    # ---- the activation and its derivative, as ops.* expressions
    def activation(self, z, act: str, lo: float, hi: float):
        ops = self.ops
        if act == "none":
            return z
        if act == "relu":
            return ops.relu(z)
        if act == "hardtanh":
            return ops.minimum(ops.maximum(z, self.const(lo)), self.const(hi))
        if act == "silu":
            return ops.mul(z, ops.sigmoid(z))
        if act == "gelu":
            cdf = ops.mul(self.const(0.5), ops.add(self.const(1.0), ops.erf(ops.mul(z, self.const(math.sqrt(0.5))))))
            return ops.mul(z, cdf)
        if act == "gelu_tanh":
            return ops.mul(ops.mul(self.const(0.5), z), ops.add(self.const(1.0), self._gelu_tanh_t(z)))
        if act == "hardswish":  # z * relu6(z + 3) / 6, in eager's order
            return ops.truediv(ops.mul(z, self._relu6_shifted(z)), self.const(6.0))
        if act == "hardsigmoid":
            return ops.truediv(self._relu6_shifted(z), self.const(6.0))
        if act == "leaky_relu":
            return ops.where(ops.gt(z, self.const(0.0)), z, ops.mul(z, self.const(lo)))
        if act == "mish":
            return ops.mul(z, ops.tanh(self._softplus(z)))
        check_activation(act)
        raise AssertionError("unreachable")

    def _relu6_shifted(self, z):
        ops = self.ops
        return ops.minimum(ops.maximum(ops.add(z, self.const(3.0)), self.const(0.0)), self.const(6.0))

    def _softplus(self, z):
        """log(1 + e^z), z itself above 20 (F.softplus's threshold: e^z would overflow)."""
        ops = self.ops
        return ops.where(ops.gt(z, self.const(20.0)), z, ops.log1p(ops.exp(z)))

    def _gelu_tanh_t(self, z):
        ops = self.ops
        cubic = ops.mul(ops.mul(ops.mul(z, z), z), self.const(GELU_TANH_CUBIC))
        return ops.tanh(ops.mul(self.const(SQRT_2_OVER_PI), ops.add(z, cubic)))

    def activation_derivative(self, z, act: str, lo: float, hi: float):
        """Same conventions as ``ops.conv_bn.activation_derivative``."""
        ops = self.ops
        one, zero = self.const(1.0), self.const(0.0)
        if act == "none":
            return one
        if act == "relu":  # zero where z <= 0: a NaN z passes the gradient, as eagerly
            return ops.where(ops.le(z, zero), zero, one)
        if act == "hardtanh":
            outside = ops.logical_or(ops.le(z, self.const(lo)), ops.ge(z, self.const(hi)))
            return ops.where(outside, zero, one)
        if act == "silu":
            s = ops.sigmoid(z)
            return ops.mul(s, ops.add(one, ops.mul(z, ops.sub(one, s))))
        if act == "gelu":
            cdf = ops.mul(self.const(0.5), ops.add(one, ops.erf(ops.mul(z, self.const(math.sqrt(0.5))))))
            pdf = ops.mul(ops.exp(ops.mul(self.const(-0.5), ops.mul(z, z))), self.const(1.0 / math.sqrt(2 * math.pi)))
            return ops.add(cdf, ops.mul(z, pdf))
        if act == "gelu_tanh":
            t = self._gelu_tanh_t(z)
            dinner = ops.mul(
                self.const(SQRT_2_OVER_PI), ops.add(one, ops.mul(self.const(3 * GELU_TANH_CUBIC), ops.mul(z, z)))
            )
            left = ops.mul(self.const(0.5), ops.add(one, t))
            right = ops.mul(ops.mul(ops.mul(self.const(0.5), z), ops.sub(one, ops.mul(t, t))), dinner)
            return ops.add(left, right)
        if act == "hardswish":
            mid = ops.add(ops.truediv(z, self.const(3.0)), self.const(0.5))
            return ops.where(ops.le(z, self.const(-3.0)), zero, ops.where(ops.lt(z, self.const(3.0)), mid, one))
        if act == "hardsigmoid":
            inside = ops.logical_and(ops.gt(z, self.const(-3.0)), ops.lt(z, self.const(3.0)))
            return ops.where(inside, self.const(1.0 / 6.0), zero)
        if act == "leaky_relu":
            return ops.where(ops.gt(z, zero), one, self.const(lo))
        if act == "mish":
            t = ops.tanh(self._softplus(z))
            return ops.add(t, ops.mul(ops.mul(z, ops.sigmoid(z)), ops.sub(one, ops.mul(t, t))))
        check_activation(act)
        raise AssertionError("unreachable")

    # ---- IR nodes
    def pointwise(self, fn, ranges, dtype):
        return self.ir.Pointwise.create(device=self.device, dtype=dtype, inner_fn=fn, ranges=list(ranges))

    def channel_sum(self, fn):
        """sum over (N, *spatial) of fn(full index), one value per channel, realized."""
        out = self.ir.Reduction.create(
            device=self.device,
            dst_dtype=self.cdt,
            src_dtype=self.cdt,
            inner_fn=lambda idx, ridx: fn(self.full_index(idx[0], ridx)),
            ranges=[self.size[1]],
            reduction_ranges=self.reduction_ranges,
            reduction_type="sum",
        )
        out.realize()
        return out


def _register() -> None:
    lowerings = _compat.inductor_lowerings()

    @_compat.register_lowering(torch.ops.ger.batch_norm_train_stats.default, type_promotion_kind=None)
    def batch_norm_train_stats(x, running_mean, running_var, momentum, eps):
        ir = _compat.inductor_ir()
        _, ops = _compat.inductor_ops()
        cd = compute_dtype(x.get_dtype())
        if x.get_dtype() != cd:
            x = lowerings[prims.convert_element_type.default](x, cd)
        size = list(x.get_size())
        dims = [0, *range(2, len(size))]
        var, mean = lowerings[aten.var_mean.correction](x, dims, correction=0, keepdim=False)
        var.realize()
        mean.realize()
        var_, mean_ = var.make_loader(), mean.make_loader()
        rm_, rv_ = running_mean.make_loader(), running_var.make_loader()
        m = sympy.Mul(size[0], *size[2:])
        device = x.get_device()

        def const(v):
            return ops.constant(v, cd)

        def bessel():
            if isinstance(m, (int, sympy.Integer)):
                return const(int(m) / (int(m) - 1))
            n = ops.index_expr(m, cd)
            return ops.truediv(n, ops.sub(n, const(1.0)))

        def update(loader, batch_value, out_dtype):
            def fn(idx):
                old = ops.mul(const(1.0 - momentum), ops.to_dtype(loader(idx), cd))
                return ops.to_dtype(ops.add(old, ops.mul(const(momentum), batch_value(idx))), out_dtype)

            return fn

        def channel_pointwise(fn, dtype):
            return ir.Pointwise.create(device=device, dtype=dtype, inner_fn=fn, ranges=[size[1]])

        invstd = channel_pointwise(lambda idx: ops.rsqrt(ops.add(var_(idx), const(eps))), cd)
        new_mean = channel_pointwise(update(rm_, mean_, running_mean.get_dtype()), running_mean.get_dtype())
        new_var = channel_pointwise(
            update(rv_, lambda idx: ops.mul(var_(idx), bessel()), running_var.get_dtype()), running_var.get_dtype()
        )
        return mean, invstd, new_mean, new_var

    @_compat.register_lowering(torch.ops.ger.batch_norm_act.default, type_promotion_kind=None)
    def batch_norm_act(x, mean, invstd, weight, bias, act, act_min, act_max):
        ch = _Channels(x, mean, invstd, weight, bias)
        ops = ch.ops

        def fn(idx):
            z = ch.scale_shift(ch.x_hat(idx), idx[1])
            return ops.to_dtype(ch.activation(z, act, act_min, act_max), ch.in_dtype)

        return ch.pointwise(fn, ch.size, ch.in_dtype)

    @_compat.register_lowering(torch.ops.ger.batch_norm_act_backward.default, type_promotion_kind=None)
    def batch_norm_act_backward(grad_out, x, mean, invstd, weight, bias, act, act_min, act_max):
        ch = _Channels(x, mean, invstd, weight, bias)
        ops = ch.ops
        g_ = grad_out.make_loader()

        def g(idx):  # grad_out * act'(z)
            z = ch.scale_shift(ch.x_hat(idx), idx[1])
            return ops.mul(ops.to_dtype(g_(idx), ch.cdt), ch.activation_derivative(z, act, act_min, act_max))

        sum_g = ch.channel_sum(g)
        sum_g_xhat = ch.channel_sum(lambda idx: ops.mul(g(idx), ch.x_hat(idx)))
        sg_, sgx_ = sum_g.make_loader(), sum_g_xhat.make_loader()

        def grad_x(idx):
            c = idx[1]
            m = ch.values_per_channel()
            k = ch.gain(c)
            centred = ops.sub(
                ops.sub(g(idx), ops.truediv(sg_([c]), m)), ops.mul(ch.x_hat(idx), ops.truediv(sgx_([c]), m))
            )
            return ops.to_dtype(ops.mul(k, centred), ch.in_dtype)

        return ch.pointwise(grad_x, ch.size, ch.in_dtype), sum_g_xhat, sum_g

    @_compat.register_lowering(torch.ops.ger.clamp_activation.default, type_promotion_kind=None)
    def clamp_activation(x, min_val, max_val):
        ir = _compat.inductor_ir()
        _, ops = _compat.inductor_ops()
        load, dtype = x.make_loader(), x.get_dtype()

        def fn(idx):
            y = ops.maximum(load(idx), ops.constant(min_val, dtype))
            return y if max_val is None else ops.minimum(y, ops.constant(max_val, dtype))

        return ir.Pointwise.create(device=x.get_device(), dtype=dtype, inner_fn=fn, ranges=list(x.get_size()))

    @_compat.register_lowering(torch.ops.ger.clamp_activation_backward.default, type_promotion_kind=None)
    def clamp_activation_backward(grad_out, out, min_val, max_val):
        ir = _compat.inductor_ir()
        _, ops = _compat.inductor_ops()
        load_grad, load_out, dtype = grad_out.make_loader(), out.make_loader(), grad_out.get_dtype()

        def fn(idx):
            y = load_out(idx)  # zero where out <= min (>= max): a NaN output passes the gradient
            outside = ops.le(y, ops.constant(min_val, out.get_dtype()))
            if max_val is not None:
                outside = ops.logical_or(outside, ops.ge(y, ops.constant(max_val, out.get_dtype())))
            return ops.where(outside, ops.constant(0.0, dtype), load_grad(idx))

        return ir.Pointwise.create(device=grad_out.get_device(), dtype=dtype, inner_fn=fn, ranges=list(out.get_size()))

    onednn_conv = torch.ops.mkldnn._convolution_pointwise.default
    if onednn_conv in lowerings:

        @_compat.register_lowering(torch.ops.ger.onednn_conv_act.default, type_promotion_kind=None)
        def onednn_conv_act(x, weight, bias, padding, stride, dilation, groups, act, act_min, act_max):
            # the activations are channels_last (Inductor's oneDNN lowering makes them so) and
            # the kernel copies a weight of another layout to channels_last on every call: have
            # the fold that computes the weight write it channels_last
            ir = _compat.inductor_ir()
            if len(weight.get_size()) == 4:
                weight = ir.ExternKernel.require_channels_last(weight)
            else:
                weight = ir.ExternKernel.require_channels_last_3d(weight)
            attr, algorithm = ONEDNN_POST_OPS[act]
            scalars = onednn_scalars(act, act_min, act_max)
            return lowerings[onednn_conv](x, weight, bias, padding, stride, dilation, groups, attr, scalars, algorithm)


_register()
