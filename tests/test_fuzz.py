"""The program fuzzer (tests/fuzz_programs.py) in CI: a fixed number of random programs
mixing the three families with writes, views, modes, NaN/-inf and dynamic sizes, each
run eagerly and under ``backend="ger"`` (strict off and on); and every counterexample
it has found so far, kept as a regression example.

The deep profile (releases): ``python -m tests.fuzz_programs --examples 20000``.
``GER_FUZZ_EXAMPLES`` sets the CI profile's count.
"""

from __future__ import annotations

import os

import pytest
import torch

from . import fuzz_programs as fz

hypothesis = pytest.importorskip("hypothesis")

CI_EXAMPLES = int(os.environ.get("GER_FUZZ_EXAMPLES", "35"))

#: counterexamples the fuzzer found (each was a wrong number or a crash, now fixed)
FOUND = {
    # -inf logit: a weighted, label-smoothed CE beside p*log(p) (eager: nan; ger gave inf)
    "neg_inf_weighted_ls_plogp": fz.Program(context="no_grad", n=4, v=5, bad_logit="-inf", terms=("zloss", "ce_weighted", "entropy_plogp"),
                                            write="clamp_target", write_at=0, act="relu_inplace", seed=296),
    "neg_inf_plogp_twice": fz.Program(context="no_grad", n=4, v=5, bad_logit="-inf", terms=("entropy_plogp", "ce_weighted", "entropy_plogp"),
                                      write="clamp_target", write_at=0, act="relu_inplace", seed=296),
    # the logits written after the loss, with grad: the fused op saved them, eager's softmax
    # saved its output (ger raised autograd's version error under strict; eager ran)
    "logits_written_after_loss": fz.Program(context="grad", n=6, v=5, ignore=True, terms=("entropy_prod", "target_logp"),
                                            write="masked_fill_", write_at=2, act="relu_inplace", seed=108),
    "head_output_copied_after_loss_autocast": fz.Program(context="autocast", n=5, v=33, terms=("ce_ls",), write="copy_",
                                                         write_at=1, logits_from="linear", conv="train", act="hardtanh",
                                                         conv_write="running_mean", seed=506),
    # an eval BN's running mean written in place (under no_grad) between conv and BN, the
    # conv output read beside BN: BN's weight gradient came from the mean written twice
    # (AOTAutograd recomputed it from the written input); now refused (tests/test_soundness.py)
    "running_mean_written_shared_conv": fz.Program(context="grad", n=2, v=16, bad_logit="nan", terms=("ce",),
                                                   logits_from="scaled", conv="eval", act="relu",
                                                   conv_write="running_mean", conv_form="shared", seed=2),
    "running_mean_written_shared_conv_2": fz.Program(context="grad", n=2, v=16, bad_logit="nan", terms=("ce",),
                                                     logits_from="scaled", conv="eval", act="relu",
                                                     conv_write="running_mean", conv_form="shared", seed=0),
    # -inf logit, weighted CE beside p * log_softmax (eager: nan; ger gave inf)
    "neg_inf_weighted_prod": fz.Program(context="grad", n=3, v=33, bad_logit="-inf", terms=("entropy_prod", "ce_weighted", "zloss"),
                                        write="masked_fill_", write_at=0, act="silu", dynamic=True, seed=0),
    # the lm head fused (the fuzzer set no lm_head_chunk before, so at its vocabularies the
    # head never fused; found by the model zoo, then by the fuzzer once it set one): per-row
    # losses written in place before the sum (transformers' LabelSmoother, fairseq) - the
    # in-forward copy of the loss code skipped the writes, so masked rows kept their
    # gradient; the same with the mask made after the statistics (the copy's writes were
    # then sorted after its reads)
    "lm_head_rows_masked_in_place": fz.Program(context="grad", n=7, v=16, ignore=True, terms=("rows_masked_inplace",),
                                               logits_from="linear", lm_chunk=2),
    "lm_head_rows_masked_late": fz.Program(context="grad", n=7, v=16, ignore=True, terms=("rows_masked_late",),
                                           logits_from="linear", lm_chunk=2),
    # stop 32 review: the KL read logits divided by T before a write, the op read them after
    # it (found by hand; the fuzzer's "kl_tempered_early" term then reproduced it)
    "kl_of_a_copy_taken_before_a_write": fz.Program(terms=("kl_tempered_early",), write="mul_", write_at=0),
    "kl_of_a_copy_taken_before_a_write_with_ce": fz.Program(terms=("ce", "kl_tempered_early"), write="mul_",
                                                            write_at=1),
    "lm_head_hf_label_smoother": fz.Program(context="grad", n=7, v=16, ignore=True, terms=("hf_label_smoother",),
                                            logits_from="linear", lm_chunk=2),
    "lm_head_rows_written_through_a_view": fz.Program(context="grad", n=7, v=16, ignore=True,
                                                      terms=("rows_view_written",), logits_from="linear", lm_chunk=2),
    # the target written in place after the loss, before the backward: eager's nll_loss
    # saved it and raises; the fused head's in-forward mode needed nothing in its backward,
    # so it ran (found by the deep fuzz, seed 1204); its grad carrier now saves the target
    "lm_head_target_clamped_after_loss": fz.Program(context="grad", n=8, v=33, terms=("ce_ls", "entropy_cat"),
                                                    write="clamp_target", write_at=2, logits_from="linear",
                                                    second_backward=True, dynamic=True, lm_chunk=64, seed=8562),
    # the class weights written after a weighted CE (the write kind added with the fix):
    # F.cross_entropy saves them, ger's row form saved only the gathered w[y]
    "class_weights_written_after_weighted_ce": fz.Program(context="grad", n=7, v=16, terms=("ce_weighted",),
                                                          write="class_weight", write_at=1, seed=3),
    "lm_head_class_weights_written_after_loss": fz.Program(context="grad", n=7, v=16, terms=("ce_weighted",),
                                                           write="class_weight", write_at=1, logits_from="linear",
                                                           lm_chunk=2, seed=3),
    # the target clamped between two of the loss's terms (deep fuzz, seed 1402, on the
    # first fix): eager's CE saved it before the write and raises; the grad carrier, after
    # the loss, kept the written version. A write to a kept tensor between its first read
    # and the loss now selects the recompute mode (whose op saves the target where it reads)
    "lm_head_target_clamped_between_terms": fz.Program(context="autocast", n=2, v=5,
                                                       terms=("ce_ls", "entropy_cat", "entropy_cat"),
                                                       write="clamp_target", write_at=2, logits_from="linear",
                                                       lm_chunk=4, seed=39660),
    # a train BN's running mean written after the BN, before the backward: eager's BN saved
    # the running statistics and raises; ger's batch_norm_act did not need them and ran
    # (found by reading eager's derivative formulas, then drawn by the fuzzer's new
    # conv_write="running_mean_after"); a ger::version_guard now keeps them
    "train_bn_running_mean_written_after": fz.Program(context="grad", n=3, v=5, terms=("ce",), logits_from="scaled",
                                                      conv="train", act="relu", conv_write="running_mean_after"),
    # the oracle, not ger (deep fuzz, seed 1301): a train-mode conv -> BN -> hardtanh under
    # CPU bf16 autocast with a second backward - ger's conv weight gradient is 0.023 from
    # eager's, exactly as far as Inductor's (BN's backward amplifies bf16 rounding), and
    # doubled by the second backward past the 3e-2 tolerance; ger is 0.024 from the
    # float64 run, eager 0.010: accepted by the float64 rule (``_closer_than_eager``)
    "autocast_train_bn_rounding_second_backward": fz.Program(context="autocast", n=2, v=33, terms=("entropy_entr",),
                                                             logits_from="scaled", conv="train", act="hardtanh",
                                                             second_backward=True, seed=1),
    # the same at n=4, with a running-mean write and the conv output read twice: eager is
    # 0.0008 from the float64 run, ger and Inductor both 0.036 (of 0.21): equal to
    # Inductor's own deviation, accepted by the second rule (an Inductor compile)
    "autocast_train_bn_rounding_as_inductor": fz.Program(context="autocast", n=4, v=33,
                                                         terms=("hf_label_smoother", "ce_ls", "entropy_entr"),
                                                         write="index_put", write_at=1, logits_from="scaled",
                                                         conv="train", act="hardtanh", conv_write="running_mean",
                                                         conv_form="shared", second_backward=True, seed=1),
    # the logits returned beside the loss and written by the caller before the backward:
    # the fused loss op had saved them (eager's softmax saves its own output); ger raised
    # autograd's version error, and under Inductor gave a wrong gradient silently
    # (tests/test_soundness.py::test_returned_logits_written_before_backward_under_inductor)
    "returned_logits_written_before_backward": fz.Program(context="grad", n=2, v=5, terms=("ce",),
                                                          returned="logits_written", seed=0),
    # the same where eager's spelling saves the logits themselves (Categorical's
    # logsumexp): eager raises autograd's version error, and ger must too - the copy the
    # op reads had let the write pass (the copy now keeps the logits for the check)
    "returned_logits_written_eager_saves_them": fz.Program(
        context="grad", n=2, v=5, terms=("entropy_cat", "ce_weighted", "entropy_cat"), write="masked_fill_",
        write_at=0, act="silu", dynamic=True, returned="logits_written", seed=4),
    # the fused head writes and returns the logits, the loss code's z-loss (logsumexp)
    # saves them in eager: the caller's write raises there, and must in ger (the gradient
    # carrier now keeps the returned logits for the check)
    "fused_head_returned_logits_written_eager_saves_them": fz.Program(
        context="grad", n=7, v=33, bad_logit="-inf", ignore=True, terms=("rows_view_written", "kl_uniform", "zloss"),
        write_at=2, logits_from="linear", act="hardtanh", lm_chunk=2, returned="logits_written", seed=0),
    # a +inf logit in a row the CE ignores, a clamped z-loss beside: eager's logsumexp +inf
    # (clamped to 50), the fused one log_softmax's NaN (before ger::loss_fwd(lse_inf_out=))
    # stop 34's first bare-logsumexp refusal also refused Categorical's internal
    # logsumexp (z - logsumexp(z, keepdim=True)) in bf16 under autocast: the head's
    # returned logits, written by the caller, lost eager's version error
    "categorical_bf16_lse_inside_entropy_returned_logits_written": fz.Program(
        context="autocast", n=6, v=33, bad_logit="+inf", ignore=True, terms=("soft_ce", "entropy_cat"), write="index_put",
        write_at=1, logits_from="linear_tempered", conv="train", act="mish", conv_write="running_mean",
        conv_form="shared", dynamic=True, lm_chunk=2, returned="logits_written", seed=81),
    "zloss_clamped_beside_ignoring_ce": fz.Program(
        context="grad", n=6, v=16, bad_logit="+inf", ignore=True, terms=("ce", "zloss_clamped"), seed=0),
    # stop 35 (a review, then the fuzzer's new NaN conv input): relu's fused backward zeroed
    # the gradient at a NaN, eager's passes it (BN bias gradient differed), train and eval
    "conv_train_relu_nan_input": fz.Program(context="grad", conv="train", act="relu", bad_x=True, seed=0),
    "conv_eval_relu_nan_input": fz.Program(context="grad", conv="eval", act="relu", bad_x=True, seed=0),
    # stop 36: under autocast eager's bf16 hardtanh_backward zeroes the NaN's gradient (BN
    # bias gradient 0), plain Inductor and ger pass it (0.25): accepted as Inductor's
    "conv_train_hardtanh_nan_input_autocast": fz.Program(
        context="autocast", n=7, v=16, bad_logit="-inf", terms=(), write="masked_fill_", write_at=1,
        logits_from="linear_div_", conv="train", act="hardtanh", conv_write="input", bad_x=True, lm_chunk=2,
        seed=22924),
}


pytestmark = pytest.mark.usefixtures("quiet_ger")


#: found and not fixed yet: expected to fail (the -inf logit ones, issue 13, are fixed:
#: tests/test_loss_semantics.py)
OPEN: set = set()


@pytest.mark.parametrize("name", [n if n not in OPEN else pytest.param(n, marks=pytest.mark.xfail(
    strict=True, reason="-inf logit: the fused entropy gives a number or inf where eager gives NaN (open)")) for n in FOUND])
def test_counterexample(name):
    assert fz.check(FOUND[name]) is None


def test_float64_rule_accepts_rounding_and_refuses_larger_errors():
    """``_closer_than_eager``: ger within 4x eager's distance from the float64 run passes;
    10x, a NaN eager does not have, or another integer state fails."""
    exact = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)

    def outcome(err, nan=False, count=1):
        t = (exact + err).float()
        if nan:
            t[0] = float("nan")
        return fz.Outcome(loss=t.sum(), grads={"w": t}, state={"n": torch.tensor(count)}, inputs=(t,))

    exact_o = fz.Outcome(loss=exact.sum(), grads={"w": exact}, state={"n": torch.tensor(1)}, inputs=(exact,))
    eager = outcome(0.01)
    assert fz._closer_than_eager(eager, outcome(-0.03), exact_o)
    assert not fz._closer_than_eager(eager, outcome(0.1), exact_o)
    assert not fz._closer_than_eager(eager, outcome(0.01, nan=True), exact_o)
    assert not fz._closer_than_eager(eager, outcome(0.01, count=2), exact_o)


def test_fuzzer_detects_a_wrong_rewrite(monkeypatch):
    """The oracle can fail: with the alias check switched off, a write between two
    statistics gives ger a different number, and ``check`` says so."""
    from ger_inductor.passes import graph

    p = fz.Program(context="no_grad", terms=("ce", "entropy_prod"), write="mul_", write_at=1, seed=3)
    assert fz.check(p, stricts=(True,)) is None
    monkeypatch.setattr(graph.Effects, "first_barrier", lambda self, reads, to, ignore=(): None)
    assert fz.check(p, stricts=(True,)) is not None


@hypothesis.settings(max_examples=CI_EXAMPLES, deadline=None, database=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(fz.programs())
def test_random_programs(p):
    why = fz.check(p)
    if why is not None and p.bad_logit is not None and ": errors differ" not in why:
        # the open class: NaN/inf semantics of -inf / NaN logits in the fused loss (issue 13);
        # rejected so the other programs still run (the OPEN regressions above track it)
        hypothesis.reject()
    assert why is None, f"{p!r}: {why}"
