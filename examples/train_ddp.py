"""Data-parallel training with backend="ger" beside eager, and a vocabulary-parallel
GER loss, on CPU ranks (gloo) or GPUs (nccl).

    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --steps 5

Part 1 trains a small CNN (conv -> BN -> ReLU blocks, a label-smoothed loss) twice from
the same weights: DDP in eager, and ``torch.compile(DDP(model), backend="ger")``; rank 0
prints both global losses per step and what ger rewrote in each graph DDP's
DDPOptimizer handed it. Part 2 splits a language-model head over the ranks by
vocabulary and computes ``ger_loss_vocab_parallel`` on the shards, beside ``ger_loss``
on the full logits. Exits with status 1 if the numbers disagree.
"""

import argparse
import copy
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import ger_inductor
from ger_inductor import ger_loss, ger_loss_vocab_parallel


class ConvBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class SmallCNN(nn.Module):
    def __init__(self, classes=10, width=16):
        super().__init__()
        self.blocks = nn.Sequential(ConvBlock(3, width), ConvBlock(width, width), ConvBlock(width, width))
        self.head = nn.Linear(width, classes)

    def forward(self, x, y):  # a user-defined forward: Dynamo compiles it under DDP
        z = self.head(self.blocks(x).mean((2, 3)))
        return F.cross_entropy(z, y, label_smoothing=0.1)


def global_mean(t):
    t = t.detach().clone()
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def train_cnn(steps, rank, world, device):
    torch.manual_seed(0)
    model = SmallCNN().to(device)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8 * world, 3, 16, 16, generator=g), torch.randint(0, 10, (8 * world,), generator=g))
               for _ in range(steps)]  # fmt: skip
    runs = {}
    for name in ("eager", "ger"):
        ddp = DDP(copy.deepcopy(model), device_ids=[device.index] if device.type == "cuda" else None)
        runs[name] = (torch.compile(ddp, backend="ger") if name == "ger" else ddp, ddp)
    opts = {name: torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9) for name, (_, ddp) in runs.items()}
    worst = 0.0
    for step, (x, y) in enumerate(batches):
        x, y = x.chunk(world)[rank].to(device), y.chunk(world)[rank].to(device)  # this rank's half
        losses = {}
        for name, (run, _) in runs.items():
            opts[name].zero_grad()
            loss = run(x, y)
            loss.backward()
            opts[name].step()
            losses[name] = global_mean(loss)
        worst = max(worst, abs(losses["eager"] - losses["ger"]))
        if rank == 0:
            print(f"step {step}  loss eager {losses['eager']:.6f}  ger {losses['ger']:.6f}")
    if rank == 0:
        print(f"\nger compiled {len(ger_inductor.reports())} graph(s) (DDPOptimizer splits at bucket boundaries):")
        for report in ger_inductor.reports():
            print(report)
    return worst


def vocab_parallel_head(rank, world, device, V=32000, d=64, positions=256):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(positions, d, generator=g).to(device)
    w = (torch.randn(V, d, generator=g) / d**0.5).to(device)
    y = torch.randint(0, V, (positions,), generator=g).to(device)
    y[::7] = -100  # padding: ignored
    # this rank holds rows [rank * V / world, (rank + 1) * V / world) of the head
    w_shard = w.chunk(world)[rank].clone().requires_grad_()
    loss = ger_loss_vocab_parallel(h @ w_shard.T, y, alpha=0.5, beta=0.2)
    loss.backward()
    w_full = w.clone().requires_grad_()
    ref = ger_loss(h @ w_full.T, y, alpha=0.5, beta=0.2)
    ref.backward()
    grad_err = (w_shard.grad - w_full.grad.chunk(world)[rank]).abs().max().item()
    if rank == 0:
        print(f"\nvocabulary-parallel GER loss over {world} ranks (V={V}, {positions} positions): "
              f"{loss.item():.6f}; ger_loss on the full logits: {ref.item():.6f}; max |grad diff| {grad_err:.2e}")  # fmt: skip
    return max(abs(loss.item() - ref.item()), grad_err)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    use_cuda = torch.cuda.is_available() and os.environ.get("GER_EXAMPLE_CPU") != "1"
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        worst = train_cnn(args.steps, rank, world, device)
        worst = max(worst, vocab_parallel_head(rank, world, device))
        if rank == 0:
            print(f"\nlargest difference (CNN: ger vs eager; vocabulary-parallel loss: vs ger_loss on the full "
                  f"logits): {worst:.2e}")
        if worst > 1e-3:
            raise SystemExit(1)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
