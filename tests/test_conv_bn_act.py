"""conv -> BN -> activation: every conv variant x activation x eval/train x grad on/off
against a float64 eager reference (forward, backward, running statistics), the match
counters and report, every near-miss, the lowerings against the eager kernels, the
generated code, graph dumps before/after, and Inductor's ConvTranspose folding bug.

Most tests run the pass on the Dynamo graph and execute the rewritten graph eagerly
(:func:`rewrite_only`, no code generation); a few compile end to end with ``ger``.
"""

from __future__ import annotations

import copy
import re
import statistics

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import FileCheck

import ger_inductor
from examples.resnet18_cnn import randomize_bn_statistics, resnet18
from ger_inductor import GerOptions, _compat, debug, fleet, lowerings, passes
from ger_inductor.backend import ger
from ger_inductor.debug import graph_text
from ger_inductor.ops import conv_bn as conv_bn_ops
from ger_inductor.passes import conv_bn_act

from .conftest import requires_cuda, rewrite_backend
from .expect import ExpectTestCase

EVAL, TRAIN, ACT = conv_bn_act.PATTERN_EVAL, conv_bn_act.PATTERN_TRAIN, conv_bn_act.PATTERN_ACT
#: fp32 against float64, norm-wise relative (the issue's forward bound; gradients too)
FP32_REL = 1e-4


def rewrite_only(profile: str = "auto", graphs: list | None = None, eager_ops: tuple = (), reparameterize: bool = True):
    """ger's conv_bn_act pass alone, the rewritten graph run eagerly (conftest.rewrite_backend);
    summed branches merged (option ``reparameterize``, off by default in ger)."""
    on_graph = None if graphs is None else (lambda before, gm: graphs.append((before, graph_text(gm))))
    return rewrite_backend({"device_profile": profile, "passes": ["conv_bn_act"], "eager_ops": list(eager_ops),
                            "reparameterize": reparameterize}, on_graph)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error; tensors of norm < 0.1 are compared absolutely (a conv
    bias before training-mode BN has a zero gradient, up to rounding)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(0.1))


def _ger_strict(gm, example_inputs):
    return ger(gm, example_inputs, options={"strict": True})


def _assert_as_accurate_as_eager(errors: dict, model, x, train, grad, dtype=torch.float32, floor=FP32_REL, factor=4):
    """Each error within ``floor`` or within ``factor`` x eager's own error (in ``dtype``)
    against float64: quantities that are zero in exact arithmetic (the gradient of a conv
    bias before training-mode BN) have no meaningful relative error of their own."""
    eager = _compare(model, x, train, grad, None, dtype=dtype)
    bad = {k: (v, eager[k]) for k, v in errors.items() if not (v <= floor or v <= factor * eager[k])}
    assert not bad, bad


def _bn_class(dims: int):
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]


def _report_matches(pattern=None):
    rep = ger_inductor.last_report()
    return [m for m in rep.matches if pattern is None or m.pattern == pattern]


def _report_near_misses(pattern=None):
    rep = ger_inductor.last_report()
    return [m for m in rep.near_misses if pattern is None or m.pattern == pattern]


# ----------------------------------------------------------------------------- the matrix
#: name -> (conv factory, input shape)
CONVS = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (3, 4, 11)),
    "conv2d_stride2_nobias": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), (3, 4, 9, 9)),
    "conv2d_groups_dilation": (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), (3, 4, 9, 9)),
    "depthwise": (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), (3, 6, 9, 9)),
    "same_padding": (lambda: nn.Conv2d(4, 6, 3, padding="same"), (3, 4, 9, 9)),
    "same_padding_even_kernel": (lambda: nn.Conv2d(4, 6, 4, padding="same"), (3, 4, 9, 9)),
    "valid_padding": (lambda: nn.Conv2d(4, 6, 3, padding="valid"), (3, 4, 9, 9)),
    "reflect_padding_mode": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), (3, 4, 9, 9)),
    "conv3d": (lambda: nn.Conv3d(4, 6, 3, padding=1), (2, 4, 5, 5, 5)),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2), (3, 4, 7)),
    "conv_transpose2d_groups": (
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), (3, 4, 5, 5)
    ),
    "conv_transpose3d": (lambda: nn.ConvTranspose3d(4, 6, 2, stride=2, bias=False), (2, 4, 3, 3, 3)),
}
#: spelling -> (activation applied to BN's output, the op name ger fuses it as)
ACTIVATIONS = {
    "none": (lambda t: t, "none"),
    "nn.ReLU(inplace=True)": (nn.ReLU(inplace=True), "relu"),
    "F.relu": (F.relu, "relu"),
    "Tensor.relu": (lambda t: t.relu(), "relu"),
    "torch.relu_": (torch.relu_, "relu"),
    "nn.ReLU6": (nn.ReLU6(), "hardtanh"),
    "F.hardtanh(-1, 2)": (lambda t: F.hardtanh(t, -1, 2), "hardtanh"),
    "nn.SiLU": (nn.SiLU(), "silu"),
    "F.gelu": (F.gelu, "gelu"),
    "nn.GELU(tanh)": (nn.GELU(approximate="tanh"), "gelu_tanh"),
    "nn.Hardswish": (nn.Hardswish(), "hardswish"),
    "F.hardsigmoid": (F.hardsigmoid, "hardsigmoid"),
    "nn.LeakyReLU(0.2, inplace=True)": (nn.LeakyReLU(0.2, inplace=True), "leaky_relu"),
    "F.leaky_relu": (F.leaky_relu, "leaky_relu"),
    "nn.Mish": (nn.Mish(), "mish"),
}
MODES = {  # name -> (BN training, grad enabled)
    "eval_no_grad": (False, False),
    "eval_grad": (False, True),
    "train_grad": (True, True),
    "train_no_grad": (True, False),
}


class Branches(nn.Module):
    """One conv -> BN -> activation branch per activation spelling, on the same input."""

    def __init__(self, conv_factory, dims: int):
        super().__init__()
        self.convs = nn.ModuleList(conv_factory() for _ in ACTIVATIONS)
        self.bns = nn.ModuleList(_bn_class(dims)(c.out_channels) for c in self.convs)
        self.acts = [fn for fn, _ in ACTIVATIONS.values()]

    def forward(self, x):
        return tuple(act(bn(conv(x))) for conv, bn, act in zip(self.convs, self.bns, self.acts))


def _compare(model: nn.Module, x: torch.Tensor, train: bool, grad: bool, backend, dtype=torch.float32):
    """Run ``model`` compiled with ``backend`` (None: eager) and a float64 eager copy on the
    same input; return the norm-wise relative errors of outputs, gradients and running
    statistics."""
    ref = copy.deepcopy(model).double().train(train)
    test = copy.deepcopy(model).to(dtype).train(train)
    x_ref = x.detach().double().requires_grad_(grad)
    x_test = x.detach().to(dtype, copy=True).requires_grad_(grad)
    compiled = test if backend is None else torch.compile(test, backend=backend)
    with torch.set_grad_enabled(grad):
        outs, refs = compiled(x_test), ref(x_ref)
    outs, refs = (outs, refs) if isinstance(outs, tuple) else ((outs,), (refs,))
    errors = {f"out{i}": _rel(o, r) for i, (o, r) in enumerate(zip(outs, refs))}
    if grad:
        g = torch.Generator().manual_seed(1)
        cot = [torch.randn(r.shape, generator=g, dtype=torch.float64).to(r.device) for r in refs]
        sum((o.double() * c).sum() for o, c in zip(outs, cot)).backward()
        sum((r * c).sum() for r, c in zip(refs, cot)).backward()
        errors["grad x"] = _rel(x_test.grad, x_ref.grad)
        for (name, p), p_ref in zip(test.named_parameters(), ref.parameters()):
            errors[f"grad {name}"] = _rel(p.grad, p_ref.grad)
    for (name, b), b_ref in zip(test.named_buffers(), ref.buffers()):
        if b.dtype.is_floating_point:
            errors[name] = _rel(b, b_ref)
        else:
            assert torch.equal(b, b_ref), name  # num_batches_tracked
    return errors


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("conv", list(CONVS))
def test_conv_variant_x_activation_matches_float64_eager(conv, mode, seed):
    """Each conv variant with every activation spelling, eval/train x grad on/off:
    outputs, input and parameter gradients, running stats vs float64 eager; all matched."""
    factory, shape = CONVS[conv]
    train, grad = MODES[mode]
    model = randomize_bn_statistics(Branches(factory, len(shape) - 2))
    x = torch.randn(shape)
    _assert_as_accurate_as_eager(_compare(model, x, train, grad, rewrite_only()), model, x, train, grad)
    matches = _report_matches(TRAIN if train else EVAL)
    assert [m.detail["act"] for m in matches] == [name for _, name in ACTIVATIONS.values()]
    assert len(_report_matches()) == len(ACTIVATIONS) and not ger_inductor.last_report().near_misses
    if not train:
        onednn = [m.detail["conv_impl"] == "onednn post-op" for m in matches]
        expect_onednn = (
            not grad
            and _compat.has_onednn_conv_fusion()
            and "transpose" not in conv
            and conv not in ("conv1d", "same_padding_even_kernel")
        )
        assert onednn == [expect_onednn and m.detail["act"] in conv_bn_ops.ONEDNN_POST_OPS for m in matches], [
            m.detail for m in matches]


def test_functional_and_keyword_spellings(seed):
    """F.conv2d / F.batch_norm / torch.batch_norm with keyword arguments (Inductor's
    efficient_conv_bn_eval drops conv kwargs; ger keeps them)."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 4, 3, 3) * 0.3)
            self.b = nn.Parameter(torch.randn(6))
            self.bn1, self.bn2 = nn.BatchNorm2d(6), nn.BatchNorm2d(6)

        def forward(self, x):
            y = F.conv2d(x, self.w, bias=self.b, stride=2, padding=1)
            y = F.batch_norm(
                y, self.bn1.running_mean, self.bn1.running_var, weight=self.bn1.weight, bias=self.bn1.bias,
                training=self.training, eps=1e-3, momentum=0.3,
            )
            z = torch.conv2d(x, self.w, self.b, padding=(1, 1), dilation=1, groups=1)
            z = torch.batch_norm(
                z, self.bn2.weight, self.bn2.bias, self.bn2.running_mean, self.bn2.running_var,
                self.training, 0.2, 1e-4, False,
            )
            return F.silu(y, inplace=False), torch.relu(z)

    model = randomize_bn_statistics(Functional())
    x = torch.randn(3, 4, 8, 8)
    for train in (False, True):
        _assert_as_accurate_as_eager(_compare(model, x, train, True, rewrite_only()), model, x, train, True)
        assert [m.detail["act"] for m in _report_matches(TRAIN if train else EVAL)] == ["silu", "relu"]


def test_shared_weights_and_mixed_train_eval(seed):
    """One conv weight used by two conv -> BN pairs, one BN left in training mode
    under model.eval(): each pair rewritten on its own, gradients accumulate right."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            y = F.relu(self.bn1(self.conv(x)))
            return F.relu6(self.bn2(self.conv(y)))

    model = randomize_bn_statistics(Shared()).eval()
    model.bn2.train()
    ref = copy.deepcopy(model).double()
    ref.bn2.train()
    test = copy.deepcopy(model)
    test.bn2.train()
    x = torch.randn(2, 4, 6, 6)
    out = torch.compile(test, backend=rewrite_only())(x)
    expected = ref(x.double())
    out.sum().backward()
    expected.sum().backward()
    assert _rel(out, expected) <= FP32_REL
    assert _rel(test.conv.weight.grad, ref.conv.weight.grad) <= FP32_REL
    assert _rel(test.bn2.running_var, ref.bn2.running_var) <= FP32_REL
    assert [m.pattern for m in _report_matches()] == [EVAL, TRAIN]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_bf16_model_within_bf16_tolerance_fold_in_fp32(train, seed):
    """A bf16 model: the fold (eval) and the statistics (train) are computed in fp32 and
    cast once, so ger's error against float64 stays at eager bf16's level."""
    factory, shape = CONVS["conv2d_groups_dilation"]
    model = randomize_bn_statistics(Branches(factory, 2))
    x = torch.randn(shape)
    ours = _compare(model, x, train, True, rewrite_only(), dtype=torch.bfloat16)
    eager = _compare(model, x, train, True, None, dtype=torch.bfloat16)
    # bf16 gradient errors are heavy-tailed, quantity by quantity: compare the
    # distributions (typical and worst), not each quantity
    assert statistics.median(ours.values()) <= 1.5 * statistics.median(eager.values()), (ours, eager)
    assert max(ours.values()) <= 2 * max(eager.values()), (ours, eager)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_weights_outweighing_the_output_scale_the_output_instead(grad, seed):
    """A conv with more weights than outputs (a late ResNet stage at a small batch): BN
    becomes one FMA on the conv output, fused with the activation, instead of a pass
    over the weights; same numbers."""
    model = randomize_bn_statistics(nn.Sequential(nn.Conv2d(32, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU6()))
    x = torch.randn(2, 32, 3, 3)
    _assert_as_accurate_as_eager(_compare(model, x, False, grad, rewrite_only()), model, x, False, grad)
    [match] = _report_matches(EVAL)
    assert match.detail["fold_into"] == "output" and match.detail["conv_impl"] == "aten conv"
    assert match.detail["why"] == "weights (13824 values) outweigh the output (864)"


def test_autocast_conv_is_folded_in_the_autocast_dtype(seed):
    """Under autocast the conv computes in bf16 while its weight is fp32: the fold casts
    to bf16 once, as autocast casts the weight."""
    model = randomize_bn_statistics(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.compile(copy.deepcopy(model), backend=rewrite_only())(x)
        eager = model(x)
    ref = copy.deepcopy(model).double()(x.double())
    assert out.dtype == torch.bfloat16
    assert _rel(out, ref) <= max(2 * _rel(eager, ref), 2e-3)
    assert len(_report_matches(EVAL)) == 1


def test_pinned_profiles_choose_per_device_strategy():
    """The same CPU graph under pinned profiles: oneDNN post-op only on CPU profiles."""
    model = randomize_bn_statistics(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())).eval()
    x = torch.randn(2, 3, 8, 8)
    for profile, impl, eval_conv in (
        ("cpu-avx512", "onednn post-op", "onednn_post_op"),
        ("h100", "aten conv", "vendor_conv_bias"),
        ("mi300x", "aten conv", "vendor_conv_bias"),
    ):
        _compat.dynamo_reset()
        with torch.no_grad():
            torch.compile(copy.deepcopy(model), backend=rewrite_only(profile))(x)
        rep = ger_inductor.last_report()
        assert [m.detail["conv_impl"] for m in rep.matches] == [impl], profile
        assert rep.passes[0].strategy["eval_conv"] == eval_conv
        assert rep.passes[0].strategy == fleet.strategy("conv_bn_act", fleet.PINNED_PROFILES[profile])


# ----------------------------------------------------------------------------- near-misses
def _near_misses():
    return [(n.pattern, n.reason) for n in ger_inductor.last_report().near_misses]


@pytest.mark.parametrize("mode", list(MODES))
def test_conv_output_with_other_users(mode, seed):
    """The conv output read beside BN (``hardswish(bn(y)) + y.sum(1)``): train fuses BN +
    activation (the conv stays anyway); eval applies BN to the kept conv's output
    (``bn_act_eval``) instead of folding it into the weights."""

    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            z = F.hardswish(self.bn(y))
            return z + y.sum(1, keepdim=True)

    train, grad = MODES[mode]
    model = randomize_bn_statistics(TwoUsers())
    x = torch.randn(2, 3, 6, 6)
    _assert_as_accurate_as_eager(_compare(model, x, train, grad, rewrite_only()), model, x, train, grad)
    [m] = _report_matches()
    assert m.pattern == (TRAIN if train else EVAL) and m.detail["act"] == "hardswish", m.detail
    assert not ger_inductor.last_report().near_misses
    if not train:
        assert m.detail["fold_into"] == "output" and m.detail["conv_impl"] == "aten conv, kept"


def test_training_refusals_empty_batch_and_written_activation(seed):
    """Training candidates left to eager's ops (review, stop 37): an empty batch (eager's
    BN returns early, its running statistics untouched; the fused update wrote NaN into
    them), and an activation output written in place later where a gradient is needed
    (eager's relu backward reads its saved result and raises autograd's version error;
    the fused op recomputes the activation, so the write went unseen)."""

    class Net(nn.Module):
        def __init__(self, write):
            super().__init__()
            self.conv, self.bn, self.write = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), write

        def forward(self, x):
            y = F.relu(self.bn(self.conv(x)))
            if self.write:
                y.mul_(2.0)
            return y

    torch._dynamo.reset()
    model = Net(False).train()
    out = torch.compile(model, backend=rewrite_only())(torch.randn(0, 3, 8, 8))
    assert out.shape == (0, 4, 8, 8)
    torch.testing.assert_close(model.bn.running_mean, torch.zeros(4), rtol=0, atol=0)
    torch.testing.assert_close(model.bn.running_var, torch.ones(4), rtol=0, atol=0)
    assert not _report_matches() and any("an empty batch" in r for _, r in _near_misses()), _near_misses()

    torch._dynamo.reset()
    model = Net(True).train()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        model(x).sum().backward()  # eager
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.compile(model, backend=rewrite_only())(x).sum().backward()
    assert not [m for m in _report_matches() if m.pattern == TRAIN]
    assert any("written in place later" in r for _, r in _near_misses()), _near_misses()

    class Residual(nn.Module):  # written, but eager saves no result: no error either way, rewritten
        def __init__(self, act):
            super().__init__()
            self.conv, self.bn, self.act = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), act

        def forward(self, x):
            y = self.bn(self.conv(x))
            if self.act is not None:
                y = self.act(y)
            y += x  # the last BN of a residual block (torchvision / timm), or silu's output
            return y

    for act in (None, nn.SiLU()):
        torch._dynamo.reset()
        model = Residual(act).train()
        ref = copy.deepcopy(model)
        x = torch.randn(2, 4, 8, 8)
        torch.compile(model, backend=rewrite_only())(x).square().sum().backward()
        ref(x).square().sum().backward()
        assert [m.pattern for m in _report_matches()] == [TRAIN], _near_misses()
        for p_, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p_.grad, q.grad, rtol=1e-4, atol=1e-5)


def test_bf16_eval_with_gradients_keeps_bn_in_fp32(seed):
    """bf16 autocast, eval BN whose fp32 weight and bias require grad (frozen-statistics
    fine-tuning): BN is applied after the conv in fp32 (``fold_into=output``), so its
    parameters' gradients are eager's; folded into bf16 weights they were bf16-rounded
    (bias gradient 14.125 vs 14.156) and the rounding moved relu's mask (12.3 vs 10.05)."""
    model = randomize_bn_statistics(nn.Sequential(nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32), nn.ReLU())).eval()
    x = torch.randn(4, 16, 12, 12)

    def grads(fn):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fn(x).float().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    ref = grads(model)
    torch._dynamo.reset()
    got = grads(torch.compile(model, backend=rewrite_only()))
    [m] = _report_matches()
    assert m.pattern == EVAL and m.detail["fold_into"] == "output", m.detail
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_conv_output_written_between_conv_and_bn(seed):
    """An in-place write to the conv output between the conv and BN (the write is one more
    reader of the conv): BN reads the written value eagerly. Folding BN into the weights
    would read the conv's output before the write; BN applied to the kept conv's output
    reads it where BN does. Eager's numbers in eval and train, no_grad."""

    class WrittenFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            y.add_(1.0)
            return F.relu(self.bn(y))

    model = randomize_bn_statistics(WrittenFirst())
    x = torch.randn(2, 3, 6, 6)
    for train in (False, True):
        _assert_as_accurate_as_eager(_compare(model, x, train, False, rewrite_only()), model, x, train, False)
        [m] = _report_matches()
        assert m.pattern == (TRAIN if train else EVAL)
        if not train:
            assert m.detail["fold_into"] == "output" and m.detail["conv_impl"] == "aten conv, kept"


class RepBlock(nn.Module):
    """A RepVGG / MobileOne-style block: conv kxk -> BN plus conv 1x1 -> BN [plus BN of the
    input], summed (``+`` then ``+=``), then an activation; or ACNet's 3x3 + 1x3 + 3x1."""

    def __init__(self, c=8, groups=1, identity=True, stride=1, kernels=((3, 3), (1, 1)), act=nn.ReLU(), dims=2):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.convs = nn.ModuleList(conv(c, c, k if dims == 2 else k[0], stride=stride,
                                        padding=tuple((ki - 1) // 2 for ki in k) if dims == 2 else (k[0] - 1) // 2,
                                        groups=groups, bias=i == 1) for i, k in enumerate(kernels))
        self.bns = nn.ModuleList(_bn_class(dims)(c) for _ in kernels)
        self.identity = _bn_class(dims)(c) if identity else None
        self.act = act

    def forward(self, x):
        y = self.bns[0](self.convs[0](x)) + self.bns[1](self.convs[1](x))
        for conv, bn in zip(self.convs[2:], self.bns[2:]):
            y = y + bn(conv(x))
        if self.identity is not None:
            y += self.identity(x)
        return self.act(y)


REP_BLOCKS = {
    "repvgg": (lambda: RepBlock(), (2, 8, 7, 7)),
    "repvgg_groups": (lambda: RepBlock(groups=4, act=nn.SiLU()), (2, 8, 7, 7)),
    "depthwise_5x5_no_act": (lambda: RepBlock(groups=8, kernels=((5, 5), (3, 3), (1, 1)), act=nn.Identity()), (2, 8, 9, 9)),
    "stride2_no_identity": (lambda: RepBlock(identity=False, stride=2, act=nn.Hardswish()), (2, 8, 9, 9)),
    "acnet_3x3_1x3_3x1": (lambda: RepBlock(identity=False, kernels=((3, 3), (1, 3), (3, 1))), (2, 8, 7, 7)),
    "conv1d": (lambda: RepBlock(dims=1, kernels=((3,), (1,))), (2, 8, 11)),
}


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("block", list(REP_BLOCKS))
def test_summed_branches_fold_into_one_conv(block, grad, seed):
    """Eval conv -> BN branches of one input, summed (with an identity BN, groups, stride,
    kernels of several sizes and shapes): one convolution whose kernel is the sum of the
    folded kernels, the activation after the sum fused; eager's numbers and gradients."""
    factory, shape = REP_BLOCKS[block]
    model = randomize_bn_statistics(factory())
    x = torch.randn(shape)
    graphs = []
    _assert_as_accurate_as_eager(_compare(model, x, False, grad, rewrite_only(graphs=graphs)), model, x, False, grad)
    [m] = _report_matches(conv_bn_act.PATTERN_BRANCHES)
    block_ = factory()
    assert m.detail["branches"] == len(block_.convs) and m.detail["identity"] == (block_.identity is not None)
    assert not ger_inductor.last_report().near_misses
    after = graphs[0][1]
    assert after.count("ger_inductor_ops_conv_bn_branches_conv_bn_act_eval(") == 1, after
    FileCheck().check_not("ger_inductor_ops_conv_bn_conv_bn_act_eval(").check_not("torch.conv").check_not(
        "torch.nn.functional.batch_norm(").check_not("torch.relu(").check_not("operator.add").run(after)


def test_summed_branches_under_cpu_autocast(seed):
    """Under CPU bf16 autocast the branches' convs compute in bf16: the folded kernel is
    summed in fp32, cast once, and gives autocast's dtype and eager's numbers (bf16)."""
    model = randomize_bn_statistics(RepBlock(groups=2)).eval()
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x)
        out = torch.compile(model, backend=rewrite_only())(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert _report_matches(conv_bn_act.PATTERN_BRANCHES)
    exact = model.double()(x.double())
    assert _rel(out, exact) <= max(4 * _rel(ref, exact), 1e-2), (_rel(out, exact), _rel(ref, exact))


def test_summed_branches_with_a_promoting_sum_are_left_alone(seed):
    """Under autocast the convs give bf16 and a BN of the fp32 input gives fp32: ``a + b +
    bn(x)`` is fp32 (promotion; ``y += bn(x)`` would stay bf16 and fold). One conv would
    give bf16: a near-miss, eager's dtype."""

    class Promoting(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
            self.bn_a, self.bn_b, self.bn_x = nn.BatchNorm2d(8), nn.BatchNorm2d(8), nn.BatchNorm2d(8)

        def forward(self, x):
            return self.bn_a(self.a(x)) + self.bn_b(self.b(x)) + self.bn_x(x)

    model = randomize_bn_statistics(Promoting()).eval()
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x)
        out = torch.compile(model, backend=rewrite_only())(x)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    assert ref.dtype == torch.float32  # the sum promoted: left alone, with the reason
    assert not _report_matches(conv_bn_act.PATTERN_BRANCHES)
    assert any("type promotion" in r for _, r in _near_misses())


def test_summed_branches_near_miss_and_residual_adds(seed):
    """Branches of one input that cannot be one conv (different groups) are a near-miss
    naming why (each pair is still folded); a residual add of a conv -> BN and the
    block's input, or a branch sliced before the sum, is no candidate (nothing reported)."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1, groups=2)
            self.c, self.d = nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.Conv2d(8, 8, 3, padding=1)
            self.e = nn.Conv2d(8, 8, 3, padding=1)
            self.bns = nn.ModuleList(nn.BatchNorm2d(8) for _ in range(5))

        def forward(self, x):
            groups = self.bns[0](self.a(x)) + self.bns[1](self.b(x))
            residual = (self.bns[2](self.d(x)) + x).relu()
            sliced = self.bns[3](self.c(x)) + self.bns[4](self.e(x))[..., ::2, ::2]
            return groups.sum() + residual.sum() + sliced.sum()

    model = randomize_bn_statistics(Mixed())
    x = torch.randn(2, 8, 8, 8)
    _assert_as_accurate_as_eager(_compare(model, x, False, False, rewrite_only()), model, x, False, False)
    assert not _report_matches(conv_bn_act.PATTERN_BRANCHES)
    assert len(_report_matches(EVAL)) == 5
    assert _near_misses() == [(conv_bn_act.PATTERN_BRANCHES,
                               conv_bn_act.NEAR_MISS_REASONS["branches"] + " (the branches differ in groups)")]


def test_summed_branches_inside_a_residual_sum(seed):
    """``(b1 + b2) + x`` (branches summed, then the residual): the sub-sum folds. ``x + b1
    + b2`` (no sub-sum of branches only): a near-miss that says how to write it."""

    class Residual(nn.Module):
        def __init__(self, residual_first: bool):
            super().__init__()
            self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
            self.bn_a, self.bn_b = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
            self.residual_first = residual_first

        def forward(self, x):
            if self.residual_first:
                return (x + self.bn_a(self.a(x)) + self.bn_b(self.b(x))).relu()
            return (self.bn_a(self.a(x)) + self.bn_b(self.b(x)) + x).relu()

    x = torch.randn(2, 8, 6, 6)
    for residual_first in (False, True):
        model = randomize_bn_statistics(Residual(residual_first))
        _assert_as_accurate_as_eager(_compare(model, x, False, True, rewrite_only()), model, x, False, True)
        if residual_first:
            assert not _report_matches(conv_bn_act.PATTERN_BRANCHES)
            [(pattern, reason)] = _near_misses()
            assert pattern == conv_bn_act.PATTERN_BRANCHES and "sum them first" in reason
        else:
            [m] = _report_matches(conv_bn_act.PATTERN_BRANCHES)
            assert m.detail["act"] == "none" and not _near_misses()  # the relu is after the residual add


def test_summed_branches_input_written_between_branches_is_refused(seed):
    """The input written in place between the branches' convs: eager's second branch
    reads the new values; one conv at the sum would read them for both. Refused, named."""

    class Written(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
            self.bn_a, self.bn_b = nn.BatchNorm2d(8), nn.BatchNorm2d(8)

        def forward(self, x):
            x = x * 1.0
            ya = self.bn_a(self.a(x))
            x.mul_(0.5)
            return ya + self.bn_b(self.b(x))

    model = randomize_bn_statistics(Written())
    x = torch.randn(2, 8, 6, 6)
    _assert_as_accurate_as_eager(_compare(model, x, False, False, rewrite_only()), model, x, False, False)
    assert not _report_matches(conv_bn_act.PATTERN_BRANCHES)
    [(pattern, reason)] = [(p, r) for p, r in _near_misses() if p == conv_bn_act.PATTERN_BRANCHES]
    assert "writes a tensor the rewrite would read at another position" in reason and "mul_" in reason


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_near_miss_track_running_stats_false(train, seed):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU())
    x = torch.randn(2, 3, 6, 6)
    _assert_as_accurate_as_eager(_compare(model, x, train, True, rewrite_only()), model, x, train, True)
    assert not _report_matches()
    assert _near_misses() == [(TRAIN, conv_bn_act.NEAR_MISS_REASONS["no_running_stats"])]


def test_near_miss_activation_not_fused_but_conv_bn_folded(seed):
    model = randomize_bn_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ELU()))
    x = torch.randn(2, 3, 6, 6)
    _assert_as_accurate_as_eager(_compare(model, x, False, True, rewrite_only()), model, x, False, True)
    assert [m.detail["act"] for m in _report_matches(EVAL)] == ["none"]
    [(pattern, reason)] = _near_misses()
    assert pattern == ACT and reason.startswith(conv_bn_act.NEAR_MISS_REASONS["activation"]) and "elu" in reason


def test_near_miss_eager_ops_are_left_alone(seed):
    """Nodes the user forces to eager (``eager_ops``) are not rewritten: a BN listed stops
    the match; an activation listed stays outside the fold."""
    model = randomize_bn_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).eval()
    x = torch.randn(2, 3, 6, 6)
    torch.compile(copy.deepcopy(model), backend=rewrite_only(eager_ops=("batch_norm",)))(x)
    [(pattern, reason)] = _near_misses()
    assert pattern == EVAL and reason.startswith(conv_bn_act.NEAR_MISS_REASONS["eager"]) and not _report_matches()
    _compat.dynamo_reset()
    torch.compile(copy.deepcopy(model), backend=rewrite_only(eager_ops=("relu",)))(x)
    [(pattern, reason)] = _near_misses()
    assert pattern == ACT and reason.startswith(conv_bn_act.NEAR_MISS_REASONS["eager"])
    assert [m.detail["act"] for m in _report_matches(EVAL)] == ["none"]


def test_rewritten_graphs_hit_inductors_caches(seed):
    """The helpers the pass inserts are cacheable: a second compile of the same model
    (fresh Dynamo) hits the FX graph / AOTAutograd caches, nothing bypasses them."""
    model = randomize_bn_statistics(BlocksA(blocks=2))
    x = torch.randn(2, 8, 6, 6)
    for _ in range(2):
        _compat.dynamo_reset()
        test = copy.deepcopy(model)
        torch.compile(test, backend="ger", options={"strict": True})(x).sum().backward()
    c = _compat.counters()
    assert c["aot_autograd"]["autograd_cache_bypass"] == 0 and c["inductor"]["fxgraph_cache_bypass"] == 0, dict(c)
    assert c["aot_autograd"]["autograd_cache_hit"] >= 1 or c["inductor"]["fxgraph_cache_hit"] >= 2, dict(c)


def test_near_miss_other_normalisation(seed):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU())
    torch.compile(model, backend=rewrite_only())(torch.randn(2, 3, 6, 6))
    [(pattern, reason)] = _near_misses()
    assert reason == conv_bn_act.NEAR_MISS_REASONS["other_norm"] + " (group norm)"


def _hand_graph(build, example_values: dict):
    """A graph built node by node, with example values set by hand, and a context to run
    the pass on it: candidates Dynamo cannot produce (flags computed in the graph, ...).
    ``build(graph, placeholders)`` returns the output node; nodes are named after their ops."""
    graph = fx.Graph()
    placeholders = {name: graph.placeholder(name) for name in ("x", "w", "rm", "rv", "p")}
    graph.output(build(graph, placeholders))
    gm = fx.GraphModule(nn.Module(), graph)
    for node in gm.graph.nodes:
        if node.name in example_values:
            node.meta["example_value"] = example_values[node.name]
    report = debug.new_report(name="hand", devices=["cpu"], options={}, mode=None)
    ctx = passes.PassContext(GerOptions.parse({"strict": True}), fleet.PINNED_PROFILES["cpu-avx512"], report)
    ctx.record = debug.PassRecord(name="conv_bn_act", seconds=0.0, changed=False)
    report.passes.append(ctx.record)
    return gm, ctx


def _values(bn_dtype=torch.float32, rm_device="cpu"):
    return {
        "x": torch.randn(2, 3, 6, 6), "w": torch.randn(4, 3, 3, 3), "rm": torch.zeros(4, device=rm_device),
        "rv": torch.ones(4), "conv2d": torch.randn(2, 4, 4, 4), "batch_norm": torch.randn(2, 4, 4, 4, dtype=bn_dtype),
    }  # fmt: skip


#: stands for the graph input ``p`` in the arguments of a hand-built node
COMPUTED = object()


def _conv_bn(conv_args=(), bn_kwargs=None):
    def build(graph, p):
        def resolve(v):
            return p["p"] if v is COMPUTED else v

        conv = graph.call_function(torch.conv2d, (p["x"], p["w"], *map(resolve, conv_args)))
        kwargs = {k: resolve(v) for k, v in (bn_kwargs or {}).items()}
        return graph.call_function(F.batch_norm, (conv, p["rm"], p["rv"]), kwargs)

    return build


def _sync_batch_norm_stats(graph, p):
    conv = graph.call_function(torch.conv2d, (p["x"], p["w"]))
    return graph.call_function(torch.batch_norm_stats, (conv, 1e-5))


@pytest.mark.parametrize(
    "build, values, key",
    [
        (_conv_bn(bn_kwargs={"training": COMPUTED}), _values(), "training_flag"),
        (_conv_bn(conv_args=(None, COMPUTED)), _values(), "non_constant"),
        (_conv_bn(bn_kwargs={"bogus": 1}), _values(), "signature"),
        (_conv_bn(), {}, "no_example_value"),
        (_conv_bn(), _values(bn_dtype=torch.float16), "dtype"),
        (_conv_bn(), _values(rm_device="meta"), "device"),
        (_sync_batch_norm_stats, _values(), "other_norm"),
    ],
    ids=["training_flag", "non_constant", "signature", "no_example_value", "dtype", "device", "sync_batch_norm"],
)
def test_near_miss_reasons_on_hand_built_graphs(build, values, key):
    gm, ctx = _hand_graph(build, values)
    assert conv_bn_act.run(gm, ctx) is False
    [miss] = ctx.record.near_misses
    assert miss.reason.startswith(conv_bn_act.NEAR_MISS_REASONS[key]), miss.reason
    assert not ctx.record.matches


def test_near_miss_hardtanh_bounds_not_constant():
    def build(graph, p):
        bn = _conv_bn()(graph, p)
        return graph.call_function(F.hardtanh, (bn, 0.0, p["p"]))

    gm, ctx = _hand_graph(build, _values())
    assert conv_bn_act.run(gm, ctx) is True  # conv -> BN still folds
    [miss] = ctx.record.near_misses
    assert miss.pattern == ACT and miss.reason.startswith(conv_bn_act.NEAR_MISS_REASONS["hardtanh_bounds"])
    assert [m.detail["act"] for m in ctx.record.matches] == ["none"]


# ----------------------------------------------------------------------------- graph dumps
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _dumps(train: bool, grad: bool) -> tuple[str, str]:
    graphs: list = []
    with torch.set_grad_enabled(grad):
        torch.compile(Block().train(train), backend=rewrite_only("cpu-avx512", graphs))(torch.randn(2, 3, 5, 5))
    [(before, after)] = graphs
    return _compat.normalize_gm(before), _compat.normalize_gm(after)


class TestGraphDumps(ExpectTestCase):
    def setUp(self):
        _compat.dynamo_reset()

    def test_eval_fold_before_after(self):
        before, after = _dumps(train=False, grad=False)
        self.assertExpectedInline(
            before,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_self_modules_conv_parameters_weight_: "f32[4, 3, 3, 3]", L_x_: "f32[2, 3, 5, 5]", L_self_modules_bn_buffers_running_mean_: "f32[4]", L_self_modules_bn_buffers_running_var_: "f32[4]", L_self_modules_bn_parameters_weight_: "f32[4]", L_self_modules_bn_parameters_bias_: "f32[4]"):
        l_self_modules_conv_parameters_weight_ = L_self_modules_conv_parameters_weight_
        l_x_ = L_x_
        l_self_modules_bn_buffers_running_mean_ = L_self_modules_bn_buffers_running_mean_
        l_self_modules_bn_buffers_running_var_ = L_self_modules_bn_buffers_running_var_
        l_self_modules_bn_parameters_weight_ = L_self_modules_bn_parameters_weight_
        l_self_modules_bn_parameters_bias_ = L_self_modules_bn_parameters_bias_

        conv2d: "f32[2, 4, 5, 5]" = torch.conv2d(l_x_, l_self_modules_conv_parameters_weight_, None, (1, 1), (1, 1), (1, 1), 1);  l_x_ = l_self_modules_conv_parameters_weight_ = None
        batch_norm: "f32[2, 4, 5, 5]" = torch.nn.functional.batch_norm(conv2d, l_self_modules_bn_buffers_running_mean_, l_self_modules_bn_buffers_running_var_, l_self_modules_bn_parameters_weight_, l_self_modules_bn_parameters_bias_, False, 0.1, 1e-05);  conv2d = l_self_modules_bn_buffers_running_mean_ = l_self_modules_bn_buffers_running_var_ = l_self_modules_bn_parameters_weight_ = l_self_modules_bn_parameters_bias_ = None
        relu: "f32[2, 4, 5, 5]" = torch.nn.functional.relu(batch_norm);  batch_norm = None
        return (relu,)
""",
        )
        self.assertExpectedInline(
            after,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_self_modules_conv_parameters_weight_: "f32[4, 3, 3, 3]", L_x_: "f32[2, 3, 5, 5]", L_self_modules_bn_buffers_running_mean_: "f32[4]", L_self_modules_bn_buffers_running_var_: "f32[4]", L_self_modules_bn_parameters_weight_: "f32[4]", L_self_modules_bn_parameters_bias_: "f32[4]"):
        l_self_modules_conv_parameters_weight_ = L_self_modules_conv_parameters_weight_
        l_x_ = L_x_
        l_self_modules_bn_buffers_running_mean_ = L_self_modules_bn_buffers_running_mean_
        l_self_modules_bn_buffers_running_var_ = L_self_modules_bn_buffers_running_var_
        l_self_modules_bn_parameters_weight_ = L_self_modules_bn_parameters_weight_
        l_self_modules_bn_parameters_bias_ = L_self_modules_bn_parameters_bias_

        conv_bn_act_eval: "f32[2, 4, 5, 5]" = ger_inductor_ops_conv_bn_conv_bn_act_eval(l_x_, l_self_modules_conv_parameters_weight_, None, l_self_modules_bn_buffers_running_mean_, l_self_modules_bn_buffers_running_var_, l_self_modules_bn_parameters_weight_, l_self_modules_bn_parameters_bias_, 1e-05, (1, 1), (1, 1), (1, 1), 1, False, (0, 0), 'relu', 0.0, 0.0, torch.float32, 'weights', True);  l_x_ = l_self_modules_conv_parameters_weight_ = l_self_modules_bn_buffers_running_mean_ = l_self_modules_bn_buffers_running_var_ = l_self_modules_bn_parameters_weight_ = l_self_modules_bn_parameters_bias_ = None
        return (conv_bn_act_eval,)
""",
        )

    def test_train_fused_batch_norm_before_after(self):
        before, after = _dumps(train=True, grad=True)
        self.assertExpectedInline(
            before,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_self_modules_conv_parameters_weight_: "f32[4, 3, 3, 3]", L_x_: "f32[2, 3, 5, 5]", L_self_modules_bn_buffers_num_batches_tracked_: "i64[]", L_self_modules_bn_buffers_running_mean_: "f32[4]", L_self_modules_bn_buffers_running_var_: "f32[4]", L_self_modules_bn_parameters_weight_: "f32[4]", L_self_modules_bn_parameters_bias_: "f32[4]"):
        l_self_modules_conv_parameters_weight_ = L_self_modules_conv_parameters_weight_
        l_x_ = L_x_
        l_self_modules_bn_buffers_num_batches_tracked_ = L_self_modules_bn_buffers_num_batches_tracked_
        l_self_modules_bn_buffers_running_mean_ = L_self_modules_bn_buffers_running_mean_
        l_self_modules_bn_buffers_running_var_ = L_self_modules_bn_buffers_running_var_
        l_self_modules_bn_parameters_weight_ = L_self_modules_bn_parameters_weight_
        l_self_modules_bn_parameters_bias_ = L_self_modules_bn_parameters_bias_

        conv2d: "f32[2, 4, 5, 5]" = torch.conv2d(l_x_, l_self_modules_conv_parameters_weight_, None, (1, 1), (1, 1), (1, 1), 1);  l_x_ = l_self_modules_conv_parameters_weight_ = None
        add_: "i64[]" = l_self_modules_bn_buffers_num_batches_tracked_.add_(1);  l_self_modules_bn_buffers_num_batches_tracked_ = add_ = None
        batch_norm: "f32[2, 4, 5, 5]" = torch.nn.functional.batch_norm(conv2d, l_self_modules_bn_buffers_running_mean_, l_self_modules_bn_buffers_running_var_, l_self_modules_bn_parameters_weight_, l_self_modules_bn_parameters_bias_, True, 0.1, 1e-05);  conv2d = l_self_modules_bn_buffers_running_mean_ = l_self_modules_bn_buffers_running_var_ = l_self_modules_bn_parameters_weight_ = l_self_modules_bn_parameters_bias_ = None
        relu: "f32[2, 4, 5, 5]" = torch.nn.functional.relu(batch_norm);  batch_norm = None
        return (relu,)
""",
        )
        self.assertExpectedInline(
            after,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_self_modules_conv_parameters_weight_: "f32[4, 3, 3, 3]", L_x_: "f32[2, 3, 5, 5]", L_self_modules_bn_buffers_num_batches_tracked_: "i64[]", L_self_modules_bn_buffers_running_mean_: "f32[4]", L_self_modules_bn_buffers_running_var_: "f32[4]", L_self_modules_bn_parameters_weight_: "f32[4]", L_self_modules_bn_parameters_bias_: "f32[4]"):
        l_self_modules_conv_parameters_weight_ = L_self_modules_conv_parameters_weight_
        l_x_ = L_x_
        l_self_modules_bn_buffers_num_batches_tracked_ = L_self_modules_bn_buffers_num_batches_tracked_
        l_self_modules_bn_buffers_running_mean_ = L_self_modules_bn_buffers_running_mean_
        l_self_modules_bn_buffers_running_var_ = L_self_modules_bn_buffers_running_var_
        l_self_modules_bn_parameters_weight_ = L_self_modules_bn_parameters_weight_
        l_self_modules_bn_parameters_bias_ = L_self_modules_bn_parameters_bias_

        conv2d: "f32[2, 4, 5, 5]" = torch.conv2d(l_x_, l_self_modules_conv_parameters_weight_, None, (1, 1), (1, 1), (1, 1), 1);  l_x_ = l_self_modules_conv_parameters_weight_ = None
        add_: "i64[]" = l_self_modules_bn_buffers_num_batches_tracked_.add_(1);  l_self_modules_bn_buffers_num_batches_tracked_ = add_ = None
        update_batch_stats = ger_inductor_ops_conv_bn_update_batch_stats(conv2d, l_self_modules_bn_buffers_running_mean_, l_self_modules_bn_buffers_running_var_, 0.1, 1e-05)
        getitem: "f32[4]" = update_batch_stats[0]
        getitem_1: "f32[4]" = update_batch_stats[1];  update_batch_stats = None
        version_guard_default: "f32[4]" = torch.ops.ger.version_guard.default(l_self_modules_bn_parameters_weight_, [l_self_modules_bn_buffers_running_mean_, l_self_modules_bn_buffers_running_var_]);  l_self_modules_bn_parameters_weight_ = l_self_modules_bn_buffers_running_mean_ = l_self_modules_bn_buffers_running_var_ = None

        batch_norm_act_default: "f32[2, 4, 5, 5]" = torch.ops.ger.batch_norm_act.default(conv2d, getitem, getitem_1, version_guard_default, l_self_modules_bn_parameters_bias_, 'relu', 0.0, 0.0);  conv2d = getitem = getitem_1 = version_guard_default = l_self_modules_bn_parameters_bias_ = None
        return (batch_norm_act_default,)
""",
        )


# ----------------------------------------------------------------------------- lowerings
@pytest.mark.parametrize(
    "dtype, memory_format",
    [(torch.float32, torch.contiguous_format), (torch.float32, torch.channels_last), (torch.bfloat16, torch.contiguous_format)],
    ids=["fp32", "fp32_channels_last", "bf16"],
)
def test_lowerings_match_eager_kernels(dtype, memory_format, seed):
    """The Inductor IR lowerings of the training ops (every activation, forward and
    backward, running stats) and of ``ger::clamp_activation`` vs the ops' eager kernels; nothing
    falls back to them."""
    lowerings.ensure_registered()
    acts = [("none", 0.0, 0.0), ("relu", 0.0, 0.0), ("hardtanh", 0.0, 6.0), ("silu", 0.0, 0.0), ("gelu", 0.0, 0.0),
            ("gelu_tanh", 0.0, 0.0), ("hardswish", 0.0, 0.0), ("hardsigmoid", 0.0, 0.0), ("leaky_relu", 0.2, 0.0),
            ("mish", 0.0, 0.0)]  # fmt: skip

    def f(x, w, b, rm, rv):
        mean, invstd = conv_bn_ops.update_batch_stats(x, rm, rv, 0.1, 1e-5)
        outs = [torch.ops.ger.batch_norm_act(x, mean, invstd, w, b, *a) for a in acts]
        return [*outs, torch.ops.ger.clamp_activation(x, -1.0, 2.0), torch.ops.ger.clamp_activation(x, 0.0, None)]

    x = (torch.randn(4, 8, 5, 7) * 2 + 0.5).to(dtype).contiguous(memory_format=memory_format)
    w, b = torch.rand(8) + 0.5, torch.randn(8)
    results = []
    for fn in (f, torch.compile(f, backend="inductor")):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        rm, rv = torch.zeros(8), torch.ones(8)
        outs = fn(xs, ws, bs, rm, rv)
        g = torch.Generator().manual_seed(2)
        sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs).backward()
        results.append((outs, xs.grad, ws.grad, bs.grad, rm, rv))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for eager, compiled in zip(torch.utils._pytree.tree_leaves(results[0]), torch.utils._pytree.tree_leaves(results[1])):
        assert _rel(compiled, eager) <= tol
    _compat.dynamo_reset()
    xs = x.clone().requires_grad_()
    _, (fwd, bwd) = _compat.run_and_get_code(
        lambda: sum(o.float().sum() for o in torch.compile(f, backend="inductor")(xs, w, b, torch.zeros(8), torch.ones(8))).backward()
    )
    for code in (fwd, bwd):
        FileCheck().check("cpp_fused").check_not("torch.ops.ger.").run(code[code.index("def call(") :])


#: every fused activation with the torch function it stands for
_TORCH_ACTIVATIONS = {
    ("none", 0.0, 0.0): lambda z: z,
    ("relu", 0.0, 0.0): torch.relu,
    ("hardtanh", -1.0, 2.0): lambda z: F.hardtanh(z, -1.0, 2.0),
    ("silu", 0.0, 0.0): F.silu,
    ("gelu", 0.0, 0.0): F.gelu,
    ("gelu_tanh", 0.0, 0.0): lambda z: F.gelu(z, approximate="tanh"),
    ("hardswish", 0.0, 0.0): F.hardswish,
    ("hardsigmoid", 0.0, 0.0): F.hardsigmoid,
    ("leaky_relu", 0.2, 0.0): lambda z: F.leaky_relu(z, 0.2),
    ("mish", 0.0, 0.0): F.mish,
}


def test_activations_and_derivatives_match_autograd_at_the_kinks():
    """Each activation and its derivative, eager reference and Inductor lowering, equal
    torch's function and autograd's gradient of it, on the kinks (0, +-3, hardtanh's
    bounds), beside them, at +-30 (mish's exp overflows past 88) and on random values.
    One value per channel with mean 0 and invstd 1, so ``batch_norm_act`` is act(z) and
    the backward's per-channel sum of g is act'(z)."""
    assert {a for a, _, _ in _TORCH_ACTIVATIONS} == set(conv_bn_ops.ACTIVATIONS)
    lowerings.ensure_registered()
    kinks = [-30.0, -20.5, -3.5, -3.0, -2.999, -1.0, -1e-7, 0.0, 1e-7, 0.5, 2.0, 2.999, 3.0, 3.5, 20.5, 30.0, 100.0]
    z = torch.cat([torch.tensor(kinks), torch.randn(40, generator=torch.Generator().manual_seed(0)) * 4])
    x = z.view(1, -1, 1)
    mean, invstd, ones = torch.zeros(z.numel()), torch.ones(z.numel()), torch.ones_like(x)

    def f(x, mean, invstd, ones):
        out = []
        for a in _TORCH_ACTIVATIONS:
            out.append(torch.ops.ger.batch_norm_act(x, mean, invstd, None, None, *a).view(-1))
            out.append(torch.ops.ger.batch_norm_act_backward(ones, x, mean, invstd, None, None, *a)[2])
        return out

    eager, compiled = f(x, mean, invstd, ones), torch.compile(f, backend="inductor")(x, mean, invstd, ones)
    for i, (a, fn) in enumerate(_TORCH_ACTIVATIONS.items()):
        zz = z.clone().requires_grad_()
        value = fn(zz)
        (slope,) = torch.autograd.grad(value.sum(), zz)
        for name, got in (("eager", eager), ("lowering", compiled)):
            torch.testing.assert_close(got[2 * i], value.detach(), rtol=1e-6, atol=1e-6, msg=f"{a} value, {name}")
            torch.testing.assert_close(got[2 * i + 1], slope, rtol=1e-5, atol=1e-6, msg=f"{a} derivative, {name}")


# ----------------------------------------------------------------------------- end to end
def _call_code(code: str) -> str:
    return code[code.index("def call(") :]


_CONV_CALL = r"(buf\d+) = (?:torch\.ops\.mkldnn\._convolution_pointwise|extern_kernels\.convolution)"


def _kernels_reading_conv_output(code: str, index: int = 0) -> list[str]:
    """Generated kernels (C++/Triton) called after convolution ``index`` of Inductor's
    output code and before the next convolution with that convolution's output, or a
    buffer reusing it in place (``buf3 = buf2; del buf2  # reuse``), as an argument."""
    body = _call_code(code)
    convs = list(re.finditer(_CONV_CALL, body))
    segment = body[convs[index].end() : convs[index + 1].start() if index + 1 < len(convs) else len(body)]
    names = {convs[index].group(1)}
    readers = []
    for line in segment.splitlines():
        alias = re.match(r"\s*(buf\d+) = (?:reinterpret_tensor\()?(buf\d+)\b", line)
        if alias and alias.group(2) in names:
            names.add(alias.group(1))
        call = re.match(r"\s*((?:cpp_fused|triton_)\w*)\((.*)\)$", line)
        if call and names & set(re.findall(r"\bbuf\d+\b", call.group(2))):
            readers.append(call.group(1))
    return readers


def _kernel_source(code: str, name: str) -> str:
    start = code.index(f"{name} = async_compile.")
    return code[start : code.index("''')", start)]


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = Block(), Block()
        self.second.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)

    def forward(self, x):
        return self.second(self.first(x))


def test_eval_no_grad_codegen_conv_feeds_conv_no_normalize_kernel(seed):
    """CPU, no gradient: C-sized fold kernels, oneDNN's conv, and after it only the ReLU:
    one kernel reads the first conv's output, and it does not normalise. Inductor's own
    code normalises it in a separate kernel. The ReLU is not oneDNN's post-op: that one
    gives 0 for a NaN, where eager keeps it (review, stop 35)."""
    model = randomize_bn_statistics(TwoBlocks()).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out, (code,) = _compat.run_and_get_code(torch.compile(model, backend="ger", options={"strict": True}), x)
        _compat.dynamo_reset()
        _, (inductor_code,) = _compat.run_and_get_code(torch.compile(model, backend="inductor"), x)
    assert _rel(out, copy.deepcopy(model).double()(x.double())) <= FP32_REL
    assert out.is_contiguous()  # eager's layout where the value leaves the graph
    FileCheck().check_count("_convolution_pointwise", 2).check_not("batch_norm").run(_call_code(code))
    FileCheck().check("_convolution_pointwise").check("'none'").check_not("'relu'").run(_call_code(code))
    [relu] = _kernels_reading_conv_output(code)  # the ReLU (beside the next conv's C-sized fold)
    assert "batch_norm" not in relu and "clamp_activation" in relu, relu
    FileCheck().check("at::vec::maximum(").run(_kernel_source(code, relu))
    [normalize] = _kernels_reading_conv_output(inductor_code)
    assert "batch_norm" in normalize and "sqrt" in _kernel_source(inductor_code, normalize)


def test_summed_branches_codegen_one_conv(seed):
    """A RepVGG block compiled by Inductor under no_grad: ONE oneDNN conv, then the ReLU
    (Inductor's own code: three convs, or two and a BN); eager's numbers."""
    model = randomize_bn_statistics(RepBlock()).eval()
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        out, (code,) = _compat.run_and_get_code(
            torch.compile(model, backend="ger", options={"strict": True, "reparameterize": True}), x)
    assert _rel(out, copy.deepcopy(model).double()(x.double())) <= FP32_REL
    assert _report_matches(conv_bn_act.PATTERN_BRANCHES)
    FileCheck().check_count("_convolution_pointwise", 1, exactly=True).check_not("extern_kernels.convolution").run(
        _call_code(code))
    FileCheck().check("_convolution_pointwise").check("'none'").run(_call_code(code))


def test_eval_with_grad_enabled_params_folds_and_matches_gradients(seed):
    """Plain model.eval() with grad-enabled parameters: folded at run time (Inductor
    cannot), the only kernel after the conv is the activation (no square root, no BN),
    no ReLU mask is saved, parameter gradients match float64 eager."""
    model = randomize_bn_statistics(Block()).eval()
    x = torch.randn(2, 3, 8, 8)
    test, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    _, (fwd, _bwd) = _compat.run_and_get_code(
        lambda: torch.compile(test, backend="ger", options={"strict": True})(x).sum().backward()
    )
    ref(x.double()).sum().backward()
    for (name, p), p_ref in zip(test.named_parameters(), ref.parameters()):
        assert _rel(p.grad, p_ref.grad) <= FP32_REL, name
    FileCheck().check("rsqrt").check("extern_kernels.convolution").check_not("batch_norm").run(_call_code(fwd))
    [activation] = _kernels_reading_conv_output(fwd)
    assert "clamp_activation" in activation and "sqrt" not in _kernel_source(fwd, activation)
    assert "torch.bool" not in _call_code(fwd)  # the ReLU backward reads its output: no mask saved


def BlocksA(blocks: int = 4, channels: int = 8) -> nn.Module:  # noqa: N802 (a model factory)
    """Model A of the benchmarks, small: conv3x3 (no bias) -> BN -> ReLU blocks."""
    from benchmarks.cases_conv import ModelA

    return ModelA(channels=channels, blocks=blocks)


def saved_activation_bytes(step, exclude: list[torch.Tensor]) -> tuple[int, torch.Tensor]:
    """Bytes of the unique storages autograd saves during ``step()``, leaving out those of
    ``exclude`` (the input and the parameters: not activations)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    return sum(seen.values()), out


def test_train_saves_conv_outputs_only_and_is_as_accurate_as_inductor(seed):
    """Training step of model A: ger saves <= 0.6x Inductor's activation bytes; output,
    gradients and running stats as accurate as Inductor's against float64.

    The input is channels_last: with a contiguous input, Inductor's CPU layout
    optimisation saves a channels_last copy of it for the first conv's backward, in both
    variants (then 5 / 8.25 = 0.61x; docs/benchmarks_conv.md)."""
    model = randomize_bn_statistics(BlocksA())
    x = torch.randn(4, 8, 32, 32).contiguous(memory_format=torch.channels_last)
    ref = copy.deepcopy(model).double()
    expected = ref(x.double())
    expected.sum().backward()
    saved, errors = {}, {}
    for backend in ("inductor", "ger"):
        _compat.dynamo_reset()
        test = copy.deepcopy(model)
        compiled = torch.compile(test, backend=backend, options={"strict": True} if backend == "ger" else None)
        saved[backend], out = saved_activation_bytes(lambda: compiled(x), [x, *test.parameters()])
        out.sum().backward()
        errors[backend] = {"out": _rel(out, expected)}
        errors[backend].update({n: _rel(p.grad, q.grad) for (n, p), q in zip(test.named_parameters(), ref.parameters())})
        errors[backend].update({n: _rel(b, q) for (n, b), q in zip(test.named_buffers(), ref.buffers()) if b.is_floating_point()})
    assert saved["ger"] <= 0.6 * saved["inductor"], saved
    for k, err in errors["ger"].items():
        assert err <= max(2 * errors["inductor"][k], 1e-6), (k, err, errors["inductor"][k])
    assert len(_report_matches(TRAIN)) == 4


def test_resnet18_example_eval(seed):
    """Model C (examples/resnet18_cnn.py), narrow: every conv -> BN [-> ReLU] matched in
    inference, the output vs float64. (A residual net's train step, with every pair
    fused and the float64 oracle: tests/test_zoo.py::test_cnn_train_step, timm's
    ResNet-10-T, the same basic blocks; here it cost ~30 s of the suite for that claim.)"""
    model = randomize_bn_statistics(resnet18(num_classes=10, width=8))
    x = torch.randn(2, 3, 64, 64)  # smaller inputs leave layer4's BN ~2 values per channel: ill-conditioned
    with torch.no_grad():
        out = torch.compile(copy.deepcopy(model).eval(), backend="ger", options={"strict": True})(x)
    assert _rel(out, copy.deepcopy(model).double().eval()(x.double())) <= FP32_REL
    assert len(_report_matches(EVAL)) == 20


def test_dynamic_shapes_eval_and_train(seed):
    """``dynamic=True``: symbolic batch and spatial sizes (the training lowerings count
    values per channel symbolically; eval uses oneDNN's fused conv, which takes symbolic
    activations); two input shapes, one compile each mode. More in tests/test_dynamic.py."""
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)  # a bias before training BN has a zero gradient
    model = randomize_bn_statistics(nn.Sequential(conv, nn.BatchNorm2d(8), nn.ReLU6()))
    for train in (False, True):
        _compat.dynamo_reset()
        test, ref = copy.deepcopy(model).train(train), copy.deepcopy(model).double().train(train)
        compiled = torch.compile(test, backend="ger", dynamic=True, options={"strict": True})
        for shape in ((2, 3, 8, 8), (3, 3, 10, 12)):
            x = torch.randn(shape)
            with torch.set_grad_enabled(train):
                out, expected = compiled(x), ref(x.double())
            assert _rel(out, expected) <= FP32_REL
            if train:
                out.sum().backward()
                expected.sum().backward()
                for (name, p), q in zip(test.named_parameters(), ref.parameters()):
                    assert _rel(p.grad, q.grad) <= FP32_REL, name
        assert ger_inductor.last_report().symbolic_inputs
        [match] = _report_matches()
        assert match.pattern == (TRAIN if train else EVAL)
        if not train:
            assert match.detail["conv_impl"] == "onednn post-op", match.detail


@pytest.mark.parametrize("groups", [1, 4])
def test_inductor_freezing_folds_conv_transpose_wrongly_ger_does_not(groups, seed):
    """DOCUMENTS INDUCTOR'S BEHAVIOUR (torch 2.13): with ``torch._inductor.config.freezing``
    set (its pre-grad conv-BN fusion reads the global flag; ``options={"freezing": True}``
    does not reach it), BN is folded into a ConvTranspose2d of frozen parameters along
    weight dim 0, the input channels: errors of order 1. If this test fails, Inductor
    fixed it: update docs/patterns.md. ger's fold is right."""
    model = randomize_bn_statistics(nn.Sequential(nn.ConvTranspose2d(16, 16, 3, groups=groups), nn.BatchNorm2d(16)))
    model.eval().requires_grad_(False)
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        with _compat.inductor_config().patch(freezing=True):
            frozen = torch.compile(copy.deepcopy(model), backend="inductor")(x)
        _compat.dynamo_reset()
        ours = torch.compile(copy.deepcopy(model), backend="ger", options={"strict": True})(x)
    assert float((frozen.double() - ref).abs().max()) > 0.1
    assert _rel(ours, ref) <= FP32_REL
    assert len(_report_matches(EVAL)) == 1


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_cuda_end_to_end(train, seed):
    model = randomize_bn_statistics(BlocksA(blocks=2)).cuda()
    x = torch.randn(4, 8, 12, 12, device="cuda")
    _assert_as_accurate_as_eager(_compare(model, x, train, True, _ger_strict), model, x, train, True)
    assert len(_report_matches(TRAIN if train else EVAL)) == 2


# ----------------------------------------------------------------------------- non-finite values (review, stop 35)
def _nan_input(shape=(2, 3, 7, 7)):
    x = torch.randn(shape)
    x[0, 0, 3, 3] = float("nan")
    x[1, 2, 1, 5] = float("nan")
    return x


def _run_with_grads(fn, model, x, grad):
    x = x.clone().requires_grad_(grad)
    model.zero_grad()
    with torch.set_grad_enabled(grad):
        y = fn(x)
    if not grad:
        return y.detach(), None, None
    y.sum().backward()
    return y.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same_with_nans(got, want, what, atol=1e-5, rtol=1e-4):
    assert torch.equal(got.isnan(), want.isnan()), (what, int(got.isnan().sum()), int(want.isnan().sum()))
    torch.testing.assert_close(got.nan_to_num(0.0), want.nan_to_num(0.0), atol=atol, rtol=rtol, msg=what)


@pytest.mark.parametrize("act", ["relu", "relu6", "hardsigmoid", "leaky_relu", "leaky_relu0", "hardswish"])
@pytest.mark.parametrize("mode", ["eval_nograd", "eval_grad", "train"])
def test_nan_inputs_keep_eagers_nan_positions_and_gradients(act, mode, seed):
    """A NaN in the input (review, stop 35): oneDNN's relu / hardtanh / hardsigmoid post-ops
    gave a number where eager keeps the NaN (the conv now runs with no post-op and the
    activation after it: ``ONEDNN_POST_OP_DROPS_NAN``), and relu's / hardtanh's backwards
    here zeroed the gradient at a NaN where eager's ``threshold_backward`` passes it (they
    now zero where z <= bound). Eager's vectorised ``hardtanh_backward`` zeroes it while its
    scalar tail passes it, and its vectorised ``hardswish_backward`` gives NaN while its
    scalar tail passes it; Inductor's decompositions and ger's fused backwards pass it at
    every position, so relu6's and hardswish's gradients are not compared with eager's."""
    acts = {"relu": nn.ReLU(), "relu6": nn.ReLU6(), "hardsigmoid": nn.Hardsigmoid(), "leaky_relu": nn.LeakyReLU(0.2),
            "leaky_relu0": nn.LeakyReLU(0.0),  # oneDNN's leaky_relu at slope 0 is its relu: NaN to 0 (stop 38)
            "hardswish": nn.Hardswish()}
    model = randomize_bn_statistics(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), acts[act]))
    model.train(mode == "train")
    grad = mode != "eval_nograd"
    x = _nan_input()
    test = copy.deepcopy(model)
    y0, gx0, gp0 = _run_with_grads(model, model, x, grad)
    y1, gx1, gp1 = _run_with_grads(torch.compile(test, backend=rewrite_only()), test, x, grad)
    assert len(_report_matches(TRAIN if mode == "train" else EVAL)) == 1
    _assert_same_with_nans(y1, y0, "output")
    if grad and act not in ("relu6", "hardswish"):
        _assert_same_with_nans(gx1, gx0, "grad x")
        for n in gp0:
            _assert_same_with_nans(gp1[n], gp0[n], n)
    if mode == "train":
        for (n, b), b0 in zip(test.named_buffers(), model.buffers()):
            _assert_same_with_nans(b, b0, n)


def test_relu_nan_gradient_under_inductor_matches_eager(seed):
    """The same through Inductor's code (the lowering of the train-mode backward and of
    ``clamp_activation_backward``): relu passes the gradient at a NaN, as eagerly."""
    for train in (False, True):
        _compat.dynamo_reset()
        model = randomize_bn_statistics(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()))
        model.train(train)
        test = copy.deepcopy(model)
        x = _nan_input()
        y0, gx0, gp0 = _run_with_grads(model, model, x, True)
        y1, gx1, gp1 = _run_with_grads(torch.compile(test, backend="ger", options={"strict": True}), test, x, True)
        assert len(_report_matches(TRAIN if train else EVAL)) == 1
        _assert_same_with_nans(y1, y0, "output")
        _assert_same_with_nans(gx1, gx0, "grad x")
        for n in gp0:
            _assert_same_with_nans(gp1[n], gp0[n], n, atol=1e-4)


@pytest.mark.parametrize("running_var", [0.0, 1e-4])
def test_fp16_eval_bn_is_applied_after_the_conv_in_fp32(running_var, seed):
    """fp16 (review, stop 35): BN folded into the weights rounds w * scale and
    (b - mean) * scale to fp16, which overflowed to -inf (a running mean of 600 at a
    variance of 0) or lost the mean's cancellation. fp16 convs now take BN after the conv,
    in fp32, as eager applies it."""
    conv = nn.Conv2d(2, 4, 1, bias=False)
    bn = nn.BatchNorm2d(4, eps=1e-5)
    with torch.no_grad():
        conv.weight.fill_(0.0)
        conv.weight[:, 0] = 1.0
        bn.running_mean.fill_(600.0)
        bn.running_var.fill_(running_var)
    model = nn.Sequential(conv, bn).eval().half()
    x = torch.zeros(1, 2, 2, 2, dtype=torch.half)
    x[:, 0] = 600.0
    x[0, 0, 0, 0] = 603.0
    with torch.no_grad():
        want = model(x)
        got = torch.compile(copy.deepcopy(model), backend=rewrite_only())(x)
    [m] = _report_matches(EVAL)
    assert m.detail["fold_into"] == "output", m.detail
    assert torch.isfinite(got).all(), got
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-3)


def test_one_batch_norm_applied_twice_in_training_is_left_alone(seed):
    """One BN module applied to two conv outputs in a training step (review, stop 35):
    the fused op's guard on the running statistics raised autograd's version error at the
    backward (eager's own update does not count); now a near-miss, eager's numbers."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.a(x)).relu() + self.bn(self.b(x))

    model = Twice().train()
    test = copy.deepcopy(model)
    x = torch.randn(2, 3, 6, 6)
    y0, gx0, gp0 = _run_with_grads(model, model, x, True)
    y1, gx1, gp1 = _run_with_grads(torch.compile(test, backend=rewrite_only()), test, x, True)
    assert not _report_matches(TRAIN)
    reasons = [r for p, r in _near_misses() if p == TRAIN]
    assert len(reasons) == 2 and all(r.startswith(conv_bn_act.NEAR_MISS_REASONS["written_param"]) for r in reasons), \
        reasons
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(gx1, gx0)
    for (n, b), b0 in zip(test.named_buffers(), model.buffers()):
        torch.testing.assert_close(b, b0, msg=n)


class _CrossBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 3, (1, 3), padding=(0, 1)), nn.Conv2d(3, 3, (3, 1), padding=(1, 0))
        self.b1, self.b2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.b1(self.c1(x)) + self.b2(self.c2(x))


def test_summed_branches_are_merged_only_when_asked(seed):
    """By default summed branches are a near-miss naming the option (each pair still
    folded), and an inf in the input spreads as eagerly; ``reparameterize=True`` merges
    them into one conv (the known gap below)."""
    model = randomize_bn_statistics(_CrossBranches()).eval()
    x = torch.randn(1, 3, 5, 5)
    x[0, 1, 2, 2] = float("inf")
    with torch.no_grad():
        want = model(x)
        got = torch.compile(copy.deepcopy(model), backend=rewrite_only(reparameterize=False))(x)
    assert not _report_matches(conv_bn_act.PATTERN_BRANCHES) and len(_report_matches(EVAL)) == 2
    assert [r for p, r in _near_misses() if p == conv_bn_act.PATTERN_BRANCHES] == [
        conv_bn_act.NEAR_MISS_REASONS["reparameterize"]]
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    torch.testing.assert_close(got.nan_to_num(0.0, 0.0, 0.0), want.nan_to_num(0.0, 0.0, 0.0))
    _compat.dynamo_reset()
    with torch.no_grad():
        torch.compile(copy.deepcopy(model), backend=rewrite_only(reparameterize=True))(x.nan_to_num(0.0, 0.0))
    assert _report_matches(conv_bn_act.PATTERN_BRANCHES)


@pytest.mark.xfail(strict=True, reason="known gap: summed branches merged into one kernel see 0 * inf at the "
                                       "zero-padded taps (docs/patterns.md)")
def test_known_gap_summed_branches_with_an_infinite_input(seed):
    """With ``reparameterize=True``, RepVGG-style branches ``bn1(conv1x3(x)) +
    bn2(conv3x1(x))`` become one 3x3 conv whose corners are 0: an inf in the input gives
    0 * inf = NaN there, where eager's branches never read it (review, stop 35). Finite
    inputs are exact up to rounding."""

    model = randomize_bn_statistics(_CrossBranches()).eval()
    x = torch.randn(1, 3, 5, 5)
    x[0, 1, 2, 2] = float("inf")
    with torch.no_grad():
        want = model(x)
        got = torch.compile(copy.deepcopy(model), backend=rewrite_only())(x)
    assert _report_matches(conv_bn_act.PATTERN_BRANCHES)
    assert torch.equal(got.isnan(), want.isnan()), (int(got.isnan().sum()), int(want.isnan().sum()))


def test_train_running_mean_keeps_eagers_infinities(seed):
    """A -inf in the input of a training BN (review, stop 38): eager's batch mean is a sum
    over the count (-inf, and so a -inf running mean); the op's eager kernel took it from
    var_mean, whose update reads -inf - (-inf) = NaN."""
    model = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2), nn.ReLU()).train()
    test = copy.deepcopy(model)
    x = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    x[0, 0, 1, 1] = float("-inf")
    model(x).sum().backward()
    torch.compile(test, backend=rewrite_only())(x).sum().backward()
    assert len(_report_matches(TRAIN)) == 1
    assert model[1].running_mean.isinf().all()  # the case: one channel +inf, the other -inf
    for (n, b), b0 in zip(test.named_buffers(), model.buffers()):
        _assert_same_with_nans(b, b0, n)


def test_eps_zero_with_a_dead_channel_folds_after_the_conv(seed):
    """eps = 0 and a channel of running variance 0 (review, stop 38): folded into the
    weights, w * inf held inf of both signs and the conv summed inf - inf (a NaN channel);
    the scale now stays after the conv, as eager applies it (its ±inf / NaN pattern)."""
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2, eps=0.0)).eval()
    with torch.no_grad():
        model[1].running_var[0] = 0.0
        model[1].running_mean[0] = 0.25
    test = copy.deepcopy(model)
    x = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y0, y1 = model(x), torch.compile(test, backend=rewrite_only())(x)
    (m,) = _report_matches(EVAL)
    assert m.detail["fold_into"] == "output", m.detail
    assert y0[0, 0].isinf().any() and y0[0, 0].isnan().any()  # the case
    _assert_same_with_nans(y1, y0, "output")
    assert torch.equal(y1.isinf(), y0.isinf())


@pytest.mark.parametrize("train", [False, True], ids=["eval_grad", "train"])
def test_in_place_leaky_relu_with_a_negative_slope_raises_as_eagerly(train, seed):
    """Eager's in-place leaky_relu backward raises for a negative slope; the fused op
    recomputed the activation and did not (review, stop 38): such an activation is a
    near-miss (conv and BN are still fused), and the backward raises as eagerly."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.LeakyReLU(-0.1, inplace=True))
    model.train(train)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="negative slope"):
        model(x).sum().backward()
    out = torch.compile(copy.deepcopy(model), backend=rewrite_only())(x)
    assert any("negative slope" in n.reason for n in _report_near_misses(ACT)), _report_near_misses(ACT)
    with pytest.raises(RuntimeError, match="negative slope"):
        out.sum().backward()
