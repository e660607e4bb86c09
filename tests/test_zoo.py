"""The model zoo's smoke subset (benchmarks/zoo.py): two unmodified library models, a
timm CNN and a transformers causal LM at small sizes, run eagerly and under
``backend="ger"`` in every zoo mode; ger must rewrite them and give eager's numbers.

The full zoo (times, memory, Inductor and freezing beside ger) is
``python -m benchmarks zoo``; its table is in docs/benchmarks.md.
"""

from __future__ import annotations


import pytest

from benchmarks import zoo_models

try:
    zoo_models.import_torchvision()  # timm and transformers import it when it is there
except ImportError:
    pass
pytest.importorskip("timm")
pytest.importorskip("transformers")

from benchmarks import zoo  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("quiet_ger")]

#: max |ger - eager| / max |eager| over outputs, gradients and BN statistics (fp32); the
#: zoo's own rule compares with Inductor's deviation, which the smoke run does not compile
TOL = 1e-4


def _run(name, modes, backends=("eager", "ger")):
    rows = zoo.run_model(name, modes=modes, backends=list(backends), rounds=1, calls=1, scale=0.25, memory=False,
                         log=lambda s: None)
    assert [r["error"] for r in rows] == [None] * len(rows), rows
    return {r["mode"]: r for r in rows if r["backend"] == "ger"}


def test_cnn_train_step():
    """A train step of timm's ResNet-10-T built with GELU (residual blocks, tiered stem). BN's
    batch statistics at these small sizes amplify rounding (fp32 eager and Inductor are
    both about 4e-3 from each other here), so the oracle is float64: ger's distance from
    the float64 step is within 4x eager fp32's own (or 1e-5)."""
    import copy

    import torch

    import ger_inductor

    zm = zoo_models.MODELS["timm_resnet10t_gelu"]
    torch.manual_seed(0)
    base = zm.build(0.25)
    g = torch.Generator().manual_seed(0)
    inputs = zm.inputs(base, 0.25, g)
    with torch.no_grad():
        shape = base.eval()(inputs["x"]).shape
    gout = torch.randn(shape, generator=g)

    def state(model, backend, dtype):
        r = zoo._Runner(zm, copy.deepcopy(model).to(dtype), "train", backend,
                        {"x": inputs["x"].to(dtype)}, gout.to(dtype))
        return r.state(r.step())

    ref64 = state(base, "eager", torch.float64)
    eager = state(base, "eager", torch.float32)
    ger_inductor.clear_reports()
    got = state(base, "ger", torch.float32)
    d_eager, d_ger = zoo._deviation(eager, ref64), zoo._deviation(got, ref64)
    assert d_ger <= max(4 * d_eager, 1e-5), (d_ger, d_eager)
    summary = zoo._ger_summary(ger_inductor.reports())
    fused = sum(n for k, n in summary["matches"].items() if k.startswith("conv_bn_act/") and k.endswith(".train"))
    assert fused >= 12, summary  # resnet10t has 14 conv -> BN pairs
    assert not summary["fallbacks"], summary["fallbacks"]


def test_causal_lm_labels_and_label_smoother():
    got = _run("llama", ["train_labels", "train_outside"])
    for mode in ("train_labels", "train_outside"):
        assert got[mode]["deviation"] <= TOL, (mode, got[mode]["deviation"])
        assert not got[mode]["ger"]["fallbacks"], got[mode]["ger"]["fallbacks"]
    # transformers' LabelSmoother on the logits: the head is fused, its gradients formed
    # in the forward (the per-token masked_fill_ is copied, not a reason to recompute)
    assert got["train_outside"]["ger"]["matches"].get("lm_head/linear+loss") == 1, got["train_outside"]["ger"]
