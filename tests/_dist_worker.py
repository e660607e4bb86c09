"""One rank of the 2-rank gloo jobs of tests/test_distributed.py (not a test module).

    python -m tests._dist_worker --rank R --world 2 --init file:///tmp/x --out DIR scenario ...

Each scenario runs on every rank, computes ger's numbers and the single-process eager
reference on the same global batch, and ``torch.save``s them to
``DIR/<scenario>.rank<R>.pt`` (tensors through a queue can fail when the worker exits
right after). A scenario that raises saves its traceback instead and the next one runs;
the process group is always destroyed.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import traceback

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import ger_inductor
from ger_inductor import ger_loss
from ger_inductor.distributed import (ger_distill_loss_vocab_parallel, ger_loss_vocab_parallel,
                                      ger_token_stats_vocab_parallel)

#: DDP's first bucket is at most 1 MiB (torch.distributed._DEFAULT_FIRST_BUCKET_BYTES),
#: and Dynamo's DDPOptimizer refuses bucket_cap_mb below it
DDP_BUCKET_MB = 1


# ----------------------------------------------------------------------------- helpers
def _report_summary() -> list[dict]:
    """Every GraphReport of this process, reduced to what the tests assert on."""
    out = []
    for r in ger_inductor.reports():
        out.append(
            {
                "name": r.name,
                "matches": [(p.name, m.pattern, m.nodes) for p in r.passes for m in p.matches],
                "near_misses": [(n.pattern, n.node, n.reason) for p in r.passes for n in p.near_misses],
                "fallbacks": [f.one_line() for f in r.fallbacks],
            }
        )
    return out


class CollectiveCounter:
    """Counts every collective of torch.distributed called inside the block, with bytes."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
             "broadcast", "all_to_all", "all_to_all_single", "gather", "scatter", "reduce", "send", "recv")  # fmt: skip

    def __init__(self):
        self.calls: list[tuple[str, str, int]] = []  # (name, op, bytes)

    def __enter__(self):
        self._saved = {n: getattr(dist, n) for n in self.NAMES if hasattr(dist, n)}
        for name, fn in self._saved.items():
            setattr(dist, name, self._wrap(name, fn))
        return self

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            # bytes of the first tensor argument (the one sent; for list forms, the first element)
            first = next(iter(args), None)
            if isinstance(first, (list, tuple)):
                first = next((t for t in first if isinstance(t, torch.Tensor)), None)
            nbytes = first.numel() * first.element_size() if isinstance(first, torch.Tensor) else 0
            op = kwargs.get("op", args[1] if len(args) > 1 and not isinstance(args[1], torch.Tensor) else None)
            self.calls.append((name, str(op), nbytes))
            return fn(*args, **kwargs)

        return counted

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def _recording_ger(collectives: list, compiler: str = "inductor"):
    """backend="ger" (strict) that first records the graph's functional collectives:
    (op, reduction, bytes)."""
    from ger_inductor.backend import ger

    def recording_ger(gm, example_inputs):
        for mod in gm.modules():
            for n in getattr(mod, "graph", torch.fx.Graph()).nodes:
                if "_c10d_functional" in str(n.target) and "wait_tensor" not in str(n.target):
                    val = n.args[0].meta.get("example_value")
                    collectives.append((str(n.target), str(n.args[1]), val.numel() * val.element_size()))
        return ger(gm, example_inputs, options={"strict": True, "compiler": compiler})

    return recording_ger


# ----------------------------------------------------------------------------- vocab-parallel loss
#: (name, logits shape, kwargs of the loss, dtype)
VOCAB_CASES = [
    ("ls_mean", (7, 50), dict(label_smoothing=0.1), torch.float32),
    ("cp_sum", (7, 50), dict(alpha=0.0, beta=0.3, reduction="sum"), torch.float32),
    ("ger_none", (7, 50), dict(alpha=0.5, beta=0.7, reduction="none"), torch.float32),
    ("ger_near0", (7, 50), dict(alpha=1e-3, beta=0.7), torch.float32),
    ("ger_near1", (7, 50), dict(alpha=0.9, beta=0.4), torch.float32),
    ("alpha1_weight", (7, 50), dict(alpha=1.0, beta=0.2, weight="w"), torch.float32),
    ("ls_weight", (7, 50), dict(label_smoothing=0.2, weight="w", ignore_index=3), torch.float32),
    ("ger_base", (7, 50), dict(alpha=0.3, beta=0.5, base="u"), torch.float32),
    ("cp_base", (7, 50), dict(alpha=0.0, beta=0.5, base="u"), torch.float32),
    ("ls_bf16", (7, 50), dict(label_smoothing=0.1), torch.bfloat16),
    ("ger_btv_extras", (2, 5, 50), dict(alpha=0.25, beta=0.3, return_extras=True), torch.float32),
    ("cp_extras_bf16", (2, 5, 50), dict(alpha=0.0, beta=0.3, return_extras=True), torch.bfloat16),
    ("ls_big_vocab", (7, 4096), dict(label_smoothing=0.1), torch.float32),
    ("ger_big_vocab", (7, 4096), dict(alpha=0.5, beta=0.7, reduction="none"), torch.float32),
]


def _vocab_inputs(shape, kw, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = shape[-1]
    z = (torch.randn(shape, generator=g) * 3).to(dtype)
    y = torch.randint(0, V, shape[:-1], generator=g)
    y.view(-1)[1] = kw.get("ignore_index", -100)
    y.view(-1)[4] = 3  # a target on rank 0's shard ...
    y.view(-1)[5] = V - 2  # ... and one on rank 1's
    kw = dict(kw)
    if kw.get("weight") == "w":
        kw["weight"] = torch.rand(V, generator=g) + 0.5
    if kw.get("base") == "u":
        kw["base"] = torch.softmax(torch.randn(V, generator=g), 0)
    return z, y, kw


def _backward_of(out):
    """A scalar that uses every output (loss, and entropy + a z-loss with extras)."""
    if isinstance(out, tuple):
        loss, entropy, lse = out
        return loss.float().sum() + 0.1 * entropy + 1e-2 * (lse.float() ** 2).mean()
    return out.float().sum()


def scenario_vocab_parallel(rank: int, world: int) -> dict:
    results = {}
    for name, shape, kw0, dtype in VOCAB_CASES:
        z, y, kw = _vocab_inputs(shape, kw0, dtype)
        # reference: ger_loss on the full logits, one process
        zf = z.clone().requires_grad_()
        ref = ger_loss(zf, y, **kw)
        _backward_of(ref).backward()
        shard = z.chunk(world, -1)[rank].clone().requires_grad_()
        with CollectiveCounter() as cc:
            out = ger_loss_vocab_parallel(shard, y, **kw)
            _backward_of(out).backward()  # no collective in backward
        outs = tuple(out) if isinstance(out, tuple) else (out,)
        refs = tuple(ref) if isinstance(ref, tuple) else (ref,)
        results[name] = {
            "out": [o.detach() for o in outs], "ref": [r.detach() for r in refs],
            "grad": shard.grad, "ref_grad": zf.grad.chunk(world, -1)[rank],
            "calls": cc.calls, "rows": y.numel(), "V": shape[-1], "dtype": str(dtype),
        }  # fmt: skip

    # unequal shards (V = 11 split 6 + 5), explicit offsets
    z, y, kw = _vocab_inputs((6, 11), dict(alpha=0.5, beta=0.7), torch.float32)
    start, size = (0, 6) if rank == 0 else (6, 5)
    shard = z[:, start : start + size].clone().requires_grad_()
    out = ger_loss_vocab_parallel(shard, y, vocab_start=start, vocab_size=11, **kw)
    out.backward()
    zf = z.clone().requires_grad_()
    ref = ger_loss(zf, y, **kw)
    ref.backward()
    results["unequal_shards"] = {"out": [out.detach()], "ref": [ref.detach()], "grad": shard.grad,
                                 "ref_grad": zf.grad[:, start : start + size]}  # fmt: skip

    # a DTensor sharded over the classes (torch.chunk's split: 6 + 5)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    z, y, kw = _vocab_inputs((6, 11), dict(label_smoothing=0.1), torch.float32)
    dz = distribute_tensor(z.clone(), mesh, [Shard(1)]).requires_grad_()
    out = ger_loss_vocab_parallel(dz, y, **kw)
    out.backward()
    zf = z.clone().requires_grad_()
    ref = ger_loss(zf, y, **kw)
    ref.backward()
    results["dtensor"] = {"out": [out.detach()], "ref": [ref.detach()], "grad": dz.grad.full_tensor(),
                          "ref_grad": zf.grad}  # fmt: skip

    # every position ignored: mean is NaN, sum is 0 (F.cross_entropy's convention)
    z, y, _ = _vocab_inputs((6, 10), {}, torch.float32)
    y.fill_(-100)
    shard = z.chunk(world, -1)[rank]
    results["all_ignored"] = {
        "mean": ger_loss_vocab_parallel(shard, y, label_smoothing=0.1),
        "sum": ger_loss_vocab_parallel(shard, y, label_smoothing=0.1, reduction="sum"),
    }

    # rows whose maximum is not finite, as F.cross_entropy / ger_loss give them (NaN loss,
    # lse and gradient row): +inf in rank 1's shard only (the target on rank 0), a row
    # all -inf on every rank, a NaN in rank 0's shard
    z = torch.randn(4, 10, generator=torch.Generator().manual_seed(3)) * 2
    z[0, 7], z[1, :], z[2, 3] = float("inf"), -float("inf"), float("nan")
    y = torch.tensor([1, 2, 8, 4])
    bad = {}
    for name, kw in {"ls": dict(label_smoothing=0.1, reduction="none"), "ce": dict(alpha=0.5, beta=0.0, reduction="none"),
                     "extras": dict(alpha=0.5, beta=0.3, return_extras=True, reduction="none")}.items():
        zf = z.clone().requires_grad_()
        ref = ger_loss(zf, y, **kw)
        _backward_of(ref).backward()
        shard = z.chunk(world, -1)[rank].clone().requires_grad_()
        out = ger_loss_vocab_parallel(shard, y, **kw)
        _backward_of(out).backward()
        outs = tuple(out) if isinstance(out, tuple) else (out,)
        refs = tuple(ref) if isinstance(ref, tuple) else (ref,)
        bad[name] = {"out": [o.detach() for o in outs], "ref": [r.detach() for r in refs], "grad": shard.grad,
                     "ref_grad": zf.grad.chunk(world, -1)[rank]}
    results["non_finite_rows"] = bad

    # a rank whose shard holds no class (vocab 6 = 6 + 0, explicit offsets): each function
    # equals its single-process value on every rank (a DTensor split gives V_r = 0 when V < world)
    from ger_inductor import ger_distill_loss, ger_token_stats

    zs, zt, y, _ = _distill_inputs("e0", (6, 6), dict(target=True), torch.float32)
    ytok = y.clamp(min=0)  # token statistics: every target a class
    start, size = (0, 6) if rank == 0 else (6, 0)
    cut = (lambda t: t[:, start: start + size].clone())
    empty = {}
    for name, call_vp, call_ref in (
        ("loss", lambda a, b: ger_loss_vocab_parallel(a, y, label_smoothing=0.1, vocab_start=start, vocab_size=6),
         lambda a, b: ger_loss(a, y, label_smoothing=0.1)),
        ("distill", lambda a, b: ger_distill_loss_vocab_parallel(a, b, y, beta=0.5, hard_weight=0.3, vocab_start=start,
                                                                  vocab_size=6),
         lambda a, b: ger_distill_loss(a, b, y, beta=0.5, hard_weight=0.3)),
        ("token", lambda a, b: ger_token_stats_vocab_parallel(a, ytok, temperature=0.7, vocab_start=start,
                                                               vocab_size=6).logp.sum(),
         lambda a, b: ger_token_stats(a, ytok, temperature=0.7).logp.sum()),
    ):
        a = cut(zs).requires_grad_()
        out = call_vp(a, cut(zt))
        out.backward()
        af = zs.clone().requires_grad_()
        ref = call_ref(af, zt)
        ref.backward()
        empty[name] = {"out": out.detach(), "ref": ref.detach(), "grad": a.grad, "ref_grad": cut(af.grad)}
    results["empty_shard"] = empty

    # shards that do not tile the vocabulary: every rank raises the same error
    errors = {}
    for case, (shard_size, kw) in {
        "sizes_differ": (5 if rank == 0 else 6, {}),  # equal shards assumed, 5 + 6 given
        "overlap": (6, dict(vocab_start=0, vocab_size=12)),  # both ranks claim [0, 6)
    }.items():
        z, y, _ = _vocab_inputs((6, shard_size), {}, torch.float32)
        y.clamp_(0, 5)
        try:
            ger_loss_vocab_parallel(z, y, label_smoothing=0.1, **kw)
            errors[case] = None
        except ValueError as e:
            errors[case] = str(e)
    results["errors"] = errors

    # compiled with backend="ger": one graph, the collectives traced as all-reduces
    collectives = []
    recording_ger = _recording_ger(collectives)

    z, y, kw = _vocab_inputs((7, 50), dict(alpha=0.5, beta=0.7), torch.float32)
    shard = z.chunk(world, -1)[rank].clone().requires_grad_()
    fn = torch.compile(lambda s, t: ger_loss_vocab_parallel(s, t, **kw), backend=recording_ger)
    out = fn(shard, y)
    out.backward()
    zf = z.clone().requires_grad_()
    ref = ger_loss(zf, y, **kw)
    ref.backward()
    from ger_inductor import _compat

    results["compiled"] = {
        "out": [out.detach()], "ref": [ref.detach()], "grad": shard.grad, "ref_grad": zf.grad.chunk(world, -1)[rank],
        "collectives": collectives, "graph_breaks": sum(_compat.counters()["graph_break"].values()),
        "reports": _report_summary(),
    }  # fmt: skip
    return results


# ----------------------------------------------------------------------------- vocab-parallel distillation / RL rows
#: (name, logits shape, kwargs of the loss ("target": a target is passed), dtype, teacher trained)
DISTILL_CASES = [
    ("fwd_kl", (7, 50), dict(beta=0.0), torch.float32, False),
    ("rev_kl_sum", (7, 50), dict(beta=1.0, reduction="sum"), torch.float32, False),
    ("jsd_half", (7, 50), dict(beta=0.5), torch.float32, False),
    ("jsd_T2_hard", (2, 5, 50), dict(beta=0.3, temperature=2.0, hard_weight=0.25, target=True), torch.float32, False),
    ("jsd_hard_T1_none", (7, 50), dict(beta=0.6, hard_weight=0.5, target=True, reduction="none"), torch.float32,
     False),
    ("skew_near0", (7, 50), dict(beta=1e-3, convention="skew_jensen"), torch.float32, False),
    ("skew_near1", (7, 50), dict(beta=0.95, convention="skew_jensen", reduction="none"), torch.float32, False),
    ("teacher_trained", (7, 50), dict(beta=0.7, temperature=0.5), torch.float32, True),
    ("mask_only", (7, 50), dict(beta=0.25, target=True), torch.float32, False),
    ("teacher_excludes_classes", (7, 50), dict(beta=0.0, temperature=1.5), torch.float32, False),
    ("jsd_bf16", (7, 50), dict(beta=0.5, temperature=1.5, hard_weight=0.1, target=True), torch.bfloat16, False),
    ("jsd_big_vocab", (7, 4096), dict(beta=0.5), torch.float32, False),
]

#: (name, logits shape, kwargs, dtype)
TOKEN_CASES = [
    ("tok_T1", (7, 50), dict(), torch.float32),
    ("tok_T07_k3", (2, 5, 50), dict(temperature=0.7, kl_estimator="k3"), torch.float32),
    ("tok_bf16_k1", (7, 50), dict(kl_estimator="k1"), torch.bfloat16),
]


def _distill_inputs(name, shape, kw, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = shape[-1]
    zs = (torch.randn(shape, generator=g) * 2).to(dtype)
    zt = (torch.randn(shape, generator=g) * 2).to(dtype)
    if name == "teacher_excludes_classes":  # -inf on both halves of the vocabulary
        zt.view(-1, V)[:, [2, V - 3]] = -torch.inf
    kw = dict(kw)
    y = None
    if kw.pop("target", False):
        y = torch.randint(0, V, shape[:-1], generator=g)
        y.view(-1)[1] = -100
        y.view(-1)[4] = 3  # a target on rank 0's shard ...
        y.view(-1)[5] = V - 2  # ... and one on rank 1's
    return zs, zt, y, kw


def _token_inputs(shape, kw, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = shape[-1]
    z = (torch.randn(shape, generator=g) * 2).to(dtype)
    y = torch.randint(0, V, shape[:-1], generator=g)
    y.view(-1)[0], y.view(-1)[1] = 3, V - 2
    kw = dict(kw)
    if "kl_estimator" in kw:  # a reference policy near the policy (k3 = e^d - d - 1 amplifies a far one)
        lp = torch.log_softmax(z.double() / kw.get("temperature", 1.0), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        kw["ref_logprobs"] = (lp + 0.3 * torch.randn(shape[:-1], generator=g, dtype=torch.float64)).float()
    adv = torch.randn(shape[:-1], generator=g)
    return z, y, kw, adv


def _token_objective(st, adv):
    """A PPO-like scalar using every output."""
    out = (st.logp.float() * adv).sum() + 0.1 * st.entropy.float().sum()
    return out + (st.kl.float().sum() if st.kl is not None else 0.0)


def scenario_vocab_parallel_distill(rank: int, world: int) -> dict:
    from ger_inductor import ger_distill_loss, ger_distill_reference, ger_token_stats, ger_token_stats_reference

    results = {}
    for name, shape, kw0, dtype, teacher_grad in DISTILL_CASES:
        zs, zt, y, kw = _distill_inputs(name, shape, kw0, dtype)
        # references: ger_distill_loss on the full logits (one process), and float64
        zsf, ztf = zs.clone().requires_grad_(), zt.clone().requires_grad_(teacher_grad)
        ref = ger_distill_loss(zsf, ztf, y, **kw)
        ref.float().sum().backward()
        ref64 = ger_distill_reference(zs, zt, y, **kw)
        ss = zs.chunk(world, -1)[rank].clone().requires_grad_()
        ts = zt.chunk(world, -1)[rank].clone().requires_grad_(teacher_grad)
        with CollectiveCounter() as cc:
            out = ger_distill_loss_vocab_parallel(ss, ts, y, **kw)
            out.float().sum().backward()  # no collective in backward
        results[name] = {
            "out": out.detach(), "ref": ref.detach(), "ref64": ref64,
            "grad": ss.grad, "ref_grad": zsf.grad.chunk(world, -1)[rank],
            "tgrad": ts.grad, "ref_tgrad": None if ztf.grad is None else ztf.grad.chunk(world, -1)[rank],
            "calls": cc.calls, "rows": zs.numel() // shape[-1], "V": shape[-1], "dtype": str(dtype),
        }  # fmt: skip
    for name, shape, kw0, dtype in TOKEN_CASES:
        z, y, kw, adv = _token_inputs(shape, kw0, dtype)
        zf = z.clone().requires_grad_()
        ref = ger_token_stats(zf, y, **kw)
        _token_objective(ref, adv).backward()
        ref64 = ger_token_stats_reference(z, y, **kw)
        shard = z.chunk(world, -1)[rank].clone().requires_grad_()
        with CollectiveCounter() as cc:
            st = ger_token_stats_vocab_parallel(shard, y, **kw)
            _token_objective(st, adv).backward()
        results[name] = {
            "out": [t.detach() for t in st if t is not None], "ref": [t.detach() for t in ref if t is not None],
            "ref64": [t for t in ref64 if t is not None],
            "grad": shard.grad, "ref_grad": zf.grad.chunk(world, -1)[rank], "calls": cc.calls,
            "rows": y.numel(), "dtype": str(dtype),
        }  # fmt: skip

    # unequal shards (V = 11 split 6 + 5) and DTensors (torch.chunk's split, also 6 + 5)
    zs, zt, y, kw = _distill_inputs("u", (6, 11), dict(beta=0.4, temperature=2.0, hard_weight=0.3, target=True),
                                    torch.float32)
    start, size = (0, 6) if rank == 0 else (6, 5)
    ss = zs[:, start : start + size].clone().requires_grad_()
    out = ger_distill_loss_vocab_parallel(ss, zt[:, start : start + size], y, vocab_start=start, vocab_size=11, **kw)
    out.backward()
    zsf = zs.clone().requires_grad_()
    ref = ger_distill_loss(zsf, zt, y, **kw)
    ref.backward()
    results["unequal_shards"] = {"out": out.detach(), "ref": ref.detach(), "grad": ss.grad,
                                 "ref_grad": zsf.grad[:, start : start + size]}  # fmt: skip

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    ds = distribute_tensor(zs.clone(), mesh, [Shard(1)]).requires_grad_()
    dt = distribute_tensor(zt.clone(), mesh, [Shard(1)])
    out = ger_distill_loss_vocab_parallel(ds, dt, y, **kw)
    out.backward()
    z, yt, tkw, adv = _token_inputs((6, 11), dict(temperature=0.7), torch.float32)
    dz = distribute_tensor(z.clone(), mesh, [Shard(1)]).requires_grad_()
    st = ger_token_stats_vocab_parallel(dz, yt, **tkw)
    _token_objective(st, adv).backward()
    zf = z.clone().requires_grad_()
    tref = ger_token_stats(zf, yt, **tkw)
    _token_objective(tref, adv).backward()
    results["dtensor"] = {"out": out.detach(), "ref": ref.detach(), "grad": ds.grad.full_tensor(),
                          "ref_grad": zsf.grad, "tok_out": [st.logp.detach(), st.entropy.detach()],
                          "tok_ref": [tref.logp.detach(), tref.entropy.detach()], "tok_grad": dz.grad.full_tensor(),
                          "tok_ref_grad": zf.grad}  # fmt: skip

    # errors every rank reaches alike: no hang
    errors = {}
    zs, zt, y, _ = _distill_inputs("e", (6, 10), dict(), torch.float32)
    for case, call in {
        "shapes_differ": lambda: ger_distill_loss_vocab_parallel(zs[:, :5], zt[:, :4], beta=0.5),
        "sizes_differ": lambda: ger_distill_loss_vocab_parallel(zs[:, : 5 if rank == 0 else 6],
                                                                zt[:, : 5 if rank == 0 else 6], beta=0.5),
        "token_overlap": lambda: ger_token_stats_vocab_parallel(zs[:, :6], torch.arange(6), vocab_start=0,
                                                                vocab_size=12),  # both ranks claim [0, 6)
    }.items():
        try:
            call()
            errors[case] = None
        except ValueError as e:
            errors[case] = str(e)
    results["errors"] = errors

    # compiled with backend="ger": one graph each, the same numbers, the collectives traced
    from ger_inductor import _compat

    # (without code generation: the vocab-parallel loss is compiled by Inductor with its
    # collectives in scenario_vocab_parallel, and the ops' lowerings are tested alone)
    collectives = []
    recording_ger = _recording_ger(collectives, compiler="aot_eager")

    zs, zt, y, kw = _distill_inputs("c", (7, 50), dict(beta=0.5, temperature=2.0, hard_weight=0.2, target=True),
                                    torch.float32)
    ss = zs.chunk(world, -1)[rank].clone().requires_grad_()
    fn = torch.compile(lambda s, t, y: ger_distill_loss_vocab_parallel(s, t, y, **kw), backend=recording_ger)
    out = fn(ss, zt.chunk(world, -1)[rank], y)
    out.backward()
    zsf = zs.clone().requires_grad_()
    ref = ger_distill_loss(zsf, zt, y, **kw)
    ref.backward()
    distill_collectives = list(collectives)
    collectives.clear()
    z, yt, tkw, adv = _token_inputs((7, 50), dict(temperature=0.7, kl_estimator="k3"), torch.float32)
    shard = z.chunk(world, -1)[rank].clone().requires_grad_()
    tfn = torch.compile(lambda s, y, r, a: _token_objective(ger_token_stats_vocab_parallel(s, y, temperature=0.7,
                                                                                           ref_logprobs=r,
                                                                                           kl_estimator="k3"), a),
                        backend=recording_ger)
    tout = tfn(shard, yt, tkw["ref_logprobs"], adv)
    tout.backward()
    zf = z.clone().requires_grad_()
    tref = _token_objective(ger_token_stats(zf, yt, **tkw), adv)
    tref.backward()
    results["compiled"] = {
        "out": out.detach(), "ref": ref.detach(), "grad": ss.grad, "ref_grad": zsf.grad.chunk(world, -1)[rank],
        "tok_out": tout.detach(), "tok_ref": tref.detach(), "tok_grad": shard.grad,
        "tok_ref_grad": zf.grad.chunk(world, -1)[rank], "collectives": distill_collectives,
        "tok_collectives": list(collectives), "graph_breaks": sum(_compat.counters()["graph_break"].values()),
        "reports": _report_summary(),
    }  # fmt: skip
    return results


# ----------------------------------------------------------------------------- DDP
class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class DDPNet(nn.Module):
    """Three conv -> BN -> ReLU blocks, a pooled linear head and a label-smoothed loss.

    The head is sized so that Dynamo's DDPOptimizer, walking the graph backwards with
    1 MiB buckets, fills the first bucket exactly at block 2's batch norm: the split
    falls between block 2's conv and its BN (cut), while blocks 1 and 3 and the loss stay
    whole, each in one piece."""

    C = 8

    def __init__(self):
        super().__init__()
        C = self.C
        self.b1, self.b2, self.b3 = ConvBlock(3, C), ConvBlock(C, C), ConvBlock(C, C)
        cap = DDP_BUCKET_MB * 2**20
        bytes_after_bn2 = sum(p.numel() * 4 for p in self.b3.parameters())
        # head (C + 1) V floats + block 3 < cap <= that + block 2's BN (2C floats)
        self.vocab = (cap - 1 - bytes_after_bn2) // ((C + 1) * 4)
        self.head = nn.Linear(C, self.vocab)
        assert (C + 1) * self.vocab * 4 + bytes_after_bn2 + 2 * C * 4 >= cap

    def forward(self, x, y):
        h = self.b3(self.b2(self.b1(x)))
        z = self.head(h.mean((2, 3)))
        return F.cross_entropy(z, y, label_smoothing=0.1)


def _batches(steps: int, n: int, vocab: int, image=(3, 6, 6), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *image, generator=g), torch.randint(0, vocab, (n,), generator=g)) for _ in range(steps)]


def _per_rank_eager_reference(model: nn.Module, batches, world: int, lr: float, broadcast_buffers: bool):
    """Single-process eager on the global batch, with data parallelism's semantics: rank
    r's shard goes through replica r (batch norm statistics of that shard, running
    statistics per replica), gradients are averaged, every replica takes the same step.
    With ``broadcast_buffers`` (DDP's default), replica 0's buffers overwrite the others'
    before each forward."""
    replicas = [copy.deepcopy(model) for _ in range(world)]
    out = {"loss": [], "grads": [], "buffers": [], "params": None}
    for x, y in batches:
        if broadcast_buffers:
            for rep in replicas[1:]:
                for b, b0 in zip(rep.buffers(), replicas[0].buffers()):
                    b.copy_(b0)
        losses, grads = [], []
        for rep, xs, ys in zip(replicas, x.chunk(world), y.chunk(world)):
            rep.zero_grad()
            loss = rep(xs, ys)
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad.clone() for n, p in rep.named_parameters()})
        mean_grad = {n: sum(g[n] for g in grads) / world for n in grads[0]}
        with torch.no_grad():
            for rep in replicas:
                for n, p in rep.named_parameters():
                    p -= lr * mean_grad[n]
        out["loss"].append(losses)
        out["grads"].append(mean_grad)
        out["buffers"].append([{n: b.clone() for n, b in rep.named_buffers()} for rep in replicas])
    out["params"] = {n: p.detach().clone() for n, p in replicas[0].named_parameters()}
    return out


def _train(run, model, batches, rank, world, lr, full_grad=lambda g: g, full_param=lambda p: p):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out = {"loss": [], "grads": [], "buffers": []}
    for x, y in batches:
        opt.zero_grad()
        loss = run(x.chunk(world)[rank], y.chunk(world)[rank])
        loss.backward()
        out["loss"].append(loss.detach())
        out["grads"].append({n: full_grad(p.grad).clone() for n, p in model.named_parameters()})
        opt.step()
        out["buffers"].append({n: b.clone() for n, b in model.named_buffers()})
    out["params"] = {n: full_param(p.detach()).clone() for n, p in model.named_parameters()}
    return out


def scenario_ddp(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ger_inductor import _compat

    torch.manual_seed(0)
    model = DDPNet()
    batches = _batches(steps=2, n=8, vocab=model.vocab)
    lr = 0.05
    ref = _per_rank_eager_reference(model, batches, world, lr, broadcast_buffers=True)
    ddp = DDP(copy.deepcopy(model), bucket_cap_mb=DDP_BUCKET_MB)
    run = torch.compile(ddp, backend="ger", options={"strict": True})
    got = _train(run, ddp.module, batches, rank, world, lr)
    split = {"got": got, "reports": _report_summary(), "unique_graphs": _compat.counters()["stats"]["unique_graphs"]}

    # without DDPOptimizer (the documented way to keep every pattern whole): one graph,
    # DDP's gradient hooks still all-reduce (after the backward, not overlapped with it)
    _compat.dynamo_reset()
    ger_inductor.clear_reports()
    ddp = DDP(copy.deepcopy(model), bucket_cap_mb=DDP_BUCKET_MB)
    # (ger's rewrites under AOTAutograd without code generation: the split run above
    # compiled the same blocks through Inductor)
    with torch._dynamo.config.patch(optimize_ddp=False):
        run = torch.compile(ddp, backend="ger", options={"strict": True, "compiler": "aot_eager"})
        whole = _train(run, ddp.module, batches[:1], rank, world, lr)
    return {"ref": ref, "split": split, "whole": {"got": whole, "reports": _report_summary()}}


# ----------------------------------------------------------------------------- FSDP2
class FSDPNet(nn.Module):
    """A conv -> BN -> ReLU stem (its own FSDP unit), then a head and a label-smoothed
    loss in the root. The stem is called once, not in a loop over blocks (see
    docs/distributed.md: a graph break inside a loop makes Dynamo skip the frame)."""

    def __init__(self, vocab: int = 40):
        super().__init__()
        self.vocab = vocab
        self.stem = ConvBlock(3, 8)
        self.head = nn.Linear(8, vocab)

    def forward(self, x, y):
        h = self.stem(x)
        z = self.head(h.mean((2, 3)))
        return F.cross_entropy(z, y, label_smoothing=0.1)


def scenario_fsdp(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ger_inductor import _compat

    torch.manual_seed(0)
    model = FSDPNet()
    batches = _batches(steps=2, n=8, vocab=model.vocab)
    lr = 0.05
    ref = _per_rank_eager_reference(model, batches, world, lr, broadcast_buffers=False)
    mesh = init_device_mesh("cpu", (world,))
    sharded = copy.deepcopy(model)
    fully_shard(sharded.stem, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    run = torch.compile(sharded, backend="ger", options={"strict": True})
    got = _train(
        run, sharded, batches, rank, world, lr, full_grad=lambda g: g.full_tensor(), full_param=lambda p: p.full_tensor()
    )
    unique_graphs = _compat.counters()["stats"]["unique_graphs"]
    return {"ref": ref, "got": got, "reports": _report_summary(), "unique_graphs": unique_graphs}


SCENARIOS = {"vocab_parallel": scenario_vocab_parallel, "vocab_parallel_distill": scenario_vocab_parallel_distill,
             "ddp": scenario_ddp, "fsdp": scenario_fsdp}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--init", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("scenarios", nargs="+", choices=sorted(SCENARIOS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    # a rank that fails mid-collective must not leave the other waiting for 30 minutes
    dist.init_process_group(
        "gloo", init_method=args.init, rank=args.rank, world_size=args.world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        for name in args.scenarios:
            from ger_inductor import _compat

            _compat.dynamo_reset()
            _compat.counters().clear()
            ger_inductor.clear_reports()
            try:
                result = {"ok": True, "result": SCENARIOS[name](args.rank, args.world)}
            except Exception:
                result = {"ok": False, "traceback": traceback.format_exc()}
            torch.save(result, os.path.join(args.out, f"{name}.rank{args.rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
