"""Rewrites under execution modes, transforms and eager cuts, checked against eager
(values and gradients) with the report's record of what fired or why not:

* CPU autocast (bf16): conv -> BN -> ReLU eval (model.eval(), with and without no_grad,
  both folds) and train: eager's dtypes exactly, numbers within bf16 tolerance;
* torch.func.grad / torch.vmap of a rewritable loss and of conv -> BN: compiled
  unchanged, with a "functorch" fallback recorded (never a crash, also under strict);
* ``eager_ops`` naming an op a rewrite would absorb (log_softmax, softmax, conv, BN,
  the activation, the lm head's linear): the rewrite is refused, a near-miss names it;
* ``eager_ops`` cuts beside a rewritten loss: the regions exchange the statistics'
  tensors, not the ``RowStats`` structure (was: "output spec mismatch").
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import ger_inductor
from ger_inductor import _compat, fallback
from ger_inductor.options import GerOptions

AOT = {"strict": True, "compiler": "aot_eager"}
BF16_TOL = dict(rtol=2e-2, atol=2e-2)


def _bf16_close(a: torch.Tensor, b: torch.Tensor, what: str = "", tol: float = 2e-2) -> None:
    """Norm-wise relative error within bf16 rounding (elementwise, a ReLU mask that flips
    at a rounded zero moves single entries by more than any useful elementwise bound)."""
    a, b = a.detach().double(), b.detach().double()
    err = float((a - b).norm() / b.norm().clamp_min(1e-6))
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def _report():
    return ger_inductor.last_report()


def _matches(family: str, rep=None) -> list:
    rep = rep or _report()
    return [m for p in rep.passes if p.name == family for m in p.matches]


def _near_misses(family: str, rep=None) -> list[str]:
    rep = rep or _report()
    return [f"{m.node}: {m.reason}" for p in rep.passes if p.name == family for m in p.near_misses]


def _randomize_bn(m: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b in m.modules():
            if isinstance(b, nn.BatchNorm2d):
                b.running_mean.copy_(torch.randn(b.num_features, generator=g) * 0.2)
                b.running_var.copy_(torch.rand(b.num_features, generator=g) + 0.5)
                b.weight.copy_(torch.rand(b.num_features, generator=g) + 0.5)
                b.bias.copy_(torch.randn(b.num_features, generator=g) * 0.1)
    return m


# ----------------------------------------------------------------------------- 1. autocast
def _conv_bn_relu(fold: str) -> nn.Module:
    if fold == "output":  # weights (32*16*9) outweigh the output (2*32*2*2): BN on the output
        return nn.Sequential(nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32), nn.ReLU())
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())


def _autocast_case(fold: str, train: bool, grad: bool, compiler: str, input_dtype=torch.float32):
    torch.manual_seed(0)
    ref_m = _randomize_bn(_conv_bn_relu(fold))
    ref_m.train(train)
    test_m = copy.deepcopy(ref_m)
    x = torch.randn(2, 16, 4, 4) if fold == "output" else torch.randn(2, 3, 8, 8)
    x = x.to(input_dtype)
    x_ref = x.clone().requires_grad_(grad)
    x_test = x.clone().requires_grad_(grad)
    f = torch.compile(test_m, backend="ger", options={"strict": True, "compiler": compiler})
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = ref_m(x_ref)
        out = f(x_test)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), **BF16_TOL)
    _bf16_close(out, ref, "output")
    for (k, a), b in zip(ref_m.state_dict().items(), test_m.state_dict().values()):
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-2, atol=1e-2, msg=k)  # running statistics
    if grad:
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        (ref.float() * g).sum().backward()
        (out.float() * g).sum().backward()
        assert x_test.grad.dtype == x_ref.grad.dtype
        _bf16_close(x_test.grad, x_ref.grad, "grad x")
        for (k, a), b in zip(ref_m.named_parameters(), test_m.parameters()):
            assert b.grad.dtype == a.grad.dtype, k
            if not (train and k == "0.bias"):  # zero up to rounding before training-mode BN
                _bf16_close(b.grad, a.grad, f"grad {k}")
    rep = _report()
    assert not rep.fallbacks, [f.one_line() for f in rep.fallbacks]
    (m,) = _matches("conv_bn_act", rep)
    assert m.pattern == ("conv_bn_act.train" if train else "conv_bn_act.eval")
    assert m.detail["act"] == "relu"
    if not train:
        # bf16 with gradients: BN after the conv in fp32 whatever the sizes (folded into
        # bf16 weights, BN's parameters got bf16-rounded gradients; stop 37)
        assert m.detail["fold_into"] == ("output" if grad else fold)
    return m


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("train,fold", [(False, "weights"), (False, "output"), (True, "weights")],
                         ids=["eval_fold_weights", "eval_fold_output", "train"])
def test_conv_bn_relu_under_cpu_autocast(train, fold, grad):
    _autocast_case(fold, train, grad, "aot_eager")


def test_conv_bn_relu_under_cpu_autocast_bf16_input():
    """bf16 activations under autocast: no cast of the input; (with no gradient) the
    conv may be oneDNN's fused one."""
    _autocast_case("weights", False, False, "aot_eager", input_dtype=torch.bfloat16)


@pytest.mark.parametrize("train", [False, True], ids=["eval_no_grad", "train_grad"])
def test_conv_bn_relu_under_cpu_autocast_inductor(train):
    _autocast_case("weights", train, train, "inductor")


# ----------------------------------------------------------------------------- 2. torch.func
def _entropy(q):
    p = q.softmax(-1)
    return -(p * q.log_softmax(-1)).sum(-1).mean()


def _ger_loss(z, y):
    return F.cross_entropy(z, y, label_smoothing=0.1) - 0.1 * _entropy(z)


_G = torch.Generator().manual_seed(0)
_W = torch.randn(8, 3, 3, 3, generator=_G) * 0.3
_RM, _RV = torch.randn(8, generator=_G) * 0.1, torch.rand(8, generator=_G) + 0.5
_BW, _BB = torch.rand(8, generator=_G) + 0.5, torch.randn(8, generator=_G) * 0.1


def _conv_bn_eval(w, x):
    return F.relu(F.batch_norm(F.conv2d(x, w, padding=1), _RM, _RV, _BW, _BB, training=False)).square().mean()


def _conv_bn_train(w, x):
    return F.relu(F.batch_norm(F.conv2d(x, w, padding=1), None, None, _BW, _BB, training=True)).square().mean()


def _functorch_inputs(name):
    g = torch.Generator().manual_seed(3)
    if name.startswith("loss"):
        lead = (3,) if name.endswith("vmap") else ()
        return torch.randn(*lead, 6, 10, generator=g) * 2, torch.randint(0, 10, (*lead, 6), generator=g)
    lead = (3,) if name.endswith("vmap") else ()
    return _W.clone(), torch.randn(*lead, 2, 3, 6, 6, generator=g)


FUNCTORCH = {
    "loss_grad": torch.func.grad(_ger_loss),
    "loss_vmap": torch.vmap(_ger_loss),
    "loss_grad_of_vmap": torch.func.grad(lambda z, y: torch.vmap(_ger_loss)(z, y).sum()),
    "conv_bn_eval_grad": torch.func.grad(_conv_bn_eval),
    "conv_bn_train_grad": torch.func.grad(_conv_bn_train),
    "conv_bn_eval_vmap": torch.vmap(_conv_bn_eval, in_dims=(None, 0)),
    "conv_bn_eval_grad_and_value": torch.func.grad_and_value(_conv_bn_eval),
}


def _check_functorch_fallback(rep):
    stages = [f.stage for f in rep.fallbacks]
    assert stages == ["functorch"], [f.one_line() for f in rep.fallbacks]
    assert "torch.func" in rep.fallbacks[0].reason
    assert not rep.matches


@pytest.mark.parametrize("name", list(FUNCTORCH))
def test_functorch_transforms_compile_unchanged(name):
    fn = FUNCTORCH[name]
    args = _functorch_inputs(name.replace("_grad_of_vmap", "_vmap") if name == "loss_grad_of_vmap" else name)
    ref = fn(*args)
    out = torch.compile(fn, backend="ger", options=AOT)(*args)  # strict: no error either
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    _check_functorch_fallback(_report())


def test_functorch_grad_inductor():
    fn = FUNCTORCH["loss_grad"]
    args = _functorch_inputs("loss_grad")
    out = torch.compile(fn, backend="ger", options={"strict": True})(*args)
    torch.testing.assert_close(out, fn(*args), rtol=1e-5, atol=1e-6)
    _check_functorch_fallback(_report())
    assert _compat.functorch_layer_depth() == 0


def test_functorch_with_eager_ops_runs_the_graph_eagerly():
    fn = FUNCTORCH["loss_grad"]
    args = _functorch_inputs("loss_grad")
    out = torch.compile(fn, backend="ger", options={**AOT, "eager_ops": ["torch.nn.functional.softmax"]})(*args)
    torch.testing.assert_close(out, fn(*args), rtol=1e-5, atol=1e-6)
    rep = _report()
    assert [f.stage for f in rep.fallbacks] == ["functorch", "functorch"], [f.one_line() for f in rep.fallbacks]
    assert "whole graph runs eagerly" in rep.fallbacks[1].reason
    assert any("softmax" in e for e in rep.eager_nodes)


@pytest.mark.parametrize("strict", [False, True])
def test_failure_inside_a_transform_leaves_no_functorch_level(monkeypatch, strict):
    """A compile that fails halfway through a transform's levels (here: a compiler that
    enters a grad level and raises) must not leave the level pushed: Dynamo's guards
    would then fail on the frame ger compiled ("Guard failed on the same frame")."""

    def broken(gm, inputs):
        torch._C._functorch._grad_increment_nesting()
        raise RuntimeError("compiler broke inside a transform")

    monkeypatch.setattr(_compat, "aot_eager", broken)
    fn = FUNCTORCH["loss_grad"]
    args = _functorch_inputs("loss_grad")
    f = torch.compile(fn, backend="ger", options={"strict": strict, "compiler": "aot_eager"})
    if strict:
        with pytest.raises(Exception, match="compiler broke inside a transform"):
            f(*args)
    else:
        torch.testing.assert_close(f(*args), fn(*args), rtol=1e-5, atol=1e-6)
        assert [fb.stage for fb in _report().fallbacks] == ["functorch", "graph"]
    assert _compat.functorch_layer_depth() == 0
    assert torch._C._functorch.peek_interpreter_stack() is None


def test_plain_graphs_have_no_functorch_node():
    gm = fx.symbolic_trace(lambda x: torch.relu(x) * 2)
    assert fallback.functorch_node(gm) is None


# ----------------------------------------------------------------------------- 3. eager_ops inside a rewrite
def _ce_entropy(z, y):
    return F.cross_entropy(z, y) - 0.1 * _entropy(z)


def _nll_log_softmax(z, y):
    return F.nll_loss(F.log_softmax(z, -1), y)


def _ce_entr(z, y):
    return F.cross_entropy(z, y) - 0.1 * torch.special.entr(F.softmax(z, -1)).sum(-1).mean()


EAGER_INSIDE_LOSS = {
    # (loss, eager op, the node the near-miss names)
    "entropy_log_softmax": (_ce_entropy, "torch.nn.functional.log_softmax", "log_softmax"),
    "entropy_softmax": (_ce_entropy, "torch.nn.functional.softmax", "p"),  # (p = q.softmax(-1))
    "entropy_product": (_ce_entropy, "torch.mul", "mul"),
    "nll_log_softmax": (_nll_log_softmax, "torch.nn.functional.log_softmax", "log_softmax"),
    "entr_softmax": (_ce_entr, "softmax", "softmax"),
}


def _loss_vs_eager(fn, options):
    g = torch.Generator().manual_seed(4)
    z = (torch.randn(8, 12, generator=g) * 2).requires_grad_(True)
    y = torch.randint(0, 12, (8,), generator=g)
    z2 = z.detach().clone().requires_grad_(True)
    ref = fn(z, y)
    out = torch.compile(fn, backend="ger", options=options)(z2, y)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    ref.backward()
    out.backward()
    torch.testing.assert_close(z2.grad, z.grad, rtol=1e-5, atol=1e-6)
    return _report()


@pytest.mark.parametrize("name", list(EAGER_INSIDE_LOSS))
def test_eager_op_inside_a_loss_is_not_fused_away(name):
    fn, op, node = EAGER_INSIDE_LOSS[name]
    rep = _loss_vs_eager(fn, {**AOT, "eager_ops": [op]})
    assert not _matches("loss_entropy", rep), _matches("loss_entropy", rep)
    misses = _near_misses("loss_entropy", rep)
    assert any("must run eagerly" in m and m.split(": ", 1)[1].startswith(node) for m in misses), misses
    assert any(e.startswith(node) for e in rep.eager_nodes), rep.eager_nodes
    assert not rep.fallbacks, [f.one_line() for f in rep.fallbacks]
    # control: without the option the same loss is rewritten
    torch._dynamo.reset()
    assert _matches("loss_entropy", _loss_vs_eager(fn, AOT))


def test_rewrite_alone_refuses_an_eager_intermediate():
    """``backend.rewrite`` (the passes without a compile) reports the refusal too."""
    from ger_inductor import backend

    seen = []

    def passes_only(gm, example_inputs):
        gm, rep = backend.rewrite(gm, example_inputs, {"eager_ops": ["Tensor.log_softmax"]})
        seen.append(rep)
        return gm.forward

    z, y = torch.randn(4, 10), torch.randint(0, 10, (4,))
    torch.testing.assert_close(torch.compile(_ce_entropy, backend=passes_only)(z, y), _ce_entropy(z, y))
    (rep,) = seen
    assert not _matches("loss_entropy", rep)
    assert any(m.startswith("cross_entropy: log_softmax must run eagerly") for m in _near_misses("loss_entropy", rep))


def test_eager_op_after_the_statistics_does_not_block_the_rewrite():
    """An op listed in eager_ops that reads the loss (not absorbed by it) leaves the
    rewrite alone: the softmax here is outside the statistics' vocabulary."""

    def fn(z, y):
        return F.cross_entropy(z, y) + 0.0 * torch.nn.functional.softmax(z.detach() * 2, -1).sum()

    rep = _loss_vs_eager(fn, {**AOT, "eager_ops": ["torch.nn.functional.softmax"]})
    assert _matches("loss_entropy", rep)


class _ConvBNReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("op,node", [("torch.conv2d", "conv2d"), ("torch.nn.functional.batch_norm", "batch_norm"),
                                     ("torch.nn.functional.relu", "relu")])
def test_eager_op_inside_conv_bn_act_is_not_fused_away(op, node, train):
    torch.manual_seed(0)
    m = _randomize_bn(_ConvBNReLU()).train(train)
    m2 = copy.deepcopy(m)
    x = torch.randn(2, 3, 6, 6)
    x2 = x.clone().requires_grad_(True)
    x = x.requires_grad_(True)
    ref = m(x)
    out = torch.compile(m2, backend="ger", options={**AOT, "eager_ops": [op]})(x2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    ref.sum().backward()
    out.sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
    rep = _report()
    misses = _near_misses("conv_bn_act", rep)
    assert any("must run eagerly" in m and f"({node}:" in m for m in misses), misses
    fused = {n for mt in _matches("conv_bn_act", rep) for n in mt.nodes}
    assert node not in fused
    if train:
        # a training BN writes its running statistics: the graph is not cut around the
        # eager node (regions could reorder the write), it runs eagerly as written
        assert [fb.stage for fb in rep.fallbacks] == ["eager_cut"] and not fused, (rep.fallbacks, fused)
        assert "writes a tensor in place" in rep.fallbacks[0].reason
    elif node == "relu":  # conv -> BN is still rewritten, the activation is left out
        assert fused == {"conv2d", "batch_norm"}
    else:
        assert not fused


class _Head(nn.Module):
    def __init__(self, v=64):
        super().__init__()
        self.v = v
        self.head = nn.Linear(16, v)

    def forward(self, h, y):
        return F.cross_entropy(self.head(h).view(-1, self.v), y.view(-1))


@pytest.mark.parametrize("eager", [False, True], ids=["control", "linear_eager"])
def test_eager_linear_is_not_fused_into_the_lm_head(eager):
    torch.manual_seed(0)
    m = _Head()
    m2 = copy.deepcopy(m)
    h = torch.randn(2, 5, 16)
    y = torch.randint(0, 64, (2, 5))
    opts = {**AOT, "lm_head_chunk": 4, "eager_ops": ["torch.nn.functional.linear"] if eager else []}
    ref = m(h, y)
    out = torch.compile(m2, backend="ger", options=opts)(h, y)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    ref.backward()
    out.backward()
    for (k, a), b in zip(m.named_parameters(), m2.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=k)
    rep = _report()
    assert _matches("loss_entropy", rep)  # the loss itself is rewritten either way
    if eager:
        assert not _matches("lm_head", rep)
        misses = _near_misses("lm_head", rep)
        assert any("linear must run eagerly" in m for m in misses), misses
    else:
        assert _matches("lm_head", rep)


# ----------------------------------------------------------------------------- 4. cuts beside rewritten ops
def _entr_entropy(z):
    return torch.special.entr(F.softmax(z, -1)).sum(-1).mean()  # (no product: torch.mul stays outside)


def _mul_after_ce(z, y):
    ce = F.cross_entropy(z, y)
    return torch.mul(ce, 2.0) - 0.1 * _entr_entropy(z)


def _mul_before_logits(x, y):
    z = torch.mul(x, 2)
    return F.cross_entropy(z, y) - 0.1 * _entr_entropy(z)


CUTS = {"mul_after_ce": _mul_after_ce, "mul_before_logits": _mul_before_logits}


def _cut_case(fn, compiler):
    rep = _loss_vs_eager(fn, {"strict": True, "compiler": compiler, "eager_ops": ["torch.mul"]})
    assert {m.pattern for m in _matches("loss_entropy", rep)} == {"cross_entropy", "entropy"}
    assert rep.regions >= 2 and any("torch.mul" in e for e in rep.eager_nodes), (rep.regions, rep.eager_nodes)
    assert not rep.fallbacks, [f.one_line() for f in rep.fallbacks]


@pytest.mark.parametrize("name", list(CUTS))
def test_eager_cut_beside_a_rewritten_loss(name):
    _cut_case(CUTS[name], "aot_eager")


def test_eager_cut_beside_a_rewritten_loss_inductor():
    _cut_case(_mul_before_logits, "inductor")


Pair = collections.namedtuple("Pair", "a b c")


@torch.fx.wrap
def _make_pair(x):
    return Pair(x.sin(), None, x.cos())


@torch.fx.wrap
def _use_pair(p, y):
    assert p.b is None
    return p.a * y + p.c


def _pair_program(x, y):
    p = _make_pair(x)
    z = torch.relu(_use_pair(p, y))
    return _use_pair(p, z) + _use_pair(p, z.exp())


def test_structured_values_cross_regions_as_tensors():
    """A namedtuple produced in one region and read in the next, and by an eager node:
    the regions pass its tensors and each reader rebuilds it in its own arguments."""
    gm = fx.symbolic_trace(_pair_program)
    x, y = torch.randn(5), torch.randn(5)
    env = {}

    class Record(fx.Interpreter):
        def run_node(self, n):
            env[n] = out = super().run_node(n)
            n.meta["example_value"] = out
            return out

    Record(gm).run(x, y)
    eager = {n: "test" for n in gm.graph.nodes if n.target is torch.relu}
    uses = [n for n in gm.graph.nodes if n.target is _use_pair]
    eager[uses[1]] = "test"  # a reader of the structure that runs eagerly
    report = ger_inductor.debug.new_report(name="t", devices=["cpu"], options={}, mode=None)
    dumper = ger_inductor.debug.GraphDumper(None, report)
    split = fallback.split_into_regions(
        gm, eager, lambda g, inputs: _compat.aot_eager(g, list(inputs)), report, GerOptions.parse({"strict": True}), dumper
    )
    torch.testing.assert_close(split(x, y), _pair_program(x, y))
    assert report.regions >= 2 and not report.fallbacks
    for name, sub in split.named_children():
        g = sub.gm.graph if isinstance(sub, fallback.LazyRegion) else None
        if g is None:
            continue
        out = next(n for n in g.nodes if n.op == "output")
        outs = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
        for v in outs:
            assert not isinstance(v.meta.get("example_value"), tuple), (name, v)


# ----------------------------------------------------------------------------- 5. the GPU check script
def test_gpu_check_soundness_skips_without_cuda(monkeypatch, tmp_path, capsys):
    from benchmarks import gpu_check_soundness

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "r.json"
    assert gpu_check_soundness.main(["--out", str(out)]) == 0
    assert "skipped: no CUDA device" in capsys.readouterr().out
    assert not out.exists()


def test_gpu_check_soundness_cpu_check_logic():
    """The checks' pass/fail logic on the CPU (the dry run's path): the refused loss
    (a write between the statistics) equals eager and names the write."""
    from benchmarks import gpu_check_soundness

    rec, steps = gpu_check_soundness.check_loss_write(torch.device("cpu"), (8, 12))
    assert rec["ok"], rec
    assert set(steps) == {"eager", "inductor", "ger"}


# ----------------------------------------------------------------------------- saved-tensor hooks
def test_first_call_inside_an_eager_checkpoint_runs_as_eager():
    """The first call of a ger-compiled function inside an eager non-reentrant
    ``checkpoint`` (which counts what its region saves, with saved-tensor hooks): ger's
    compile-time fake runs of the ops it inserts were counted as the region's (14 saved
    against 8 recomputed) and the backward raised CheckpointError where eager and Inductor
    run (review, stop 37). ger's own work now runs outside the caller's hooks; a user's
    pack hook sees no fake tensor."""
    from torch.utils.checkpoint import checkpoint

    g = torch.Generator().manual_seed(0)
    z0, y = torch.randn(6, 40, generator=g), torch.randint(0, 40, (6,), generator=g)

    def loss_fn(z, y):
        return F.cross_entropy(z, y, label_smoothing=0.1) - 0.05 * -(z.softmax(-1) * z.log_softmax(-1)).sum(-1).mean()

    grads = []
    for fn in (loss_fn, torch.compile(loss_fn, backend="ger", options={"strict": True, "compiler": "aot_eager"})):
        torch._dynamo.reset()
        z = z0.clone().requires_grad_()
        checkpoint(fn, z * 1.0, y, use_reentrant=False).backward()
        grads.append(z.grad)
    torch.testing.assert_close(grads[1], grads[0])
    assert ger_inductor.last_report().match_count("loss_entropy") >= 1

    seen = []

    def pack(t):
        seen.append(_compat.is_traced_tensor(t))
        return t

    torch._dynamo.reset()
    f = torch.compile(loss_fn, backend="ger", options={"strict": True, "compiler": "aot_eager"})
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        f(z0.clone().requires_grad_(), y)
    assert seen and not any(seen), seen


def test_measured_graph_inside_an_eager_checkpoint(tmp_path):
    """The same with the measured selection (default options): its timing calls ran real
    forwards and backwards under the checkpoint's hooks (an autotune fallback, then
    CheckpointError at the user's backward). Eager's gradient and running statistics."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()).train()
    block = copy.deepcopy(ref)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    ger_inductor.clear_reports()
    cb = torch.compile(block, backend="ger", options={"autotune": True, "autotune_store": str(tmp_path / "d.json")})
    outs = []
    for m in (ref, cb):
        xi = x.clone().requires_grad_()
        checkpoint(m, xi, use_reentrant=False).square().sum().backward()
        outs.append(xi.grad)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    assert not [f for r in ger_inductor.reports() for f in r.fallbacks], \
        [f.one_line() for r in ger_inductor.reports() for f in r.fallbacks]
    assert [d["source"] for r in ger_inductor.reports() for d in r.decisions] == ["measured"]


def test_patterns_inside_checkpointed_regions_are_reported():
    """ger's passes rewrite the graph's own nodes, not a higher-order op's subgraph (an
    activation-checkpointed region under torch.compile): such a pattern runs as
    Inductor compiles it, and the report says so with a near-miss per family instead of
    nothing (review, stop 37). Eager's numbers either way."""
    from torch.utils.checkpoint import checkpoint

    from .conftest import rewrite_backend

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x, y):
            h = checkpoint(lambda t: F.relu(self.b(self.c(t))), x, use_reentrant=False)
            return checkpoint(lambda z: F.cross_entropy(z, y, label_smoothing=0.1), h.mean((2, 3)), use_reentrant=False)

    torch.manual_seed(0)
    m = M().train()
    ref = copy.deepcopy(m)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    reports = []
    torch._dynamo.reset()
    out = torch.compile(m, backend=rewrite_backend({}, reports=reports))(x, y)
    torch.testing.assert_close(out, ref(x, y))
    misses = {(n.family, n.pattern) for r in reports for n in r.near_misses}
    assert {("conv_bn_act", "subgraph"), ("loss_entropy", "subgraph")} <= misses, misses
    assert not [m_ for r in reports for m_ in r.matches]
