"""Dynamic shapes: every pattern family on symbolic sizes.

Training changes shapes every step (sequence lengths, image sizes, the short last
batch). Dynamo then hands ger graphs with symbolic sizes: automatically after the second
distinct size, from the first call with ``dynamic=True``, or per dimension with
``torch._dynamo.mark_dynamic``. For each family these tests check, on unmodified code:

* compiles: Dynamo's ``unique_graphs`` after every step (the static first graph and
  one dynamic graph; a size of 1 is Dynamo's own specialisation, whatever the backend);
* the rewrite on the dynamic graph (the report's matches, no guard added by a pass);
* the numbers against eager (forward and backward, float64 where rounding matters);
* the generated code (no example size baked in; sizes as ``ks`` symbols).

:func:`run_steps` is the helper: it runs a step function over a list of batches with a
model compiled by one backend and records outputs, gradients and compile counts, so a
new family adds a model and a list of batches.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import json
import os
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import FileCheck

import ger_inductor
from examples.resnet18_cnn import randomize_bn_statistics
from ger_inductor import _compat, debug, ger_loss, ger_loss_reference
from ger_inductor.demo import SmallCNN, TinyLM
from ger_inductor.passes import conv_bn_act, loss_entropy

from . import spellings
from .conftest import rewrite_backend

#: fp32 against float64, norm-wise relative (as tests/test_conv_bn_act.py)
FP32_REL = 1e-4


def unique_graphs() -> int:
    return _compat.counters()["stats"]["unique_graphs"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(0.1))


def _options(families=None, **extra) -> dict[str, Any]:
    opts: dict[str, Any] = {"strict": True, **extra}
    if families is not None:
        opts["passes"] = list(families)
        if "lm_head" in families:
            opts.setdefault("lm_head_chunk", 32)  # the test's vocabulary is small: fuse it anyway
    return opts


# ----------------------------------------------------------------------------- the helper
@dataclasses.dataclass
class Steps:
    outputs: list[torch.Tensor]
    grads: list[dict[str, torch.Tensor]]  # per step: parameter (or input) gradients
    compiles: list[int]  # Dynamo's unique graphs after each step


def run_steps(
    model: nn.Module,
    batches: list[tuple],
    step: Callable[[Callable, nn.Module, tuple], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    *,
    backend: str | None,
    dynamic: bool | None = None,
    options: dict[str, Any] | None = None,
) -> Steps:
    """``step(runner, model, batch) -> (output, grads)`` over ``batches``, with ``model``
    compiled by ``backend`` (None: eager), counting Dynamo's unique graphs after each
    step."""
    runner: Callable = model
    if backend is not None:
        runner = torch.compile(model, backend=backend, dynamic=dynamic, options=options)
    out = Steps([], [], [])
    for batch in batches:
        o, g = step(runner, model, batch)
        out.outputs.append(o.detach())
        out.grads.append({k: v.detach().clone() for k, v in g.items()})
        out.compiles.append(unique_graphs())
    return out


def dynamic_reports(family: str) -> list[debug.GraphReport]:
    """Reports of graphs with symbolic inputs in which ``family`` matched."""
    return [r for r in ger_inductor.reports() if r.symbolic_inputs and r.match_count(family)]


def _assert_symbolic_rewrite(family: str, patterns: set[str]) -> debug.GraphReport:
    reps = dynamic_reports(family)
    assert reps, [(r.symbolic_inputs, [m.pattern for m in r.matches]) for r in ger_inductor.reports()]
    rep = reps[-1]
    assert patterns <= {m.pattern for m in rep.matches if m.family == family}, rep.table()
    assert rep.guards == [], rep.table()  # valid for every size: no condition added
    assert rep.fallbacks == [], rep.table()
    return rep


# ----------------------------------------------------------------------------- loss + entropy: a small LM
#: the families a test runs, and the patterns each must show on the dynamic graph
#: (the lm-head family adds its entry and a ("loss_entropy", "lm_head") parameter)
LM_FAMILIES = [("loss_entropy",), ("loss_entropy", "lm_head")]
LM_PATTERNS = {"loss_entropy": {"cross_entropy(label_smoothing)", "entropy"}, "lm_head": {"linear+loss"}}


def _lm_batches(shapes, vocab=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for B, T in shapes:
        tokens = torch.randint(0, vocab, (B, T), generator=g)
        targets = torch.randint(0, vocab, (B, T), generator=g)
        if T > 1:
            targets[:, -1] = -100  # padding
        out.append((tokens, targets))
    return out


def _lm_train_step(lr=0.3):
    def step(runner, model, batch):
        model.zero_grad(set_to_none=True)
        loss = runner(*batch)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
        return loss, grads

    return step


def _assert_same_training(a: Steps, b: Steps, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(torch.stack(a.outputs), torch.stack(b.outputs), rtol=rtol, atol=atol)
    for i, (ga, gb) in enumerate(zip(a.grads, b.grads)):
        for name in gb:
            torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-6, msg=f"step {i}: {name}")


def _lm_run(shapes, families, dynamic):
    """demo.TinyLM with F.cross_entropy (label smoothing, ignore_index) minus a
    hand-written entropy bonus, trained with SGD, eager vs ger."""
    torch.manual_seed(0)
    base = TinyLM(vocab=96, d=16, layers=1, entropy_beta=0.05)
    batches = _lm_batches(shapes)
    eager = run_steps(copy.deepcopy(base), batches, _lm_train_step(), backend=None)
    ger = run_steps(copy.deepcopy(base), batches, _lm_train_step(), backend="ger", dynamic=dynamic,
                    options=_options(families))
    _assert_same_training(ger, eager)
    return ger


@pytest.mark.parametrize("families", LM_FAMILIES, ids="+".join)
def test_lm_sequence_length_changes_every_step(families):
    """Automatic dynamic shapes: lengths 37, 64, 91, 128, 200 compile twice (the static
    first graph, then one graph with a symbolic length), the loss rewrite active in the
    dynamic graph, the same numbers as eager throughout. (A length of 1 is Dynamo's own
    specialisation, one more graph with any backend: see the CNN's batch 1.)"""
    ger = _lm_run([(2, 37), (2, 64), (2, 91), (2, 128), (2, 200)], families, dynamic=None)
    assert ger.compiles == [1, 2, 2, 2, 2]
    for family in families:
        rep = _assert_symbolic_rewrite(family, LM_PATTERNS[family])
        assert any(s.startswith("l_tokens_: [2, s") for s in rep.symbolic_inputs), rep.symbolic_inputs
    assert all(r.match_count("loss_entropy") == 2 for r in ger_inductor.reports())


@pytest.mark.parametrize("families", LM_FAMILIES, ids="+".join)
def test_lm_dynamic_true_batch_and_length_one_compile(families):
    """``dynamic=True`` from the first call: batch and length symbolic, a short last
    batch included, ONE graph."""
    ger = _lm_run([(3, 37), (3, 64), (2, 91), (3, 128), (2, 200)], families, dynamic=True)
    assert ger.compiles == [1] * 5
    for family in families:
        _assert_symbolic_rewrite(family, LM_PATTERNS[family])
    assert len(ger_inductor.reports()) == 1  # Dynamo's restarted first attempt left no report


# ----------------------------------------------------------------------------- ger_loss called directly
@pytest.mark.parametrize("profile", ["cpu-avx512", "h100"])
def test_ger_loss_symbolic_rows_and_classes(profile, seed):
    """``ger_loss`` with rows and classes symbolic (``dynamic=True``), one graph, forward
    and backward vs float64: the whole-row reductions (CPU profiles) and the chunked
    split reduction (GPU profiles, lowered here for the CPU), whose chunk count is
    ceil(V / 1024) computed from the symbolic V in the generated code."""
    fn = lambda z, y: ger_loss(z, y, alpha=0.5, beta=0.3, ignore_index=-100)  # noqa: E731
    compiled = torch.compile(fn, backend="ger", dynamic=True, options=_options(device_profile=profile))
    code = None
    for N, V in [(11, 37), (5, 77), (3, 1500)]:
        z = (torch.randn(N, V) * 2).requires_grad_()
        y = torch.randint(0, V, (N,))
        y[1] = -100
        if code is None:
            (out, (g,)), code = _compat.run_and_get_code(lambda: _loss_and_grad(compiled, z, y))
        else:
            out, (g,) = _loss_and_grad(compiled, z, y)
        zd = z.detach().double().requires_grad_()
        ref = ger_loss_reference(zd, y, alpha=0.5, beta=0.3)
        (gd,) = torch.autograd.grad(ref, zd)
        assert _rel(out, ref) <= 1e-5 and _rel(g, gd) <= 1e-5, (N, V)
    assert unique_graphs() == 1
    [strategy] = [p.strategy for p in ger_inductor.last_report().passes if p.name == "loss_entropy"]
    assert strategy["chunk"] == (1024 if profile == "h100" else 0)
    fwd = code[0]
    FileCheck().check("const int64_t ks0").check_not("37L").check_not("11L").run(fwd)
    if profile == "h100":  # the chunk count: ceil(V / 1024) of the symbolic V
        FileCheck().check("1023L + ks").check("1024L").run(fwd)


def _loss_and_grad(fn, z, y):
    out = fn(z, y)
    return out, torch.autograd.grad(out, z)


def test_ger_loss_size_one_inside_the_dynamic_graph(seed):
    """With ``backed_size_oblivious`` Dynamo does not specialise a size of 1: one rows
    and 2 rows run through the same graph, and the lowering is right for both."""
    fn = lambda z, y: ger_loss(z, y, label_smoothing=0.1)  # noqa: E731
    with _compat.size_oblivious_dynamic_shapes():
        compiled = torch.compile(fn, backend="ger", dynamic=True, options=_options())
        for N in (4, 1, 2):
            z = torch.randn(N, 33, requires_grad=True)
            y = torch.randint(0, 33, (N,))
            out, (g,) = _loss_and_grad(compiled, z, y)
            zd = z.detach().double().requires_grad_()
            ref = F.cross_entropy(zd, y, label_smoothing=0.1)
            (gd,) = torch.autograd.grad(ref, zd)
            assert _rel(out, ref) <= 1e-5 and _rel(g, gd) <= 1e-5, N
    assert unique_graphs() == 1


# ----------------------------------------------------------------------------- symbolic vocabulary
def loss_with_class_means(z, y):
    """CE (label smoothing) - 0.1 H + 0.01 * mean over classes of -log p: the mean's
    coefficient 1/V is symbolic when V is."""
    ce = F.cross_entropy(z, y, label_smoothing=0.1)
    lp = z.log_softmax(-1)
    ent = -(lp.exp() * lp).sum(-1).mean()
    smooth = -lp.mean(-1).mean()
    return ce - 0.1 * ent + 0.01 * smooth


def test_symbolic_vocabulary_rewrites_means_over_classes(tmp_path, seed):
    """``mark_dynamic`` on the class dimension: sums and means over the classes have
    coefficients in V (``loss_entropy.VPoly``), evaluated from the run-time V: one graph
    for V = 40, 57, 33, everything rewritten, eager's numbers. The report and the dumps
    show the symbolic sizes; no guard was added."""
    compiled = torch.compile(loss_with_class_means, backend="ger", options=_options(dump_dir=str(tmp_path)))
    for N, V in [(6, 40), (5, 57), (7, 33)]:
        z = (torch.randn(N, V) * 2).requires_grad_()
        y = torch.randint(0, V, (N,))
        torch._dynamo.mark_dynamic(z, 1)
        out, (g,) = _loss_and_grad(compiled, z, y)
        zd = z.detach().double().requires_grad_()
        ref = loss_with_class_means(zd, y)
        (gd,) = torch.autograd.grad(ref, zd)
        assert _rel(out, ref) <= 1e-5 and _rel(g, gd) <= 1e-5, V
    rep = _assert_symbolic_rewrite("loss_entropy", {"cross_entropy(label_smoothing)", "entropy", "sum_log_probs"})
    assert rep.near_misses == []
    # the report and the dumps say what is symbolic
    folder = sorted(glob.glob(os.path.join(str(tmp_path), "graph_*")))[-1]  # rows and classes symbolic
    text = open(os.path.join(folder, "report.txt")).read()
    assert "symbolic  " in text and "l_z_: [s" in text, text
    assert json.load(open(os.path.join(folder, "report.json")))["guards"] == []
    after = open(glob.glob(os.path.join(folder, "*_loss_entropy.py"))[0]).read()
    # the mean over the classes: a row statistic of symbolic length whose coefficient is 1/V
    FileCheck().check("row_stats").check('row_statistic_1: "f32[s').check("('zsum', ('V', ((-1, 1.0),)))").run(after)


# ----------------------------------------------------------------------------- every recognised spelling
def rewrite_only(reports: list, families=("loss_entropy",)):
    """ger's passes, the rewritten graph run eagerly (conftest.rewrite_backend)."""
    return rewrite_backend({"passes": list(families)}, reports=reports)


#: spellings whose constants are computed from V itself (1 / z.shape[-1] inside the
#: graph): with a symbolic V they are graph values, left alone with this reason
NEEDS_STATIC_CLASSES = {
    "kl_uniform_u_p": loss_entropy.SYMBOLIC_SCALAR_REASON,
    "ger_reference_torch": loss_entropy.SYMBOLIC_SCALAR_REASON,
    "kl_uniform_alone": loss_entropy.SYMBOLIC_SCALAR_REASON,
}


@pytest.mark.parametrize("name", list(spellings.RECOGNISED))
def test_every_spelling_with_dynamic_true(name):
    """``dynamic=True``: rows and classes symbolic (unless the user's own code
    specialises them); every recognised spelling is rewritten with eager's numbers,
    except the ones whose constants are computed from a symbolic V (a near-miss)."""
    fn, patterns = spellings.RECOGNISED[name]
    reports: list = []
    compiled = torch.compile(fn, backend=rewrite_only(reports), dynamic=True)
    for N, V in [(24, 40), (10, 57)]:
        g = torch.Generator().manual_seed(N)
        z = (torch.randn(N, V, generator=g) * 2).requires_grad_()
        y = torch.randint(0, V, (N,), generator=g)
        y[::5] = 3
        out, (gz,) = _loss_and_grad(compiled, z, y)
        z2 = z.detach().clone().requires_grad_()
        ref, (g2,) = _loss_and_grad(fn, z2, y)
        torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(gz, g2, rtol=1e-5, atol=1e-6)
    first = reports[0]  # the first graph (a graph break may follow it)
    assert first.guards == []
    if name in NEEDS_STATIC_CLASSES:
        assert NEEDS_STATIC_CLASSES[name] in {n.reason for n in first.near_misses}
    else:
        assert patterns <= {m.pattern for m in first.matches}, first.table()


# ----------------------------------------------------------------------------- a condition on sizes
def nll_and_class_mean(z, y):
    lp = F.log_softmax(z, -1)
    nll = -lp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return 0.9 * nll.mean() - 0.1 * lp.mean(-1).mean()


def test_gather_rows_condition_is_a_guard_in_the_report(seed):
    """gather accepts an index with fewer rows than the logits (rows 0..k-1); the op needs
    one target per row. Without duck sizing the two row counts are different symbols:
    the pass adds the guard ``Eq(rows(y), rows(z))`` through the shape environment and the
    report says so; unequal rows then recompile into a graph where the gather is left
    alone (a near-miss) - eager's numbers in both."""
    with _compat.no_duck_sizing():
        compiled = torch.compile(nll_and_class_mean, backend="ger", dynamic=True, options=_options())
        for N, M in [(6, 6), (9, 9), (8, 4)]:
            z = torch.randn(N, 40, requires_grad=True)
            y = torch.randint(0, 40, (M,))
            out, (g,) = _loss_and_grad(compiled, z, y)
            ref, (g2,) = _loss_and_grad(nll_and_class_mean, z.detach().requires_grad_(), y)
            torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6)
            torch.testing.assert_close(g, g2, rtol=1e-5, atol=1e-6)
    assert unique_graphs() == 2
    first, second = ger_inductor.reports()
    [guard] = first.guards
    assert guard.family == "loss_entropy" and guard.condition.startswith("Eq(s") and guard.why == loss_entropy.GATHER_ROWS_WHY
    assert f"guard     loss_entropy: {guard.condition}" in first.table()
    assert {m.pattern for m in first.matches} == {"target_log_prob", "sum_log_probs"}
    assert second.match_count("loss_entropy") == 0
    assert "gather with an index that is not one target per row" in {n.reason for n in second.near_misses}


# ----------------------------------------------------------------------------- conv -> BN -> activation
#: image sizes and batch sizes that change every step (non-square first, so that
#: duck sizing does not tie H to W), then batch 1
CNN_SHAPES = [(4, 3, 16, 18), (3, 3, 20, 24), (2, 3, 11, 13), (5, 3, 9, 8), (1, 3, 17, 15)]


def _cnn_step(train: bool):
    def step(runner, model, batch):
        (x,) = batch
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(train):
            out = runner(x.to(next(model.parameters()).dtype))
        if train:
            out.square().mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters()} if train else {}
        grads.update({f"buffer:{n}": b for n, b in model.named_buffers() if b.is_floating_point()})
        return out, grads

    return step


@pytest.mark.parametrize("train,dynamic", [(False, None), (False, True), (True, None)],
                         ids=["eval-automatic", "eval-dynamic_true", "train-automatic"])
def test_cnn_varying_image_and_batch_sizes(train, dynamic, seed):
    """demo.SmallCNN (4 conv -> BN -> ReLU blocks) over changing image and batch sizes: at most two compiles
    (one with dynamic=True), fold (eval: oneDNN conv with the fused ReLU) or fused BN+ReLU
    (train) on the dynamic graph, float64-eager numbers (outputs, parameter gradients,
    running statistics). Batch 1 (eval only) is Dynamo's specialisation (one more graph,
    rewritten as well). In training ger keeps Inductor from specialising: no channels_last layout
    optimisation, convolution_backward as its ATen kernel (the report says why).
    (Training with dynamic=True: tests/test_conv_bn_act.py::test_dynamic_shapes_eval_and_train;
    here it took 40 s of the suite for the same claims.)"""
    model = randomize_bn_statistics(SmallCNN(width=4)).train(train)
    # batch 1 in eval only: its specialised graph is Dynamo's, rewritten like the others
    # (a training compile of it cost ~10 s of the suite for the same claim)
    shapes = CNN_SHAPES if not train else CNN_SHAPES[:-1]
    batches = [(torch.randn(s),) for s in shapes]
    ref = run_steps(copy.deepcopy(model).double(), batches, _cnn_step(train), backend=None)
    ger = run_steps(model, batches, _cnn_step(train), backend="ger", dynamic=dynamic, options=_options())
    for i, (a, b) in enumerate(zip(ger.outputs, ref.outputs)):
        assert _rel(a, b) <= FP32_REL, i
    for i, (ga, gb) in enumerate(zip(ger.grads, ref.grads)):
        for name in gb:
            assert _rel(ga[name], gb[name]) <= FP32_REL, (i, name)
    expected = [1, 1, 1, 1, 2] if dynamic else [1, 2, 2, 2, 3]
    assert ger.compiles == expected[: len(shapes)]
    pattern = conv_bn_act.PATTERN_TRAIN if train else conv_bn_act.PATTERN_EVAL
    rep = _assert_symbolic_rewrite("conv_bn_act", {pattern})
    assert rep.match_count("conv_bn_act", pattern) == 4
    if train:
        assert set(rep.dynamic_shapes) == {"layout_optimization", "convolution_backward"}, rep.dynamic_shapes
    else:
        assert {m.detail["conv_impl"] for m in rep.matches} == {"onednn post-op"}
        assert rep.dynamic_shapes == {}


def test_dynamic_true_with_default_options_compiles_not_falls_back(seed):
    """``dynamic=True`` first passes float hyper-parameters (BN's momentum and eps) as
    symbols, and AOTAutograd restarts Dynamo's trace to specialise them. That restart is
    an exception raised through the backend: ger lets it through (before, the default
    non-strict mode took it for a failure and ran the whole graph eagerly). Default
    options, as users run: compiled, rewritten, one report."""
    model = randomize_bn_statistics(SmallCNN(width=4)).eval()
    compiled = torch.compile(model, backend="ger", dynamic=True)
    with torch.no_grad():
        for s in CNN_SHAPES[:3]:
            x = torch.randn(s)
            assert _rel(compiled(x), copy.deepcopy(model).double()(x.double())) <= FP32_REL
    [rep] = ger_inductor.reports()
    assert rep.fallbacks == [] and rep.inductor, rep.table()
    assert rep.match_count("conv_bn_act", conv_bn_act.PATTERN_EVAL) == 4
    assert rep.symbolic_inputs
