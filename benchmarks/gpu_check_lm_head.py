"""GPU check of the fused lm head + GER loss, in ONE run.

    python -m benchmarks.gpu_check_lm_head [--out DIR] [--cpu-dry-run]

1. correctness of ``ger_linear_loss`` (the op's eager CUDA kernel) against
   F.linear + ger_loss / F.cross_entropy: loss, grad_h, grad_W, grad_b, fp32 and bf16,
   every GER variant, reductions mean / none, several chunk sizes;
2. a small causal LM (unmodified F.cross_entropy(label_smoothing, ignore_index))
   compiled with backend="ger" on CUDA trained 10 steps beside eager: losses, report;
3. timing and peak memory (CUDA events, torch.cuda.max_memory_allocated) of forward +
   backward at N=4096, H=1024, V=128256 (bf16 and fp32): eager / inductor /
   F.linear_cross_entropy chunked (where this torch has it) / ger (compiled) /
   ger_linear_loss (eager API), same inputs, one process.
Writes lm_head_gpu.json under --out and prints a table. Without CUDA it exits 0 after
saying why (``--cpu-dry-run`` runs parts 1-2 on the CPU to test the script).
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def correctness(device) -> list[dict]:
    from ger_inductor import ger_linear_loss, ger_loss

    rows = []
    N, H, V = 300, 64, 5003
    variants = {"ce": dict(label_smoothing=0.0), "ls": dict(label_smoothing=0.1), "cp": dict(alpha=0.0, beta=0.2),
                "kl_u_p": dict(alpha=1.0, beta=0.2), "ger_0.5": dict(alpha=0.5, beta=0.7),
                "ger_0.9": dict(alpha=0.9, beta=0.7)}
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for name, kw in variants.items():
            for reduction in ("mean", "none"):
                for chunk in (64, 1000):
                    h = torch.randn(N, H, generator=g).to(device, dtype).requires_grad_()
                    W = (torch.randn(V, H, generator=g) * 0.2).to(device, dtype).requires_grad_()
                    b = (torch.randn(V, generator=g) * 0.1).to(device, dtype).requires_grad_()
                    y = torch.randint(0, V, (N,), generator=g).to(device)
                    y[::7] = -100
                    out = ger_linear_loss(h, W, y, linear_bias=b, reduction=reduction, chunk=chunk, **kw)
                    gout = torch.randn(out.shape, generator=g).to(device, out.dtype)
                    grads = torch.autograd.grad(out, (h, W, b), gout)
                    # reference: float64 math on the same (rounded) inputs
                    h64, W64, b64 = (t.detach().double().requires_grad_() for t in (h, W, b))
                    z = F.linear(h64, W64, b64)
                    if dtype != torch.float32:
                        z = z.to(dtype).double()  # the logits eager would form in bf16
                    ref = ger_loss(z, y, reduction=reduction, **kw)
                    rgrads = torch.autograd.grad(ref, (h64, W64, b64), gout.double())
                    errs = [_rel(out, ref)] + [_rel(a, r) for a, r in zip(grads, rgrads)]
                    tol = 2e-5 if dtype == torch.float32 else 2e-2
                    rows.append({"dtype": str(dtype), "variant": name, "reduction": reduction, "chunk": chunk,
                                 "err_loss": errs[0], "err_h": errs[1], "err_W": errs[2], "err_b": errs[3],
                                 "ok": all(e < tol for e in errs)})
    return rows


def unrolled_low_div(device) -> dict:
    """The unrolled head on bf16 logits divided by T before the upcast, compiled by
    Inductor (Triton on CUDA), against the op's eager kernel: ``ger::lowp_div``'s lowering
    must round the quotient as eagerly (a plain division stays fp32 when fused: ~0.03 in
    nll at this size on CPU)."""
    from ger_inductor import lowerings
    from ger_inductor.ops import linear_loss as op

    lowerings.ensure_registered()
    g = torch.Generator().manual_seed(1)
    n, hd, v, T = 37, 32, 3001, 1.2  # a T where CUDA's reciprocal product and a division differ
    h = torch.randn(n, hd, generator=g).bfloat16().to(device)
    W = (torch.randn(v, hd, generator=g) * 0.4).bfloat16().to(device)
    y = torch.randint(0, v, (n,), generator=g).to(device)
    coefs = torch.randn(4, n, generator=g).to(device)

    def f(h, W, y, coefs):
        return op.unrolled(h, W, None, y, None, None, 1.0, -100, True, 8, coefs, 3, None, T, True)[:7]

    torch._dynamo.reset()
    got = torch.compile(f, backend="inductor", fullgraph=True)(h, W, y, coefs)
    ref = op._kernel(h, W, None, y, None, None, 1.0, -100, True, 8, coefs, 3, None, T, True)[:7]
    # the op itself against eager's division on every bf16 value (bit-exact)
    xs = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).to(device)
    q_eager = xs / T
    q_op = torch.compile(lambda x: torch.ops.ger.lowp_div(x, T), backend="inductor")(xs)
    same = torch.equal(q_eager.view(torch.int16), q_op.view(torch.int16)) or bool(
        ((q_eager == q_op) | (q_eager.isnan() & q_op.isnan())).all())
    stats = max(float((a - b).abs().max()) for a, b in zip(got[:4], ref[:4]))
    grads = max(float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in zip(got[5:7], ref[5:7]))
    return {"max_abs_stats": stats, "max_rel_grads": grads, "lowp_div_bit_exact": same,
            "ok": stats < 5e-5 and grads < 1e-2 and same}


def train_small_lm(device) -> dict:
    import ger_inductor
    from ger_inductor.demo import TinyLM

    torch.manual_seed(0)
    ref = TinyLM(vocab=16384, d=64).to(device)
    model = TinyLM(vocab=16384, d=64).to(device)
    model.load_state_dict(ref.state_dict())
    cm = torch.compile(model, backend="ger", options={"strict": True})
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (ref, model)]
    g = torch.Generator().manual_seed(0)
    out = {"eager": [], "ger": []}
    for _ in range(10):
        x = ((torch.randint(0, 97, (4, 1), generator=g) + torch.arange(64)) % 97).to(device)
        y = torch.roll(x, -1, 1)
        y[:, -1] = -100
        for key, m, o in (("eager", ref, opts[0]), ("ger", cm, opts[1])):
            o.zero_grad()
            loss = m(x, y)
            loss.backward()
            o.step()
            out[key].append(loss.item())
    rep = ger_inductor.last_report()
    out["matches"] = [f"{m.family}/{m.pattern} {m.detail}" for p in rep.passes for m in p.matches]
    out["fallbacks"] = [str(f) for f in rep.fallbacks]
    out["max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(out["eager"], out["ger"]))
    return out


def timing(device, sizes) -> list[dict]:
    from benchmarks.cases import CASES  # registers the lm-head cases too
    from benchmarks.harness import run_case

    rows = []
    for name in sizes:
        case = CASES[name]
        res = run_case(case, device, warmup=2, repeat=10, allocator="caching", log=lambda s: print(s, flush=True))
        rows += [r.__dict__ for r in res]
    return rows


def _after_correctness(device, report) -> None:
    worst = {}
    for r in report["correctness"]:
        k = r["dtype"]
        worst[k] = max(worst.get(k, 0.0), r["err_loss"], r["err_h"], r["err_W"], r["err_b"])
    print("  worst norm-wise relative error vs float64:", worst, flush=True)
    try:
        report["unrolled_low_div"] = ld = unrolled_low_div(device)
        print(f"unrolled bf16 division (ger::lowp_div) vs the kernel: {ld}", flush=True)
    except Exception as e:  # reported, the rest still runs
        report["unrolled_low_div"] = {"error": f"{type(e).__name__}: {e}"}
        print("unrolled_low_div ERROR", report["unrolled_low_div"], flush=True)
    t0 = time.time()
    try:
        report["train"] = tr = train_small_lm(device)
        print(f"train 10 steps ({time.time() - t0:.0f}s): max |loss ger - eager| = {tr['max_abs_loss_diff']:.2e}; "
              f"matches {tr['matches']}; fallbacks {tr['fallbacks']}", flush=True)
    except Exception as e:  # reported, the timing still runs
        report["train"] = {"error": f"{type(e).__name__}: {e}"}
        print("train ERROR", report["train"], flush=True)


def _timing(device, report) -> None:
    from benchmarks.harness import format_table, Result

    rows = timing(device, ["lmhead_ce_bf16", "lmhead_ls_bf16", "lmhead_ce_fp32"])
    report["timing"] = rows
    print(format_table([Result(**r) for r in rows]), flush=True)


def main(argv=None) -> int:
    from benchmarks.harness import gpu_check_main

    return gpu_check_main("gpu_check_lm_head", argv, correctness, "lm_head_gpu.json", _after_correctness, _timing)


if __name__ == "__main__":
    sys.exit(main())
