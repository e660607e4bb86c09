"""ger under torch.distributed: DDP, FSDP2, SyncBatchNorm and the vocabulary-parallel
GER loss.

The multi-rank checks run as ONE job of two real processes (gloo on the CPU, started by
the test, bounded in time, always torn down; tests/_dist_worker.py): each rank runs
every scenario and saves its numbers and the single-process eager reference on the same
global batch; the tests below compare them. Single-process checks (SyncBatchNorm, graph
breaks, argument errors) run in the test process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ger_inductor
from ger_inductor.distributed import ger_loss_vocab_parallel
from ger_inductor.passes import conv_bn_act

from . import _dist_worker as worker
from .conftest import rewrite_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
#: hard limit for the whole 2-rank job (it takes ~35 s on 2 busy cores)
JOB_TIMEOUT_S = 300
REASONS = conv_bn_act.NEAR_MISS_REASONS


#: one pytest-xdist worker runs this module (its 2-rank job is a session fixture, run once): --dist loadgroup
pytestmark = pytest.mark.xdist_group("distributed")


def test_the_module_runs_on_one_worker(request):
    """Under ``--dist loadgroup`` pytest-xdist sends this module to one worker (its node
    ids carry the group), so the 2-rank job runs once. pytest 9 with pytest-xdist 3.8
    ignored the group silently and the job ran on both workers (~70 s each): pinned in
    pyproject.toml."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not run by pytest-xdist with --dist loadgroup")
    assert request.node.nodeid.endswith("@distributed"), request.node.nodeid


# ----------------------------------------------------------------------------- the 2-rank job
@pytest.fixture(scope="session")
def job(tmp_path_factory):
    """Runs every scenario of tests/_dist_worker.py on 2 gloo ranks; {scenario: [rank results]}.
    Session scope: pytest tears a module fixture down whenever the worker runs a test of
    another module in between (xdist interleaves), and the job would run again."""
    tmp = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHINDUCTOR_CACHE_DIR=str(tmp / "inductor_cache"))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    init = f"file://{tmp / 'rendezvous'}"
    logs = [tmp / f"rank{r}.log" for r in range(WORLD)]
    procs = []
    start = time.monotonic()
    timed_out = False
    try:
        for r in range(WORLD):
            cmd = [sys.executable, "-m", "tests._dist_worker", "--rank", str(r), "--world", str(WORLD),
                   "--init", init, "--out", str(tmp), *worker.SCENARIOS]  # fmt: skip
            with open(logs[r], "w") as log:
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        for p in procs:
            try:
                p.wait(timeout=max(1.0, JOB_TIMEOUT_S - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    tails = "\n".join(f"--- rank {r} log (tail) ---\n{logs[r].read_text()[-4000:]}" for r in range(WORLD))
    if timed_out:
        pytest.fail(f"the 2-rank job did not finish in {JOB_TIMEOUT_S} s (killed)\n{tails}")
    results = {}
    for name in worker.SCENARIOS:
        per_rank = []
        for r in range(WORLD):
            path = tmp / f"{name}.rank{r}.pt"
            if not path.exists():
                per_rank.append({"ok": False, "traceback": f"rank {r} wrote no result (exit code {procs[r].returncode})\n{tails}"})
            else:
                per_rank.append(torch.load(path, weights_only=False))
        results[name] = per_rank
    return results


def _results(job, scenario: str) -> list:
    out = []
    for r, res in enumerate(job[scenario]):
        if not res["ok"]:
            pytest.fail(f"scenario {scenario} failed on rank {r}:\n{res['traceback']}")
        out.append(res["result"])
    return out


def _tolerances(dtype: str) -> dict:
    # bf16 outputs: both sides compute in fp32 and round once; one bf16 ulp apart at most
    return dict(rtol=1e-2, atol=1e-2) if "bfloat16" in dtype else dict(rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- vocabulary-parallel loss
@pytest.mark.parametrize("case", [c[0] for c in worker.VOCAB_CASES])
def test_vocab_parallel_loss_matches_ger_loss_on_full_logits(job, case):
    """Loss (and entropy / lse with extras) on every rank, and each rank's shard gradient,
    equal ger_loss on the full logits in one process."""
    for r, res in enumerate(_results(job, "vocab_parallel")):
        c = res[case]
        tol = _tolerances(c["dtype"])
        assert len(c["out"]) == len(c["ref"])
        for got, ref in zip(c["out"], c["ref"]):
            torch.testing.assert_close(got, ref, **tol, msg=lambda m: f"rank {r} {case}: {m}")
        assert c["grad"].shape == c["ref_grad"].shape and c["grad"].dtype == c["ref_grad"].dtype
        torch.testing.assert_close(c["grad"], c["ref_grad"], **tol, msg=lambda m: f"rank {r} {case} grad: {m}")
        assert c["grad"].abs().sum() > 0


def _expected_collectives(case: dict, kw: dict) -> list[tuple[str, str, int]]:
    """What the loss must send: a MAX of the row maxima (+ 2 numbers), ONE SUM of k
    per-row sums (+ 1 number), and for 0 < alpha < 1 a SUM of two per-row sums."""
    rows, b = case["rows"], 4  # fp32 statistics, also for bf16 logits
    alpha = 1.0 if "label_smoothing" in kw else kw["alpha"]
    extras = kw.get("return_extras", False)
    k = 3 + int(alpha == 0.0 or extras) + int(alpha == 0.0 and "base" in kw) + int(alpha == 1.0)
    calls = [("all_reduce", "RedOpType.MAX", (rows + 2) * b), ("all_reduce", "RedOpType.SUM", (rows * k + 1) * b)]
    if alpha not in (0.0, 1.0):
        calls.append(("all_reduce", "RedOpType.SUM", rows * 2 * b))
    return calls


def test_vocab_parallel_loss_moves_only_per_position_statistics(job):
    """Counted on every rank by wrapping every torch.distributed collective: forward and
    backward together send 2 (3 for general alpha) all-reduces of O(positions) bytes,
    no all-gather, the same bytes for V = 50 and V = 4096."""
    for r, res in enumerate(_results(job, "vocab_parallel")):
        for name, _shape, kw, dtype in worker.VOCAB_CASES:
            c = res[name]
            assert c["calls"] == _expected_collectives(c, kw), (r, name, c["calls"])
            sent = sum(b for _, _, b in c["calls"])
            assert sent <= 4 * (8 * c["rows"] + 3)  # O(positions): at most 8 numbers a position
            if c["V"] >= 4096:  # an all-gather of the logits would move 4 * rows * V bytes
                assert 100 * sent < c["rows"] * c["V"] * torch.empty((), dtype=dtype).element_size()
        assert res["ls_big_vocab"]["calls"] == res["ls_mean"]["calls"]
        assert res["ger_big_vocab"]["calls"] == res["ger_none"]["calls"]


def test_vocab_parallel_loss_unequal_shards_and_dtensor(job):
    for r, res in enumerate(_results(job, "vocab_parallel")):
        for case in ("unequal_shards", "dtensor"):
            c = res[case]
            torch.testing.assert_close(c["out"][0], c["ref"][0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(c["grad"], c["ref_grad"], rtol=1e-5, atol=1e-6)
        assert res["unequal_shards"]["grad"].shape == (6, 6 if r == 0 else 5)


def test_vocab_parallel_loss_rows_with_non_finite_maximum_are_nan_as_ger_loss(job):
    """A +inf logit in one rank's shard, a row all -inf on every rank, a NaN: NaN loss,
    lse and gradient rows on every rank, as ger_loss (and F.cross_entropy) give them.
    Before, a +inf row maximum was clamped to 0 with the -inf ones: loss +inf and finite
    gradients on the other rank's classes."""
    for r, res in enumerate(_results(job, "vocab_parallel")):
        for name, c in res["non_finite_rows"].items():
            for got, ref in zip(c["out"], c["ref"]):
                torch.testing.assert_close(got, ref, equal_nan=True, msg=lambda m: f"rank {r} {name}: {m}")
            torch.testing.assert_close(c["grad"], c["ref_grad"], equal_nan=True,
                                       msg=lambda m: f"rank {r} {name} grad: {m}")
            assert c["grad"][:3].isnan().all() and c["grad"][3].isfinite().all(), (name, c["grad"])


def test_vocab_parallel_functions_take_a_shard_without_classes(job):
    """Vocabulary 6 split 6 + 0 (what a DTensor split gives when V < world): the loss, the
    distillation loss and the token statistics equal their single-process values on both
    ranks (before, the empty rank raised and the other waited in its all-reduce)."""
    for r, res in enumerate(_results(job, "vocab_parallel")):
        for name, c in res["empty_shard"].items():
            torch.testing.assert_close(c["out"], c["ref"], rtol=1e-5, atol=1e-6, msg=lambda m: f"rank {r} {name}: {m}")
            torch.testing.assert_close(c["grad"], c["ref_grad"], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"rank {r} {name} grad: {m}")
            assert c["grad"].shape == (6, 6 if r == 0 else 0)


def test_vocab_parallel_loss_all_positions_ignored(job):
    for res in _results(job, "vocab_parallel"):
        assert torch.isnan(res["all_ignored"]["mean"]) and res["all_ignored"]["sum"].item() == 0.0


def test_vocab_parallel_loss_shards_that_do_not_tile_raise_on_every_rank(job):
    """Both ranks reach the same decision from all-reduced numbers: both raise, no hang."""
    for res in _results(job, "vocab_parallel"):
        errors = res["errors"]
        assert errors["sizes_differ"] is not None and "hold 11 classes" in errors["sizes_differ"]
        assert "pass vocab_start and vocab_size" in errors["sizes_differ"]
        assert errors["overlap"] is not None and "owned by no rank or by several" in errors["overlap"]


def test_vocab_parallel_loss_compiled_with_ger(job):
    """torch.compile(backend="ger") traces it into one graph: the same numbers, and the
    graph's collectives are three all-reduces of per-position statistics."""
    for r, res in enumerate(_results(job, "vocab_parallel")):
        c = res["compiled"]
        torch.testing.assert_close(c["out"][0], c["ref"][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c["grad"], c["ref_grad"], rtol=1e-5, atol=1e-6)
        assert c["graph_breaks"] == 0
        assert [(op.split(".")[-1], red) for op, red, _ in c["collectives"]] == [
            ("all_reduce", "max"), ("all_reduce", "sum"), ("all_reduce", "sum")
        ], c["collectives"]
        assert [b for *_, b in c["collectives"]] == [(7 + 2) * 4, (7 * 3 + 1) * 4, 7 * 2 * 4]
        assert len(c["reports"]) == 1 and not c["reports"][0]["fallbacks"]


# ----------------------------------------------------------------------------- vocab-parallel distillation / RL rows
@pytest.mark.parametrize("case", [c[0] for c in worker.DISTILL_CASES])
def test_vocab_parallel_distill_matches_the_full_logits(job, case):
    """The loss on every rank and each rank's shard gradients (the teacher's too where it
    is trained) equal ger_distill_loss on the full logits in one process, and the float64
    reference; the ends beta in {0, 1}, near-end skew-Jensen, T != 1, the hard-label mix,
    masks, a teacher that excludes classes (-inf) on both shards, bf16."""
    for r, res in enumerate(_results(job, "vocab_parallel_distill")):
        c = res[case]
        tol = _tolerances(c["dtype"])
        torch.testing.assert_close(c["out"], c["ref"], **tol, msg=lambda m: f"rank {r} {case}: {m}")
        ref64 = c["ref64"].to(c["out"].dtype)
        torch.testing.assert_close(c["out"], ref64, **(tol if "bfloat16" in c["dtype"] else dict(rtol=1e-4,
                                   atol=1e-5)), msg=lambda m: f"rank {r} {case} vs float64: {m}")  # fmt: skip
        assert c["grad"].dtype == c["ref_grad"].dtype
        torch.testing.assert_close(c["grad"], c["ref_grad"], **tol, msg=lambda m: f"rank {r} {case} grad: {m}")
        assert c["grad"].abs().sum() > 0
        if c["ref_tgrad"] is None:
            assert c["tgrad"] is None
        else:
            torch.testing.assert_close(c["tgrad"], c["ref_tgrad"], **tol)
            assert c["tgrad"].abs().sum() > 0


@pytest.mark.parametrize("case", [c[0] for c in worker.TOKEN_CASES])
def test_vocab_parallel_token_stats_match_the_full_logits(job, case):
    for r, res in enumerate(_results(job, "vocab_parallel_distill")):
        c = res[case]
        tol = _tolerances(c["dtype"])
        assert len(c["out"]) == len(c["ref"]) == len(c["ref64"])
        for got, ref, ref64 in zip(c["out"], c["ref"], c["ref64"]):
            torch.testing.assert_close(got, ref, **tol, msg=lambda m: f"rank {r} {case}: {m}")
            torch.testing.assert_close(got, ref64.to(got.dtype), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(c["grad"], c["ref_grad"], **tol, msg=lambda m: f"rank {r} {case} grad: {m}")
        assert c["grad"].abs().sum() > 0


def test_vocab_parallel_distill_moves_only_per_position_statistics(job):
    """Forward and backward together: three all-reduces for the distillation loss (MAX of
    2-3 row maxima, SUM of 2-5 row sums, SUM of 1-2 KL partial sums), two for the token
    statistics; O(positions) bytes, nothing that grows with V, no all-gather."""
    b = 4  # fp32 statistics, also for bf16 logits
    for r, res in enumerate(_results(job, "vocab_parallel_distill")):
        for name, _shape, kw, _dtype, _tg in worker.DISTILL_CASES:
            c, rows = res[name], res[name]["rows"]
            hard = kw.get("hard_weight", 0.0) > 0
            own_ce = hard and kw.get("temperature", 1.0) != 1.0
            k_max, k_sum = 2 + own_ce, 2 + own_ce + 2 * hard
            k_kl = 1 if kw["beta"] in (0.0, 1.0) else 2
            assert c["calls"] == [("all_reduce", "RedOpType.MAX", (rows * k_max + 2) * b),
                                  ("all_reduce", "RedOpType.SUM", (rows * k_sum + 1) * b),
                                  ("all_reduce", "RedOpType.SUM", rows * k_kl * b)], (r, name, c["calls"])  # fmt: skip
        assert res["jsd_big_vocab"]["calls"] == res["jsd_half"]["calls"]
        for name, *_ in worker.TOKEN_CASES:
            c, rows = res[name], res[name]["rows"]
            assert c["calls"] == [("all_reduce", "RedOpType.MAX", (rows + 2) * b),
                                  ("all_reduce", "RedOpType.SUM", (rows * 4 + 1) * b)], (r, name, c["calls"])


def test_vocab_parallel_distill_unequal_shards_dtensors_and_errors(job):
    for r, res in enumerate(_results(job, "vocab_parallel_distill")):
        for case in ("unequal_shards", "dtensor"):
            c = res[case]
            torch.testing.assert_close(c["out"], c["ref"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(c["grad"], c["ref_grad"], rtol=1e-5, atol=1e-6)
        assert res["unequal_shards"]["grad"].shape == (6, 6 if r == 0 else 5)
        d = res["dtensor"]
        for got, ref in zip(d["tok_out"], d["tok_ref"]):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d["tok_grad"], d["tok_ref_grad"], rtol=1e-5, atol=1e-6)
        errors = res["errors"]
        assert "must have the same shape" in errors["shapes_differ"]
        assert "hold 11 classes" in errors["sizes_differ"]
        assert "owned by no rank or by several" in errors["token_overlap"]


def test_vocab_parallel_distill_compiled_with_ger(job):
    """torch.compile(backend="ger") traces each into one graph with eager's numbers: the
    distillation loss with three all-reduces, the PPO-like token objective with two
    (compiler="aot_eager": ger's rewrites and the traced collectives, no code generation;
    Inductor compiles the vocabulary-parallel CE with its collectives in
    test_vocab_parallel_loss_compiled_with_ger)."""
    for r, res in enumerate(_results(job, "vocab_parallel_distill")):
        c = res["compiled"]
        torch.testing.assert_close(c["out"], c["ref"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c["grad"], c["ref_grad"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c["tok_out"], c["tok_ref"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c["tok_grad"], c["tok_ref_grad"], rtol=1e-5, atol=1e-6)
        assert c["graph_breaks"] == 0
        assert [(op.split(".")[-1], red) for op, red, _ in c["collectives"]] == [
            ("all_reduce", "max"), ("all_reduce", "sum"), ("all_reduce", "sum")]
        assert [(op.split(".")[-1], red) for op, red, _ in c["tok_collectives"]] == [
            ("all_reduce", "max"), ("all_reduce", "sum")]
        assert len(c["reports"]) == 2 and not any(rep["fallbacks"] for rep in c["reports"])


def test_vocab_parallel_distill_refuses_bad_arguments_before_any_collective():
    """Argument errors are raised on each rank before it talks (here: no process group)."""
    from ger_inductor import ger_distill_loss_vocab_parallel, ger_token_stats_vocab_parallel

    zs, zt = torch.randn(4, 6), torch.randn(4, 6)
    with pytest.raises(ValueError, match="beta"):
        ger_distill_loss_vocab_parallel(zs, zt, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        ger_distill_loss_vocab_parallel(zs, zt, beta=0.5, temperature=0.0)
    with pytest.raises(ValueError, match="same shape"):
        ger_distill_loss_vocab_parallel(zs, zt[:, :5], beta=0.5)
    with pytest.raises(ValueError, match="pass target"):
        ger_distill_loss_vocab_parallel(zs, zt, beta=0.5, hard_weight=0.5)
    with pytest.raises(ValueError, match="pass both vocab_start and vocab_size"):
        ger_distill_loss_vocab_parallel(zs, zt, beta=0.5, vocab_start=0)
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):
        ger_distill_loss_vocab_parallel(zs, zt, beta=0.5)
    with pytest.raises(ValueError, match="kl_estimator"):
        ger_token_stats_vocab_parallel(zs, torch.zeros(4, dtype=torch.long), kl_estimator="k9",
                                       ref_logprobs=torch.zeros(4))
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):
        ger_token_stats_vocab_parallel(zs, torch.zeros(4, dtype=torch.long))


# ----------------------------------------------------------------------------- DDP
def _assert_training_matches(got: dict, ref: dict, rank: int, steps: int, what: str) -> None:
    """Losses, averaged gradients, running statistics (per rank) and updated parameters
    equal single-process eager on the same global batch, within fp32 rounding."""
    tol = dict(rtol=1e-4, atol=1e-5)
    for s in range(steps):
        torch.testing.assert_close(got["loss"][s], ref["loss"][s][rank], **tol, msg=lambda m: f"{what} loss {s}: {m}")
        for n, g in ref["grads"][s].items():
            torch.testing.assert_close(got["grads"][s][n], g, **tol, msg=lambda m: f"{what} grad {n} step {s}: {m}")
        for n, b in ref["buffers"][s][rank].items():
            torch.testing.assert_close(got["buffers"][s][n], b, **tol, msg=lambda m: f"{what} buffer {n} step {s}: {m}")
    if steps == len(ref["loss"]):  # the parameters after the reference's last step
        for n, p in ref["params"].items():
            torch.testing.assert_close(got["params"][n], p, **tol, msg=lambda m: f"{what} param {n}: {m}")


def _matches(report: dict, family: str | None = None) -> list:
    return [(pat, nodes) for fam, pat, nodes in report["matches"] if family is None or fam == family]


def _has_loss_rewrite(report: dict) -> bool:
    return any(fam in ("loss_entropy", "lm_head") for fam, _, _ in report["matches"])


def test_ddp_split_graph_trains_like_eager_and_reports_the_cut(job):
    """torch.compile(DDP(model), backend="ger") with 1 MiB buckets: DDPOptimizer cuts the
    graph between block 2's conv and its BN. Training matches eager; the report names the
    cut on both sides; blocks 1 and 3 and the loss, not cut, are still rewritten."""
    for r, res in enumerate(_results(job, "ddp")):
        split = res["split"]
        _assert_training_matches(split["got"], res["ref"], r, steps=2, what=f"rank {r} ddp")
        assert split["unique_graphs"] >= 1
        first, second = split["reports"]  # one report per piece
        assert _matches(first, "conv_bn_act") == [("conv_bn_act.train", ["conv2d", "batch_norm", "relu"])]
        [cut_conv] = first["near_misses"]
        assert cut_conv[0] == conv_bn_act.PATTERN_SPLIT and cut_conv[1] == "conv2d_1"
        assert cut_conv[2].startswith(REASONS["conv_output_leaves_graph"]) and "DDP bucket boundary" in cut_conv[2]
        assert [m[0] for m in _matches(second, "conv_bn_act")] == ["conv_bn_act.train"]
        [cut_bn] = second["near_misses"]
        assert cut_bn[0] == conv_bn_act.PATTERN_SPLIT and cut_bn[1] == "batch_norm"
        assert cut_bn[2].startswith(REASONS["bn_input_from_other_graph"]) and "DDPOptimizer" in cut_bn[2]
        assert _has_loss_rewrite(second)
        assert not first["fallbacks"] and not second["fallbacks"]


def test_ddp_without_graph_splitting_rewrites_every_block(job):
    """torch._dynamo.config.optimize_ddp = False: one graph, every pattern rewritten (run
    with compiler="aot_eager": the split test compiled the same blocks through Inductor)
    (DDP's own bucketing caps the first bucket at 1 MiB whatever bucket_cap_mb says, so
    a larger bucket_cap_mb does not remove this model's cut)."""
    for r, res in enumerate(_results(job, "ddp")):
        one = res["whole"]
        _assert_training_matches(one["got"], res["ref"], r, steps=1, what=f"rank {r} ddp unsplit")
        [report] = one["reports"]
        assert [m[0] for m in _matches(report, "conv_bn_act")] == ["conv_bn_act.train"] * 3
        assert _has_loss_rewrite(report) and not report["near_misses"] and not report["fallbacks"]


# ----------------------------------------------------------------------------- FSDP2
def test_fsdp2_sharded_model_trains_like_eager_and_is_rewritten(job):
    """fully_shard (FSDP2) on the conv block and the root, compiled with backend="ger":
    losses, full (all-gathered) gradients, running statistics and parameters equal
    eager; the block's conv -> BN -> ReLU and the root's loss are rewritten (FSDP2's
    hooks are graph breaks: one graph per side of them)."""
    for r, res in enumerate(_results(job, "fsdp")):
        _assert_training_matches(res["got"], res["ref"], r, steps=2, what=f"rank {r} fsdp")
        reports = res["reports"]
        assert sum(len(_matches(rep, "conv_bn_act")) for rep in reports) == 1
        assert any(_has_loss_rewrite(rep) for rep in reports)
        assert all(not rep["fallbacks"] for rep in reports)


# ----------------------------------------------------------------------------- single process
def _rewrite_only():
    """ger's conv_bn_act pass, the rewritten graph run eagerly (conftest.rewrite_backend)."""
    return rewrite_backend({"passes": ["conv_bn_act"]})


class ConvSyncBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.SyncBatchNorm(6)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _near_misses():
    return [(n.pattern, n.reason) for r in ger_inductor.reports() for n in r.near_misses]


def _conv_matches():
    return [m for r in ger_inductor.reports() for p in r.passes if p.name == "conv_bn_act" for m in p.matches]


def test_sync_batch_norm_in_training_is_left_alone(seed):
    """In training SyncBatchNorm's statistics are meant to span all ranks: never fused as
    plain BN, even where it falls back to F.batch_norm (no process group, one rank)."""
    model = ConvSyncBN().train()
    ref_model = ConvSyncBN().train()
    ref_model.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 7, 7)
    out = torch.compile(model, backend=_rewrite_only())(x)
    assert _near_misses() == [(conv_bn_act.PATTERN_TRAIN, REASONS["sync_batch_norm"] + " (training)")]
    assert not _conv_matches()
    torch.testing.assert_close(out, ref_model(x))
    torch.testing.assert_close(model.bn.running_var, ref_model.bn.running_var)


def test_sync_batch_norm_in_eval_is_folded_like_batch_norm(seed):
    """In eval SyncBatchNorm is F.batch_norm with running statistics and no
    synchronisation: folding is exact, and the report says it was a SyncBatchNorm."""
    model = ConvSyncBN().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-1, 1)
    x = torch.randn(4, 3, 7, 7, requires_grad=True)
    out = torch.compile(model, backend=_rewrite_only())(x)
    [match] = _conv_matches()
    assert match.pattern == conv_bn_act.PATTERN_EVAL and match.detail["norm"] == "SyncBatchNorm (eval: running statistics)"
    x_ref = x.detach().clone().requires_grad_()
    ref = model(x_ref)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)


class ConvBreakBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        torch._dynamo.graph_break()
        return F.relu(self.bn(y))


def test_graph_break_between_conv_and_batch_norm_is_reported(seed):
    model = ConvBreakBN().eval()
    x = torch.randn(2, 3, 6, 6)
    out = torch.compile(model, backend=_rewrite_only())(x)
    [(pattern, reason)] = _near_misses()
    assert pattern == conv_bn_act.PATTERN_SPLIT
    assert reason.startswith(REASONS["conv_output_leaves_graph"]) and "graph break" in reason
    assert not _conv_matches()
    torch.testing.assert_close(out, model(x))


def test_conv_output_returned_from_a_whole_graph_is_not_a_near_miss(seed):
    model = nn.Conv2d(3, 4, 3)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = model

        def forward(self, x):
            return self.conv(x)

    torch.compile(Wrap(), backend=_rewrite_only())(torch.randn(2, 3, 6, 6))
    assert len(ger_inductor.reports()) == 1 and _near_misses() == []


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(label_smoothing=0.1, reduction="avg"), ValueError, "reduction must be one of"),
        (dict(alpha=1.5, beta=0.1), ValueError, "alpha must be in"),
        (dict(alpha=0.5), TypeError, "alpha and beta are required"),
        (dict(label_smoothing=0.1, alpha=0.5, beta=0.1), ValueError, "either label_smoothing or"),
        (dict(label_smoothing=0.1, vocab_start=0), ValueError, "pass both vocab_start and vocab_size"),
        (dict(label_smoothing=0.1, target_shape=(6, 1)), ValueError, "classes in the LAST dimension"),
        (dict(label_smoothing=0.1, target_dtype=torch.float32), TypeError, "class indices"),
        (dict(label_smoothing=0.1, logits_dtype=torch.int64), TypeError, "logits must be float16"),
        (dict(label_smoothing=0.1), RuntimeError, "needs an initialised torch.distributed process group"),
    ],
)
def test_vocab_parallel_loss_refuses_bad_arguments(kwargs, error, message):
    kwargs = dict(kwargs)
    shape = kwargs.pop("target_shape", (6,))
    logits = (torch.randn(6, 5) * 3).to(kwargs.pop("logits_dtype", torch.float32))
    target = torch.randint(0, 5, shape).to(kwargs.pop("target_dtype", torch.int64))
    assert not torch.distributed.is_initialized()
    with pytest.raises(error, match=message):
        ger_loss_vocab_parallel(logits, target, **kwargs)
