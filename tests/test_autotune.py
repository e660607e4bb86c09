"""Measured strategy selection (ger_inductor/autotune.py, the lm head's ``_selected``):
the store, the decision rule, the report, and that a decision decides the graph.

One test measures for real (two small Inductor compiles); the others give the decision
through the store, so what they check does not depend on this machine's load.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F

import ger_inductor
from ger_inductor import autotune
from ger_inductor.__main__ import main as cli
from ger_inductor.options import GerOptions

from .conftest import rewrite_backend

# a site just above the CPU profile's autotune floor (16 MiB of fp32 logits)
N, H, V = 256, 64, 16384


class Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(H, H)
        self.head = torch.nn.Linear(H, V, bias=False)

    def forward(self, x, y):
        return F.cross_entropy(self.head(torch.tanh(self.proj(x))), y, label_smoothing=0.1)


def _inputs(seed=0, rows=N):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, H, generator=g), torch.randint(0, V, (rows,), generator=g)


@pytest.fixture
def store(tmp_path):
    autotune._memo.clear()
    yield str(tmp_path / "decisions.json")
    autotune._memo.clear()


def _timing(ms):
    return autotune.Timing(ms, ms * 0.95, ms * 1.05, 5)


# ----------------------------------------------------------------------------- rule and store
def test_choose_the_faster_form_and_the_leaner_on_a_tie():
    assert autotune.choose(_timing(100.0), _timing(100.0)) == "ger"
    assert autotune.choose(_timing(102.9), _timing(100.0)) == "ger"  # a tie within 3 %: the leaner form
    assert autotune.choose(_timing(103.5), _timing(100.0)) == "inductor"
    assert autotune.choose(_timing(50.0), _timing(100.0)) == "ger"
    # where the fused form is not the leaner (one chunk holds all rows), a tie goes to Inductor's
    assert autotune.choose(_timing(100.0), _timing(100.0), fused_leaner=False) == "inductor"
    assert autotune.choose(_timing(97.5), _timing(100.0), fused_leaner=False) == "inductor"
    assert autotune.choose(_timing(96.0), _timing(100.0), fused_leaner=False) == "ger"


def test_a_heavier_fused_form_is_never_kept():
    """Where both peaks are measured (whole graphs), a faster but heavier ger form loses."""
    fast_heavy = autotune.Timing(8.0, 7.5, 8.5, 5, peak_mib=120.0)
    slow_lean = autotune.Timing(10.0, 9.5, 10.5, 5, peak_mib=100.0)
    assert autotune.heavier(fast_heavy, slow_lean)
    assert autotune.choose(fast_heavy, slow_lean, fused_leaner=False) == "inductor"
    assert autotune.choose(fast_heavy, slow_lean, fused_leaner=True) == "inductor"
    within = dataclasses.replace(fast_heavy, peak_mib=105.5)  # 5 % + 1 MiB of slack
    assert not autotune.heavier(within, slow_lean) and autotune.choose(within, slow_lean, fused_leaner=False) == "ger"
    unknown = dataclasses.replace(fast_heavy, peak_mib=None)
    assert autotune.choose(unknown, slow_lean, fused_leaner=False) == "ger"


def test_timing_stops_early_only_when_the_forms_are_far_apart(monkeypatch):
    """After MIN_ROUNDS rounds a measurement stops where every call of one form beat every
    call of the other and the medians are more than DECIDED_GAP apart; near a tie, or with
    overlapping samples, it runs all its rounds."""
    def run(times: dict) -> dict:
        calls = {n: 0 for n in times}

        def fake_time_step(step, device, warmup, repeat):
            name = step()
            calls[name] += 1
            seq = times[name]
            return [seq[(calls[name] - 1) % len(seq)]] * repeat

        monkeypatch.setattr(autotune, "time_step", fake_time_step)
        got = autotune.time_forms({n: (lambda n=n: n) for n in times}, torch.device("cpu"), rounds=5)
        return {n: t.calls for n, t in got.items()}, calls

    far = {"ger": [100.0], "inductor": [120.0]}  # 17 % apart, no overlap
    counts, calls = run(far)
    # one call per round (each step longer than ROUND_SECONDS): the estimating call is the first round
    assert calls == {"ger": autotune.MIN_ROUNDS, "inductor": autotune.MIN_ROUNDS}
    assert counts == {"ger": autotune.MIN_ROUNDS, "inductor": autotune.MIN_ROUNDS}
    tie = {"ger": [100.0], "inductor": [104.0]}  # within the gap: every round
    _, calls = run(tie)
    assert calls == {"ger": 5, "inductor": 5}
    overlap = {"ger": [100.0, 100.0, 130.0], "inductor": [120.0]}  # far medians, overlapping samples
    _, calls = run(overlap)
    assert calls == {"ger": 5, "inductor": 5}
    fast = {"ger": [10.0], "inductor": [12.0]}  # several calls per round: the estimate is not a sample
    counts, calls = run(fast)
    assert calls == {"ger": 1 + autotune.MIN_ROUNDS, "inductor": 1 + autotune.MIN_ROUNDS}
    assert counts == {"ger": 5 * autotune.MIN_ROUNDS, "inductor": 4 * autotune.MIN_ROUNDS}


def test_peak_alloc_bytes_sees_the_allocations_of_one_call():
    from ger_inductor.measure import peak_alloc_bytes

    def step():
        a = torch.empty(4_000_000)  # 16 MB
        b = torch.empty(2_000_000)  # 8 MB, both live
        del a
        c = torch.empty(1_000_000)
        return b, c

    peak = peak_alloc_bytes(step, torch.device("cpu"))
    assert 24_000_000 <= peak < 25_000_000


def test_decide_measures_once_then_serves_memo_and_store(store):
    calls = []

    def measure():
        calls.append(1)
        return _timing(90.0), _timing(100.0)

    d1 = autotune.decide("lm_head", "k1", measure, store)
    assert (d1.choice, d1.source, len(calls)) == ("ger", "measured", 1)
    assert d1.seconds > 0
    d2 = autotune.decide("lm_head", "k1", measure, store)
    assert (d2.source, d2.seconds, len(calls)) == ("memo", 0.0, 1)
    autotune._memo.clear()  # a new process: the store answers
    d3 = autotune.decide("lm_head", "k1", measure, store)
    assert (d3.source, d3.choice, len(calls)) == ("stored", "ger", 1)
    assert d3.ger == d1.ger and d3.inductor == d1.inductor


def test_a_failed_measurement_raises_and_stores_nothing(store):
    def measure():
        raise RuntimeError("no")

    with pytest.raises(RuntimeError, match="no"):
        autotune.decide("lm_head", "k", measure, store)
    assert autotune.load(store) == {}


def test_store_of_another_format_is_ignored_and_bad_imports_raise(store, tmp_path):
    with open(store, "w") as f:
        json.dump({"format": autotune.FORMAT + 1, "decisions": {"k": {"choice": "ger"}}}, f)
    assert autotune.load(store) == {}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a ger decision export"):
        autotune.import_decisions(str(bad), store)
    bad.write_text(json.dumps({"format": autotune.FORMAT, "decisions": {"k": {"choice": "maybe"}}}))
    with pytest.raises(ValueError, match="is not a decision"):
        autotune.import_decisions(str(bad), store)


def test_export_import_round_trip_and_cli(store, tmp_path, capsys):
    autotune.decide("lm_head", "k1", lambda: (_timing(120.0), _timing(100.0)), store)
    out = tmp_path / "fleet.json"
    assert cli(["decisions", "export", str(out), "--store", store]) == 0
    other = str(tmp_path / "other.json")
    assert cli(["decisions", "import", str(out), "--store", other]) == 0
    assert autotune.load(other) == autotune.load(store)
    assert cli(["decisions", "list", "--store", other]) == 0
    assert "-> inductor: ger 120 ms" in capsys.readouterr().out
    assert ger_inductor.decisions(other)[0]["choice"] == "inductor"
    assert cli(["decisions", "clear", "--store", other]) == 0
    assert autotune.load(other) == {}
    # a missing or foreign file: one line naming it, no traceback
    with pytest.raises(SystemExit, match=r"decisions import: .*No such file.*missing\.json"):
        cli(["decisions", "import", str(tmp_path / "missing.json"), "--store", other])
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(SystemExit, match="decisions import: .*not a ger decision export"):
        cli(["decisions", "import", str(tmp_path / "bad.json"), "--store", other])


def test_key_names_device_kind_torch_version_and_site():
    from ger_inductor import fleet

    a = autotune.site_key("lm_head", fleet.PINNED_PROFILES["h100"], {"V": 1})
    b = autotune.site_key("lm_head", fleet.PINNED_PROFILES["mi300x"], {"V": 1})
    c = autotune.site_key("lm_head", fleet.PINNED_PROFILES["h100"], {"V": 2})
    assert len({a, b, c}) == 3
    k = json.loads(a)
    assert (k["profile"], k["arch"], k["torch"]) == ("h100", "sm90", torch.__version__)


def test_options(monkeypatch):
    monkeypatch.setenv("GER_AUTOTUNE", "0")  # as conftest sets it for the suite
    assert GerOptions.parse({}).autotune is False
    assert GerOptions.parse({"autotune": True}).autotune is True
    with pytest.raises(TypeError, match="'autotune' must be a bool"):
        GerOptions.parse({"autotune": 1})
    with pytest.raises(TypeError, match="autotune_store"):
        GerOptions.parse({"autotune_store": 3})
    assert "autotune_store" not in GerOptions.parse({"autotune_store": "/tmp/x.json"}).cache_key()


def test_env_turns_the_default_off(monkeypatch):
    monkeypatch.setenv("GER_AUTOTUNE", "1")
    assert GerOptions.parse({}).autotune is True
    monkeypatch.setenv("GER_AUTOTUNE", "off")
    assert GerOptions.parse({}).autotune is False


# ----------------------------------------------------------------------------- the lm head site
def _rewrite(model, store, rows=N, backward=True, **options):
    """Compile with ger's passes only (rewrite_backend), autotune on; one call (and its backward)."""
    reports = []
    f = torch.compile(model, backend=rewrite_backend({"autotune": True, "autotune_store": store, **options},
                                                     reports=reports))
    x, y = _inputs(rows=max(rows, N))
    loss = f(x[:rows], y[:rows])
    if backward and loss.requires_grad:
        loss.backward()
    return reports[-1], loss


def _eager(model):
    x, y = _inputs()
    model.zero_grad()
    loss = model(x, y)
    loss.backward()
    return loss, model.head.weight.grad.clone()


def test_measured_site_decides_the_graph_and_keeps_eager_numbers(store):
    """The one real measurement: two small Inductor compiles, timed both ways. Whatever
    it chooses, the report carries both timings, the graph follows the choice, the
    numbers are eager's; flipping the stored choice flips the graph."""
    torch.manual_seed(0)
    model = Head()
    ref, ref_g = _eager(model)
    model.zero_grad()
    report, loss = _rewrite(model, store)
    assert len(report.decisions) == 1
    d = report.decisions[0]
    assert d["source"] == "measured" and d["ger"]["median_ms"] > 0 and d["inductor"]["median_ms"] > 0
    assert report.autotune_seconds > 0
    fused = report.match_count("lm_head") == 1
    assert fused == (d["choice"] == "ger")
    if not fused:
        assert any("measured on" in m.reason and "-> inductor" in m.reason for m in report.near_misses)
    assert "selected  lm_head" in report.table()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(model.head.weight.grad, ref_g)

    # the other choice, through the store (as an imported fleet decision would give it)
    entries = autotune.load(store)
    (key, entry), = entries.items()
    entry["choice"] = "inductor" if fused else "ger"
    autotune.save(store, {key: entry})
    autotune._memo.clear()
    torch._dynamo.reset()
    model.zero_grad()
    report2, loss2 = _rewrite(model, store)
    assert report2.decisions[0]["source"] == "stored" and report2.autotune_seconds == 0
    assert (report2.match_count("lm_head") == 1) == (not fused)
    torch.testing.assert_close(loss2, ref)
    torch.testing.assert_close(model.head.weight.grad, ref_g)


def test_forced_small_and_off_sites_are_not_measured(store, monkeypatch):
    from ger_inductor.passes import lm_head

    def boom(*a, **k):
        raise AssertionError("measured")

    monkeypatch.setattr(lm_head, "_measure", boom)
    torch.manual_seed(0)
    model = Head()
    report, _ = _rewrite(model, store, lm_head_chunk=64)  # forced: no measurement
    assert report.match_count("lm_head") == 1 and report.decisions == []
    torch._dynamo.reset()
    report, _ = _rewrite(model, store, autotune=False)  # the prior: V >= min_vocab fuses
    assert report.match_count("lm_head") == 1 and report.decisions == []
    torch._dynamo.reset()
    report, _ = _rewrite(model, store, rows=8)  # 8 x 16384 fp32 logits: below the 16 MiB floor
    assert report.match_count("lm_head") == 1 and report.decisions == []
    assert report.passes[-1].strategy["selection"] == "prior (below the profile's autotune_min_mib)"
    torch._dynamo.reset()
    monkeypatch.setattr(autotune, "fits", lambda device, nbytes: False)
    report, _ = _rewrite(model, store)  # a measurement must not run the model out of memory
    assert report.match_count("lm_head") == 1 and report.decisions == []
    assert report.passes[-1].strategy["selection"] == "prior (the unfused form would not fit in free memory)"


def test_failed_measurement_leaves_the_prior_in_charge_and_strict_raises(store, monkeypatch):
    from ger_inductor.passes import lm_head

    def boom(*a, **k):
        raise RuntimeError("measurement exploded")

    monkeypatch.setattr(lm_head, "_measure", boom)
    torch.manual_seed(0)
    model = Head()
    rep, _ = _rewrite(model, store, strict=False)
    assert rep.match_count("lm_head") == 1  # the prior fuses V=16384
    assert any(fb.stage == "autotune" and "measurement exploded" in (fb.message or "") for fb in rep.fallbacks)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="measurement exploded"):
        _rewrite(model, store)  # rewrite_backend is strict


class HeadNone(Head):
    def forward(self, x, y):  # per-token losses returned: the backward sweeps again
        return F.cross_entropy(self.head(torch.tanh(self.proj(x))), y, reduction="none")


class HeadLogits(Head):
    def forward(self, x, y):  # the logits returned beside the loss: the fused op writes them
        z = self.head(torch.tanh(self.proj(x)))
        return F.cross_entropy(z, y), z


@pytest.mark.parametrize("model_cls, grad, mode", [(Head, True, "in_forward"), (HeadNone, True, "recompute"),
                                                   (Head, False, "no_grad"), (HeadLogits, True, "in_forward")])
def test_measured_forms_compute_the_same_values(store, monkeypatch, model_cls, grad, mode):
    """The two graphs a measurement compiles, without compiling them: the unfused one
    holds the head and the statistics, the fused one the op, in the site's gradient mode,
    and on the same random inputs they give the same values."""
    from ger_inductor import lm_head as lm_fns

    seen = {}

    def fake_compile_and_time(forms, device, patches):
        seen.update(forms)
        return {"ger": _timing(1.0), "inductor": _timing(2.0)}

    monkeypatch.setattr(autotune, "compile_and_time", fake_compile_and_time)
    torch.manual_seed(0)
    model = model_cls()
    with torch.set_grad_enabled(grad):
        report, _ = _rewrite(model, store, backward=False)
    assert report.decisions[0]["choice"] == "ger" and report.match_count("lm_head") == 1
    assert report.matches[-1].detail["gradients"] == mode
    fused, inputs, finish, wrap = seen["ger"]
    unfused, inputs2, _, no_wrap = seen["inductor"]
    assert inputs is inputs2 and no_wrap is None
    # returned logits: the fused graph returns them detached, the backend's wrapper
    # attaches their gradient (what the measurement times too)
    assert (wrap is not None) == (model_cls is HeadLogits)
    targets = lambda gm: {n.target for n in gm.graph.nodes if n.op == "call_function"}  # noqa: E731
    assert lm_fns.linear_row_stats in targets(fused) and F.linear not in targets(fused)
    assert F.linear in targets(unfused) and lm_fns.linear_row_stats not in targets(unfused)
    with torch.set_grad_enabled(grad):
        a, b = (wrap or (lambda f: f))(fused)(*inputs), unfused(*inputs)
        torch.testing.assert_close(a, b)
        finish(b)  # the step's backward (none without gradients) runs on the unfused form's output



@pytest.mark.parametrize("rows, slower", [(N, 1), (2 * N, 1), (2 * N, 2)])
def test_returned_logits_try_lean_chunks_then_larger_ones(store, monkeypatch, rows, slower):
    """Logits returned: the lean chunking (a quarter of the rows, at least 128) is
    measured first; where it is slower, half of the rows per chunk, then the largest
    chunk the memory rule allows (equal chunkings once): the first that is not slower
    is kept. Each chunking is a decision of its own. (``slower``: how many of the
    forms measure slower.)"""
    calls = []

    def fake_compile_and_time(forms, device, patches):
        calls.append(forms)
        ger = 130.0 if len(calls) <= slower else 100.0  # slower, then a tie
        return {"ger": _timing(ger), "inductor": _timing(100.0)}

    monkeypatch.setattr(autotune, "compile_and_time", fake_compile_and_time)
    torch.manual_seed(0)
    report, _ = _rewrite(HeadLogits(), store, rows=rows, backward=False)
    chunkings = [rows // c for c in ([2, 1] if rows == N else [4, 2, 1])]  # 128 rows at least
    assert len(calls) == slower + 1
    assert [d["choice"] for d in report.decisions] == ["inductor"] * slower + ["ger"]
    keys = [json.loads(d["key"])["site"] for d in report.decisions]
    assert [rows // k["chunks"] for k in keys] == chunkings[:slower + 1] and all(k["returned"] for k in keys)
    assert report.match_count("lm_head") == 1 and report.matches[-1].detail["chunk"] == chunkings[slower]


# ----------------------------------------------------------------------------- whole inference graphs (conv eval)
class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
        self.c2, self.b2 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))).mean((2, 3))


def _conv_net():
    torch.manual_seed(0)
    m = ConvNet()
    for bn in (m.b1, m.b2):  # running statistics that are not the defaults
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _compile_conv(model, store, x, **opts):
    torch._dynamo.reset()
    ger_inductor.clear_reports()
    fn = torch.compile(model, backend="ger", options={"strict": True, "autotune": True, "autotune_store": store,
                                                      **opts})
    with torch.no_grad():
        out = fn(x)
    return ger_inductor.last_report(), out


def test_inference_graph_is_timed_whole_and_follows_the_choice(store):
    """A conv eval graph under no_grad is compiled and timed with and without ger's conv
    rewrites (two Inductor compiles); the chosen form's compiled code runs, with eager's
    numbers; the stored decision is served next time; flipping it flips the graph."""
    model = _conv_net()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    rep, out = _compile_conv(model, store, x)
    (d,) = rep.decisions
    assert d["family"] == "graph" and d["source"] == "measured" and rep.autotune_seconds > 0
    assert d["ger"]["median_ms"] > 0 and d["inductor"]["median_ms"] > 0
    assert d["ger"]["peak_mib"] > 0 and d["inductor"]["peak_mib"] > 0  # the output at least
    kept = d["choice"] == "ger"
    assert rep.match_count("conv_bn_act") == (2 if kept else 0)
    assert [i["kind"] for i in rep.inductor] == ["inference"]  # the kept form's code only
    if not kept:
        assert len([m for m in rep.near_misses if "the whole graph" in m.reason and "-> inductor" in m.reason]) == 2
    torch.testing.assert_close(out, ref)

    autotune._memo.clear()  # a new process: the store answers, nothing is measured
    rep2, out2 = _compile_conv(model, store, x)
    assert rep2.decisions[0]["source"] == "stored" and rep2.autotune_seconds == 0
    assert rep2.match_count("conv_bn_act") == rep.match_count("conv_bn_act")
    torch.testing.assert_close(out2, ref)

    entries = autotune.load(store)
    (key, entry), = entries.items()
    assert json.loads(key)["family"] == "graph"
    entry["choice"] = "inductor" if kept else "ger"
    autotune.save(store, {key: entry})
    autotune._memo.clear()
    rep3, out3 = _compile_conv(model, store, x)
    assert rep3.match_count("conv_bn_act") == (0 if kept else 2)
    assert rep3.passes[0].strategy["graph_selection"] == f"the whole graph, stored: {entry['choice']}"
    torch.testing.assert_close(out3, ref)


def _scope(model, *xs, grad: bool, **opts):
    from ger_inductor import passes
    from ger_inductor.backend import rewrite

    seen = []

    def backend(gm, example_inputs):
        settings = GerOptions.parse({"strict": True, **opts})
        gm, report = rewrite(gm, example_inputs, settings)
        seen.append(passes.graph_selection_scope(gm, example_inputs, settings, report))
        return gm.forward

    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        torch.compile(model, backend=backend)(*xs)
    return seen


def test_whole_graph_selection_scope():
    """Measured whole: inference graphs whose only rewrites are conv eval ones. Not
    measured (the rewrites stay, with the reason): a gradient may be asked for, autotune
    off, another compiler, another family's rewrites; nothing to decide without a conv
    eval rewrite."""
    model = _conv_net()
    x = torch.randn(2, 3, 8, 8)
    assert _scope(model, x, grad=False, autotune=True) == [""]
    assert _scope(model, x, grad=True, autotune=True) == [""]  # a backward is timed too
    assert _scope(copy.deepcopy(model).train(), x, grad=True, autotune=True) == [""]  # running stats: on twins
    assert _scope(model, x, grad=False, autotune=False) == ["autotune is off"]
    assert _scope(model, x, grad=False, autotune=True, compiler="aot_eager") == ["not compiled by Inductor"]

    class WithLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _conv_net()

        def forward(self, x, y):
            return F.cross_entropy(self.net(x), y, label_smoothing=0.1)

    with_loss, y = WithLoss().eval(), torch.zeros(2, dtype=torch.long)
    (seen,) = _scope(lambda x: with_loss(x, y), x, grad=False, autotune=True)
    assert seen.startswith("the graph also holds") and "loss_entropy" in seen, seen
    assert _scope(torch.nn.Linear(8, 8), torch.randn(2, 8), grad=False, autotune=True) == [None]

    def writes_intermediates(x):  # in-place ops on the graph's own tensors: measured
        h = torch.relu_(model.c1(x) * 1.0)
        return model.b2(model.c2(model.b1(h))).add_(1.0)

    assert _scope(writes_intermediates, x, grad=False, autotune=True) == [""]

    def writes_its_input(x):  # the timing calls write the input's twin
        x.mul_(2.0)
        return model(x)

    assert _scope(writes_its_input, x.clone(), grad=False, autotune=True) == [""]

    def two_views(x, x2):
        return model(x) + model(x2)

    base = torch.randn(4, 3, 8, 8)
    assert _scope(two_views, base[:2], base[2:], grad=False, autotune=True) == [
        "inputs that share storage (their twins for the timing calls would not)"]


def test_failed_graph_measurement_keeps_the_rewrites_and_strict_raises(store, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("graph measurement exploded")

    monkeypatch.setattr(autotune, "compile_and_time_graphs", boom)
    model = _conv_net()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    rep, out = _compile_conv(model, store, x, strict=False)
    assert rep.match_count("conv_bn_act") == 2 and rep.decisions == []
    assert any(fb.stage == "autotune" and "graph measurement exploded" in (fb.message or "") for fb in rep.fallbacks)
    torch.testing.assert_close(out, ref)
    with pytest.raises(Exception, match="graph measurement exploded"):
        _compile_conv(model, store, x)


def test_whole_graph_measurement_leaves_the_random_stream_alone(store):
    """The timing calls run the graph several times; a graph that draws random numbers
    must not advance the user's generator: after the first call, the global stream is
    where the unmeasured compile (autotune=False) leaves it."""
    model = _conv_net()

    def noisy(x):
        return model(x + 0.01 * torch.randn_like(x))

    x = torch.randn(2, 3, 8, 8)
    after = []
    for opts in ({"autotune": True, "autotune_store": store}, {"autotune": False}):
        torch._dynamo.reset()
        ger_inductor.clear_reports()
        fn = torch.compile(noisy, backend="ger", options={"strict": True, **opts})
        torch.manual_seed(123)
        with torch.no_grad():
            fn(x)
        after.append(torch.rand(4))
        if opts["autotune"]:
            assert ger_inductor.last_report().decisions[0]["source"] == "measured"
    torch.testing.assert_close(after[0], after[1], rtol=0, atol=0)


def test_training_graph_is_timed_whole_on_twins(store):
    """A train-mode conv graph is timed with its backward; the timing calls run on twins
    of the inputs, so the module's running statistics and gradients are those of ONE
    eager step, whatever the choice."""
    model = _conv_net().train()
    ref_model = copy.deepcopy(model)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    ref_model(x).sum().backward()
    torch._dynamo.reset()
    ger_inductor.clear_reports()
    fn = torch.compile(model, backend="ger", options={"strict": True, "autotune": True, "autotune_store": store})
    fn(x).sum().backward()
    rep = ger_inductor.last_report()
    (d,) = rep.decisions
    assert d["family"] == "graph" and d["source"] == "measured"
    assert rep.match_count("conv_bn_act") == (2 if d["choice"] == "ger" else 0)
    assert sorted(i["kind"] for i in rep.inductor) == ["backward", "forward"]
    for (name, got), (_, ref) in zip(model.named_buffers(), ref_model.named_buffers()):
        torch.testing.assert_close(got, ref, msg=name)  # num_batches_tracked == 1: one step
    for (name, got), (_, ref) in zip(model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(got.grad, ref.grad, msg=name)


def test_measured_graph_that_writes_its_input_writes_it_once(store):
    """The timing calls write the input's twin: after the compiled call the user's input
    was written once, as eager writes it, and the output is eager's."""
    model = _conv_net()

    def scale_then_net(x):
        x.mul_(2.0)
        return model(x)

    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    x_eager = x.clone()
    with torch.no_grad():
        ref = scale_then_net(x_eager)
    rep, out = _compile_conv(scale_then_net, store, x)
    assert rep.decisions and rep.decisions[0]["source"] == "measured"
    torch.testing.assert_close(x, x_eager, rtol=0, atol=0)
    torch.testing.assert_close(out, ref)


def test_written_inputs_are_copied_the_others_read_in_place():
    """The timing calls copy only the inputs a form may write (one set shared by both
    forms): a train BN's running statistics and an input written in place, not an eval
    net's weights; an input whose elements overlap (a stride-0 expand) is copied as the
    memory it spans, viewed alike."""
    from ger_inductor import passes

    def written(model, *xs, train=False):
        seen = []

        def backend(gm, example_inputs):
            names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
            seen.append(sorted(names[i] for i in passes.written_inputs([gm])))
            return gm.forward

        torch._dynamo.reset()
        torch.compile(model, backend=backend)(*xs)
        return seen[0]

    x = torch.randn(2, 3, 8, 8)
    assert written(_conv_net(), x) == []  # eval: nothing is written
    w = written(_conv_net().train(), x)
    assert len(w) == 6 and all("running" in n or "num_batches" in n for n in w), w  # two BNs x 3 buffers

    def scale(x):
        x.mul_(2.0)
        return x.sum()

    assert written(scale, x.clone()) == ["l_x_"]
    y = torch.randn(1, 3, 4, 4).expand(5, 3, 4, 4)[1:]
    t = autotune._twin(y)
    assert t.shape == y.shape and t.stride() == y.stride() and t.untyped_storage().data_ptr() != y.untyped_storage().data_ptr()
    torch.testing.assert_close(t, y, rtol=0, atol=0)
    p = torch.nn.Parameter(torch.randn(3))
    a = autotune._alias(p)
    assert a.data_ptr() == p.data_ptr() and a.requires_grad and a.is_leaf and a is not p
    assert autotune.twin_bytes([x, p, 3], {1}) == 12


def test_expanded_input_is_measured_with_eager_numbers(store):
    """A stride-0 input (``expand``) of a measured graph: the timing calls get a copy
    of the memory it spans (a copy into an empty_strided twin raised, which strict turned
    into a compile error where eager runs)."""
    model = _conv_net()
    x = torch.randn(1, 3, 8, 8).expand(3, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    rep, out = _compile_conv(model, store, x)
    assert rep.decisions and rep.decisions[0]["source"] == "measured"
    torch.testing.assert_close(out, ref)


def test_a_users_profiler_session_is_left_alone(store):
    """Under the user's torch.profiler (CPU), a graph with no stored decision is not
    measured (measuring memory would start and stop a profiler of ours, ending the
    user's session; the timing calls would join the profile): the prior, with the reason,
    and the user's profile keeps its events."""
    from torch.profiler import ProfilerActivity, profile

    model = _conv_net()
    x = torch.randn(2, 3, 8, 8)
    torch._dynamo.reset()
    ger_inductor.clear_reports()
    fn = torch.compile(model, backend="ger", options={"strict": True, "autotune": True, "autotune_store": store})
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, torch.no_grad():
        out = fn(x)
    rep = ger_inductor.last_report()
    assert not rep.decisions and autotune.load(store) == {}
    assert rep.passes[0].strategy["graph_selection"].startswith("prior (a profiler is recording"), rep.passes[0].strategy
    assert any(e.key.startswith("aten::") for e in prof.key_averages())
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))


def test_graph_key_tells_compile_contexts_apart(store, monkeypatch):
    """The whole-graph key holds what else shapes the compiled code: the mode's Inductor
    settings, the autocast state, the thread count. Each context measures its own."""
    calls = []

    def fake(forms, example_inputs, device, compile_fn, on_call=lambda n: None, written=None):
        calls.append(written)
        return {"ger": _timing(1.0), "inductor": _timing(2.0)}, {}

    monkeypatch.setattr(autotune, "compile_and_time_graphs", fake)
    model = _conv_net()
    x = torch.randn(2, 3, 8, 8)
    keys = []

    # (torch.compile takes a mode or options, not both: the mode's run takes the env's)
    monkeypatch.setenv(autotune.STORE_ENV, store)
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "1")

    def run(mode=None):
        torch._dynamo.reset()
        ger_inductor.clear_reports()
        fn = (torch.compile(model, backend="ger", mode=mode) if mode else
              torch.compile(model, backend="ger", options={"strict": True, "autotune": True}))
        with torch.no_grad():
            fn(x)
        (d,) = ger_inductor.last_report().decisions
        keys.append(d["key"])
        return d["source"]

    assert run() == "measured"
    assert run() == "memo"
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1) if threads > 1 else 2)
    try:
        assert run() == "measured"
    finally:
        torch.set_num_threads(threads)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert run() == "measured"
    assert run(mode="max-autotune-no-cudagraphs") == "measured"
    assert len(set(keys)) == 4 and calls == [set()] * 4  # an eval graph: no input is copied
    ctx = autotune.compile_context({"max_autotune": True, "post_grad_custom_post_pass": lambda g: None})
    assert ctx["config"] == {"max_autotune": "True"} and ctx["threads"] == torch.get_num_threads()


def test_malformed_stored_entries_are_measured_afresh_and_refused_on_import(store, tmp_path):
    """A stored entry whose timings are not numbers (a hand-edited or foreign store) is
    ignored (measured afresh), never served; an export holding one is refused whole."""
    good = autotune.decide("graph", "k", lambda: (_timing(1.0), _timing(2.0)), store)
    entries = autotune.load(store)
    for bad in ("fast", None, float("nan"), -1.0):
        entries["k"]["ger"]["median_ms"] = bad
        autotune.save(store, {"k": entries["k"]})
        autotune._memo.clear()
        d = autotune.decide("graph", "k", lambda: (_timing(3.0), _timing(2.0)), store)
        assert d.source == "measured" and d.choice == "inductor", bad
    assert good.choice == "ger"
    entries = autotune.load(store)
    entries["k"]["inductor"]["calls"] = "many"
    path = tmp_path / "export.json"
    path.write_text(json.dumps({"format": autotune.FORMAT, "decisions": entries}))
    with pytest.raises(ValueError, match="entry 'k' is not a decision"):
        autotune.import_decisions(str(path), str(tmp_path / "other.json"))
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    assert autotune.load(str(deep)) == {}
    assert autotune.store_path("rel/decisions.json") == os.path.abspath("rel/decisions.json")


def test_timing_backwards_are_not_captured_by_compiled_autograd(store, monkeypatch):
    """With compiled autograd on and the backward inside the compiled step, the
    measurement's timing backwards run autograd's own engine: one capture, the user's,
    as with the selection off (before: two captures and three more graphs compiled)."""
    import torch._dynamo.config as dconfig
    from torch._dynamo.utils import counters

    monkeypatch.setattr(dconfig, "compiled_autograd", True)
    model = _conv_net().train()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    ref(x).sum().backward()
    torch._dynamo.reset()
    ger_inductor.clear_reports()
    counters.clear()

    @torch.compile(backend="ger", options={"autotune": True, "autotune_store": store})
    def step(x):
        loss = model(x).sum()
        loss.backward()
        return loss

    step(x)
    assert [d["source"] for r in ger_inductor.reports() for d in r.decisions] == ["measured"]
    assert counters["compiled_autograd"]["captures"] == 1, dict(counters["compiled_autograd"])
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=name)


def test_graph_key_tells_grad_modes_and_requires_grad_apart():
    """The same graph code compiles to an inference graph or to a forward and a
    backward: a decision for one must not serve the other (the conv harness's
    grad-enabled eval once took the no_grad graph's decision)."""
    x, w = torch.randn(2, 3), torch.randn(3, 3)
    key = lambda *inputs: autotune.graph_shape_class("code", list(inputs), "{}", "src")  # noqa: E731
    with torch.no_grad():
        no_grad = key(x, w)
    assert key(x, w) != no_grad  # grad mode on
    assert key(x, w.requires_grad_()) != key(x, w.detach())
    assert key(x, w.detach()) == key(x.clone(), w.detach().clone())  # values do not matter


class HeadPPO(Head):
    def forward(self, x, y):  # a PPO objective at a temperature: gradients in the forward, per-chunk coefficients
        lp = F.log_softmax(self.head(torch.tanh(self.proj(x))) / 0.9, -1)
        logp = lp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        adv = torch.sin(y.float())
        ratio = torch.exp(logp + 9.0)
        pg = -torch.minimum(ratio * adv, torch.clamp(ratio, 0.8, 1.2) * adv)
        return (pg - 0.01 * -(lp.exp() * lp).sum(-1)).mean()


@pytest.mark.parametrize("model_cls", [Head, HeadPPO])
def test_large_sites_are_timed_on_fewer_rows(store, monkeypatch, model_cls):
    """A site whose logits exceed MEASURE_MAX_ELEMENTS is timed on fewer rows (two chunks'
    worth at least): the leading dimension of the head's input and of every input that
    shares it scaled down; the two forms still compute the same values there, and the
    report says how many rows were timed."""
    from ger_inductor.passes import lm_head as lm_pass

    seen = {}

    def fake_compile_and_time(forms, device, patches):
        seen.update(forms)
        return {"ger": _timing(1.0), "inductor": _timing(2.0)}

    monkeypatch.setattr(autotune, "compile_and_time", fake_compile_and_time)
    monkeypatch.setattr(lm_pass, "MEASURE_MAX_ELEMENTS", N * V // 4)
    real_chunk_rows = lm_pass._chunk_rows
    monkeypatch.setattr(lm_pass, "_chunk_rows", lambda ctx, V_, rows, plan, lean=False: min(32, rows)
                        if isinstance(rows, int) else real_chunk_rows(ctx, V_, rows, plan, lean))
    torch.manual_seed(0)
    report, _ = _rewrite(model_cls(), store, backward=False)
    assert report.decisions[0]["choice"] == "ger" and report.match_count("lm_head") == 1
    assert (report.matches[-1].detail.get("coefficients") == "per chunk") == (model_cls is HeadPPO)
    rec = next(p for p in report.passes if p.name == "lm_head")
    assert rec.strategy["measured_rows"] == f"{N // 4} of {N}", rec.strategy
    fused, inputs, finish, _ = seen["ger"]
    unfused = seen["inductor"][0]
    assert inputs[0].shape == (N // 4, H)  # the head's input (proj's output in the site graph)
    a, b = fused(*inputs), unfused(*inputs)
    torch.testing.assert_close(a, b)
    finish(b)


@pytest.mark.parametrize("fused_faster", [False, True])
def test_symbolic_rows_that_would_recompute_are_timed_at_the_example_size(store, monkeypatch, fused_faster):
    """With symbolic rows (a varying sequence length, ``dynamic=True``) the PPO objective's
    per-chunk coefficients need the unrolled loop, so the fused head would recompute the
    logits in the backward: four matmuls to Inductor's three. Such a site is timed at the
    example's sizes as the graph runs it (two forms that compute the same values there);
    the decision is keyed apart from the static site's, and Inductor's head is kept where
    it is faster (before, the prior fused it unmeasured: 1.43x Inductor's step at
    ~1000 x 1024 x 32000 on CPU)."""
    seen = {}

    def fake_compile_and_time(forms, device, patches):
        seen.update(forms)
        return {"ger": _timing(1.0 if fused_faster else 2.0), "inductor": _timing(1.5)}

    monkeypatch.setattr(autotune, "compile_and_time", fake_compile_and_time)
    torch.manual_seed(0)
    reports = []
    f = torch.compile(HeadPPO(), backend=rewrite_backend({"autotune": True, "autotune_store": store},
                                                         reports=reports), dynamic=True)
    x, y = _inputs()
    loss = f(x, y)  # N x V fp32 logits at the profile's autotune_min_mib: measured
    loss.backward()
    report = reports[-1]
    assert report.decisions and report.decisions[0]["choice"] == ("ger" if fused_faster else "inductor"), \
        report.decisions
    assert json.loads(report.decisions[0]["key"])["site"].get("symbolic_rows") is True, report.decisions[0]
    assert report.match_count("lm_head") == (1 if fused_faster else 0)
    if fused_faster:
        assert report.matches[-1].detail["gradients"] == "recompute"
    else:
        assert any("slower" in n.reason for n in report.near_misses if n.pattern == "linear+loss"), report.near_misses
    fused, inputs, finish, _ = seen["ger"]
    assert inputs[0].shape == (N, H)  # the example's rows
    a, b = fused(*inputs), seen["inductor"][0](*inputs)
    torch.testing.assert_close(a, b)
