"""The fused lm head + GER loss: ``ger_linear_loss`` and ``ger::linear_loss_fwd`` against
eager (loss, grad_h, grad_W, grad_bias) for every variant; the ``lm_head`` rewrite on
unmodified code (spellings, gradient modes, near-misses); a small causal LM trained
with backend="ger" for 20 steps against eager; peak memory in a subprocess."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import FileCheck

import ger_inductor
from ger_inductor import GerOptions, fleet, ger_linear_loss, ger_loss, ger_loss_reference
from ger_inductor.debug import graph_text
from ger_inductor.ops import linear_loss as linear_loss_op
from . import spellings
from .conftest import rewrite_backend

N, H, V = 37, 16, 53  # 37 rows in chunks of 8: four full chunks and a short one
CHUNK = 8

VARIANTS = {
    "ce": dict(label_smoothing=0.0),
    "label_smoothing": dict(label_smoothing=0.1),
    "confidence_penalty": dict(alpha=0.0, beta=0.3),
    "kl_u_p": dict(alpha=1.0, beta=0.3),
    "ger_0.5": dict(alpha=0.5, beta=0.7),
    "ger_0.9": dict(alpha=0.9, beta=0.7),  # the log1p branch of log(p/m)
    "ger_0.1": dict(alpha=0.1, beta=0.7),
}


def _head_inputs(dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(V, H, generator=g) * 0.4).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.2).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = -100
    return h, W, b, y


def _grads(out, inputs, g):
    return torch.autograd.grad(out, [t for t in inputs if t is not None], g)


def _close(a, b, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    else:  # bf16 results of fp32 math: norm-wise, at bf16 resolution
        a, b = a.double(), b.double()
        a, b = a.detach().double(), b.detach().double()
        assert float((a - b).norm() / b.norm().clamp_min(1e-3)) < 1e-2, (a, b)


# ----------------------------------------------------------------------------- the op / API
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ger_linear_loss_matches_eager(variant, dtype, monkeypatch):
    kw = VARIANTS[variant]
    # bf16: grad_W is formed in blocks of 10 classes (6 blocks) before its fp32 accumulation
    monkeypatch.setattr(linear_loss_op, "GRAD_W_BLOCK_BYTES", 10 * H * 2)
    for reduction in ("mean", "sum", "none"):
        for bias in (False, True):
            h, W, b, y = _head_inputs(dtype, bias)
            out = ger_linear_loss(h, W, y, linear_bias=b, reduction=reduction, chunk=CHUNK, **kw)
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
            grads = _grads(out, (h, W, b), g)
            h2, W2 = h.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
            b2 = b.detach().clone().requires_grad_() if bias else None
            z = F.linear(h2, W2, b2).float()
            if "label_smoothing" in kw:
                ref = F.cross_entropy(z, y, reduction=reduction, **kw)
            else:
                ref = ger_loss(z, y, reduction=reduction, **kw)
                # the plain-torch reference of the same math (fp32 logits)
                torch.testing.assert_close(ref, ger_loss_reference(z, y, reduction=reduction, **kw), rtol=1e-5, atol=1e-6)
            ref_grads = _grads(ref.to(dtype), (h2, W2, b2), g)
            assert out.dtype == dtype
            _close(out, ref.to(dtype), dtype)
            for a, r in zip(grads, ref_grads):
                assert a.dtype == dtype
                _close(a, r, dtype)


def test_class_weights_base_and_chunk_sizes():
    h, W, b, y = _head_inputs(torch.float32, True)
    w = torch.rand(V, generator=torch.Generator().manual_seed(3)) + 0.2
    base = torch.softmax(torch.randn(V, generator=torch.Generator().manual_seed(4)), 0)
    cases = [
        (dict(label_smoothing=0.2, weight=w), lambda z: F.cross_entropy(z, y, label_smoothing=0.2, weight=w)),
        (dict(alpha=0.5, beta=0.4, base=base), lambda z: ger_loss(z, y, alpha=0.5, beta=0.4, base=base)),
        (dict(alpha=0.0, beta=0.4, base=base), lambda z: ger_loss(z, y, alpha=0.0, beta=0.4, base=base)),
        (dict(alpha=1.0, beta=0.4, base=base, weight=w), lambda z: ger_loss(z, y, alpha=1.0, beta=0.4, base=base, weight=w)),
    ]
    for kw, ref_fn in cases:
        for chunk in (1, 7, N, 1000, None):
            out = ger_linear_loss(h, W, y, linear_bias=b, chunk=chunk, **kw)
            grads = _grads(out, (h, W, b), None)
            ref = ref_fn(F.linear(h, W, b))
            ref_grads = _grads(ref, (h, W, b), None)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
            for a, r in zip(grads, ref_grads):
                torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_batched_input_and_no_grad():
    h, W, _, y = _head_inputs(torch.float32, False)
    h3, y3 = h[:36].reshape(4, 9, H), y[:36].reshape(4, 9)
    out = ger_linear_loss(h3, W, y3, label_smoothing=0.1, reduction="none", chunk=5)
    assert out.shape == (4, 9)
    torch.testing.assert_close(out, F.cross_entropy(F.linear(h3, W).transpose(1, 2), y3, label_smoothing=0.1,
                                                    reduction="none"), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        a = ger_linear_loss(h, W, y, alpha=0.5, beta=0.2)
    torch.testing.assert_close(a, ger_loss(F.linear(h, W), y, alpha=0.5, beta=0.2), rtol=1e-5, atol=1e-6)


def test_ger_linear_loss_bad_input():
    h, W, _, y = _head_inputs(torch.float32, False)
    with pytest.raises(ValueError, match="expects 16"):
        ger_linear_loss(h[:, :5], W, y, label_smoothing=0.1)
    with pytest.raises(ValueError, match="target must have shape"):
        ger_linear_loss(h, W, y[:5], label_smoothing=0.1)
    with pytest.raises(TypeError, match="share a dtype"):
        ger_linear_loss(h, W.double(), y, label_smoothing=0.1)
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        ger_linear_loss(h, W, y, label_smoothing=0.1, chunk=0)
    with pytest.raises(TypeError, match="class indices"):
        ger_linear_loss(h, W, y.float(), label_smoothing=0.1)
    with pytest.raises(ValueError, match="reduction"):
        ger_linear_loss(h, W, y, label_smoothing=0.1, reduction="batchmean")
    with pytest.raises(TypeError, match="alpha and beta are required"):
        ger_linear_loss(h, W, y, alpha=0.5)
    bad = y.clone()
    bad[1] = V
    with pytest.raises(IndexError, match="out of bounds"):
        ger_linear_loss(h, W, bad, label_smoothing=0.1)


# ----------------------------------------------------------------------------- the rewrite
def rewrite_only(graphs: list | None = None, **opts):
    """ger's loss and lm-head passes, the rewritten graph run eagerly (conftest.rewrite_backend)."""
    on_graph = None if graphs is None else (lambda before, gm: graphs.append(graph_text(gm)))
    return rewrite_backend({"passes": ["loss_entropy", "lm_head"], **opts}, on_graph)


class Head(nn.Module):
    """embedding -> mixer -> lm head; ``loss_fn(model, h, y)`` is the spelling under test."""

    def __init__(self, loss_fn, bias=False, dtype=torch.float32, tied=False):
        super().__init__()
        self.emb = nn.Embedding(V, H)
        self.mix = nn.Linear(H, H)
        self.head = nn.Linear(H, V, bias=bias)
        if tied:
            self.head.weight = self.emb.weight
        self.loss_fn = loss_fn
        self.register_buffer("acc", torch.zeros(()))
        self.to(dtype)

    def forward(self, x, y):
        h = torch.tanh(self.mix(self.emb(x)))
        return self.loss_fn(self, h, y)


def _entropy_penalty(m, h, y):
    logits = m.head(h).float()
    lp = logits.log_softmax(-1)
    ent = -(lp.exp() * lp).sum(-1)
    mask = (y != -100).float()
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    return ce - 0.1 * (ent * mask).sum() / mask.sum()


def _masked_mean(m, h, y):
    logits = m.head(h)
    per = F.cross_entropy(logits.transpose(1, 2), y.clamp_min(0), reduction="none", label_smoothing=0.05)
    mask = (y >= 0).to(per.dtype)  # defined after the loss: the rewrite reorders the O(rows) code
    return (per * mask).sum() / mask.sum()


def _hf_label_smoother(m, h, y):
    """transformers' LabelSmoother on shifted logits: its per-token losses are written in
    place (``nll_loss.masked_fill_(padding_mask, 0.0)``, result unused). Found by the model
    zoo: the in-forward copy of the loss code skipped the writes, so padded rows kept
    their gradient (lm-head weight gradient 19x eager's on a Llama config)."""
    return spellings.ls_transformers(m.head(h)[..., :-1, :].contiguous(), y[..., 1:].contiguous())


def _fairseq_label_smoothed(m, h, y):
    return spellings.ls_fairseq(m.head(h).view(-1, V), y.view(-1).clamp_min(0), ignore_index=0)


def _masked_through_a_view(m, h, y):
    per = F.cross_entropy(m.head(h).transpose(1, 2), y.clamp_min(0), reduction="none", label_smoothing=0.1)
    per.view(-1).masked_fill_((y < 0).view(-1), 0.0)  # written through a view of the per-token losses
    return per.sum() / (y >= 0).sum()


def _loss_accumulated_into_a_buffer(m, h, y):
    return m.acc.add_(F.cross_entropy(m.head(h).view(-1, V), y.view(-1)))  # a buffer written by the loss


def _written_after_the_loss(m, h, y):
    per = F.cross_entropy(m.head(h).view(-1, V), y.view(-1), reduction="none")
    loss = per.mean()
    per.mul_(2.0)  # after the loss is formed: it does not change the loss, nor its gradient
    return loss


def _hf_causal_lm_loss(m, h, y):
    """transformers' ``ForCausalLMLoss`` as a causal LM calls it with ``labels=``: the
    logits upcast, the labels shifted by padding, a sum over the tokens divided by their
    count; the model returns the logits beside the loss."""
    logits = m.head(h)
    z = logits.float()
    labels = F.pad(y, (0, 1), value=-100)[..., 1:].contiguous()
    loss = F.cross_entropy(z.view(-1, V), labels.view(-1), ignore_index=-100, reduction="sum")
    return loss / (labels != -100).sum(), logits


def _token_inputs(y):
    """What a PPO step reads besides the policy, from the sampled tokens: old and
    reference log-probs, advantages, a mask (none depends on the head)."""
    yf = y.clamp_min(0).float()
    return torch.sin(yf) - 4.0, torch.cos(yf) - 4.0, torch.sin(3 * yf), (y >= 0).float()


def _ppo(logits, y, per_sequence=False):
    """verl / TRL style: log_softmax, gather at the sampled tokens, entropy from
    softmax * log_softmax, the k3 KL to the reference, a clipped ratio, masked means."""
    old, ref, adv, mask = _token_inputs(y)
    lp = F.log_softmax(logits, dim=-1)
    logp = lp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    entropy = -(lp.exp() * lp).sum(-1)
    d = ref - logp
    kl = torch.exp(d) - d - 1
    ratio = torch.exp(logp - old)
    pg = -torch.minimum(ratio * adv, torch.clamp(ratio, 0.8, 1.2) * adv)
    per_token = pg - 0.01 * entropy + 0.04 * kl
    if per_sequence:  # GRPO's seq-mean-token-mean: linear after the per-sequence sums
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1)).mean()
    return (per_token * mask).sum() / mask.sum()


def _ppo_div_in_place(m, h, y):
    logits = m.head(h)
    logits.div_(0.9)  # verl: logits.div_(temperature), the result unused
    return _ppo(logits, y)


def _ppo_itruediv(m, h, y):
    logits = m.head(h).float()
    logits /= 0.7  # TRL: logits /= self.temperature
    return _ppo(logits, y, per_sequence=True)


def _ppo_with_clip_fraction(m, h, y):
    """verl's compute_policy_loss also returns the fraction of clipped tokens: an output
    that needs no gradient does not stop the gradients forming in the forward."""
    logits = m.head(h) / 0.9
    lp = F.log_softmax(logits, dim=-1)
    logp = lp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    old, _, adv, mask = _token_inputs(y)
    ratio = torch.exp(logp - old)
    pg1, pg2 = -ratio * adv, -torch.clamp(ratio, 0.8, 1.2) * adv
    loss = (torch.maximum(pg1, pg2) * mask).sum() / mask.sum()
    clipfrac = ((torch.gt(pg2, pg1).float() * mask).sum() / mask.sum())
    return loss, clipfrac


def _ppo_nonlinear_after_reduction(m, h, y):
    logits = m.head(h) / 0.9
    lp = F.log_softmax(logits, dim=-1)
    logp = lp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (logp.mean() - 1.0) ** 2  # the square of a mean: not a sum of per-row terms


def _ppo_rows_misaligned(m, h, y):
    logits = m.head(h)
    lp = F.log_softmax(logits, dim=-1)
    logp = lp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    entropy = -(lp.exp() * lp).sum(-1)
    return (torch.exp(logp) * entropy.flip(-1)).mean()  # row i's term reads another row's entropy


def _grpo_trl_fp32(m, h, y):
    """TRL's GRPO on fp32 logits: selective_log_softmax's raw target logit minus a loop of
    per-row logsumexps, the clipped ratio taken with ``torch.min`` of two tensors."""
    logits = m.head(h) / 0.9
    sel = torch.gather(logits, dim=-1, index=y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    logp = sel - torch.stack([torch.logsumexp(lg, dim=-1) for lg in logits])
    coef_1 = torch.exp(logp - logp.detach() + 0.1)
    adv = torch.linspace(-1.0, 1.0, h.shape[0]).unsqueeze(1)
    per_token = -torch.min(coef_1 * adv, torch.clamp(coef_1, 0.8, 1.2) * adv)
    mask = (y != -100).float()
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


SPELLINGS = {
    # name: (loss_fn, Head kwargs, expected gradient mode; "in_forward_rows": in the forward
    # with coefficients per chunk, the loss a non-linear sum of per-row terms)
    "hf_label_smoother_shifted": (_hf_label_smoother, {}, "in_forward"),
    "fairseq_label_smoothed_masked_in_place": (_fairseq_label_smoothed, {}, "in_forward"),
    "per_token_losses_masked_through_a_view": (_masked_through_a_view, {}, "in_forward"),
    "loss_accumulated_into_a_buffer": (_loss_accumulated_into_a_buffer, {}, "recompute"),
    "per_token_losses_written_after_the_loss": (_written_after_the_loss, {}, "recompute"),
    "nn_linear_ce_ls_ignore": (lambda m, h, y: F.cross_entropy(m.head(h).view(-1, V), y.view(-1), ignore_index=-100,
                                                               label_smoothing=0.1), {}, "in_forward"),
    "bias_ce_sum": (lambda m, h, y: F.cross_entropy(m.head(h).reshape(-1, V), y.reshape(-1), reduction="sum"),
                    {"bias": True}, "in_forward"),
    "tied_matmul_T": (lambda m, h, y: F.cross_entropy((h @ m.emb.weight.T).view(-1, V), y.view(-1)), {"tied": True},
                      "in_forward"),
    "tied_functional_linear": (lambda m, h, y: F.cross_entropy(F.linear(h, m.emb.weight).flatten(0, 1), y.flatten(),
                                                                label_smoothing=0.2), {"tied": True}, "in_forward"),
    "matmul_of_transposed_param": (lambda m, h, y: F.cross_entropy(torch.matmul(h, m.head.weight.t()).view(-1, V),
                                                                    y.view(-1)), {}, "in_forward"),
    "bf16_head_float_upcast": (lambda m, h, y: F.cross_entropy(m.head(h).float().view(-1, V), y.view(-1),
                                                               label_smoothing=0.1), {"dtype": torch.bfloat16},
                               "in_forward"),
    "entropy_penalty_masked": (_entropy_penalty, {}, "in_forward"),
    "masked_mean_after_loss": (_masked_mean, {}, "in_forward"),
    "nc_d_layout_transpose": (lambda m, h, y: F.cross_entropy(m.head(h).transpose(1, 2), y, label_smoothing=0.1), {},
                              "in_forward"),
    "shifted_logits_slice": (lambda m, h, y: F.cross_entropy(m.head(h)[..., :-1, :].contiguous().view(-1, V),
                                                             y[..., 1:].contiguous().view(-1), ignore_index=-100),
                             {}, "in_forward"),
    "last_position_only": (lambda m, h, y: F.cross_entropy(m.head(h)[:, -1], y[:, -1].clamp_min(0)), {"bias": True},
                           "in_forward"),
    "ger_loss_direct": (lambda m, h, y: ger_loss(m.head(h), y, alpha=0.5, beta=0.3), {}, "in_forward"),
    "two_heads_one_loss": (lambda m, h, y: F.cross_entropy(m.head(h).view(-1, V), y.view(-1))
                           + 0.5 * F.cross_entropy(F.linear(h.flip(-1), m.head.weight).view(-1, V), y.view(-1),
                                                   label_smoothing=0.1), {}, "in_forward"),
    "reduction_none_returned": (lambda m, h, y: F.cross_entropy(m.head(h).view(-1, V), y.view(-1), reduction="none"),
                                {}, "recompute"),
    "loss_returned_twice": (lambda m, h, y: (lambda l: (l, l * 2))(F.cross_entropy(m.head(h).view(-1, V), y.view(-1))),
                            {}, "recompute"),
    "nonlinear_use_of_loss": (lambda m, h, y: F.cross_entropy(m.head(h).view(-1, V), y.view(-1)).exp(), {},
                              "recompute"),
    # the logits returned beside the loss (transformers' causal LMs): the op writes them
    "logits_returned": (lambda m, h, y: (lambda z: (F.cross_entropy(z.view(-1, V), y.view(-1)), z))(m.head(h)), {},
                        "in_forward"),
    "logits_returned_hf_sum_over_items": (_hf_causal_lm_loss, {"bias": True}, "in_forward"),
    "logits_returned_bf16_upcast": (_hf_causal_lm_loss, {"dtype": torch.bfloat16}, "in_forward"),
    # policy-gradient objectives at a temperature (non-linear in log p(y) and the entropy)
    "ppo_temperature_functional": (lambda m, h, y: _ppo(m.head(h) / 0.9, y), {}, "in_forward_rows"),
    "ppo_temperature_div_in_place": (_ppo_div_in_place, {"bias": True}, "in_forward_rows"),
    "grpo_temperature_itruediv_seq_mean": (_ppo_itruediv, {}, "in_forward_rows"),
    "ppo_bf16_upcast_then_temperature": (lambda m, h, y: _ppo(m.head(h).float() / 0.9, y), {"dtype": torch.bfloat16},
                                         "in_forward_rows"),
    # divided in bf16 (verl's logits.div_(T) before the upcast): the unrolled form rounds
    # the quotient as eagerly (ger::lowp_div), so the gradients are formed in the forward
    "ppo_bf16_temperature_before_upcast": (lambda m, h, y: _ppo((m.head(h) / 0.9).float(), y),
                                           {"dtype": torch.bfloat16}, "in_forward_rows"),
    "ppo_with_clip_fraction_returned": (_ppo_with_clip_fraction, {}, "in_forward_rows"),
    "grpo_trl_fp32_raw_logp_torch_min": (_grpo_trl_fp32, {}, "in_forward_rows"),
    "nonlinear_after_a_reduction": (_ppo_nonlinear_after_reduction, {}, "recompute"),
    "rows_misaligned": (_ppo_rows_misaligned, {}, "recompute"),
    "logits_returned_twice_with_reduction_none": (
        lambda m, h, y: (lambda z: (F.cross_entropy(z.view(-1, V), y.view(-1), reduction="none"), z, z))(m.head(h)),
        {}, "recompute"),
}


def _tokens(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (3, 11), generator=g)
    y = torch.randint(0, V, (3, 11), generator=g)
    y[0, :4] = -100
    return x, y


def _compare_with_eager(loss_fn, head_kw, backend, backward_outputs=None):
    """Values and gradients of the compiled model against eager, with random gradients
    into the outputs (the first ``backward_outputs`` of them; all by default)."""
    torch.manual_seed(0)
    m = Head(loss_fn, **head_kw)
    m2 = Head(loss_fn, **head_kw)
    m2.load_state_dict(m.state_dict())
    x, y = _tokens()
    out = torch.compile(m2, backend=backend)(x, y)
    ref = m(x, y)
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    k = backward_outputs or len(outs)
    gs = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)).to(o.dtype) for i, o in enumerate(outs[:k])]
    torch.autograd.backward(outs[:k], gs)
    torch.autograd.backward(refs[:k], gs)
    bf16 = head_kw.get("dtype") == torch.bfloat16
    tol = dict(rtol=2e-2, atol=2e-3) if bf16 else dict(rtol=1e-5, atol=1e-6)
    for a, r in zip(outs, refs):
        torch.testing.assert_close(a, r, **tol)
    for (name, p), (_, p2) in zip(m.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(p2.grad, p.grad, **tol, msg=lambda s: f"{name}: {s}")
    for (name, b), (_, b2) in zip(m.named_buffers(), m2.named_buffers()):
        torch.testing.assert_close(b2, b, **tol, msg=lambda s: f"buffer {name}: {s}")


def _code_lines(text: str) -> str:
    """The graph's code without the source comments."""
    return "\n".join(line for line in text.splitlines() if not line.strip().startswith("#"))


def _lm_matches():
    return [mt for r in ger_inductor.reports() for p in r.passes if p.name == "lm_head" for mt in p.matches]


def _lm_near_misses():
    return [n for r in ger_inductor.reports() for p in r.passes if p.name == "lm_head" for n in p.near_misses]


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_rewrite_spelling(name):
    loss_fn, head_kw, mode = SPELLINGS[name]
    graphs: list = []
    # a returned logits' gradient: test_returned_logits_gradient (eager sums the two
    # gradients of the logits before the head's matmuls, the fused head after them)
    _compare_with_eager(loss_fn, head_kw, rewrite_only(graphs, lm_head_chunk=4),
                        backward_outputs=1 if name.startswith("logits_returned") or "clip_fraction" in name else None)
    matches = _lm_matches()
    heads = 2 if name == "two_heads_one_loss" else 1
    assert len(matches) == heads, (matches, [n.reason for n in _lm_near_misses()])
    rows = mode == "in_forward_rows"
    assert all(mt.detail["gradients"] == mode.replace("_rows", "") and mt.detail["chunk"] in (3, 4)
               and (mt.detail.get("coefficients") == "per chunk") == rows for mt in matches), matches
    code = _code_lines("\n".join(graphs))
    FileCheck().check("linear_row_stats").run(code)
    if rows:  # the loss code is a module the op differentiates per chunk
        FileCheck().check("self.ger_rowwise_loss_0").check("linear_row_stats").check("tail = ger_rowwise_loss_0") \
            .check("add_carrier").run(code)
        FileCheck().check_not("stat_coefficients").run(code)
    elif mode == "in_forward":
        FileCheck().check("stat_leaves").check("stat_coefficients").check("linear_row_stats").check("add_carrier").run(code)
    else:
        FileCheck().check_not("stat_coefficients").run(code)
    # no lm-head matmul is left: the logits exist only as a zero-stride stand-in
    FileCheck().check_not("torch._C._nn.linear(h").check_not("matmul").run(code)


NEAR_MISSES = {
    "small_vocabulary_by_default": (lambda m, h, y: F.cross_entropy(m.head(h).view(-1, V), y.view(-1)),
                                    "below this profile's min_vocab (16384)"),
    "fp64_upcast_before_the_loss": (lambda m, h, y: F.cross_entropy(m.head(h).double().view(-1, V), y.view(-1)),
                                    "cast from torch.float32 to torch.float64"),
    "logits_returned_after_a_row_selection": (
        lambda m, h, y: (lambda z: (F.cross_entropy(z[:, :-1].reshape(-1, V), y[:, 1:].reshape(-1)), z))(m.head(h)),
        "rows are selected between the head and the loss"),
    "upcast_logits_returned": (lambda m, h, y: (lambda z: (F.cross_entropy(z.view(-1, V), y.view(-1)), z))(
        m.head(h).float()), "are also used by"),
    "accuracy_from_logits": (lambda m, h, y: (lambda z: F.cross_entropy(z.view(-1, V), y.view(-1))
                                              + 0 * (z.argmax(-1) == y).float().mean())(m.head(h)), "also used by argmax"),
    # the loss after a graph break: reported in the graph the logits leave
    "graph_break_between_head_and_loss": (lambda m, h, y: (lambda z: (torch._dynamo.graph_break(),
                                                                      F.cross_entropy(z.view(-1, V), y.view(-1)))[1])(
        m.head(h)), "leave the graph at a graph break"),
    "rows_reordered_by_a_transpose": (lambda m, h, y: F.cross_entropy(m.head(h).transpose(0, 1).reshape(-1, V),
                                                                       y.t().reshape(-1)), "reorders the rows"),
    # a policy's entropy bonus alone (verl's entropy_from_logits): the loss pass rewrites it
    # without a target; the fused head needs one
    "entropy_alone_no_target": (lambda m, h, y: -spellings.entropy_bonus_verl(m.head(h), y), "need no target"),
    "two_temperatures": (lambda m, h, y: F.cross_entropy((m.head(h) / 0.9 / 1.1).view(-1, V), y.view(-1)),
                         "divided by constants more than once"),
    "negative_temperature": (lambda m, h, y: F.cross_entropy((m.head(h) / -2.0).view(-1, V), y.view(-1)),
                             "only a finite temperature > 0"),
    "logits_scaled_by_a_constant": (lambda m, h, y: F.cross_entropy((m.head(h) * 0.5).view(-1, V), y.view(-1)),
                                    "multiplied by 0.5: only a division by a constant temperature"),
    "returned_logits_divided_in_place": (lambda m, h, y: (lambda z: (z.div_(0.9), F.cross_entropy(z.view(-1, V),
                                                                                                y.view(-1)), z)[1:])(
        m.head(h)), "divided in place"),
}


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_near_miss(name):
    loss_fn, reason = NEAR_MISSES[name]
    graphs: list = []
    # lm_head_chunk opts small vocabularies in: every case but the first is refused for its own reason
    opts = {} if name == "small_vocabulary_by_default" else {"lm_head_chunk": 4}
    _compare_with_eager(loss_fn, {}, rewrite_only(graphs, **opts))
    assert not _lm_matches()
    if reason is not None:
        reasons = [n.reason for n in _lm_near_misses()]
        assert any(reason in r for r in reasons), reasons
    FileCheck().check("torch._C._nn.linear").run(_code_lines("\n".join(graphs)))


def test_temperature_argument_under_dynamic_true_is_a_reported_near_miss():
    """With dynamic=True Dynamo passes a Python float argument (the temperature of RL
    trainer code) as a tensor read back by .item(): the division is by a graph value, not
    a constant. The head is left unfused and the near-miss names the float and the config
    that keeps it a constant; with it the head is fused."""

    class TempHead(Head):
        def forward(self, x, y, T):
            h = torch.tanh(self.mix(self.emb(x)))
            return F.cross_entropy((self.head(h) / T).view(-1, V), y.view(-1))

    torch.manual_seed(0)
    m = TempHead(None)
    x, y = _tokens()
    for specialize in (False, True):
        torch._dynamo.reset()
        ger_inductor.clear_reports()
        with torch._dynamo.config.patch(specialize_float=specialize):
            out = torch.compile(m, backend=rewrite_only(None, lm_head_chunk=4), dynamic=True)(x, y, 0.9)
        torch.testing.assert_close(out, m(x, y, 0.9), rtol=1e-5, atol=1e-6)
        if specialize:
            assert _lm_matches() and _lm_matches()[0].detail["temperature"] == 0.9, _lm_matches()
        else:
            assert not _lm_matches()
            reasons = [n.reason for n in _lm_near_misses()]
            assert any("divided by" in r and "specialize_float" in r for r in reasons), reasons


def test_graph_break_near_miss_names_the_transformers_way_around(monkeypatch):
    """transformers' ``loss_function`` logs ``warning_once`` on every call when the model's
    loss_type is unset (GPT-2): Dynamo breaks the graph between head and loss. The
    near-miss names the break and how to avoid it."""
    from ger_inductor import _compat

    msg = ("logging.Logger method not supported ... <Logger transformers.modeling_utils (WARNING)>.warning_once, "
           "args: [ConstantVariable(str: '`loss_type=None` was set in the config but it is unrecognized.')]")
    monkeypatch.setattr(_compat, "graph_break_reasons", lambda: [msg])
    loss_fn, reason = NEAR_MISSES["graph_break_between_head_and_loss"]
    _compare_with_eager(loss_fn, {}, rewrite_only(None, lm_head_chunk=4))
    reasons = [n.reason for n in _lm_near_misses()]
    assert any(reason in r and 'model.loss_type = "ForCausalLM"' in r for r in reasons), reasons


# ----------------------------------------------------------------------------- returned logits
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_returned_logits_gradient(dtype):
    """Gradients into the loss and into the returned logits: the fused head's, and eager's,
    against a float64 model. Eager sums the two gradients of the logits before the head's
    matmuls, the fused head after them (``lm_head.logits_output`` runs the linear's
    backward on the logits' own gradient): both are within float64 by as much. A write
    into the returned logits after the call is allowed, as in eager."""
    loss_fn = _hf_causal_lm_loss
    torch.manual_seed(0)
    models = {k: Head(loss_fn, bias=True) for k in ("eager", "ger", "f64")}
    for m in models.values():
        m.load_state_dict(models["eager"].state_dict())
    models["f64"].double()
    models["eager"].to(dtype)
    models["ger"].to(dtype)
    x, y = _tokens()
    cm = torch.compile(models["ger"], backend=rewrite_only(None, lm_head_chunk=4))
    grads = {}
    for k, f in (("eager", models["eager"]), ("ger", cm), ("f64", models["f64"])):
        loss, z = f(x, y)
        assert z.requires_grad and z.dtype == (torch.float64 if k == "f64" else dtype)
        gz = torch.randn(z.shape, generator=torch.Generator().manual_seed(1)).to(z.dtype)
        (loss * 3.0 + (z * gz).sum()).backward()
        grads[k] = {n: p.grad.double() for n, p in models[k].named_parameters()}
    assert [mt.detail.get("logits") for mt in _lm_matches()] == ["written and returned"]
    for n, ref in grads["f64"].items():
        err = {k: (grads[k][n] - ref).abs().max().item() for k in ("eager", "ger")}
        scale = ref.abs().max().item()
        assert err["ger"] <= 2 * err["eager"] + (1e-6 if dtype == torch.float32 else 1e-2) * scale, (n, err, scale)
    loss, z = cm(x, y)
    z.mul_(2.0)  # the logits are a plain tensor: in-place code may write them
    loss.backward()


def _detached_backend(captured: dict):
    """ger's passes, the returned logits taken out of the graph as the backend does, and
    AOTAutograd (no code generation) capturing the forward and backward graphs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from ger_inductor import passes
    from ger_inductor.backend import rewrite

    def grab(kind):
        def compiler(gm, inputs):
            captured[kind] = gm
            return make_boxed_func(gm.forward)
        return compiler

    def backend(gm, example_inputs):
        gm, _ = rewrite(gm, example_inputs, {"strict": True, "passes": ["loss_entropy", "lm_head"],
                                             "lm_head_chunk": 4})
        wrap = passes.detach_outputs(gm)
        compiled = aot_autograd(fw_compiler=grab("fw"), bw_compiler=grab("bw"))(gm, example_inputs)
        return wrap(compiled) if wrap is not None else compiled

    return backend


def test_returned_logits_leave_the_compiled_graph():
    """The logits the fused op writes leave AOTAutograd's graph as a non-differentiable
    output, so the backward has no N x V gradient input for them (inside, autograd would
    hand it an N x V zero tensor on every step, and the head's matmuls would run on it);
    their gradient is attached outside and runs only when one reaches them."""
    captured: dict = {}
    loss_fn = SPELLINGS["logits_returned"][0]
    _compare_with_eager(loss_fn, {}, _detached_backend(captured), backward_outputs=1)
    assert [mt.detail.get("logits") for mt in _lm_matches()] == ["written and returned"]
    shapes = [tuple(n.meta["val"].shape) for n in captured["bw"].graph.nodes if n.op == "placeholder"]
    assert shapes and not any(len(s) >= 2 and s[-1] == V for s in shapes), shapes
    FileCheck().check("ger.linear_loss_fwd").check("ger.grad_carrier").run(captured["fw"].code)
    # (a gradient into the logits as well: test_returned_logits_gradient)


def test_returned_logits_without_gradients_are_a_near_miss():
    """Under no_grad fusing a head whose logits are returned saves nothing: refused."""
    loss_fn = SPELLINGS["logits_returned"][0]
    torch.manual_seed(0)
    m = Head(loss_fn)
    x, y = _tokens()
    with torch.no_grad():
        out = torch.compile(m, backend=rewrite_only(None, lm_head_chunk=4))(x, y)
        ref = m(x, y)
    torch.testing.assert_close(out, ref)
    assert not _lm_matches()
    assert any("no gradient is needed" in n.reason for n in _lm_near_misses()), _lm_near_misses()


def test_returned_logits_without_donated_buffers_are_a_near_miss(monkeypatch):
    """With ``torch._functorch.config.donated_buffer = False`` (what torch's own
    retain_graph error suggests) a second backward raises nothing; the fused head's
    compiled backward had reused its saved gradient buffers in place (the scaled gradient
    of h fused with the returned h's tangent), so the second backward's gradients above
    the head were wrong (1.6e-1 vs eager's). Refused there; eager's numbers."""
    import torch._functorch.config as fconfig

    monkeypatch.setattr(fconfig, "donated_buffer", False)

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lin, self.head = nn.Embedding(96, 16), nn.Linear(16, 16), nn.Linear(16, 96, bias=False)

        def forward(self, x, y):
            z = self.head(torch.tanh(self.lin(self.emb(x))))
            return F.cross_entropy(z.view(-1, 96), y.view(-1)), z

    torch.manual_seed(0)
    ref = Body()
    model = Body()
    model.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 96, (2, 12), generator=g), torch.randint(0, 96, (2, 12), generator=g)
    torch._dynamo.reset()
    ger_inductor.clear_reports()
    cm = torch.compile(model, backend="ger", options={"strict": True, "lm_head_chunk": 8, "autotune": False})
    for m in (ref, cm):
        loss, _ = m(x, y)
        loss.backward(retain_graph=True)
        loss.backward()
    assert not _lm_matches()
    assert any("donated_buffer is False" in n.reason for n in _lm_near_misses()), _lm_near_misses()
    for (n, p), (_, p2) in zip(ref.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p2.grad, p.grad, msg=lambda s: f"{n}: {s}")


@pytest.mark.parametrize("profile", ["auto", "h100"], ids=["kernel", "unrolled"])
@pytest.mark.parametrize("spelling", ["categorical_entropy", "clamped_entropy"])
def test_masked_vocabulary_entropy_through_the_fused_head(profile, spelling):
    """A vocabulary masked by a -inf bias, an entropy term in the loss: the fused head's
    E_p[z - m] and its gradient's B (z - m) term met 0 * -inf = NaN at the masked class
    (loss and every gradient NaN where eager is finite; review, stop 37). The op reads
    z - m = -inf as 0 there (0 log 0 = 0), in its kernel (CPU fp32) and in the unrolled
    form (the h100 profile's, traced here by AOTAutograd)."""
    from torch.distributions import Categorical

    N_, H_, V_ = 8, 4, 10
    g = torch.Generator().manual_seed(0)
    h0, W0, b0 = torch.randn(N_, H_, generator=g), torch.randn(V_, H_, generator=g), torch.randn(V_, generator=g)
    b0[3] = -math.inf
    y = torch.randint(0, V_, (N_,), generator=g)
    y[y == 3] = 0
    adv = torch.randn(N_, generator=g)

    def loss_fn(h, W, b):
        z = F.linear(h, W, b)
        if spelling == "categorical_entropy":
            z = z / 0.7
            logp = F.log_softmax(z, -1).gather(-1, y[:, None]).squeeze(-1)
            return -(logp * adv).mean() - 0.01 * Categorical(logits=z).entropy().mean()
        p = F.softmax(z, -1)
        ent = -(p * p.clamp(min=torch.finfo(p.dtype).tiny).log()).sum(-1)
        return F.cross_entropy(z, y) - 0.01 * ent.mean()

    def run(fn):
        ts = [t.clone().requires_grad_() for t in (h0, W0, b0)]
        loss = fn(*ts)
        loss.backward()
        return [loss] + [t.grad for t in ts]

    ref = run(loss_fn)
    torch._dynamo.reset()
    ger_inductor.clear_reports()
    got = run(torch.compile(loss_fn, backend="ger", options={
        "strict": True, "compiler": "aot_eager", "lm_head_chunk": 4, "autotune": False, "device_profile": profile}))
    assert any(m.pattern == "linear+loss" for r in ger_inductor.reports() for p in r.passes for m in p.matches)
    for a, b in zip(got, ref):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- end to end
class TinyCausalLM(nn.Module):
    """embedding -> causal self-attention + MLP blocks -> lm head (no custom loss code)."""

    def __init__(self, vocab=16384, dim=32, heads=2, layers=2, seq=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(seq, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, x, y):
        t = x.shape[1]
        h = self.emb(x) + self.pos[:t]
        for b in self.blocks:
            h = b(h, src_mask=self.mask[:t, :t], is_causal=True)
        logits = self.head(self.norm(h))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-100, label_smoothing=0.1)


@pytest.mark.parametrize("profile", ["auto", "h100"])
def test_causal_lm_trains_like_eager_for_20_steps(profile, tmp_path):
    """Unmodified training code, default options: the head (V = 16384, this profile's
    min_vocab) is fused. The CPU profile runs the op's kernel for fp32; the h100 profile's
    unrolled form is compiled here by Inductor's C++ backend (chunks of 16 tokens)."""
    vocab = 16384
    torch.manual_seed(0)
    ref = TinyCausalLM(vocab=vocab)
    model = TinyCausalLM(vocab=vocab)
    model.load_state_dict(ref.state_dict())
    opts = {"strict": True, "dump_dir": str(tmp_path)}
    if profile == "h100":
        opts.update(device_profile="h100", lm_head_chunk=16)
    cm = torch.compile(model, backend="ger", options=opts)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(0)
    losses, ref_losses = [], []
    for _ in range(20):
        x = (torch.randint(0, 97, (4, 1), generator=g) + torch.arange(16)) % 97  # learnable: next = this + 1
        y = torch.roll(x, -1, 1)
        y[:, -1] = -100
        for m, o, out in ((ref, opt_ref, ref_losses), (cm, opt, losses)):
            o.zero_grad()
            loss = m(x, y)
            loss.backward()
            o.step()
            out.append(loss.item())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-5)
    assert ref_losses[-1] < 0.9 * ref_losses[0], ref_losses  # it learned something
    for (n, p), (_, p2) in zip(ref.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p2, p, rtol=1e-3, atol=1e-4, msg=lambda s: f"{n}: {s}")
    rep = ger_inductor.last_report()
    assert any(m.pattern == "linear+loss" and m.detail["gradients"] == "in_forward" for p in rep.passes for m in p.matches)
    assert not rep.fallbacks
    fwd = open(next(os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in sorted(fs)
                    if f.startswith("inductor_forward"))).read()
    if profile == "h100":
        # 4 chunks of 16 tokens one after the other: a (16, V) logits buffer, one fused C++
        # kernel for its statistics and gradient, its matmuls
        FileCheck().check(f"empty_strided_cpu((16, {vocab})").check("extern_kernels.mm(").check("cpp_fused_").check(
            "torch.ops.ger.after.default(").check("extern_kernels.mm(").check("cpp_fused_").check(
            "torch.ops.ger.grad_carrier.default(").run(fwd)
        FileCheck().check_count("torch.ops.ger.after.default(", 3, exactly=True).run(fwd)
    else:
        FileCheck().check("torch.ops.ger.linear_loss_fwd.default(").check("torch.ops.ger.grad_carrier.default(").run(fwd)
    FileCheck().check_not(f"(64, {vocab})").run(fwd)  # never the whole logits


_PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, torch, torch.nn.functional as F
    from ger_inductor.measure import peak_extra_bytes
    from ger_inductor import ger_linear_loss
    torch.manual_seed(0)
    N, H, V = 2048, 64, 16384
    h = torch.randn(N, H, requires_grad=True); W = (torch.randn(V, H) * 0.05).requires_grad_()
    y = torch.randint(0, V, (N,))
    def eager():
        loss = F.cross_entropy(F.linear(h, W).float(), y, label_smoothing=0.1)
        return torch.autograd.grad(loss, (h, W))
    def fused():
        loss = ger_linear_loss(h, W, y, label_smoothing=0.1, chunk=256)
        return torch.autograd.grad(loss, (h, W))
    fn = {"eager": eager, "fused": fused}[sys.argv[1]]
    fn()
    print(json.dumps({"peak": peak_extra_bytes(fn, torch.device("cpu"))}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
def test_peak_memory_in_a_subprocess():
    """Logits 2048 x 16384 fp32 = 128 MiB (and their gradient as much); the fused head
    holds a 256-row chunk (16 MiB) and grad_W (4 MiB)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    peaks = {}
    for which in ("eager", "fused"):
        out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, which], cwd=root, capture_output=True, text=True,
                             timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr
        peaks[which] = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    logits_bytes = 2048 * 16384 * 4
    assert peaks["eager"] >= logits_bytes, peaks
    assert peaks["fused"] <= 0.25 * peaks["eager"], peaks


def test_no_grad_and_dynamic_sequence_lengths():
    """Under no_grad the op computes statistics only; with dynamic=True one graph serves
    every sequence length (incl. 1) and the rewrite stays on."""
    loss_fn = SPELLINGS["nn_linear_ce_ls_ignore"][0]
    torch.manual_seed(0)
    m = Head(loss_fn)
    graphs: list = []
    cm = torch.compile(m, backend=rewrite_only(graphs, lm_head_chunk=5), dynamic=True)
    g = torch.Generator().manual_seed(0)
    for T in (7, 13, 2, 1):
        x = torch.randint(0, V, (2, T), generator=g)
        y = torch.randint(0, V, (2, T), generator=g)
        with torch.no_grad():
            torch.testing.assert_close(cm(x, y), m(x, y), rtol=1e-5, atol=1e-6)
    # one dynamic graph; Dynamo specialises a size-1 dimension, so length 1 may add one
    assert 1 <= len(graphs) <= 2, len(graphs)
    matches = _lm_matches()
    assert [mt.detail["gradients"] for mt in matches] == ["no_grad"] * len(graphs)
    for gr in graphs:
        FileCheck().check("linear_row_stats").check_not("stat_coefficients").run(_code_lines(gr))
    assert re.search(r"\bs\d+\b", graphs[0])  # symbolic sizes in the graph


def test_lm_head_chunk_option_is_checked():
    with pytest.raises(ValueError, match="lm_head_chunk"):
        GerOptions.parse({"lm_head_chunk": 0})
    with pytest.raises(ValueError, match="lm_head_chunk"):
        GerOptions.parse({"lm_head_chunk": "big"})
    assert GerOptions.parse({"lm_head_chunk": 128}).lm_head_chunk == 128
    # the profile's choice: a ~256 MiB fp32 buffer on CPUs, 64-row multiples, at least 64 rows
    cpu = fleet.PINNED_PROFILES["cpu-avx512"]
    assert fleet.lm_head_chunk(cpu, 128256) == 512
    assert fleet.lm_head_chunk(cpu, 10**7) == 64
    assert fleet.lm_head_chunk(cpu, 128256, override=100) == 100
    assert fleet.lm_head_chunk(fleet.PINNED_PROFILES["h100"], 128256) == 1024


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_unrolled_form_matches_the_kernel(dtype):
    """The functional, unrolled form Inductor compiles and the op's eager kernel agree on
    every output, for every alpha, with and without entropy and base, bias and coefs."""
    g = torch.Generator().manual_seed(0)
    for alpha in (1.0, 0.0, 0.5, 0.9, 0.1):
        for extras in (False, True):
            for with_base in (False, True):
                h = torch.randn(N, H, generator=g).to(dtype)
                W = (torch.randn(V, H, generator=g) * 0.4).to(dtype)
                b = (torch.randn(V, generator=g) * 0.1).to(dtype)
                y = torch.randint(0, V, (N,), generator=g)
                y[::5] = -100
                u = torch.softmax(torch.randn(V, generator=g), 0) if with_base else None
                lu = None if u is None else u.log()
                coefs = torch.randn(4, N, generator=g)
                a = linear_loss_op._kernel(h, W, b, y, u, lu, alpha, -100, extras, CHUNK, coefs, 7)
                c = linear_loss_op.unrolled(h, W, b, y, u, lu, alpha, -100, extras, CHUNK, coefs, 7)
                for x, r in zip(a, c):
                    assert x.shape == r.shape and x.dtype == r.dtype
                    if x.numel():
                        _close(x, r, dtype)


def test_in_forward_gradients_are_consumed_once():
    """The eager backward scales the gradients formed in the forward in place (no second
    V x H buffer): a second backward raises a clear error instead of wrong gradients."""
    h, W, _, y = _head_inputs(torch.float32, False)
    loss = ger_linear_loss(h, W, y, label_smoothing=0.1)
    (2.0 * loss).backward(retain_graph=True)
    ref = F.cross_entropy(F.linear(h, W), y, label_smoothing=0.1)
    gh, gW = torch.autograd.grad(2.0 * ref, (h, W))
    torch.testing.assert_close(h.grad, gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(W.grad, gW, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_returned_logits_dynamic_sequence_lengths():
    """Symbolic rows: the op writes logits of a symbolic shape; one graph serves every
    sequence length (Dynamo may specialise length 1), values and gradients eager's."""
    loss_fn = SPELLINGS["logits_returned"][0]
    torch.manual_seed(0)
    m, m2 = Head(loss_fn), Head(loss_fn)
    m2.load_state_dict(m.state_dict())
    captured: dict = {}
    graphs = []
    backend = _detached_backend(captured)
    cm = torch.compile(m2, backend=lambda gm, ex: (graphs.append(gm), backend(gm, ex))[1], dynamic=True)
    g = torch.Generator().manual_seed(0)
    first = None
    for T in (7, 13, 5):
        x = torch.randint(0, V, (2, T), generator=g)
        y = torch.randint(0, V, (2, T), generator=g)
        m.zero_grad()
        m2.zero_grad()
        (loss, z), (rl, rz) = cm(x, y), m(x, y)
        first = len(graphs) if first is None else first
        torch.testing.assert_close(z, rz)
        torch.testing.assert_close(loss, rl)
        loss.backward()
        rl.backward()
        for (n, p), (_, p2) in zip(m.named_parameters(), m2.named_parameters()):
            torch.testing.assert_close(p2.grad, p.grad, rtol=1e-5, atol=1e-6, msg=lambda s: f"{n}: {s}")
    # no recompile after the first call (whose trace Dynamo may restart once, to
    # specialise float hyper-parameters: a second call of the backend)
    assert len(graphs) == first, (first, len(graphs))
    assert re.search(r"\bs\d+\b", graph_text(graphs[-1]))  # symbolic sizes
    assert _lm_matches() and all(mt.detail.get("logits") == "written and returned" for mt in _lm_matches())


@pytest.mark.parametrize("dtype,low_div,form", [
    (torch.float32, False, "kernel"), (torch.bfloat16, False, "kernel"), (torch.bfloat16, True, "kernel"),
    # the pass never unrolls a bf16 division (Inductor would not round the quotient)
    (torch.float32, False, "unrolled"), (torch.bfloat16, False, "unrolled")],
    ids=["fp32", "bf16_divided_after_upcast", "bf16_divided_before_upcast", "fp32_unrolled", "bf16_unrolled"])
def test_temperature_statistics_and_gradients_match_eager(dtype, low_div, form):
    """The op with a temperature: the statistics of (h @ W.T + b) / T and the gradients of
    sum(coefs * statistics) equal eager autograd through the same division, in the same
    dtype (``low_div``: divided in bf16 before the upcast, as ``(logits / T).float()``)."""
    g = torch.Generator().manual_seed(1)
    T = 0.7
    h = torch.randn(N, H, generator=g).to(dtype)
    W = (torch.randn(V, H, generator=g) * 0.4).to(dtype)
    b = (torch.randn(V, generator=g) * 0.1).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = -100
    coefs = torch.randn(4, N, generator=g)
    fn = linear_loss_op._kernel if form == "kernel" else linear_loss_op.unrolled
    nll, reg, lse, ent, _, gh, gw, gb = fn(h, W, b, y, None, None, 1.0, -100, True, CHUNK, coefs, 7, None, T,
                                           low_div)[:8]
    hh, WW, bb = (t.detach().clone().requires_grad_() for t in (h, W, b))
    logits = F.linear(hh, WW, bb)
    z = (logits / T).float() if low_div else logits.float() / T
    L = torch.logsumexp(z, -1)
    valid = y != -100
    zy = z.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    ref = [torch.where(valid, L - zy, torch.zeros(())), L - z.mean(-1) - math.log(V), L,
           L - (torch.softmax(z, -1) * z).sum(-1)]
    (rgh, rgw, rgb) = torch.autograd.grad(sum((c * r).sum() for c, r in zip(coefs, ref)), (hh, WW, bb))
    for got, want in zip((nll, reg, lse, ent), ref):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    for got, want in zip((gh, gw, gb), (rgh, rgw, rgb)):
        _close(got, want, dtype)


def test_unrolled_bf16_division_rounds_as_eager_under_inductor():
    """bf16 logits divided by T before the upcast: Inductor fuses a low-precision
    intermediate into its consumer in fp32 (no rounding), so the unrolled form divides
    with ``ger::lowp_div``, whose lowering rounds the input and the quotient to bf16
    through their bits. Compiled by Inductor, the statistics equal the op's eager kernel
    to fp32 summation order (a plain division differed by 0.03 in nll) and the gradients
    (the division's backward rounded the same way) to a bf16 rounding."""
    from ger_inductor import lowerings

    lowerings.ensure_registered()
    g = torch.Generator().manual_seed(1)
    n, hd, v, T = 37, 32, 3001, 0.7
    h = torch.randn(n, hd, generator=g).bfloat16()
    W = (torch.randn(v, hd, generator=g) * 0.4).bfloat16()
    y = torch.randint(0, v, (n,), generator=g)
    coefs = torch.randn(4, n, generator=g)

    def f(h, W, y, coefs):
        return linear_loss_op.unrolled(h, W, None, y, None, None, 1.0, -100, True, 8, coefs, 3, None, T, True)[:7]

    torch._dynamo.reset()
    got = torch.compile(f, backend="inductor", fullgraph=True)(h, W, y, coefs)
    ref = linear_loss_op._kernel(h, W, None, y, None, None, 1.0, -100, True, 8, coefs, 3, None, T, True)[:7]
    for a, b in zip(got[:4], ref[:4]):  # nll, reg, lse, ent
        torch.testing.assert_close(a, b, rtol=0, atol=5e-5)
    for a, b in zip(got[5:7], ref[5:7]):  # grad_h, grad_W (bf16)
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=1e-2 * float(b.float().abs().max()))
    # the op itself: bit-exact with eager's division on every bf16 value (inf, NaN, subnormals)
    xs = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    for t in (0.6, 1.2):
        q = torch.compile(lambda x, t=t: torch.ops.ger.lowp_div(x, t), backend="inductor")(xs)
        want = xs / t
        assert torch.equal(q.isnan(), want.isnan())
        ok = ~want.isnan()
        assert torch.equal(q[ok].view(torch.int16), want[ok].view(torch.int16))


def test_ppo_objective_compiled_by_inductor_forms_gradients_in_the_forward():
    """End to end under Inductor: a PPO objective at a temperature on an lm head (rows 33 in
    chunks of 8). The per-chunk coefficients are traced into the forward graph (the loss
    code's module differentiated at each chunk's statistics), so the backward has no
    matmul of the head's size; values and gradients are eager's."""
    from torch._inductor.utils import run_and_get_code

    ger_inductor.clear_reports()
    torch._dynamo.reset()
    loss_fn = SPELLINGS["ppo_temperature_functional"][0]
    torch.manual_seed(0)
    m, m2 = Head(loss_fn), Head(loss_fn)
    m2.load_state_dict(m.state_dict())
    x, y = _tokens()
    cm = torch.compile(m2, backend="ger", options={"lm_head_chunk": 8})

    def step():
        loss = cm(x, y)
        loss.backward()
        return loss

    loss, codes = run_and_get_code(step)
    ref = m(x, y)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for (name, p), (_, p2) in zip(m.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(p2.grad, p.grad, rtol=1e-5, atol=1e-6, msg=lambda s: f"{name}: {s}")
    (mt,) = _lm_matches()
    assert mt.detail["gradients"] == "in_forward" and mt.detail["coefficients"] == "per chunk", mt.detail
    assert len(codes) == 2, len(codes)  # forward and backward
    # the head's matmuls (5 chunks: logits, grad_h, grad_W each) are in the forward; the
    # backward only scales the gradients the forward formed
    assert codes[0].count("extern_kernels.mm(") + codes[0].count("extern_kernels.addmm(") >= 15, codes[0]
    bwd_mm = [ln for ln in codes[1].splitlines() if "extern_kernels.mm(" in ln or "extern_kernels.addmm(" in ln]
    assert len(bwd_mm) <= 2, bwd_mm  # the mixer's two (the unfused head would add two more)


def test_per_row_loss_dividing_by_the_statistics_keeps_what_eager_saves():
    """``c / exp(logp)``: eager's division saves its numerator ``c`` (the divisor needs a
    gradient), so writing ``c`` before the backward raises autograd's error. With the
    gradients formed in the forward, the carrier keeps ``c`` for the same check."""
    c = torch.rand(3, 11) + 0.5

    def loss_fn(m, h, y):
        lp = F.log_softmax(m.head(h) / 0.9, -1)
        logp = lp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return (c / torch.exp(logp).clamp_min(1e-3)).mean()

    ger_inductor.clear_reports()
    torch._dynamo.reset()
    torch.manual_seed(0)
    m, m2 = Head(loss_fn), Head(loss_fn)
    m2.load_state_dict(m.state_dict())
    x, y = _tokens()
    out = torch.compile(m2, backend=rewrite_only(lm_head_chunk=4))(x, y)
    ref = m(x, y)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    (mt,) = _lm_matches()
    assert mt.detail["coefficients"] == "per chunk", mt.detail
    c.mul_(2.0)
    for loss in (ref, out):
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


# ----------------------------------------------------------------------------- review, stop 35
class _EmbHead(nn.Module):
    def __init__(self, vocab=40, hidden=8, autocast=False):
        super().__init__()
        self.emb, self.mix, self.head = nn.Embedding(vocab, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, vocab)
        self.autocast = autocast

    def forward(self, x, y):
        h = torch.tanh(self.mix(self.emb(x)))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            z = self.head(h)
            loss = F.cross_entropy(z.view(-1, z.shape[-1]), y.view(-1), label_smoothing=0.1)
        return loss, z


def test_head_under_autocast_is_left_as_written():
    """bf16 autocast around the head (the HF Trainer's ``bf16=True``): eager's logits are
    bf16 from fp32 weights; the fused head computed in the weights' fp32 and returned fp32
    logits (review, stop 35). Now a near-miss naming autocast; the loss is still fused."""
    torch.manual_seed(0)
    model = _EmbHead(autocast=True)
    x, y = torch.randint(0, 40, (2, 6)), torch.randint(0, 40, (2, 6))
    ref_loss, ref_z = model(x, y)
    loss, z = torch.compile(model, backend=rewrite_backend({"lm_head_chunk": 4}))(x, y)
    assert z.dtype == ref_z.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss)
    rep = ger_inductor.last_report()
    assert not [m for m in rep.matches if m.family == "lm_head"]
    assert any("(autocast)" in n.reason for n in rep.near_misses if n.family == "lm_head"), rep.near_misses


def test_empty_token_batch_gives_every_parameter_a_zero_gradient():
    """No tokens (B = 2, T = 0): eager's loss is NaN and every parameter gets a zero
    gradient; the fused head's backward returned None for the hidden states' gradient, so
    the embedding and the layers before the head kept ``.grad = None`` and an optimizer
    would skip them (review, stop 35)."""
    torch.manual_seed(0)
    model = _EmbHead()
    x = y = torch.zeros(2, 0, dtype=torch.long)
    loss, _ = torch.compile(lambda a, b: (model(a, b)[0], None), backend=rewrite_backend({"lm_head_chunk": 4}))(x, y)
    loss.backward()
    assert loss.isnan()
    assert [m.detail["gradients"] for m in ger_inductor.last_report().matches if m.family == "lm_head"] == ["in_forward"]
    for n, p in model.named_parameters():
        assert p.grad is not None and not p.grad.any(), n


class _LowHead(nn.Module):
    def __init__(self, V_, H_, dtype):
        super().__init__()
        self.W = nn.Parameter((torch.randn(V_, H_, generator=torch.Generator().manual_seed(1)) / H_ ** 0.5).to(dtype))

    def forward(self, h, y):
        return F.cross_entropy(F.linear(h, self.W).float(), y)


@pytest.mark.parametrize("dtype, scale, chunk", [(torch.bfloat16, 1.0, 32), (torch.bfloat16, 1.0, 4096),
                                                (torch.float16, 65536.0, 32)], ids=["bf16", "bf16-one-chunk", "fp16-scaled"])
def test_low_precision_head_gradients_round_as_eager(dtype, scale, chunk):
    """bf16: each chunk's grad_W product was rounded to bf16 and the sum rounded again (1
    ulp off eager on a third of the entries); now one rounding, as eager's one product
    (several chunks: products of the upcast inputs; one chunk: eager's own product).
    fp16 under a loss scale (GradScaler's 65536): gradients formed in the forward at an
    upstream gradient of 1 underflowed to 0 (W.grad 1e-2 off eager); an fp16 head forms
    them in the backward, after the scale (stop-38 review)."""
    V_, H_, N_ = 16384, 16, 96  # the CPU profile fuses heads from 16384 classes
    m = _LowHead(V_, H_, dtype)
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(N_, H_, generator=g).to(dtype)
    y = torch.randint(0, V_, (N_,), generator=g)

    def step(fn):
        m.zero_grad()
        h = h0.clone().requires_grad_()
        fn(h, y).backward(torch.tensor(scale))
        return h.grad, m.W.grad.clone()

    eh, ew = step(m)
    torch._dynamo.reset()
    gh, gw = step(torch.compile(m, backend="ger", options={"autotune": False, "lm_head_chunk": chunk}))
    (match,) = _lm_matches()[-1:]
    assert match.detail["gradients"] == ("recompute" if dtype == torch.float16 else "in_forward"), match.detail
    torch.testing.assert_close(gh, eh, rtol=0, atol=0) if dtype == torch.bfloat16 else \
        torch.testing.assert_close(gh.float(), eh.float(), rtol=2e-3, atol=1e-3 * float(eh.float().abs().max()))
    assert bool((gw == 0).sum() <= (ew == 0).sum()), "grad_W underflowed where eager's did not"
    differ = float((gw != ew).float().mean())
    assert differ < 0.02, f"{differ:.1%} of grad_W entries differ from eager's"
