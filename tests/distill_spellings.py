"""How trainers write distillation losses: transcriptions of the open-source trainers'
code (TRL, Liger-Kernel's reference formulas, Hinton-style knowledge distillation),
written here - none of them knows about ger. Used by tests/test_distill.py and
benchmarks/cases_distill.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def trl_generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                             reduction="batchmean"):
    """Trainer-style code: a transcription of TRL's GKDTrainer.generalized_jsd_loss
    (huggingface/trl, trl/trainer/gkd_trainer.py)."""
    student_logits = student_logits / temperature
    teacher_logits = teacher_logits / temperature
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log(1 - beta), teacher_log_probs + torch.log(beta)]),
            dim=0,
        )
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta * kl_teacher + (1 - beta) * kl_student
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if reduction == "batchmean":
        return jsd.sum() / mask.sum() if labels is not None else jsd.sum() / (jsd.size(0) * jsd.size(1))
    elif reduction == "sum":
        return jsd.sum()
    elif reduction == "mean":
        return jsd.mean()
    else:
        return jsd


def liger_jsd_rows(X, Y, beta):
    """Trainer-style code: the per-element formulas of Liger-Kernel's _jsd_kernel
    (linkedin/Liger-Kernel, src/liger_kernel/ops/jsd.py); X = log Q (student), Y = log P
    (teacher), summed per row."""
    if beta == 0.0:
        loss = Y.exp() * (Y - X)
    elif beta == 1.0:
        loss = X.exp() * (X - Y)
    else:
        P, Q = Y.exp(), X.exp()
        M = beta * P + (1 - beta) * Q
        loss = beta * P * Y + (1 - beta) * Q * X - M * torch.log(M)
    return loss.sum(-1)


def hinton_kd_loss(student_logits, teacher_logits, labels, temperature=2.0, alpha=0.5):
    """Knowledge distillation as most training scripts write it (Hinton et al. 2015):
    alpha T^2 KL(p_t || p_s) (F.kl_div, 'batchmean') + (1 - alpha) CE on the hard labels."""
    T = temperature
    soft = F.kl_div(F.log_softmax(student_logits / T, dim=-1), F.softmax(teacher_logits / T, dim=-1),
                    reduction="batchmean") * (T * T)
    hard = F.cross_entropy(student_logits, labels)
    return alpha * soft + (1.0 - alpha) * hard
