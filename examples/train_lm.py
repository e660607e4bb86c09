"""Train a small language model with an unmodified label-smoothed cross-entropy under
backend="ger", next to eager, and show what ger rewrote.

    python examples/train_lm.py [--steps 20] [--dump ger_dump]
"""

import argparse

import torch

import ger_inductor
from ger_inductor.demo import TinyLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dump", default=None, help="dump every compiled graph into this folder")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.steps):
        tokens = torch.randint(0, 2000, (4, 64), generator=g)
        targets = torch.roll(tokens, -1, dims=1)
        targets[:, -1] = -100  # no next token: ignored
        batches.append((tokens, targets))
    losses = {}
    for backend in ("eager", "ger"):
        torch.manual_seed(0)
        model = TinyLM(vocab=2000, d=64, layers=2)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        options = {"dump_dir": args.dump} if args.dump else None
        run = model if backend == "eager" else torch.compile(model, backend="ger", options=options)
        losses[backend] = []
        for tokens, targets in batches:
            opt.zero_grad()
            loss = run(tokens, targets)
            loss.backward()
            opt.step()
            losses[backend].append(loss.item())
    for step, (a, b) in enumerate(zip(losses["eager"], losses["ger"])):
        print(f"step {step:3d}  eager {a:.5f}  ger {b:.5f}")
    print()
    print(ger_inductor.last_report())


if __name__ == "__main__":
    main()
