"""The loss family's algebra (passes/loss_entropy/algebra.py) and evaluator
(passes/loss_entropy/evaluate.py) against numeric evaluation.

A symbolic value is a linear combination of vocabulary terms (z, 1, p, p z, log m, p log m)
or of row statistics (L, z_y, sum z, E_p[z], sum p log m, sum u log m), with numeric,
V-polynomial or per-row coefficients. ``numeric`` below evaluates one on real logits, by
the definitions in the modules' docstrings, written independently of the pass. The tests
check every algebra operation, and the evaluator's value of every node of every
recognised spelling (tests/spellings.py), against the tensor that node computes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
from hypothesis import given, settings, strategies as st

from ger_inductor import _compat
from ger_inductor.passes.loss_entropy import NotRepresentable, Root, Row, Vocab, VPoly
from ger_inductor.passes.loss_entropy import algebra
from ger_inductor.passes.loss_entropy.classify import classify
from ger_inductor.passes.loss_entropy.evaluate import Evaluator

from . import spellings


# ----------------------------------------------------------------------------- numeric evaluation
def _terms(z: torch.Tensor, alpha: float | None) -> dict[str, torch.Tensor]:
    V = z.shape[-1]
    p = z.softmax(-1)
    t = {"z": z, "one": torch.ones_like(z), "p": p, "pz": p * z}
    if alpha is not None:
        logm = torch.log(alpha * p + (1 - alpha) / V)
        t.update(logm=logm, plogm=p * logm)
    return t


def _stats(z: torch.Tensor, y: torch.Tensor | None, alpha: float | None) -> dict[str, torch.Tensor]:
    V = z.shape[-1]
    p = z.softmax(-1)
    s = {"L": z.logsumexp(-1), "zsum": z.sum(-1), "one": torch.ones(z.shape[:-1], dtype=z.dtype),
         "ez": (p * z).sum(-1)}
    if y is not None:
        s["zy"] = z.gather(-1, y.reshape(z.shape[:-1]).unsqueeze(-1).long()).squeeze(-1)
    if alpha is not None:
        logm = torch.log(alpha * p + (1 - alpha) / V)
        s["plogm"] = (p * logm).sum(-1)
        s["ulogm"] = logm.mean(-1)
    return s


class Env:
    """Numeric logits of each root (the base node's value, its views applied)."""

    def __init__(self, values: dict | None = None, logits: dict | None = None):
        self.values = values or {}  # fx.Node -> tensor
        self.logits = logits or {}  # Root -> tensor

    def z(self, root: Root) -> torch.Tensor:
        if root in self.logits:
            return self.logits[root]
        t = self.values[root.base].double()
        for target, args, kwargs in root.views:
            args = tuple(self.values.get(a, a) if isinstance(a, fx.Node) else a for a in args)
            kwargs = dict(kwargs)
            t = getattr(t, target)(*args, **kwargs) if isinstance(target, str) else target(t, *args, **kwargs)
        return t


def coef(c, V: int, env: Env):
    if isinstance(c, Row):
        return numeric(c, env).unsqueeze(-1) if not c.keepdim else numeric(c, env)
    if isinstance(c, VPoly):
        return sum(ck * V**k for k, ck in c.terms.items())
    return c


def numeric(v, env: Env) -> torch.Tensor:
    z = env.z(v.root)
    V = z.shape[-1]
    if isinstance(v, Vocab):
        terms = _terms(z, v.alpha)
        return sum(coef(c, V, env) * terms[k] for k, c in v.terms.items())
    target = v.target[1] if isinstance(v.target, tuple) else v.target  # ("squeeze", index)
    y = env.values[target] if target is not None else None
    stats = _stats(z, y, v.alpha)
    out = sum(coef(c, V, env) * stats[k] for k, c in v.coefs.items())
    if not isinstance(out, torch.Tensor):
        out = torch.full(z.shape[:-1], float(out), dtype=z.dtype)
    return out.unsqueeze(-1) if v.keepdim else out


# ----------------------------------------------------------------------------- the algebra
ROOT = Root("z", ())
OTHER = Root("w", ())


def _env(seed: int, V: int = 7, N: int = 5) -> Env:
    g = torch.Generator().manual_seed(seed)
    return Env(logits={ROOT: torch.randn(N, V, generator=g, dtype=torch.float64) * 2,
                       OTHER: torch.randn(N, V, generator=g, dtype=torch.float64)})


def test_building_blocks_are_their_definitions():
    env = _env(0)
    z = env.z(ROOT)
    torch.testing.assert_close(numeric(algebra.log_softmax(ROOT), env), z.log_softmax(-1))
    torch.testing.assert_close(numeric(algebra.probs(ROOT), env), z.softmax(-1))
    torch.testing.assert_close(numeric(algebra.lse_row(ROOT, 2.5), env), 2.5 * z.logsumexp(-1))


numbers = st.floats(-3, 3, allow_nan=False).filter(lambda x: abs(x) > 1e-3)
vocab_keys = st.sampled_from(("z", "one", "p", "pz"))


@st.composite
def vocabs(draw):
    terms = {}
    for k in draw(st.lists(vocab_keys, min_size=1, max_size=4, unique=True)):
        if k in ("one", "p") and draw(st.booleans()):
            terms[k] = Row(ROOT, {s: draw(numbers) for s in draw(st.lists(st.sampled_from(("L", "zsum", "ez", "one")),
                                                                              min_size=1, max_size=3, unique=True))})
        else:
            terms[k] = draw(numbers)
    return Vocab(ROOT, terms)


@settings(max_examples=60, deadline=None, database=None)
@given(vocabs(), vocabs(), numbers, st.sampled_from((1.0, -1.0)), st.integers(0, 2**16))
def test_vadd_and_vscale_are_addition_and_scaling(a, b, s, sign, seed):
    env = _env(seed)
    torch.testing.assert_close(numeric(algebra.vadd(a, b, sign), env), numeric(a, env) + sign * numeric(b, env))
    torch.testing.assert_close(numeric(algebra.vscale(a, s), env), s * numeric(a, env))


@settings(max_examples=40, deadline=None, database=None)
@given(vocabs(), vocabs())
def test_coefficient_algebra(a, b):
    env = _env(1)
    for k in a.terms.keys() & b.terms.keys():
        ca, cb = a.terms[k], b.terms[k]
        torch.testing.assert_close(torch.as_tensor(coef(algebra.add_coef(ca, cb), 7, env), dtype=torch.float64),
                                   torch.as_tensor(coef(ca, 7, env) + coef(cb, 7, env), dtype=torch.float64))
        torch.testing.assert_close(torch.as_tensor(coef(algebra.scale_coef(ca, 3.0), 7, env), dtype=torch.float64),
                                   torch.as_tensor(3.0 * coef(ca, 7, env), dtype=torch.float64))
    assert algebra.coef_eq(1.0, 1.0 + 1e-15) and not algebra.coef_eq(1.0, 1.0 + 1e-9)


def test_vadd_refuses_two_roots_and_two_mixtures():
    with pytest.raises(NotRepresentable, match="two different logits"):
        algebra.vadd(algebra.probs(ROOT), algebra.probs(OTHER))
    with pytest.raises(NotRepresentable, match="two different mixtures"):
        algebra.vadd(Vocab(ROOT, {"logm": 1.0}, alpha=0.5), Vocab(ROOT, {"logm": 1.0}, alpha=0.25))


def test_inf_and_nan_tags_join_to_the_wider_condition():
    assert algebra.join_nan((None, "zinf"), ("p0", None)) == ("p0", "zinf")
    v = algebra.vadd(algebra.log_softmax(ROOT), algebra.probs(ROOT))
    assert v.inf == "p0"  # log(softmax) rows include the -inf-logit rows


polys = st.dictionaries(st.integers(-2, 2), st.floats(-4, 4, allow_nan=False), max_size=3)


@settings(max_examples=80, deadline=None, database=None)
@given(polys, polys, st.floats(-4, 4, allow_nan=False), st.integers(2, 50))
def test_vpoly_is_a_polynomial_in_V(a, b, c, V):
    def ev(x):
        return sum(ck * V**k for k, ck in x.terms.items()) if isinstance(x, VPoly) else x

    pa, pb = VPoly(a), VPoly(b)
    assert math.isclose(ev(pa + pb), ev(pa) + ev(pb), rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(ev(pa - c), ev(pa) - c, rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(ev(c - pa), c - ev(pa), rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(ev(pa * pb), ev(pa) * ev(pb), rel_tol=1e-9, abs_tol=1e-6)
    assert math.isclose(ev(c * pa), c * ev(pa), rel_tol=1e-9, abs_tol=1e-9)
    mono = VPoly({1: 2.0})
    assert math.isclose(ev(pa / mono), ev(pa) / (2.0 * V), rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(ev(c / mono), c / (2.0 * V), rel_tol=1e-9, abs_tol=1e-9)
    if len(pb.terms) > 1:
        with pytest.raises(NotRepresentable):
            pa / pb
    assert VPoly({0: 3.0}) + 0.0 == 3.0 and isinstance(VPoly({0: 3.0}) * 1.0, float)  # constants collapse
    assert VPoly(a).encode() == ("V", tuple(sorted((k, v) for k, v in a.items() if v != 0.0)))


# ----------------------------------------------------------------------------- the evaluator on real graphs
def _capture(fn, *args) -> fx.GraphModule:
    graphs: list[fx.GraphModule] = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    _compat.dynamo_reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    assert len(graphs) == 1
    return graphs[0]


def _node_values(gm: fx.GraphModule, *args) -> dict:
    values: dict = {}

    class Record(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            values[n] = out
            return out

    Record(gm).run(*args)
    return values


#: spellings written with more than F.cross_entropy (its options are read by classify, not
#: evaluated into the algebra)
ALGEBRAIC = sorted(k for k, (_, pats) in spellings.RECOGNISED.items() if not all(p.startswith("cross_entropy") for p in pats)
                   or k == "z_loss")


@pytest.mark.parametrize("name", ALGEBRAIC)
def test_evaluator_values_are_the_node_values(name):
    """For every node of a recognised spelling whose symbolic value the evaluator forms,
    that value, evaluated numerically, is what the node computes."""
    fn, _ = spellings.RECOGNISED[name]
    torch.manual_seed(0)
    z = torch.randn(8, 11) * 3
    y = torch.randint(0, 11, (8,))
    if name == "ce_upcast_bf16":
        z = z.bfloat16()
    gm = _capture(fn, z, y)
    values = _node_values(gm, *[a for a in (z, y)][: len([n for n in gm.graph.nodes if n.op == "placeholder"])])
    ev = Evaluator()
    checked = rows = 0
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method"):
            continue
        c = None
        try:
            v = ev.value(n)
        except NotRepresentable:
            v = None
        if not isinstance(v, (Vocab, Row)):
            # a reduction over the classes (sum, mean, gather, logsumexp) is a candidate's row
            try:
                c = classify(ev, n)
            except NotRepresentable:
                c = None
            v = c.row if c is not None and c.kind in ("row", "kl") else None
        rows += isinstance(v, Row)
        if v is None or not isinstance(values.get(n), torch.Tensor):
            continue
        got = numeric(v, Env(values))
        if c is not None and c.kind == "kl":  # F.kl_div's reduction of the per-row KL (its docs)
            z = Env(values).z(v.root)
            got = {"sum": got.sum(), "batchmean": got.sum() / z.shape[0], "mean": got.sum() / z.numel()}[c.kl_reduction]
        want = values[n].double()
        torch.testing.assert_close(got.expand_as(want) if got.dim() == want.dim() else got.reshape(want.shape), want,
                                   rtol=1e-5 if z.dtype == torch.float32 else 2e-2, atol=1e-5, msg=lambda m: f"{n}: {m}")
        checked += 1
    assert checked >= 1 and rows >= 1, f"{name}: {checked} nodes with a symbolic value, {rows} reductions"
