"""GPU check of the distillation and per-token RL lowerings (``ger::distill_*``,
``ger::token_*``, lowerings/distill.py), in ONE run:

    python -m benchmarks.gpu_check_distill [--out DIR] [--skip-timing] [--cpu-dry-run]

1. correctness: ``ger_distill_loss`` / ``ger_token_stats`` compiled with Inductor (the
   Triton lowering) against the ops' eager kernels and the float64 references, fp32 and
   bf16, with -inf logits (masked classes), value and gradients; the generated code must
   call no ger op (the lowering ran);
2. timing: the harness cases distill_jsd, distill_kd, distill_kl_rows, distill_two_heads and
   rl_token_head (eager / inductor / ger / the in-run floor), CUDA events.

Without CUDA it prints why it skips and exits 0 (``--cpu-dry-run`` runs step 1 on the
CPU, to test the script). Writes gpu_check_distill.json (frame: ``harness.gpu_check_main``);
exits 1 when a correctness row fails.
"""

from __future__ import annotations

import math
import re

import torch


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    fin = torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), fin):
        return math.inf
    return float((a[fin] - b[fin]).abs().max() / b[fin].abs().max().clamp_min(1e-30)) if fin.any() else 0.0


def correctness(device) -> list[dict]:
    from ger_inductor import _compat, ger_distill_loss, ger_distill_reference, ger_token_stats, ger_token_stats_reference

    rows = []
    g = torch.Generator().manual_seed(0)
    R, V = 257, 5003  # not multiples of a block size
    # (beta, T, hard_weight, teacher_grad); T = 2 and 4 with a hard term: its exponential
    # by squaring the tempered one (lowerings/distill.py, _Pair.hard_lse)
    configs = [(0.5, 2.0, 0.1, True), (0.0, 1.0, 0.0, False), (1.0, 0.5, 0.5, True), (0.1, 1.0, 0.0, False),
               (0.0, 4.0, 0.5, False)]
    for dtype in (torch.float32, torch.bfloat16):
        for beta, T, hw, teacher_grad in configs:
            zs = (3 * torch.randn(R, V, generator=g)).to(device=device, dtype=dtype)
            zt = (3 * torch.randn(R, V, generator=g)).to(device=device, dtype=dtype)
            zs[2, :7] = zt[2, :7] = -math.inf
            zt[4, 10:20] = -math.inf
            zs.requires_grad_()
            zt.requires_grad_(teacher_grad)
            y = torch.randint(7, V, (R,), generator=g).to(device)
            y[5] = -100
            kw = dict(beta=beta, temperature=T, hard_weight=hw)

            def f(a, b):
                return ger_distill_loss(a, b, y, **kw)

            wrt = [zs] + ([zt] if teacher_grad else [])
            torch._dynamo.reset()
            compiled = torch.compile(f, backend="inductor", fullgraph=True)
            got, code = _compat.run_and_get_code(lambda: (lambda l: (l, torch.autograd.grad(l, wrt)))(compiled(zs, zt)))
            (loss, grads) = got
            ref = f(zs, zt)
            rgrads = torch.autograd.grad(ref, wrt)
            exact = ger_distill_reference(zs.double(), zt.double(), y, **kw)
            tol = 2e-5 if dtype == torch.float32 else 2e-2
            errs = {"loss_vs_op": _rel(loss, ref), "loss_vs_f64": _rel(loss, exact),
                    "grads_vs_op": max(_rel(a, b) for a, b in zip(grads, rgrads))}
            lowered = not any(re.search(r"torch\.ops\.ger\.distill_\w+\.default\(", c) for c in code)
            rows.append({"op": "distill", "dtype": str(dtype), "beta": beta, "T": T, "hard_weight": hw,
                         "teacher_grad": teacher_grad, **errs, "lowered": lowered,
                         "ok": lowered and all(e <= tol for e in errs.values())})
        z = (2 * torch.randn(R, V, generator=g)).to(device=device, dtype=dtype)
        z[1, :9] = -math.inf
        z.requires_grad_()
        y = torch.randint(9, V, (R,), generator=g).to(device)

        def t(x):
            st = ger_token_stats(x, y, temperature=0.7)
            return 0.3 * st.logp.sum() - 0.01 * st.entropy.sum(), st

        torch._dynamo.reset()
        ct = torch.compile(t, backend="inductor", fullgraph=True)
        ((loss, st), (gz,)), code = _compat.run_and_get_code(
            lambda: (lambda out: (out, torch.autograd.grad(out[0], z)))(ct(z)))
        (lref, _) = t(z)
        exact = ger_token_stats_reference(z.double(), y, temperature=0.7)
        gr, = torch.autograd.grad(lref, z)
        tol = 2e-5 if dtype == torch.float32 else 2e-2
        errs = {"logp_vs_f64": _rel(st.logp, exact.logp), "entropy_vs_f64": _rel(st.entropy, exact.entropy),
                "grad_vs_op": _rel(gz, gr)}
        lowered = not any(re.search(r"torch\.ops\.ger\.token_\w+\.default\(", c) for c in code)
        rows.append({"op": "token", "dtype": str(dtype), **errs, "lowered": lowered,
                     "ok": lowered and all(e <= tol for e in errs.values())})
    return rows


def timing(device, report) -> None:
    from benchmarks.cases import CASES
    from benchmarks.harness import Result, format_table, run_case

    rows = []
    for name in ("distill_jsd", "distill_kd", "distill_kl_rows", "distill_two_heads", "rl_token_head"):
        res = run_case(CASES[name], device, warmup=2, repeat=10, allocator="caching", log=lambda s: print(s, flush=True))
        rows += [r.__dict__ for r in res]
    report["timing"] = rows
    print(format_table([Result(**r) for r in rows]), flush=True)


def main(argv=None) -> int:
    from benchmarks.harness import gpu_check_main

    return gpu_check_main("gpu_check_distill", argv, correctness, "gpu_check_distill.json", timing=timing)


if __name__ == "__main__":
    raise SystemExit(main())
