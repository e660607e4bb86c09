"""How real code writes cross-entropy with entropy regularisers: the catalog the loss
rewrite is tested (tests/test_loss_rewrite.py) and benchmarked (benchmarks/cases.py) on.

Every function takes (logits, target) and is written the way the library or paper it
imitates writes it - none of them knows about ger.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

BETA = 0.1


def ce_plain(z, y):
    return F.cross_entropy(z, y)


def ce_label_smoothing(z, y):
    return F.cross_entropy(z, y, label_smoothing=0.1)


def ce_weight_ignore_sum(z, y):
    w = torch.linspace(0.5, 1.5, z.shape[-1], device=z.device)
    return F.cross_entropy(z, y, weight=w, ignore_index=3, reduction="sum")


def ce_module_ls_none(z, y):
    return nn.CrossEntropyLoss(label_smoothing=0.2, reduction="none")(z, y).mean()


def ce_btv_view(z, y):
    """(B, T, V) logits flattened the way LM training loops do."""
    B, T, V = 2, z.shape[0] // 2, z.shape[-1]
    logits = z.view(B, T, V)
    return F.cross_entropy(logits.view(-1, V), y.view(-1), ignore_index=-100, label_smoothing=0.1)


def ce_upcast_bf16(z, y):
    """bf16 logits upcast with .float() before the loss."""
    return F.cross_entropy(z.to(torch.bfloat16).float(), y, label_smoothing=0.1)


def cp_softmax_logsoftmax(z, y, beta=BETA):
    lp = torch.log_softmax(z, dim=-1)
    ent = -(lp.exp() * lp).sum(-1).mean()
    return F.cross_entropy(z, y) - beta * ent


def cp_p_log_p(z, y, beta=BETA):
    p = z.softmax(-1)
    return F.cross_entropy(z, y) + beta * (p * p.log()).sum(-1).mean()


def cp_torch_log(z, y, beta=BETA):
    p = F.softmax(z, dim=1)
    ent = -(p * torch.log(p)).sum(dim=1)
    return F.cross_entropy(z, y) - beta * ent.mean()


def cp_entr(z, y, beta=BETA):
    p = z.softmax(-1)
    return F.cross_entropy(z, y) - beta * torch.special.entr(p).sum(-1).mean()


def cp_categorical(z, y, beta=BETA):
    return F.cross_entropy(z, y) - beta * torch.distributions.Categorical(logits=z, validate_args=False).entropy().mean()


def cp_tensor_beta_masked_mean(z, y):
    """beta as a 0-d tensor, entropy averaged over non-padding positions only."""
    beta = torch.tensor(BETA, device=z.device)
    mask = (y != 3).float()
    lp = F.log_softmax(z, -1)
    ent = -(lp.exp() * lp).sum(-1)
    return F.cross_entropy(z, y, ignore_index=3) - beta * (ent * mask).sum() / mask.sum()


def ls_fairseq(z, y, eps=0.1, ignore_index=3):
    """fairseq's label_smoothed_nll_loss (reduce=True)."""
    lprobs = F.log_softmax(z, dim=-1)
    target = y.unsqueeze(-1)
    nll_loss = -lprobs.gather(dim=-1, index=target)
    smooth_loss = -lprobs.sum(dim=-1, keepdim=True)
    pad_mask = target.eq(ignore_index)
    nll_loss.masked_fill_(pad_mask, 0.0)
    smooth_loss.masked_fill_(pad_mask, 0.0)
    nll_loss = nll_loss.sum()
    smooth_loss = smooth_loss.sum()
    eps_i = eps / (lprobs.size(-1) - 1)
    return (1.0 - eps - eps_i) * nll_loss + eps_i * smooth_loss


def ls_transformers(logits, labels, epsilon=0.1, ignore_index=-100):
    """transformers' LabelSmoother.__call__ (shift_labels=False)."""
    log_probs = -nn.functional.log_softmax(logits, dim=-1)
    if labels.dim() == log_probs.dim() - 1:
        labels = labels.unsqueeze(-1)
    padding_mask = labels.eq(ignore_index)
    labels = torch.clamp(labels, min=0)
    nll_loss = log_probs.gather(dim=-1, index=labels)
    smoothed_loss = log_probs.sum(dim=-1, keepdim=True, dtype=torch.float32)
    nll_loss.masked_fill_(padding_mask, 0.0)
    smoothed_loss.masked_fill_(padding_mask, 0.0)
    num_active_elements = padding_mask.numel() - padding_mask.long().sum()
    nll_loss = nll_loss.sum() / num_active_elements
    smoothed_loss = smoothed_loss.sum() / (num_active_elements * log_probs.shape[-1])
    return (1 - epsilon) * nll_loss + epsilon * smoothed_loss


def ls_mean_bool_mask(z, y, eps=0.1):
    """NLL of log_softmax mixed with the mean of -log_softmax, padding masked by a bool mask."""
    lp = F.log_softmax(z, dim=-1)
    nll = -lp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    smooth = -lp.mean(dim=-1)
    keep = y != -100
    per = (1 - eps) * nll + eps * smooth
    return per[keep].mean()


def kl_uniform_u_p(z, y, beta=BETA):
    """CE + beta KL(u || p) with F.kl_div(log p, u)."""
    lp = F.log_softmax(z, -1)
    u = torch.full_like(lp, 1.0 / z.shape[-1])
    return F.cross_entropy(z, y) + beta * F.kl_div(lp, u, reduction="batchmean")


def kl_uniform_p_u(z, y, beta=BETA):
    """CE + beta KL(p || u) with F.kl_div(log u, p)."""
    p = F.softmax(z, -1)
    log_u = torch.full_like(p, math.log(1.0 / z.shape[-1]))
    return F.cross_entropy(z, y) + beta * F.kl_div(log_u, p, reduction="batchmean")


def ger_reference_torch(z, y, alpha=0.5, beta=0.7):
    """The paper's criterion in plain torch (two softmaxes, a mixture with a uniform
    tensor, the skew-Jensen expression), as in the authors' fairseq code."""
    lprobs = F.log_softmax(z, dim=-1)
    probs = F.softmax(z, dim=-1)
    u = torch.ones_like(probs) / probs.size(-1)
    m = alpha * probs + (1 - alpha) * u
    jensen = (alpha * (probs * lprobs).sum(-1) + (1 - alpha) * (u * u.log()).sum(-1) - (m * m.log()).sum(-1)) / (
        alpha * (1 - alpha)
    )
    nll = F.nll_loss(lprobs, y, reduction="none")
    return (nll + beta * jensen).mean()


def z_loss(z, y):
    return F.cross_entropy(z, y) + 1e-3 * torch.logsumexp(z, -1).pow(2).mean()


def cp_temperature_one_softmax(z, y):
    """The entropy of softmax(z / T), the CE on z: two logits tensors, one op each (the
    entropy's op has no target)."""
    p = F.softmax(z / 2.0, -1)
    return F.cross_entropy(z, y) - BETA * (-(p * p.log()).sum(-1).mean())


def entropy_bonus_verl(z, y):
    """A policy's entropy alone, masked mean over tokens (verl's entropy_from_logits: no
    target, no cross-entropy on these logits)."""
    pd = torch.nn.functional.softmax(z, dim=-1)
    entropy = torch.logsumexp(z, dim=-1) - torch.sum(pd * z, dim=-1)
    mask = (y % 4 != 0).float()
    return -BETA * (entropy * mask).sum() / mask.sum()


def entropy_verl_chunked(z, y):
    """verl's entropy_from_logits_with_chunking: the entropy row block by row block, written
    into a preallocated vector (to save memory), then a masked mean: one op per block."""
    chunk_size = max(16, z.shape[0] // 2)  # verl's default is 2048 rows; two blocks here at any size
    entropy = torch.zeros(z.shape[0], device=z.device)
    for i in range(0, z.shape[0], chunk_size):
        logits_chunk = z[i:i + chunk_size].float()
        pd_chunk = torch.nn.functional.softmax(logits_chunk, dim=-1)
        entropy_chunk = torch.logsumexp(logits_chunk, dim=-1) - torch.sum(pd_chunk * logits_chunk, dim=-1)
        entropy[i:i + chunk_size] = entropy_chunk
    mask = (y % 4 != 0).float()
    return -BETA * (entropy * mask).sum() / mask.sum()


def entropy_categorical_alone(z, y):
    """torch.distributions' entropy of a policy, alone (an entropy bonus, A2C style)."""
    return -BETA * torch.distributions.Categorical(logits=z).entropy().mean()


def kl_uniform_alone(z, y):
    """A KL to the uniform alone (a confidence regulariser without the CE term)."""
    lp = F.log_softmax(z, -1)
    return F.kl_div(lp, torch.full_like(lp, 1.0 / z.shape[-1]), reduction="batchmean")


#: every spelling the rewrite recognises, and the patterns the report must show
RECOGNISED = {
    "ce_plain": (ce_plain, {"cross_entropy"}),
    "ce_label_smoothing": (ce_label_smoothing, {"cross_entropy(label_smoothing)"}),
    "ce_weight_ignore_sum": (ce_weight_ignore_sum, {"cross_entropy"}),
    "ce_module_ls_none": (ce_module_ls_none, {"cross_entropy(label_smoothing)"}),
    "ce_btv_view": (ce_btv_view, {"cross_entropy(label_smoothing)"}),
    "ce_upcast_bf16": (ce_upcast_bf16, {"cross_entropy(label_smoothing)"}),
    "cp_softmax_logsoftmax": (cp_softmax_logsoftmax, {"cross_entropy", "entropy"}),
    "cp_p_log_p": (cp_p_log_p, {"cross_entropy", "entropy"}),
    "cp_torch_log": (cp_torch_log, {"cross_entropy", "entropy"}),
    "cp_entr": (cp_entr, {"cross_entropy", "entropy"}),
    "cp_categorical": (cp_categorical, {"cross_entropy", "entropy"}),
    "cp_tensor_beta_masked_mean": (cp_tensor_beta_masked_mean, {"cross_entropy", "entropy"}),
    "ls_fairseq": (ls_fairseq, {"target_log_prob", "sum_log_probs"}),
    "ls_transformers": (ls_transformers, {"target_log_prob", "sum_log_probs"}),
    "ls_mean_bool_mask": (ls_mean_bool_mask, {"target_log_prob", "sum_log_probs"}),
    "kl_uniform_u_p": (kl_uniform_u_p, {"cross_entropy", "kl_div"}),
    "kl_uniform_p_u": (kl_uniform_p_u, {"cross_entropy", "kl_div"}),
    "ger_reference_torch": (ger_reference_torch, {"nll_loss(log_softmax)", "entropy", "ger_mixture_term"}),
    "z_loss": (z_loss, {"cross_entropy"}),
    "cp_temperature_one_softmax": (cp_temperature_one_softmax, {"cross_entropy", "entropy"}),
    "entropy_bonus_verl": (entropy_bonus_verl, {"entropy"}),
    "entropy_verl_chunked": (entropy_verl_chunked, {"entropy"}),
    "entropy_categorical_alone": (entropy_categorical_alone, {"entropy"}),
    "kl_uniform_alone": (kl_uniform_alone, {"kl_div"}),
}


# ----------------------------------------------------------------------------- near-misses
def nm_entropy_other_dim(z, y):
    lp = F.log_softmax(z, -1)
    return F.cross_entropy(z, y) - BETA * (-(lp.exp() * lp).sum(0).mean())


def nm_logprobs_used_elsewhere(z, y):
    lp = F.log_softmax(z, -1)
    acc = (lp.argmax(-1) == y).float().mean()
    return F.nll_loss(lp, y) - BETA * (-(lp.exp() * lp).sum(-1).mean()) + 0 * acc


def nm_soft_targets(z, y):
    q = F.one_hot(y, z.shape[-1]).float() * 0.8 + 0.3 / z.shape[-1]
    q = q / q.sum(-1, keepdim=True)
    return F.cross_entropy(z, q)


def nm_squared_probabilities(z, y):
    p = F.softmax(z, -1)
    return F.cross_entropy(z, y) + BETA * (p * p).sum(-1).mean()  # not an entropy: a Gini/Brier term


def nm_gather_beside_ce_ignoring_a_valid_class(z, y):
    """CE ignoring class 3 plus a hand-written NLL that reads class 3 rows too."""
    lp = F.log_softmax(z, -1)
    return F.cross_entropy(z, y, ignore_index=3) - 0.1 * lp.gather(-1, y.unsqueeze(-1)).mean()


#: near-misses and a word their reason must contain
NEAR_MISSES = {
    "nm_entropy_other_dim": (nm_entropy_other_dim, "dimension other than the classes"),
    "nm_logprobs_used_elsewhere": (nm_logprobs_used_elsewhere, "also used by"),
    "nm_soft_targets": (nm_soft_targets, "soft targets"),
    "nm_squared_probabilities": (nm_squared_probabilities, "not an entropy"),
    "nm_gather_beside_ce_ignoring_a_valid_class": (nm_gather_beside_ce_ignoring_a_valid_class, "valid class"),
}
