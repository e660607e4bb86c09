"""Distil a small student LM from a small (frozen) teacher with ger's distillation loss
(the generalized JSD of GKD, temperature-scaled, mixed with hard-label CE), the training
step compiled with backend="ger", next to the same step run eagerly.

    python examples/distill.py [--steps 10] [--beta 0.5] [--temperature 2.0]

``ger_distill_loss`` is the library call; ``backend="ger"`` also finds distillation
losses written by hand (TRL's ``generalized_jsd_loss``, ``F.kl_div`` of two softmaxes:
docs/patterns.md). Under torch.compile the loss is ger's op inside the compiled step;
the rest of the step goes to Inductor with ger's other rewrites. "eager" below runs the
same step (``ger_distill_loss``'s eager kernel) without torch.compile; the loss itself
is tested against its float64 reference in tests/test_distill.py.
"""

import argparse

import torch

import ger_inductor
from ger_inductor import ger_distill_loss
from ger_inductor.demo import TinyLM


def lm_logits(m: TinyLM, tokens):
    """TinyLM's logits (its forward also applies its own loss)."""
    h = m.embed(tokens)
    for b in m.blocks:
        h = b(h)
    return m.head(m.norm(h))


class Step(torch.nn.Module):
    """One distillation step's forward: student logits, teacher logits without grad, the loss."""

    def __init__(self, student, teacher, beta, temperature, hard_weight):
        super().__init__()
        self.student, self.teacher = student, teacher
        self.kw = dict(beta=beta, temperature=temperature, hard_weight=hard_weight, ignore_index=-100)

    def forward(self, tokens, targets):
        zs = lm_logits(self.student, tokens)
        with torch.no_grad():
            zt = lm_logits(self.teacher, tokens)
        V = zs.shape[-1]
        return ger_distill_loss(zs.reshape(-1, V), zt.reshape(-1, V), targets.reshape(-1), **self.kw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--beta", type=float, default=0.5, help="JSD beta (0: forward KL, 1: reverse KL)")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--hard-weight", type=float, default=0.1, help="weight of the hard-label CE")
    args = ap.parse_args()
    V = 1000
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.steps):
        tokens = torch.randint(0, V, (4, 32), generator=g)
        targets = torch.roll(tokens, -1, dims=1)
        targets[:, -1] = -100
        batches.append((tokens, targets))
    torch.manual_seed(1)
    teacher = TinyLM(vocab=V, d=64, layers=2).requires_grad_(False)
    losses = {}
    for backend in ("eager", "ger"):
        torch.manual_seed(0)
        student = TinyLM(vocab=V, d=32, layers=1)
        step = Step(student, teacher, args.beta, args.temperature, args.hard_weight)
        opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
        run = step if backend == "eager" else torch.compile(step, backend="ger")
        losses[backend] = []
        for tokens, targets in batches:
            opt.zero_grad()
            loss = run(tokens, targets)
            loss.backward()
            opt.step()
            losses[backend].append(loss.item())
    for i, (a, b) in enumerate(zip(losses["eager"], losses["ger"])):
        print(f"step {i:3d}  eager {a:.5f}  ger {b:.5f}")
    worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(losses["eager"], losses["ger"]))
    print(f"\nlargest relative difference over {args.steps} steps: {worst:.1e}")
    print(ger_inductor.last_report())


if __name__ == "__main__":
    main()
