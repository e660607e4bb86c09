"""Classification: which graph nodes are loss-like reductions of one logits tensor
(a :class:`Candidate`: the node, its root, its per-row statistics), found through the
evaluator; F.cross_entropy / nll_loss / kl_div are read with their options (targets,
weights, ignore_index, label smoothing, reduction).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import torch
import torch.fx as fx

from ... import losses, shapes
from ..graph import arg as _arg, dtype as _dtype, is_op as _is, shape as _shape, target_of as _target_of, val as _val
from .algebra import TWO_DISTRIBUTIONS_HINT, NotRepresentable, Root, Row, Vocab, add_coef, lse_row, vscale
from .evaluate import (
    Evaluator, CE, GATHER, KL, LOGSUMEXP, LOG_SOFTMAX, MEAN, NLL, SOFTMAX, STACK, SUB, SUM, class_dim_ok,
    refuse_log_of_probabilities,
)


# ----------------------------------------------------------------------------- candidates
@dataclasses.dataclass
class Candidate:
    node: fx.Node
    kind: str  # row | ce | kl
    root: Root
    row: Row | None = None
    ce: dict[str, Any] | None = None  # target, weight, ignore_index, reduction, label_smoothing, class_dim
    kl_reduction: str | None = None
    operands: tuple = ()  # vocabulary-level nodes the candidate consumes
    # (reader, input) pairs of the logits' reads that are not vocabulary-level values (the
    # raw target logit and the logsumexps of ``raw_log_prob``), for the barrier check, and
    # the nodes the rewrite makes dead with it
    reads: tuple = ()
    absorbed: tuple = ()


def classify(ev: Evaluator, n: fx.Node, guard=None) -> Candidate | None:
    """A class-dimension reduction (or a loss call) whose value is a GER statistic, or None.
    ``guard(cond, why)`` (``PassContext.guard``) is asked for size conditions that are not
    known to hold for every size (symbolic sizes)."""
    t = _target_of(n) if n.op in ("call_function", "call_method") else None
    if t is None:
        return None
    if t in CE or t in NLL:
        return _classify_ce(ev, n, nll=t in NLL)
    if t in KL:
        return _classify_kl(ev, n)
    if t in SUM or t in MEAN:
        x = n.args[0]
        dim = _arg(n, 1, "dim")
        shp = _shape(x)
        if shp is None or dim is None or not isinstance(_val(x), torch.Tensor):
            return None
        v = _value_if_loss_like(ev, x)
        if not isinstance(v, Vocab):
            return None
        if not class_dim_ok(n, dim, len(shp)):
            raise NotRepresentable("reduction over a dimension other than the classes", n)
        row = ev.reduce(v, mean=t in MEAN, keepdim=bool(_arg(n, 2, "keepdim", False)))
        return Candidate(n, "row", v.root, row=row, operands=(x,))
    if t in LOGSUMEXP:
        x = n.args[0]
        shp = _shape(x)
        if shp is None or not class_dim_ok(n, _arg(n, 1, "dim"), len(shp)):
            return None
        root = ev.root_of(x)
        return Candidate(n, "row", root, row=Row(root, {"L": 1.0}, keepdim=bool(_arg(n, 2, "keepdim", False)),
                                                 lse_inf=True))
    if t in GATHER:
        x = n.args[0]
        v = _value_if_loss_like(ev, x)
        if not isinstance(v, Vocab):
            return None
        try:
            refuse_log_of_probabilities(v, "a gather at the target")
        except NotRepresentable as e:
            raise NotRepresentable(e.reason, n) from None
        target = _gather_target(n, x, guard)
        coefs: dict[str, float] = {}
        for k, c in v.terms.items():
            if k == "z":
                coefs["zy"] = coefs.get("zy", 0.0) + c
            elif k == "one":
                for kk, cc in (c.coefs.items() if isinstance(c, Row) else (("one", c),)):
                    coefs[kk] = coefs.get(kk, 0.0) + cc
            else:
                raise NotRepresentable("gather of probabilities (not a log-likelihood)", n)
        row = Row(v.root, {k: c for k, c in coefs.items() if c != 0.0}, keepdim=True, target=target,
                  lse_inf=v.lse_inf)
        return Candidate(n, "row", v.root, row=row, operands=(x,))
    if t in SUB:
        return raw_log_prob(ev, n, guard)
    return None


def _gather_target(n: fx.Node, x, guard):
    """The per-row target of ``gather(x, -1, index)`` (``n``): the index squeezed, or
    ("squeeze", index) to squeeze at the rewrite; NotRepresentable unless one target per row."""
    shp = _shape(x)
    if shp is None or not class_dim_ok(n, _arg(n, 1, "dim"), len(shp)):
        raise NotRepresentable("gather over a dimension other than the classes", n)
    index = _arg(n, 2, "index")
    # gather also takes an index with fewer rows than the logits (rows 0..k-1): the op
    # needs one target per row, known for every size or guarded
    ishape = _shape(index)
    if ishape is None or len(ishape) != len(shp) or not shapes.known_equal(ishape[-1], 1) or not (
        shapes.known_equal(ishape[:-1], shp[:-1])
        or (guard is not None and guard(_rows_equal(ishape[:-1], shp[:-1]), GATHER_ROWS_WHY))
    ):
        raise NotRepresentable("gather with an index that is not one target per row", n)
    target = _squeeze_last(index)
    return ("squeeze", index) if target is None else target  # e.g. clamp(y.unsqueeze(-1), min=0)


def _strip_squeeze(x):
    """(x without a trailing squeeze(-1), whether one was stripped)."""
    if isinstance(x, fx.Node) and _is(x, {"squeeze", torch.squeeze}) and len(x.args) == 2 and not x.kwargs \
            and isinstance(x.args[0], fx.Node) and _shape(x.args[0]) is not None \
            and x.args[1] in (-1, len(_shape(x.args[0])) - 1):
        return x.args[0], True
    return x, False


def raw_log_prob(ev: Evaluator, n: fx.Node, guard=None) -> Candidate | None:
    """``gather(z, -1, y) - logsumexp(z, -1)``: log p(y) from the raw target logit and a
    logsumexp of the same logits, both squeezed or both kept (N, 1); the logsumexps may be
    stacked from per-row blocks ``[logsumexp(z[i], -1) for i]`` covering z in order (TRL's
    fp32 ``selective_log_softmax``). A Row {zy: 1, L: -1} with torch.logsumexp's L
    (``Row.lse_inf``: -inf, or NaN, where a row's max is +-inf, not log_softmax's NaN); the
    gather, the logsumexps and the blocks go with it. None when ``n`` is not of that form."""
    if len(n.args) != 2 or n.kwargs or not all(isinstance(a, fx.Node) for a in n.args):
        return None
    g, squeezed = _strip_squeeze(n.args[0])
    if not (_is(g, GATHER) and isinstance(g.args[0], fx.Node)):
        return None
    z = g.args[0]
    zshape, nshape = _shape(z), _shape(n)
    b = n.args[1]
    if zshape is None or nshape is None or not isinstance(_val(z), torch.Tensor) \
            or _val(z).dtype not in (torch.float32, torch.float64):
        return None  # bf16 / fp16: eager rounds the logsumexp and the difference (TRL's branch is fp32/fp64)
    reads, absorbed = [(g, z)], [g] + ([n.args[0]] if squeezed else [])
    if _is(b, LOGSUMEXP) and b.args and b.args[0] is z:
        if not class_dim_ok(b, _arg(b, 1, "dim"), len(zshape)) or bool(_arg(b, 2, "keepdim", False)) == squeezed:
            return None
        reads.append((b, z))
        absorbed.append(b)
    elif _is(b, STACK) and squeezed and isinstance(b.args[0], (list, tuple)) and (_arg(b, 1, "dim", 0) or 0) == 0 \
            and len(zshape) >= 2 and isinstance(zshape[0], int) and len(b.args[0]) == zshape[0]:
        for i, e in enumerate(b.args[0]):
            blk = e.args[0] if isinstance(e, fx.Node) and _is(e, LOGSUMEXP) and e.args else None
            if not (isinstance(blk, fx.Node) and blk.op == "call_function" and blk.target is operator.getitem
                    and blk.args[0] is z and blk.args[1] == i and not blk.kwargs) \
                    or not class_dim_ok(e, _arg(e, 1, "dim"), len(zshape) - 1) or _arg(e, 2, "keepdim", False):
                return None
            reads += [(blk, z), (e, blk)]
            absorbed += [e, blk]
        absorbed.append(b)
    else:
        return None
    if not shapes.known_equal(_shape(b), nshape):
        return None  # a broadcast
    target = _gather_target(g, z, guard)
    root = ev.root_of(z)
    row = Row(root, {"zy": 1.0, "L": -1.0}, keepdim=not squeezed, target=target, lse_inf=True)
    return Candidate(n, "row", root, row=row, reads=tuple(reads), absorbed=tuple(absorbed))


#: why the gather rewrite asks for a guard when the sizes are symbolic
GATHER_ROWS_WHY = "gather's index has one target per row of the logits (gather also accepts fewer rows)"


def _rows_equal(a: tuple, b: tuple):
    """The SymBool (or bool) ``a == b`` elementwise, for PassContext.guard."""
    conds = [x == y for x, y in zip(a, b)]
    if any(c is False for c in conds):
        return False
    symbolic = [c for c in conds if c is not True]
    if not symbolic:
        return True
    cond = symbolic[0]
    for c in symbolic[1:]:
        cond = cond & c
    return cond


def _value_if_loss_like(ev: Evaluator, x):
    """x's symbolic value; None if x has nothing to do with log-probabilities; re-raises
    (a near-miss) when a softmax-family op is involved but the whole is not a statistic."""
    try:
        return ev.value(x)
    except NotRepresentable:
        if _has_softmax_ancestor(x):
            raise
        return None


def _walk_up(nodes, depth: int, stop=lambda n: False):
    """The graph nodes within ``depth`` steps above ``nodes`` (themselves included),
    breadth first, not going above a node where ``stop`` holds."""
    seen, frontier = set(), list(nodes)
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if not isinstance(n, fx.Node) or n in seen:
                continue
            seen.add(n)
            yield n
            if not stop(n):
                nxt.extend(n.all_input_nodes)
        frontier = nxt


def _is_softmax(n) -> bool:
    return _is(n, LOG_SOFTMAX | SOFTMAX)


def _has_softmax_ancestor(node, depth: int = 8) -> bool:
    return any(_is_softmax(n) or (n.op == "call_function" and n.target is torch.ops.ger.loss_fwd.default)
               for n in _walk_up([node], depth))


def _softmax_roots(ev: Evaluator, nodes, depth: int = 8) -> set:
    """The logits tensors (roots, views stripped) whose softmax / log_softmax the nodes
    are computed from, within ``depth`` steps (the evaluator's own notion of a root)."""
    return {(ev._shifted_root(n.args[0]) or ev.root_of(n.args[0])).base
            for n in _walk_up(nodes, depth, stop=_is_softmax) if _is_softmax(n)}


def _squeeze_last(index) -> fx.Node | None:
    """y from y.unsqueeze(-1) / y.view(..., 1) / y[..., None]."""
    if not isinstance(index, fx.Node):
        return None
    shp = _shape(index)
    if shp is None or not shp or not shapes.known_equal(shp[-1], 1):
        return None
    if _is(index, {"unsqueeze", torch.unsqueeze}) and _arg(index, 1, "dim") in (-1, len(shp) - 1):
        return index.args[0]
    if _is(index, {"view", "reshape"}) and shapes.known_equal(_shape(index.args[0]), shp[:-1]):
        return index.args[0]
    if index.op == "call_function" and index.target is operator.getitem:
        src, idx = index.args
        if isinstance(idx, tuple) and idx and idx[-1] is None and shapes.known_equal(_shape(src), shp[:-1]):
            return src
    return None


def _classify_ce(ev: Evaluator, n: fx.Node, nll: bool) -> Candidate:
    x, target = _arg(n, 0, "input"), _arg(n, 1, "target")
    weight = _arg(n, 2, "weight")
    size_average, reduce_ = _arg(n, 3, "size_average"), _arg(n, 5, "reduce")
    ignore_index = _arg(n, 4, "ignore_index", -100)
    reduction = _arg(n, 6, "reduction", "mean")
    eps = 0.0 if nll else _arg(n, 7, "label_smoothing", 0.0)
    if size_average is not None or reduce_ is not None:
        raise NotRepresentable("deprecated size_average/reduce arguments", n)
    if not isinstance(ignore_index, int) or not isinstance(reduction, str) or not isinstance(eps, (int, float)):
        raise NotRepresentable("loss arguments that are not constants", n)
    tdt = _dtype(target)
    if tdt is None or tdt.is_floating_point:
        if not nll and isinstance(target, fx.Node) and _softmax_roots(ev, [target]):
            # the softmax of another logits tensor: the two-distribution pass (pairs.py)
            raise NotRepresentable("a cross-entropy whose soft targets are the probabilities of another logits "
                                   "tensor" + TWO_DISTRIBUTIONS_HINT, n)
        raise NotRepresentable("soft targets (class probabilities) are not a smoothing of one-hot targets", n)
    if tdt not in losses.TARGET_DTYPES:  # eager raises "expected target dtype to be Long or Byte"
        raise NotRepresentable(f"{tdt} targets: F.cross_entropy takes int64 or uint8 class indices (eagerly an error)", n)
    if weight is not None and not isinstance(_val(weight), torch.Tensor):
        raise NotRepresentable("weight that is not a tensor", n)
    shp = _shape(x)
    if shp is None or len(shp) < 1:
        raise NotRepresentable("logits of unknown shape", n)
    class_dim = 1 if len(shp) >= 3 else len(shp) - 1
    if nll:
        v = ev.value(x)
        if not (isinstance(v, Vocab) and v.is_(z=1.0, one=lse_row(v.root, -1.0))):
            raise NotRepresentable("nll_loss of something other than log_softmax(logits)", n)
        try:
            refuse_log_of_probabilities(dataclasses.replace(v, inf=None), "nll_loss")  # (clamped)
        except NotRepresentable as e:
            raise NotRepresentable(e.reason, n) from None
        if v.inf == "p0":
            raise NotRepresentable("nll_loss of log(softmax(...)): eagerly inf where the target's probability "
                                   "underflows to 0; written with log_softmax it is rewritten", n)
        if v.lse_inf:
            raise NotRepresentable("nll_loss of z - logsumexp(z, keepdim=True): torch.logsumexp's +-inf on a row "
                                   "whose max is +-inf is not the loss's convention; written with log_softmax it "
                                   "is rewritten", n)
        if len(shp) >= 3:
            raise NotRepresentable("nll_loss with classes in dim 1 of a >2-d input", n)
        root = v.root
        operands = (x,)
    else:
        if len(shp) >= 3:
            root = Root(x, ())  # (N, C, d...) layout: the op reads it through a view
        else:
            root = ev.root_of(x)
        operands = ()
    spec = dict(target=target, weight=weight, ignore_index=ignore_index, reduction=reduction,
                label_smoothing=float(eps), class_dim=class_dim, input=x)
    return Candidate(n, "ce", root, ce=spec, operands=operands)


def _classify_kl(ev: Evaluator, n: fx.Node) -> Candidate:
    """A kl_div against a constant distribution (either direction), or the refusal; a
    refused kl_div between two logits tensors' distributions says so (and what to call)."""
    try:
        return _classify_kl_one(ev, n)
    except NotRepresentable:
        if len(_softmax_roots(ev, [n.args[0], _arg(n, 1, "target")])) > 1:
            raise NotRepresentable("kl_div between the distributions of two logits tensors" + TWO_DISTRIBUTIONS_HINT,
                                   n) from None
        raise


def _classify_kl_one(ev: Evaluator, n: fx.Node) -> Candidate:
    inp, tgt = n.args[0], _arg(n, 1, "target")
    reduction = _arg(n, 4, "reduction", "mean")
    log_target = bool(_arg(n, 5, "log_target", False))
    if _arg(n, 2, "size_average") is not None or _arg(n, 3, "reduce") is not None:
        raise NotRepresentable("deprecated size_average/reduce arguments", n)
    if reduction not in ("sum", "batchmean", "mean"):
        raise NotRepresentable(f"kl_div with reduction={reduction!r} is not per row", n)
    a, b = ev.value(inp), ev.value(tgt)
    if (isinstance(a, Vocab) and a.clamped) or (isinstance(b, Vocab) and b.clamped):
        raise NotRepresentable("kl_div of a clamped (log-)probability: the clamp changes the entries it reads", n)
    if not isinstance(a, Vocab) or not isinstance(b, Vocab):
        raise NotRepresentable("kl_div between tensors that are not both vocabulary-level", n)
    # elementwise: target * (log target - input)   (log_target: exp(t) * (t - input))
    if log_target:
        t_prob = Vocab(b.root, {"p": 1.0}) if b.is_(z=1.0, one=lse_row(b.root, -1.0)) else None
    else:
        t_prob = b
    if a.is_(z=1.0, one=lse_row(a.root, -1.0)) and not log_target and set(b.terms) == {"one"} and isinstance(b.terms["one"], float):
        c = b.terms["one"]  # sum_j c (log c - log p_j), the KL(u||p) direction when c = 1/V
        row = ev.reduce(Vocab(a.root, {"one": c * math.log(c) if c > 0 else 0.0}), False, False)
        row2 = ev.reduce(vscale(a, -c), False, False)
        coefs = dict(row.coefs)
        for k, v in row2.coefs.items():
            coefs[k] = coefs.get(k, 0.0) + v
        return Candidate(n, "kl", a.root, row=Row(a.root, coefs, lse_inf=a.lse_inf), kl_reduction=reduction,
                         operands=(inp, tgt))
    if set(a.terms) == {"one"} and isinstance(a.terms["one"], float) and t_prob is not None and t_prob.is_(p=1.0):
        # sum_j p_j (log p_j - log u_j): KL(p||u) with input = log u
        lu = a.terms["one"]
        row = ev.reduce(Vocab(t_prob.root, {"pz": 1.0, "p": add_coef(lse_row(t_prob.root, -1.0), -lu)}), False, False)
        # eagerly: xlogy(p, p) is 0 at p = 0 but its gradient (0 / 0) NaN; with log_target,
        # exp(t) * (t - input) is NaN where t = -inf
        row.nan = (b.inf, b.inf) if log_target else (None, t_prob.inf)
        return Candidate(n, "kl", t_prob.root, row=row, kl_reduction=reduction, operands=(inp, tgt))
    raise NotRepresentable("kl_div that is not between the model's distribution and a constant one", n)


