"""#15 part 3: KL divergences between two logits tensors, found in unmodified trainer
code under backend="ger" (passes/loss_entropy/pairs.py) and rewritten into one
``ger::distill_fwd`` call, with eager's numbers: values and gradients on random logits,
and NaN / inf exactly where eager has them (-inf logits, masked vocabularies, underflow).
Refused look-alikes are near-misses with their reasons."""

from __future__ import annotations

import glob
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch.testing import FileCheck

import ger_inductor

from . import distill_spellings as ds

B, S, V = 2, 5, 40
T = 2.0


# ----------------------------------------------------------------------------- the spellings
def hinton(s, t, y):
    return ds.hinton_kd_loss(s.flatten(0, 1), t.flatten(0, 1), y.flatten(), temperature=T)


def trl_forward_kl(s, t, y):
    return ds.trl_generalized_jsd_loss(s, t, beta=0.0, temperature=T)


def trl_reverse_kl(s, t, y):
    return ds.trl_generalized_jsd_loss(s, t, beta=1.0, temperature=T)


def kl_log_target_sum(s, t, y):
    """F.kl_div on log-probabilities of both, summed; T^2 scaling."""
    lps = F.log_softmax(s.view(-1, V) / T, dim=-1)
    lpt = F.log_softmax(t.view(-1, V) / T, dim=-1)
    return F.kl_div(lps, lpt, log_target=True, reduction="sum") * T ** 2 / s.size(0)


def handwritten_forward_kl_rows(s, t, y):
    """KL(p_t || p_s) per token, written out, then a masked mean over tokens."""
    lps = torch.log_softmax(s / T, dim=-1)
    lpt = torch.log_softmax(t / T, dim=-1)
    pt = torch.softmax(t / T, dim=-1)
    kl = (pt * (lpt - lps)).sum(dim=-1)
    mask = (y != 0).float()
    return (kl * mask).sum() / mask.sum()


def reference_policy_kl(s, t, y):
    """RL style: the full-vocabulary KL(pi || pi_ref) per token (policy = s, reference
    = t), as logp.exp() * (logp - ref_logp), kept per token."""
    logp = s.log_softmax(-1)
    ref = t.log_softmax(-1)
    return (logp.exp() * (logp - ref)).sum(-1, keepdim=True) * 0.05


def liger_rows_forward(s, t, y):
    """Liger-Kernel's per-element formula at beta = 0 on log-probabilities."""
    X = F.log_softmax(s.float() / T, dim=-1)
    Y = F.log_softmax(t.float() / T, dim=-1)
    return ds.liger_jsd_rows(X, Y, 0.0).mean()


def viewed_after_log_softmax(s, t, y):
    """Log-probabilities flattened to (tokens, V) after the softmax, the per-token KL
    weighted by a flat mask: the output keeps the terms' rows, not the logits'."""
    lps = F.log_softmax(s / T, -1).view(-1, s.size(-1))
    lpt = F.log_softmax(t / T, -1).view(-1, s.size(-1))
    kl = (lpt.exp() * (lpt - lps)).sum(-1)
    return kl * torch.linspace(0.1, 1.0, kl.numel())


def entropy_form_kl(s, t, y):
    """KL as sum p_t log p_t - sum p_t log p_s inside one reduction, p_t from exp."""
    lpt = F.log_softmax(t * 0.5, -1)
    lps = F.log_softmax(s * 0.5, -1)
    pt = lpt.exp()
    return torch.sum(pt * lpt - pt * lps, dim=-1).mean()


#: name -> (function, mode the report names, whether the teacher's gradient is exact too)
RECOGNISED = {
    "hinton": (hinton, "xlogy", False),
    "trl_forward_kl": (trl_forward_kl, "ieee", True),
    "trl_reverse_kl": (trl_reverse_kl, "ieee", True),
    "kl_log_target_sum": (kl_log_target_sum, "ieee", True),
    "handwritten_forward_kl_rows": (handwritten_forward_kl_rows, "ieee", True),
    "reference_policy_kl": (reference_policy_kl, "ieee", True),
    "liger_rows_forward": (liger_rows_forward, "ieee", True),
    "entropy_form_kl": (entropy_form_kl, "ieee", True),
    "viewed_after_log_softmax": (viewed_after_log_softmax, "ieee", True),
}


def _inputs(kind: str, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = 3 * torch.randn(B, S, V, generator=g)
    t = 3 * torch.randn(B, S, V, generator=g)
    y = torch.randint(0, V, (B, S), generator=g)
    if kind == "masked":  # padded vocabulary masked with the most negative float, both models
        s[..., -3:] = torch.finfo(torch.float32).min
        t[..., -3:] = torch.finfo(torch.float32).min
    elif kind == "underflow":  # probabilities that underflow to 0 with finite logits
        s[0, 0, :7] -= 400.0
        t[1, 2, 5:9] -= 500.0
    elif kind == "neg_inf":  # -inf logits: in the teacher, in the student, in both, at one class
        t[0, 1, 3] = -float("inf")
        s[0, 3, 4] = -float("inf")
        s[1, 0, 6] = t[1, 0, 6] = -float("inf")
        s[1, 4, 2] = -float("inf")
        t[1, 4, 2] = -200.0  # p_t underflows where the student's logit is -inf: 0 * inf
    return s.to(dtype), t.to(dtype), y


def _grads(out, wrt):
    w = torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape)
    return torch.autograd.grad((out * w).sum(), wrt, allow_unused=True)


def _close(a, b, tol=2e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True)


def _rewritten_graph(tmp_path) -> str:
    files = sorted(glob.glob(os.path.join(str(tmp_path), "graph_*", "*_loss_entropy.py")))
    assert files, os.listdir(str(tmp_path))
    return "\n".join(line for f in files for line in open(f).read().splitlines() if not line.strip().startswith("#"))


@pytest.mark.parametrize("name", list(RECOGNISED))
def test_recognised_kl_spelling(name, tmp_path):
    fn, mode, teacher_grad = RECOGNISED[name]
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="ger", options={"strict": True, "dump_dir": str(tmp_path)})
    for kind in ("random", "masked", "underflow", "neg_inf"):
        s, t, y = _inputs(kind)
        s.requires_grad_()
        t.requires_grad_(teacher_grad)
        wrt = [s, t] if teacher_grad else [s]
        got = compiled(s, t, y)
        s2, t2 = s.detach().clone().requires_grad_(), t.detach().clone().requires_grad_(teacher_grad)
        want = fn(s2, t2, y)
        _close(got, want)
        for a, b in zip(_grads(got, wrt), _grads(want, [s2, t2] if teacher_grad else [s2])):
            _close(a, b)
        if kind == "neg_inf":  # the NaN / inf structure itself, as eager's
            assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
    reps = ger_inductor.reports()
    matches = [m for r in reps for m in r.matches if m.pattern == "distill_kl"]
    assert matches and all(m.detail["mode"] == mode for m in matches), [(m.pattern, m.detail) for r in reps for m in r.matches]
    assert not [n for r in reps for n in r.near_misses], [n.reason for r in reps for n in r.near_misses]
    code = _rewritten_graph(tmp_path)
    FileCheck().check("pair_kl").run(code)
    assert not re.search(r"(log_softmax|\bsoftmax|functional\.kl_div|\.exp\()", code), code


def test_bf16_logits_upcast_first():
    """Logits in bf16, upcast before the temperature: the op reads the bf16 logits and
    does the math in float32, as eager's spelling."""
    def fn(s, t, y):
        lps = F.log_softmax(s.float() / T, dim=-1)
        lpt = F.log_softmax(t.float() / T, dim=-1)
        return F.kl_div(lps, lpt, log_target=True, reduction="batchmean")

    torch._dynamo.reset()
    s, t, y = _inputs("random", dtype=torch.bfloat16)
    s.requires_grad_()
    got = torch.compile(fn, backend="ger", options={"strict": True})(s, t, y)
    s2 = s.detach().clone().requires_grad_()
    want = fn(s2, t, y)
    _close(got, want, 1e-5)
    _close(_grads(got, [s])[0].float(), _grads(want, [s2])[0].float(), 1e-2)
    assert [m for m in ger_inductor.last_report().matches if m.pattern == "distill_kl"]


# ----------------------------------------------------------------------------- near-misses
def soft_target_ce(s, t, y):
    """-sum p_t log p_s: KL plus the teacher's entropy."""
    return -(F.softmax(t / T, -1) * F.log_softmax(s / T, -1)).sum(-1).mean()


def two_temperatures(s, t, y):
    return F.kl_div(F.log_softmax(s / 2.0, -1), F.log_softmax(t / 3.0, -1), log_target=True, reduction="batchmean")


def jsd_mixture(s, t, y):
    return ds.trl_generalized_jsd_loss(s, t, beta=0.5, temperature=T)


def teacher_trained_through_xlogy(s, t, y):
    return F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean")


def log_of_softmax(s, t, y):
    pt = F.softmax(t, -1)
    return (pt * (pt.log() - F.softmax(s, -1).log())).sum(-1).mean()


def intermediates_reused(s, t, y):
    lps = F.log_softmax(s, -1)
    kl = F.kl_div(lps, F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    return kl + lps.argmax(-1).float().mean()


NEAR_MISSES = {
    "soft_target_ce": (soft_target_ce, "entropy of one distribution", False),
    "two_temperatures": (two_temperatures, "two temperatures", False),
    "jsd_mixture": (jsd_mixture, "ger_distill_loss", False),
    "teacher_trained_through_xlogy": (teacher_trained_through_xlogy, "xlogy(p, p)", True),
    "log_of_softmax": (log_of_softmax, "log(softmax", False),
    "intermediates_reused": (intermediates_reused, "also used by", False),
}


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_kl_near_miss_left_alone_and_reported(name):
    fn, words, teacher_grad = NEAR_MISSES[name]
    torch._dynamo.reset()
    s, t, y = _inputs("random")
    s.requires_grad_()
    t.requires_grad_(teacher_grad)
    got = torch.compile(fn, backend="ger", options={"strict": True, "compiler": "aot_eager"})(s, t, y)
    _close(got, fn(s, t, y))
    reps = ger_inductor.reports()
    assert not [m for r in reps for m in r.matches if m.pattern == "distill_kl"]
    reasons = [n.reason for r in reps for n in r.near_misses]
    assert any(words in r for r in reasons), (words, reasons)


def test_op_modes_match_eager_products_eagerly():
    """The op's product modes (no compile): "ieee" is exp(lt) * (lt - ls) and "xlogy" is
    xlogy(p_t, p_t) - p_t * ls, -inf logits included; the public default keeps 0 log 0 = 0."""
    from ger_inductor.passes.loss_entropy.pairs import pair_kl

    s, t, _ = _inputs("neg_inf")
    a, b = s.view(-1, V) / T, t.view(-1, V) / T
    lps, lpt = a.log_softmax(-1), b.log_softmax(-1)
    like = s.view(-1, V)
    ieee = pair_kl(s.view(-1, V), t.view(-1, V), like, T, "ieee", 1.0, "rows", False, torch.float32, 0)
    _close(ieee, (lpt.exp() * (lpt - lps)).sum(-1))
    xl = pair_kl(s.view(-1, V), t.view(-1, V), like, T, "xlogy", 1.0, "rows", False, torch.float32, 0)
    _close(xl, (torch.xlogy(lpt.exp(), lpt.exp()) - lpt.exp() * lps).sum(-1), 1e-5)
    with pytest.raises(ValueError, match="unknown distillation kind"):
        torch.ops.ger.distill_fwd(a, b, None, "fwd:other", 0.0, 1.0, 0.0, 1.0, False, -100, 0, 0)
