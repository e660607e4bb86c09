"""The loss rewrite on unmodified code: every recognised spelling (match counters and
report, numbers vs eager forward and backward, the rewritten graph) and every
near-miss (left alone, reported with its reason)."""

from __future__ import annotations

import glob
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch.testing import FileCheck

import ger_inductor
from ger_inductor import _compat

from . import spellings
from .conftest import compiler_params
from .expect import ExpectTestCase

N, V = 24, 40


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(N, V, generator=g) * 2).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = 3
    return z, y


def _run(fn, tmp_path=None, options=None, compiler="inductor"):
    z, y = _inputs()
    opts = {"strict": True, "compiler": compiler, **(options or {})}
    if tmp_path is not None:
        opts["dump_dir"] = str(tmp_path)
    out = torch.compile(fn, backend="ger", options=opts)(z, y)
    (g,) = torch.autograd.grad(out, z)
    z2 = z.detach().clone().requires_grad_()
    ref = fn(z2, y)
    (g2,) = torch.autograd.grad(ref, z2)
    return out, ref, g, g2


def _code_lines(text: str) -> str:
    """The graph's code without the source comments print_readable adds."""
    return "\n".join(line for line in text.splitlines() if not line.strip().startswith("#"))


def _rewritten_graph(tmp_path) -> str:
    files = sorted(glob.glob(os.path.join(str(tmp_path), "graph_*", "*_loss_entropy.py")))
    assert files, os.listdir(str(tmp_path))
    return "\n".join(open(f).read() for f in files)


#: spellings also compiled through Inductor (one per kind of statistic and layout)
CODEGEN_SPELLINGS = {"ce_label_smoothing", "ce_weight_ignore_sum", "ce_upcast_bf16", "cp_categorical",
                     "ls_mean_bool_mask", "ger_reference_torch", "z_loss", "entropy_verl_chunked"}


@pytest.mark.parametrize("name, compiler", compiler_params(spellings.RECOGNISED, CODEGEN_SPELLINGS))
def test_recognised_spelling(name, compiler, tmp_path):
    fn, patterns = spellings.RECOGNISED[name]
    out, ref, g, g2 = _run(fn, tmp_path, compiler=compiler)
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6)
    if name == "ce_upcast_bf16":  # gradients pass through bf16: compare at bf16 resolution
        torch.testing.assert_close(g, g2, rtol=1e-2, atol=1e-5)
    else:
        torch.testing.assert_close(g, g2, rtol=1e-5, atol=1e-7)
    reps = ger_inductor.reports()
    matched = {m.pattern for r in reps for m in r.matches}
    assert patterns <= matched, (patterns, matched, [n.reason for r in reps for n in r.near_misses])
    assert not [n for r in reps for n in r.near_misses], [n.reason for r in reps for n in r.near_misses]
    assert all(not r.fallbacks for r in reps)
    # the rewritten Dynamo graph reads the logits through the fused op only
    code = _code_lines(_rewritten_graph(tmp_path))
    FileCheck().check("ger_inductor_losses_row_stats").run(code)
    vocab_calls = r"(log_softmax|\bsoftmax|special_entr|\blogsumexp|functional\.kl_div|\.gather|xlogy)\("
    assert not re.search(vocab_calls, code), code


@pytest.mark.parametrize("name", list(spellings.NEAR_MISSES))
def test_near_miss_left_alone_and_reported(name, tmp_path):
    fn, word = spellings.NEAR_MISSES[name]
    out, ref, g, g2 = _run(fn, tmp_path, compiler="aot_eager")  # left as written: Inductor adds nothing here
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(g, g2, rtol=1e-5, atol=1e-7)
    reps = ger_inductor.reports()
    reasons = [n.reason for r in reps for n in r.near_misses]
    assert any(word in r for r in reasons), (word, reasons)
    # the refused regulariser stays as written
    code = _code_lines(_rewritten_graph(tmp_path))
    assert "softmax" in code or "cross_entropy(" in code, code


def test_fused_code_has_no_log_softmax_buffer():
    """The generated code of a rewritten hand-written loss: the fused kernels, and no
    N x V buffer in the forward (the log-probabilities are never materialised)."""
    z, y = _inputs()

    def step(z, y):
        loss = spellings.cp_softmax_logsoftmax(z, y)
        loss.backward()
        return loss

    _, (fwd, bwd) = _compat.run_and_get_code(torch.compile(step, backend="ger", options={"strict": True}), z, y)
    FileCheck().check("cpp_fused").check("loss_fwd").run(fwd)
    assert not re.search(rf"empty_strided_cpu\(\({N}, {V}(, 1)?\)", fwd)
    FileCheck().check("loss_bwd").run(bwd)
    assert len(re.findall(rf"empty_strided_cpu\(\({N}, {V}(, 1)?\)", bwd)) == 1  # the gradient
    assert ger_inductor.last_report().match_count("loss_entropy") == 2


def test_eval_graph_without_grad_rewritten():
    z, y = _inputs()
    with torch.no_grad():
        out = torch.compile(spellings.cp_entr, backend="ger", options={"strict": True})(z, y)
    torch.testing.assert_close(out, spellings.cp_entr(z, y))
    assert ger_inductor.last_report().match_count("loss_entropy", "entropy") == 1


def test_pass_can_be_disabled():
    z, y = _inputs()
    out = torch.compile(spellings.ce_label_smoothing, backend="ger", options={"passes": {"loss_entropy": False}})(z, y)
    torch.testing.assert_close(out, spellings.ce_label_smoothing(z, y))
    assert [p.name for p in ger_inductor.last_report().passes] == ["conv_bn_act", "lm_head"]
    assert not [m for p in ger_inductor.last_report().passes for m in p.matches]


def test_pinned_profile_sets_chunked_strategy_on_the_op(tmp_path):
    """The GPU profiles' split-reduction strategy is visible on the graph (and still
    exact when the chunked lowering runs here, on the CPU)."""
    z = torch.randn(N, 3000, requires_grad=True)  # more classes than one chunk holds
    y = torch.randint(0, 3000, (N,))
    f = torch.compile(spellings.ce_label_smoothing, backend="ger",
                      options={"strict": True, "device_profile": "h100", "dump_dir": str(tmp_path)})
    out = f(z, y)
    (g,) = torch.autograd.grad(out, z)
    z2 = z.detach().clone().requires_grad_()
    ref = spellings.ce_label_smoothing(z2, y)
    (g2,) = torch.autograd.grad(ref, z2)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, g2, rtol=1e-5, atol=1e-7)
    text = _code_lines(_rewritten_graph(tmp_path))
    assert re.search(r"row_stats\([^)]*, 1024, class_dim", text), text  # chunk = 1024 classes on an H100
    m = ger_inductor.last_report().matches[0]
    assert m.detail["chunk"] == 1024


def test_direct_ger_loss_gets_profile_strategy():
    z, y = _inputs()
    z = torch.randn(N, 3000, requires_grad=True)
    y = torch.randint(0, 3000, (N,))
    f = torch.compile(lambda z, y: ger_inductor.ger_loss(z, y, alpha=0.0, beta=0.1), backend="ger",
                      options={"strict": True, "device_profile": "mi300x"})
    out = f(z, y)
    torch.testing.assert_close(out, ger_inductor.ger_loss(z, y, alpha=0.0, beta=0.1))
    strat = next(p for p in ger_inductor.last_report().passes if p.name == "loss_entropy").strategy
    assert strat["forward"] == "chunks" and strat["chunk"] == 1024 and strat["profile"] == "mi300x"


def test_lm_trains_like_eager_for_50_steps():
    """An unmodified small LM (embedding -> MLP blocks -> lm head -> F.cross_entropy
    with ignore_index and label smoothing) trained with backend="ger"."""
    from ger_inductor.demo import TinyLM

    torch.manual_seed(0)
    tokens = torch.randint(0, 500, (4, 16))
    targets = torch.randint(0, 500, (4, 16))
    targets[:, -3:] = -100
    curves = {}
    for backend in ("eager", "ger"):
        torch.manual_seed(0)
        model = TinyLM(vocab=500, d=32, layers=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        run = model if backend == "eager" else torch.compile(model, backend="ger", options={"strict": True})
        losses = []
        for _ in range(50):
            opt.zero_grad()
            loss = run(tokens, targets)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[backend] = losses
    assert curves["eager"][-1] < curves["eager"][0] - 0.5  # it learns
    torch.testing.assert_close(torch.tensor(curves["ger"]), torch.tensor(curves["eager"]), rtol=1e-4, atol=1e-4)
    assert any(m.pattern == "cross_entropy(label_smoothing)" for r in ger_inductor.reports() for m in r.matches)


class TestRewriteDumps(ExpectTestCase):
    """Before/after graphs of two representative spellings, as dumped."""

    def _dump(self, fn, tmp):
        z, y = _inputs()
        torch.compile(fn, backend="ger", options={"strict": True, "dump_dir": tmp})(z, y)
        d = sorted(glob.glob(os.path.join(tmp, "graph_*")))[0]
        before = _compat.normalize_gm(open(glob.glob(os.path.join(d, "00_input.py"))[0]).read())
        after = _compat.normalize_gm(open(glob.glob(os.path.join(d, "*_loss_entropy.py"))[0]).read())
        return before, after

    def setUp(self):
        _compat.dynamo_reset()

    def test_confidence_penalty_dump(self):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            before, after = self._dump(spellings.cp_softmax_logsoftmax, tmp)
        self.assertExpectedInline(before, """\
class GraphModule(torch.nn.Module):
    def forward(self, L_z_: "f32[24, 40]", L_y_: "i64[24]"):
        l_z_ = L_z_
        l_y_ = L_y_

        lp: "f32[24, 40]" = torch.log_softmax(l_z_, dim = -1)

        exp: "f32[24, 40]" = lp.exp()
        mul: "f32[24, 40]" = exp * lp;  exp = lp = None
        sum_1: "f32[24]" = mul.sum(-1);  mul = None
        mean: "f32[]" = sum_1.mean();  sum_1 = None
        ent: "f32[]" = -mean;  mean = None

        cross_entropy: "f32[]" = torch.nn.functional.cross_entropy(l_z_, l_y_);  l_z_ = l_y_ = None
        mul_1: "f32[]" = 0.1 * ent;  ent = None
        sub: "f32[]" = cross_entropy - mul_1;  cross_entropy = mul_1 = None
        return (sub,)
""")
        self.assertExpectedInline(after, """\
class GraphModule(torch.nn.Module):
    def forward(self, L_z_: "f32[24, 40]", L_y_: "i64[24]"):
        l_z_ = L_z_
        l_y_ = L_y_

        row_stats = ger_inductor_losses_row_stats(l_z_, l_y_, 1.0, -100, True, 0, class_dim = 1, smooth_eps = None, smooth_weight = None, zmin = True)

        row_statistic: "f32[24]" = ger_inductor_losses_row_statistic(row_stats, l_z_, (('L', -1.0), ('ez', 1.0)), False, 1.0, torch.float32, nan = ('zinf', 'zinf'))
        mean: "f32[]" = row_statistic.mean();  row_statistic = None
        ent: "f32[]" = -mean;  mean = None

        cross_entropy_from_stats: "f32[]" = ger_inductor_losses_cross_entropy_from_stats(row_stats, l_z_, l_y_, None, -100, 'mean', 0.0, torch.float32, 1);  row_stats = l_z_ = l_y_ = None
        mul_1: "f32[]" = 0.1 * ent;  ent = None
        sub: "f32[]" = cross_entropy_from_stats - mul_1;  cross_entropy_from_stats = mul_1 = None
        return (sub,)
""")

    def test_fairseq_label_smoothing_dump(self):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            before, after = self._dump(spellings.ls_fairseq, tmp)
        self.assertExpectedInline(before, """\
class GraphModule(torch.nn.Module):
    def forward(self, L_z_: "f32[24, 40]", L_y_: "i64[24]"):
        l_z_ = L_z_
        l_y_ = L_y_

        lprobs: "f32[24, 40]" = torch.nn.functional.log_softmax(l_z_, dim = -1);  l_z_ = None

        target: "i64[24, 1]" = l_y_.unsqueeze(-1);  l_y_ = None

        gather: "f32[24, 1]" = lprobs.gather(dim = -1, index = target)
        nll_loss: "f32[24, 1]" = -gather;  gather = None

        sum_1: "f32[24, 1]" = lprobs.sum(dim = -1, keepdim = True);  lprobs = None
        smooth_loss: "f32[24, 1]" = -sum_1;  sum_1 = None

        pad_mask: "b8[24, 1]" = target.eq(3);  target = None

        masked_fill_: "f32[24, 1]" = nll_loss.masked_fill_(pad_mask, 0.0);  masked_fill_ = None

        masked_fill__1: "f32[24, 1]" = smooth_loss.masked_fill_(pad_mask, 0.0);  pad_mask = masked_fill__1 = None

        nll_loss_1: "f32[]" = nll_loss.sum();  nll_loss = None

        smooth_loss_1: "f32[]" = smooth_loss.sum();  smooth_loss = None

        mul: "f32[]" = 0.8974358974358975 * nll_loss_1;  nll_loss_1 = None
        mul_1: "f32[]" = 0.002564102564102564 * smooth_loss_1;  smooth_loss_1 = None
        add: "f32[]" = mul + mul_1;  mul = mul_1 = None
        return (add,)
""")
        self.assertExpectedInline(after, """\
class GraphModule(torch.nn.Module):
    def forward(self, L_z_: "f32[24, 40]", L_y_: "i64[24]"):
        l_z_ = L_z_
        l_y_ = L_y_

        target: "i64[24, 1]" = l_y_.unsqueeze(-1)

        row_stats = ger_inductor_losses_row_stats(l_z_, l_y_, 1.0, -4611686018427387904, False, 0, class_dim = 1, smooth_eps = None, smooth_weight = None);  l_y_ = None

        row_statistic: "f32[24, 1]" = ger_inductor_losses_row_statistic(row_stats, l_z_, (('L', -1.0), ('zy', 1.0)), True, 1.0, torch.float32)
        nll_loss: "f32[24, 1]" = -row_statistic;  row_statistic = None

        row_statistic_1: "f32[24, 1]" = ger_inductor_losses_row_statistic(row_stats, l_z_, (('L', -40.0), ('zsum', 1.0)), True, 1.0, torch.float32);  row_stats = l_z_ = None
        smooth_loss: "f32[24, 1]" = -row_statistic_1;  row_statistic_1 = None

        pad_mask: "b8[24, 1]" = target.eq(3);  target = None

        masked_fill_: "f32[24, 1]" = nll_loss.masked_fill_(pad_mask, 0.0);  masked_fill_ = None

        masked_fill__1: "f32[24, 1]" = smooth_loss.masked_fill_(pad_mask, 0.0);  pad_mask = masked_fill__1 = None

        nll_loss_1: "f32[]" = nll_loss.sum();  nll_loss = None

        smooth_loss_1: "f32[]" = smooth_loss.sum();  smooth_loss = None

        mul: "f32[]" = 0.8974358974358975 * nll_loss_1;  nll_loss_1 = None
        mul_1: "f32[]" = 0.002564102564102564 * smooth_loss_1;  smooth_loss_1 = None
        add: "f32[]" = mul + mul_1;  mul = mul_1 = None
        return (add,)
""")


def _fairseq_unreduced(z, y, eps=0.1):
    """fairseq's criterion as it calls label_smoothed_nll_loss: the (B, T, V) log-probs
    viewed as rows, ignore_index=None, reduce=False, then a weighted sum per token."""
    lprobs = F.log_softmax(z, dim=-1)
    lprobs, target = lprobs.view(-1, lprobs.size(-1)), y.view(-1)
    target = target.unsqueeze(-1)
    nll_loss = -lprobs.gather(dim=-1, index=target)
    smooth_loss = -lprobs.sum(dim=-1, keepdim=True)
    eps_i = eps / (lprobs.size(-1) - 1)
    loss = (1.0 - eps - eps_i) * nll_loss + eps_i * smooth_loss
    return (loss.squeeze(-1) * torch.linspace(0.5, 2.0, loss.shape[0])).sum()


def _single_step_weighted(z, y):
    """T = 1: (B, 1, V) log-probs viewed as (B, V); the per-row nll weighted by (B, 1)."""
    nll = -F.log_softmax(z, -1).view(-1, z.shape[-1]).gather(-1, y.view(-1, 1))
    return (nll * torch.linspace(0.5, 2.0, z.shape[0]).view(-1, 1)).sum()


def _split_rows(z, y):
    """(N, V) log-probs split into (B, T, V), a mean per position, weighted per (B, T)."""
    lp = F.log_softmax(z.view(-1, z.shape[-1]), -1).view(z.shape[0], z.shape[1], -1)
    return (lp.mean(-1) * torch.arange(float(z.shape[0] * z.shape[1])).view(z.shape[0], z.shape[1])).sum()


@pytest.mark.parametrize("fn, shape", [
    (_fairseq_unreduced, (4, 6, 50)),
    (_single_step_weighted, (5, 1, 50)),
    (_split_rows, (4, 6, 50)),
], ids=["fairseq_unreduced", "single_step_weighted", "split_rows"])
def test_a_view_of_the_log_probabilities_that_changes_rows_is_a_near_miss(fn, shape):
    """A view after log_softmax that changes the rows (fairseq's ``lprobs.view(-1, V)`` of
    (B, T, V) log-probs) was dropped by the rewrite: the statistic kept the rows before it
    - a (B, T) result where eager's is (B * T,), a (B, 1, 1) one broadcast into (B, B, 1):
    a wrong loss and gradient (review, stop 38). Now a near-miss that says to view the
    logits before the softmax; eager's numbers."""
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(shape, generator=g) * 2).requires_grad_()
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    ref = fn(z, y)
    (g_ref,) = torch.autograd.grad(ref, z)
    _compat.dynamo_reset()
    out = torch.compile(fn, backend="ger", options={"strict": True, "compiler": "aot_eager"})(z, y)
    (g_out,) = torch.autograd.grad(out, z)
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-5, atol=1e-6)
    rep = ger_inductor.last_report()
    assert any("changes their rows" in n.reason for n in rep.near_misses), [n.reason for n in rep.near_misses]
