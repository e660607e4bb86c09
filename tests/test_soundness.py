"""Rewrites never change a number: in-place writes and aliasing between the reads a
rewrite would move (every family), checked against eager, with the near-miss that
names the writing node, and a control without the write that IS rewritten (so each
test fails if the refusal were missing or too broad)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ger_inductor
from ger_inductor import _compat
from ger_inductor.passes import graph

N, V = 16, 40
AOT = {"strict": True, "compiler": "aot_eager"}


def _lv(seed=0, n=N, v=V):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * 2, torch.randint(0, v, (n,), generator=g)


def _entropy(q):
    p = q.softmax(-1)
    return -(p * q.log_softmax(-1)).sum(-1).mean()


def _matches(family: str) -> int:
    rep = ger_inductor.last_report()
    return sum(len(p.matches) for p in rep.passes if p.name == family)


def _near_misses(family: str) -> list[str]:
    rep = ger_inductor.last_report()
    return [m.reason for p in rep.passes if p.name == family for m in p.near_misses]


# ----------------------------------------------------------------------------- loss family
def _ce_then_write(write):
    def f(q, y):
        ce = F.cross_entropy(q, y)
        write(q, y)
        return ce - 0.1 * _entropy(q)
    return f


def _masked(q, y):
    q.masked_fill_(q > 1.0, -3.0)


def _index_put(q, y):
    q[torch.arange(q.shape[0]), y] = 0.5


def _through_view(q, y):
    q.view(-1)[::7].mul_(2.0)


def _copy(q, y):
    q.copy_(q.flip(0))


LOSS_WRITES = {
    "mul_": lambda q, y: q.mul_(3.0),
    "masked_fill_": _masked,
    "div_": lambda q, y: q.div_(1.7),
    "index_put": _index_put,
    "write_through_view": _through_view,
    "copy_": _copy,
}


@pytest.mark.parametrize("name", list(LOSS_WRITES))
def test_loss_write_between_statistics_no_grad(name):
    fn = _ce_then_write(LOSS_WRITES[name])
    q, y = _lv()
    with torch.no_grad():
        ref = fn(q.clone(), y)
        out = torch.compile(fn, backend="ger", options=AOT)(q.clone(), y)
    torch.testing.assert_close(out, ref)
    assert _matches("loss_entropy") == 0
    assert any("writes a tensor the rewrite would read" in r for r in _near_misses("loss_entropy")), _near_misses("loss_entropy")


def test_loss_write_before_all_statistics_is_rewritten():
    """Control: the same write before every statistic moves nothing across it."""
    def fn(q, y):
        q.mul_(3.0)
        return F.cross_entropy(q, y) - 0.1 * _entropy(q)

    q, y = _lv()
    with torch.no_grad():
        ref = fn(q.clone(), y)
        out = torch.compile(fn, backend="ger", options=AOT)(q.clone(), y)
    torch.testing.assert_close(out, ref)
    assert _matches("loss_entropy") == 2


def test_loss_write_to_unrelated_tensor_is_rewritten():
    """Control: a write to a tensor the statistics do not read does not refuse."""
    def fn(q, y, other):
        ce = F.cross_entropy(q, y)
        other.mul_(2.0)
        return ce - 0.1 * _entropy(q) + other.sum()

    q, y = _lv()
    other = torch.randn(5)
    with torch.no_grad():
        ref = fn(q.clone(), y, other.clone())
        out = torch.compile(fn, backend="ger", options=AOT)(q.clone(), y, other.clone())
    torch.testing.assert_close(out, ref)
    assert _matches("loss_entropy") == 2


def test_loss_write_with_grad():
    def fn(x, y):
        q = x * 1.5
        ce = F.cross_entropy(q, y)
        q.mul_(3.0)
        return ce - 0.1 * _entropy(q)

    x, y = _lv()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = fn(x1, y)
    ref.backward()
    out = torch.compile(fn, backend="ger", options=AOT)(x2, y)
    out.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x2.grad, x1.grad)
    assert _matches("loss_entropy") == 0
    assert ger_inductor.last_report().fallbacks == []


def test_target_written_between_statistics():
    def fn(q, y):
        h = _entropy(q)
        y.clamp_(max=3)
        return F.cross_entropy(q, y) - 0.1 * h

    q, y = _lv()
    with torch.no_grad():
        ref = fn(q.clone(), y.clone())
        out = torch.compile(fn, backend="ger", options=AOT)(q.clone(), y.clone())
    torch.testing.assert_close(out, ref)
    assert _matches("loss_entropy") == 0


def test_loss_write_under_real_inductor():
    """The default compiler too (one small code generation)."""
    fn = _ce_then_write(LOSS_WRITES["mul_"])
    q, y = _lv()
    with torch.no_grad():
        ref = fn(q.clone(), y)
        out = torch.compile(fn, backend="ger", options={"strict": True})(q.clone(), y)
    torch.testing.assert_close(out, ref)
    assert _matches("loss_entropy") == 0


def test_returned_logits_written_before_backward_under_inductor():
    """The loss's logits returned beside it and written by the caller before the backward
    (found by the fuzzer): eager's gradient is unchanged (its softmax saved its own
    output). The fused loss op saves the logits; Inductor's partitioner would save the
    returned tensor itself through an alias with its own version counter, so the write
    changed the gradient silently. The op now reads a private copy (``ger::version_guard``)."""
    def fn(q_in, y):
        q = q_in * 1.0
        return F.cross_entropy(q, y, label_smoothing=0.1), q

    g = torch.Generator().manual_seed(0)
    q0, y = torch.randn(6, 11, generator=g), torch.randint(0, 11, (6,), generator=g)

    def write_then_backward(f):
        q_in = q0.clone().requires_grad_()
        loss, q = f(q_in, y)
        try:
            q.mul_(0.5)
        except RuntimeError as e:
            return str(e)
        loss.backward()
        return q_in.grad

    # torch 2.14.1's Inductor returns q as an output view of its compiled function, and
    # the caller's write raises there (plain backend="inductor" alike; 2.13 does not):
    # ger may then raise Inductor's error, never give another gradient.
    inductor = write_then_backward(torch.compile(fn, backend="inductor"))
    _compat.dynamo_reset()
    ger_inductor.clear_reports()
    eager, ger = write_then_backward(fn), write_then_backward(torch.compile(fn, backend="ger", options={"strict": True}))
    if isinstance(inductor, str):
        assert isinstance(ger, str) and "is a view and is being modified inplace" in ger, ger
    else:
        assert isinstance(ger, torch.Tensor), ger
        torch.testing.assert_close(ger, eager)
    assert _matches("loss_entropy") == 1
    rep = ger_inductor.last_report()
    assert "copied for" in next(p for p in rep.passes if p.name == "loss_entropy").strategy["saved_logits"]


def test_returned_input_logits_are_not_copied():
    """Logits that are a graph input (returned as they are or not): the op saves the
    caller's own tensor, no copy; its row outputs check the logits' version (a write
    raises autograd's error: test_input_logits_written_before_backward_raise_never_a_new_gradient);
    logits computed in the graph and not returned: neither."""
    from .conftest import rewrite_backend

    def strategy():
        return next(p for p in ger_inductor.last_report().passes if p.name == "loss_entropy").strategy

    q, y = _lv()
    q.requires_grad_()
    out = torch.compile(lambda q, y: (F.cross_entropy(q, y, label_smoothing=0.1), q),
                        backend=rewrite_backend({}))(q, y)
    assert out[1] is q and _matches("loss_entropy") == 1
    assert strategy()["saved_logits"].startswith("copied for row_stats (version check)")
    torch._dynamo.reset()
    torch.compile(lambda q, y: F.cross_entropy(q * 2.0, y, label_smoothing=0.1), backend=rewrite_backend({}))(q, y)
    assert _matches("loss_entropy") == 1 and "saved_logits" not in strategy()
    torch._dynamo.reset()
    torch.compile(lambda q, y: (lambda z: (F.cross_entropy(z, y, label_smoothing=0.1), z.view(-1)))(q * 2.0),
                  backend=rewrite_backend({}))(q, y)
    assert _matches("loss_entropy") == 1 and "copied for" in strategy()["saved_logits"]


@pytest.mark.parametrize("spelling", ["ls", "ce_entropy"])
def test_input_logits_written_before_backward_raise_never_a_new_gradient(spelling):
    """A loss compiled on its own takes the logits as an input; the caller writes them
    (under no_grad) between the forward and the backward. Eager's log_softmax saved its
    output: the old gradient. The op saves the logits themselves: compiled by Inductor it
    gave the gradient of the written logits, silently (stop-36 review). Now autograd's
    error, as plain Inductor gives for a plain cross-entropy (a copy would hold N x V
    where Inductor holds the input itself)."""
    def loss(z, y):
        lv = z.view(-1, z.shape[-1])
        if spelling == "ls":
            return F.cross_entropy(lv, y.view(-1), label_smoothing=0.1)
        return F.cross_entropy(lv, y.view(-1)) + 0.1 * (F.softmax(lv, -1) * F.log_softmax(lv, -1)).sum(-1).mean()

    torch.manual_seed(0)
    z = torch.randn(2, 3, 5, requires_grad=True)
    y = torch.tensor([[1, 0, 2], [3, 4, 0]])
    out = torch.compile(loss, backend="ger", options={"strict": True})(z, y)
    assert _matches("loss_entropy") >= 1
    with torch.no_grad():
        z.mul_(0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


# ----------------------------------------------------------------------------- conv -> BN
class ConvBNWrite(nn.Module):
    def __init__(self, write: bool):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.write = write

    def forward(self, x):
        x = x * 1.0
        y = self.conv(x)
        if self.write:
            x.mul_(0.5)
        return torch.relu(self.bn(y)) + x


def _bn_stats(m):
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
    return m


@pytest.mark.parametrize("write", [True, False])
def test_conv_input_written_before_bn(write):
    torch.manual_seed(0)
    m = _bn_stats(ConvBNWrite(write)).eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref = m(x.clone())
        out = torch.compile(m, backend="ger", options=AOT)(x.clone())
    torch.testing.assert_close(out, ref)
    assert _matches("conv_bn_act") == (0 if write else 1)
    if write:
        assert any("mul_" in r for r in _near_misses("conv_bn_act"))


class StatsWritten(nn.Module):
    """An eval BN whose running mean (or weight) is written in place in the graph, before
    the conv or between conv and BN; the conv output optionally read beside BN."""

    def __init__(self, where: str, shared: bool, what: str = "running_mean", train: bool = False):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.where, self.shared, self.what = where, shared, what
        self.train(train)

    def _write(self):
        with torch.no_grad():
            getattr(self.bn, self.what).add_(0.1)

    def forward(self, x):
        if self.where == "before":
            self._write()
        y = self.conv(x)
        if self.where == "between":
            self._write()
        z = F.relu(self.bn(y))
        return z.mean() + (y.mean() if self.shared else 0)


@pytest.mark.parametrize("where,shared,what,train", [
    ("before", False, "running_mean", False), ("before", True, "running_mean", False),
    ("between", True, "running_mean", False), ("before", False, "weight", False), ("before", False, "weight", True)])
def test_bn_statistic_or_weight_written_in_the_graph_is_refused(where, shared, what, train):
    """Found by the fuzzer (tests/test_fuzz.py FOUND["running_mean_written_shared_conv"]):
    with grad-enabled parameters, an eval BN whose running mean is written in place in the
    graph got its weight gradient from the running mean written twice - AOTAutograd
    recomputed the written value from the (by then written) input in the backward. ger
    now leaves a conv -> BN alone when a weight or statistic it reads is written in the
    graph: eager's gradients, a near-miss naming the write."""
    torch.manual_seed(0)
    m = _bn_stats(StatsWritten(where, shared, what, train))
    m2 = copy.deepcopy(m)
    x = torch.randn(2, 3, 6, 6)
    m(x).backward()
    torch.compile(m2, backend="ger", options=AOT)(x).backward()
    for (name, p), p2 in zip(m.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p2.grad, p.grad, msg=name)
    for (name, b), b2 in zip(m.named_buffers(), m2.buffers()):
        torch.testing.assert_close(b2, b, msg=name)
    assert _matches("conv_bn_act") == 0
    assert any("written in place in this graph" in r and "add_" in r for r in _near_misses("conv_bn_act"))


def test_conv_input_written_with_grad():
    """Eager's forward is a number and its backward raises autograd's error (the conv
    saved x). ger leaves the conv alone; tracing the joint graph meets the same error,
    so the graph falls back to eager (strict re-raises it): eager's forward, eager's
    error."""
    torch.manual_seed(0)
    m = _bn_stats(ConvBNWrite(True)).eval()
    x = torch.randn(2, 4, 8, 8)
    x1, x2 = (x.clone().requires_grad_() for _ in range(2))
    ref = m(x1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        ref.sum().backward()
    out = torch.compile(m, backend="ger", options={"compiler": "aot_eager"})(x2)
    assert _matches("conv_bn_act") == 0
    torch.testing.assert_close(out, ref.detach())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    with pytest.raises(Exception, match="modified by an inplace operation"):
        torch._dynamo.reset()
        torch.compile(m, backend="ger", options=AOT)(x.clone().requires_grad_())


def test_conv_weight_written_before_bn():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            self.conv.weight.mul_(0.5)
            return torch.relu(self.bn(y))

    torch.manual_seed(0)
    m1 = _bn_stats(M()).eval()
    m2 = _bn_stats(M()).eval()
    m2.load_state_dict(m1.state_dict())
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref = m1(x)
        out = torch.compile(m2, backend="ger", options=AOT)(x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(m2.conv.weight, m1.conv.weight)
    assert _matches("conv_bn_act") == 0


def test_conv_under_grad_mode_switch_not_moved():
    """The conv computed under no_grad, its BN outside: the fold would move it across."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            with torch.no_grad():
                y = self.conv(x)
            return self.bn(y)

    torch.manual_seed(0)
    m = _bn_stats(M()).eval()
    x = torch.randn(2, 4, 8, 8)
    ref = m(x)
    out = torch.compile(m, backend="ger", options=AOT)(x)
    torch.testing.assert_close(out, ref)
    assert out.requires_grad == ref.requires_grad
    out.sum().backward()
    ref.sum().backward()


# ----------------------------------------------------------------------------- lm head
H, VH = 16, 64


def _head_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(12, H, generator=g), torch.randn(VH, H, generator=g) * 0.3, torch.randint(0, VH, (12,), generator=g)


@pytest.mark.parametrize("write", [True, False])
def test_head_input_written_before_loss(write):
    def fn(h, w, y):
        h = h * 1.0
        z = F.linear(h, w)
        if write:
            h.mul_(2.0)
        return F.cross_entropy(z, y, label_smoothing=0.1) + h.sum() * 1e-3

    h, w, y = _head_inputs()
    opts = {**AOT, "lm_head_chunk": 5}
    with torch.no_grad():
        ref = fn(h, w, y)
        out = torch.compile(fn, backend="ger", options=opts)(h, w, y)
    torch.testing.assert_close(out, ref)
    assert _matches("lm_head") == (0 if write else 1)
    if write:
        assert any("mul_" in r for r in _near_misses("lm_head"))


def test_head_input_written_with_grad_is_refused():
    """With a gradient eager's backward raises (linear saved h); ger never fuses across
    the write, so the compiled graph is the unrewritten one."""
    def fn(h, w, y):
        h = h * 1.0
        z = F.linear(h, w)
        h.mul_(2.0)
        return F.cross_entropy(z, y)

    h, w, y = _head_inputs()
    w1 = w.clone().requires_grad_()
    ref = fn(h, w1, y)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        ref.backward()
    out = torch.compile(fn, backend="ger", options={"compiler": "aot_eager", "lm_head_chunk": 5})(h, w.clone().requires_grad_(), y)
    torch.testing.assert_close(out, ref.detach())
    assert _matches("lm_head") == 0


def test_head_weight_changed_between_forward_and_backward():
    """Eager raises autograd's version-counter error; so must the fused head."""
    def fn(h, w, y):
        return F.cross_entropy(F.linear(h, w), y)

    h, w, y = _head_inputs()
    for compiled in (False, True):
        wl = w.clone().requires_grad_()
        w_used = wl * 1.0  # a non-leaf, so it may be written in place
        f = torch.compile(fn, backend="ger", options={**AOT, "lm_head_chunk": 5}) if compiled else fn
        loss = f(h.clone().requires_grad_(), w_used, y)
        with torch.no_grad():
            w_used.mul_(2.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
    assert _matches("lm_head") == 1


@pytest.mark.parametrize("what", ["target", "class_weight"])
def test_loss_inputs_written_between_forward_and_backward(what):
    """F.cross_entropy saves its target and class weights: written in place before the
    backward, eager raises autograd's error. So must ger's public losses eagerly, and the
    compiled fused head in its in-forward mode (whose backward needs neither)."""
    h, W, y = _head_inputs()
    cw = torch.rand(W.shape[0]) + 0.5

    def write(y_, w_):
        with torch.no_grad():
            (y_.clamp_(max=2) if what == "target" else w_.mul_(2.0))

    def fused(h_, W_, y_, w_):
        return ger_inductor.ger_linear_loss(h_, W_, y_, weight=w_, label_smoothing=0.1, chunk=5)

    def loss(h_, W_, y_, w_):
        return ger_inductor.ger_loss(F.linear(h_, W_), y_, weight=w_, label_smoothing=0.1)

    def eager(h_, W_, y_, w_):
        return F.cross_entropy(F.linear(h_, W_), y_, weight=w_, label_smoothing=0.1)

    compiled = torch.compile(eager, backend="ger", options={**AOT, "lm_head_chunk": 5})
    for f in (eager, fused, loss, compiled):
        y_, w_ = y.clone(), cw.clone()
        out = f(h.clone().requires_grad_(), W.clone().requires_grad_(), y_, w_)
        write(y_, w_)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.backward()
    assert _matches("lm_head") == 1


@pytest.mark.parametrize("use", ["added", "divided", "multiplied", "mask"])
def test_head_loss_operand_written_after_the_loss(use):
    """An O(rows) operand of the fused head's loss code, written in place after the loss
    and before the backward: eager raises where its op saved the operand (a divisor, a
    factor, a mask) and runs where it did not (a term added); the in-forward mode, whose
    backward reads none of them, must do the same."""
    h, W, y = _head_inputs()

    def fn(h_, W_, y_, t):
        per = F.cross_entropy(F.linear(h_, W_), y_, reduction="none")
        if use == "added":
            return per.sum() + t.sum()
        if use == "divided":
            return per.sum() / t.sum().clamp_min(1.0)
        if use == "multiplied":
            return (per * t).sum()
        return per.masked_fill(t, 0.0).sum()  # t: a bool mask here

    for compiled in (False, True):
        t = torch.rand(y.shape[0]) + 0.25
        if use == "mask":
            t = t > 0.75
        f = torch.compile(fn, backend="ger", options={**AOT, "lm_head_chunk": 5}) if compiled else fn
        loss = f(h.clone().requires_grad_(), W.clone().requires_grad_(), y, t)
        with torch.no_grad():
            t.logical_not_() if use == "mask" else t.mul_(2.0)
        if use in ("added", "divided"):  # sum() makes a new tensor: nothing saved of t itself
            loss.backward()
        else:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                loss.backward()
    assert _matches("lm_head") == 1
    assert [m.detail.get("gradients") for r in ger_inductor.reports() for m in r.matches
            if m.family == "lm_head"] == ["in_forward"]


# ----------------------------------------------------------------------------- the layer itself
def _dynamo_graph(fn, *args):
    got = []

    def capture(gm, example_inputs):
        got.append(gm)
        return gm.forward

    torch.compile(fn, backend=capture)(*args)
    return got[0]


def test_effects_follow_views_and_classify_writes():
    def fn(x, w, rm, rv):
        v = x.view(-1)
        t = x.T
        a = x.relu()
        v.mul_(2)  # writes x through a view
        t.add_(1)  # writes x through .T
        F.relu(a, inplace=True)  # writes a only
        b = F.batch_norm(a, rm, rv, training=True)  # writes rm, rv
        torch.add(a, 1, out=a)
        return b + w

    gm = _dynamo_graph(fn, torch.randn(3, 3), torch.randn(3), torch.zeros(3), torch.ones(3))
    eff = graph.Effects(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    ph = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    x, w, rm, rv = (ph[f"l_{k}_"] for k in ("x", "w", "rm", "rv"))
    writers = {n.name for n in eff.writers_of(x)}
    assert {"mul_", "add_"} <= writers and not any(n in writers for n in ("relu", "a"))
    assert {n.name for n in eff.writers_of(rm)} == {"b"}
    assert not eff.writers_of(w)
    relu = next(n for n in gm.graph.nodes if n.name in ("a", "relu"))
    assert len(eff.writers_of(relu)) == 2  # F.relu(inplace=True) and out=
    # reads moved across the write of x are refused, reads of w are not
    last = list(gm.graph.nodes)[-1]
    first = nodes.get("v") or next(iter(gm.graph.nodes))
    assert eff.first_barrier([(first, x)], last) is not None
    assert eff.first_barrier([(first, w)], last) is None


def test_unknown_calls_are_writes():
    def opaque(t):
        return t

    g = torch.fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(opaque, (x,))
    g.output(y)
    gm = torch.fx.GraphModule({}, g)
    eff = graph.Effects(gm)
    assert graph.mutates(y) and eff.writers_of(x) == [y]


# ----------------------------------------------------------------------------- autocast
class ConvBNAutocast(nn.Module):
    def __init__(self, inside: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.inside = inside

    def forward(self, x):
        if self.inside:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return torch.relu(self.bn(self.conv(x)))
        return torch.relu(self.bn(self.conv(x)))


def _autocast_case(inside: bool, train: bool, grad: bool, compiler: str):
    import contextlib

    torch.manual_seed(0)
    m = _bn_stats(ConvBNAutocast(inside)).train(train)
    m2 = _bn_stats(ConvBNAutocast(inside)).train(train)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 8, 8)
    outer = contextlib.nullcontext() if inside else torch.autocast("cpu", dtype=torch.bfloat16)
    with (torch.enable_grad() if grad else torch.no_grad()), outer:
        ref = m(x)
        out = torch.compile(m2, backend="ger", options={"strict": True, "compiler": compiler})(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(m2.state_dict()[k], v)
    if grad:
        out.float().sum().backward()
        ref.float().sum().backward()
        for (k, a), b in zip(m.named_parameters(), m2.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=5e-2, atol=5e-2, msg=k)
    assert _matches("conv_bn_act") == 1


@pytest.mark.parametrize("inside", [False, True], ids=["autocast_outside", "autocast_in_graph"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_conv_bn_under_cpu_autocast(inside, train, grad):
    _autocast_case(inside, train, grad, "aot_eager")


def test_conv_bn_under_cpu_autocast_inductor():
    _autocast_case(True, False, False, "inductor")
