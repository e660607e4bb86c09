"""The plan and the rewrite: group the candidates of each logits tensor, decide the
statistics and the strategy (fleet), check that the moved reads cross no write or mode
switch (passes/graph.py), and replace the reductions by O(rows) combinations of one
``ger::loss_fwd`` call; the N x V intermediates become dead and are removed.
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import torch
import torch.fx as fx

from ... import _compat, fleet, losses, shapes
from ...ops import ger_loss as _op
from .. import graph
from ..graph import (
    SHAPE_ONLY as _SHAPE_ONLY, VIEWS as _VIEWS, arg as _arg, dtype as _dtype, is_op as _is, shape as _shape,
    target_of as _target_of, val as _val,
)
from . import pairs
from .algebra import TWO_DISTRIBUTIONS_HINT, NotRepresentable, Root, VPoly, Vocab
from .evaluate import KL, MEAN, NLL, ROW_VIEW_REASON, SUB, SUM, Evaluator, changes_rows
from .classify import Candidate, _softmax_roots, classify


FAMILY = "loss_entropy"
LOSS_FWD = (torch.ops.ger.loss_fwd, torch.ops.ger.loss_fwd.default)
#: ignore_index for statistics read through gather (every target is then a valid class)
NO_IGNORE = _op.NO_IGNORE


#: the functions the rewrite inserts into graphs (AOTAutograd traces through them)
GRAPH_FUNCTIONS = (losses.row_stats, losses.cross_entropy_from_stats, losses.row_statistic, losses.kl_div_reduce,
                   *pairs.GRAPH_FUNCTIONS)


# ----------------------------------------------------------------------------- the pass
def run(gm: fx.GraphModule, ctx) -> bool:
    changed = _set_strategy_of_existing_ops(gm, ctx)
    ev = Evaluator()
    cands: list[Candidate] = []
    pair_cands: list[pairs.PairCandidate] = []
    pair_refusals: list = []  # (candidate node, node, reason): reported unless a larger candidate covers it
    per_row: set = set()  # reductions over the classes, and combinations of them
    two: set = set()  # totals of two-distribution terms, and combinations of them
    for n in list(gm.graph.nodes):
        if _is(n, SUM | MEAN) and _arg(n, 1, "dim") is not None:
            per_row.add(n)
        elif _is(n, KL | SUM | MEAN) and _two_roots(ev, n):  # a total; totals combine (pairs.Total)
            per_row.add(n)
            two.add(n)
        if _is(n, pairs.ROW_OPS) and any(a in per_row for a in n.all_input_nodes):
            per_row.add(n)  # a KL or JSD split over several sums: (p_t lp_t).sum(-1) - (p_t lp_s).sum(-1)
            if any(a in two for a in n.all_input_nodes) or len(_softmax_roots(ev, n.all_input_nodes)) > 1:
                two.add(n)
                try:
                    pair_cands.append(pairs.classify_pair(ev, n))
                except NotRepresentable:
                    pass  # the reductions it combines are judged themselves
        try:
            c = classify(ev, n, guard=ctx.guard)
            if c is None and _is(n, SUM | MEAN) and _two_roots(ev, n):
                raise NotRepresentable("a sum of a two-distribution term" + TWO_DISTRIBUTIONS_HINT, n)
        except NotRepresentable as e:
            if TWO_DISTRIBUTIONS_HINT in e.reason or (_is(n, SUM | MEAN | KL) and _two_roots(ev, n)):
                if _is(n, KL) and _arg(n, 4, "reduction", "mean") == "none":
                    continue  # elementwise: the reduction that reads it is the candidate
                try:
                    pair_cands.append(pairs.classify_pair(ev, n))
                    continue
                except pairs.NotACandidate:
                    continue
                except NotRepresentable as pe:
                    reason = pe.reason if TWO_DISTRIBUTIONS_HINT in pe.reason else pe.reason + TWO_DISTRIBUTIONS_HINT
                    pair_refusals.append((n, pe.node or n, reason))
                    continue
            ctx.near_miss("loss_statistic", e.node or n, e.reason)
            continue
        if c is not None:
            eager = ctx.eager_reason(n)
            if eager is not None:
                ctx.near_miss("loss_statistic", n, f"left to run eagerly: {eager}")
                continue
            cands.append(c)
    # a two-distribution candidate takes the single-root terms inside it (sum p_t log p_t of a KL)
    covered = set().union(*(pc.visited | {pc.node} for pc in pair_cands)) if pair_cands else set()
    groups: dict[Root, list[Candidate]] = {}
    for c in cands:
        if c.node in covered:
            continue
        groups.setdefault(_group_key(c.root), []).append(c)
    # a cross-entropy on a KL's student logits: the pair op forms it in the same sweep
    # (pairs.rewrite); rewritten on its own below where it does not
    student_bases = {ev.root_of(x).base for pc in pair_cands for x in (pairs.logits_of(pc) or ())}
    deferred: dict = {}
    effects = functools.cache(lambda: graph.Effects(gm))  # built when a bare logsumexp needs it
    for key in list(groups):
        groups[key] = _lse_inf_policy(groups[key], ctx, effects)
    for root, group in groups.items():
        if not group:
            continue
        plan = _plan(ev, root, group, ctx)
        if plan is not None and _absorbs_eager_node(group, plan, ctx):
            continue
        if plan is not None and root.base in student_bases and plan.ce is not None:
            deferred[root.base] = (root, group, plan)
            continue
        if plan is not None and _reads_may_move(gm, ev, group, ctx) and _hoist_operands(gm.graph, group, plan, ctx):
            _rewrite(gm, root, group, plan, ctx)
            changed = True
    for n, at, reason in pair_refusals:
        if n not in covered:  # e.g. KL(p_t||m) alone, inside a JSD found whole at a later node
            ctx.near_miss(pairs.PATTERN, at, reason)
    if pair_cands:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        returned = {alias_base(a) for a in _compat.tree_leaves(out.args[0]) if isinstance(a, fx.Node)}
        alive = set(gm.graph.nodes)
        for pc in reversed(pair_cands):  # the outermost first: a mean of per-row KLs folds the mean in
            if pc.node in alive and pc.visited <= alive:
                keys = [ev.root_of(x).base for x in (pairs.logits_of(pc) or ())]
                hard = next((deferred[k] for k in keys if k in deferred), None)
                done, merged = pairs.rewrite(gm, ev, pc, ctx, returned, alias_base, hard=hard)
                changed |= done
                if merged:
                    del deferred[hard[0].base]
                alive = set(gm.graph.nodes)
    for root, group, plan in deferred.values():
        if _reads_may_move(gm, ev, group, ctx) and _hoist_operands(gm.graph, group, plan, ctx):
            _rewrite(gm, root, group, plan, ctx)
            changed = True
    return changed


#: the near-miss of a statistic of torch.logsumexp's convention the op cannot serve with the others
LSE_INF_MIXED_WHY = (
    "a log-probability spelled with torch.logsumexp (the raw target logit minus a logsumexp, e.g. TRL's fp32 "
    "selective_log_softmax, or z - logsumexp(z, keepdim=True)) beside statistics of log_softmax's convention on "
    "the same logits: on a row whose max is +-inf eager's logsumexp is +-inf (log p(y) -inf, its gradient NaN "
    "only at a +inf logit) where log_softmax is NaN, and one op serves one convention; left as written")
LSE_INF_SUM_WHY = (
    "a sum of log-probabilities spelled with torch.logsumexp (z - logsumexp(z, keepdim=True); also as a KL to the "
    "uniform): on a row whose max is +-inf eager's gradient is finite at the finite logits, where the fused "
    "statistics' is NaN; left as written")


def _lse_raw(c: Candidate) -> bool:
    """A statistic of torch.logsumexp's convention the op serves with ``lse_inf``: c L (+ k),
    or c (z_y - L) (+ k) - log p(y) from the raw target logit, computed as -nll, so that the
    op's L - z_y keeps eager's IEEE arithmetic on +-inf rows (-inf, NaN)."""
    if c.kind != "row" or not c.row.lse_inf:
        return False
    co = {k: v for k, v in c.row.coefs.items() if k != "one"}
    if set(co) == {"L"}:
        return True
    return set(co) == {"zy", "L"} and isinstance(co["zy"], float) and co["zy"] == -co["L"]


def _bare_lse(c: Candidate) -> bool:
    """A logsumexp of torch.logsumexp's convention alone (c L + k), no target logit."""
    return _lse_raw(c) and "zy" not in c.row.coefs


def _bare_lse_refusal(c: Candidate, effects) -> str | None:
    """Why a bare logsumexp cannot join the op call of the statistics beside it: its
    output written in place (eager's logsumexp saved it for its backward: autograd raises
    there, the op's copy would not), or bf16 / fp16 logits (eager's backward forms
    e^(z - L) from the rounded L, the op from its fp32 L). None when it can, and when it
    is only read inside the others' expressions (``z - logsumexp(z, keepdim=True)``, as
    Categorical's normalised logits): the op call replaces it with them."""
    x = c.node.args[0] if c.node.args else None
    readers = [u for u in c.node.users if not _is(u, _SHAPE_ONLY)]
    if isinstance(x, fx.Node) and readers and all(
            _is(u, SUB) and len(u.args) == 2 and u.args[0] is x and u.args[1] is c.node and not u.kwargs
            for u in readers):
        return None
    dt = _dtype(c.node)
    if dt not in (torch.float32, torch.float64):
        return (f"a logsumexp in {dt}: eager's gradient e^(z - L) uses its {dt}-rounded value, the fused "
                "statistics' the fp32 one; left as written")
    writers = effects().writers_of(c.node)
    if writers:
        return (f"the logsumexp is written in place by {graph.describe(writers[0])}: eager saved it for its "
                "backward (autograd raises there); left as written")
    return None


def _lse_inf_policy(group: list[Candidate], ctx, effects=None) -> list[Candidate]:
    """The candidates of one logits tensor the op can serve, given that one op call has one
    convention for L on a row whose max is +-inf (``ger::loss_fwd(lse_inf=)``):

    - every statistic of torch.logsumexp's convention (``_lse_raw``): the op takes it;
    - a log p(y) of that convention beside any other statistic: left as written (near-miss),
      the others rewritten with log_softmax's convention;
    - a bare logsumexp beside log_softmax statistics (a z-loss beside a cross-entropy, verl's
      entropy as logsumexp - sum p z): the op gives the logsumexp its own convention and
      the others log_softmax's (``Plan.lse_inf_out``);
    - other terms built on z - logsumexp(z, keepdim=True): a sum over the classes is left
      as written (LSE_INF_SUM_WHY); products with probabilities are NaN there in both."""
    out, left = [], set()
    for c in group:
        if len(group) > 1 and _bare_lse(c) and effects is not None:
            why = _bare_lse_refusal(c, effects)
            if why is not None:
                ctx.near_miss("logsumexp", c.node, why)
                continue
        if c.kind in ("row", "kl") and c.row.lse_inf and not _lse_raw(c) \
                and set(c.row.coefs) <= {"zy", "zsum", "L", "one"}:
            ctx.near_miss(_pattern_name(c), c.node, LSE_INF_SUM_WHY)
            continue
        used = _absorbed_used_elsewhere(c)
        if used is not None:
            ctx.near_miss(_pattern_name(c), c.node, used)
            left |= set(c.absorbed)
            continue
        out.append(c)
    raw_logp = [c for c in out if _lse_raw(c) and "zy" in c.row.coefs]
    if raw_logp and not all(_lse_raw(c) for c in out if c.node not in left):
        for c in raw_logp:
            ctx.near_miss("target_log_prob", c.node, LSE_INF_MIXED_WHY)
        left |= {n for c in raw_logp for n in c.absorbed}
        out = [c for c in out if c not in raw_logp]
    # the logsumexps a refused subtraction reads stay as written too: rewritten with the
    # others' convention they would give the subtraction left in the graph log_softmax's NaN
    return [c for c in out if c.node not in left]


def _absorbed_used_elsewhere(c: Candidate) -> str | None:
    """Why the raw target logit or a logsumexp that ``c`` absorbs (``raw_log_prob``) cannot
    go with it: read by another node (an in-place write included: the op would not see
    it). None when they feed only ``c``'s own expression."""
    inside = set(c.absorbed) | {c.node}
    for n in c.absorbed:
        for u in n.users:
            if u not in inside:
                return (f"{n.name} (part of a log-probability spelled as the raw target logit minus a logsumexp) is "
                        f"also used by {u.name}: left as written")
    return None


def _two_roots(ev: Evaluator, n: fx.Node) -> bool:
    """Whether ``n`` reduces a term computed from the softmaxes of two logits tensors."""
    x = n.args[0] if n.args else None
    if not isinstance(x, fx.Node) or not isinstance(_val(x), torch.Tensor):
        return False
    return len(_softmax_roots(ev, [x] + ([_arg(n, 1, "target")] if _is(n, KL) else []))) > 1


def _absorbs_eager_node(group: list[Candidate], plan: Plan, ctx) -> bool:
    """Whether the rewrite would remove a node that must run eagerly (``eager_ops``, a
    device without Inductor): an intermediate it absorbs (a softmax, a log_softmax, a
    product) is removed with the statistics. Refused then, a near-miss naming it."""
    for n in sorted(plan.vocab, key=lambda n: n.name):
        eager = ctx.eager_reason(n)
        if eager is not None:
            for c in group:
                ctx.near_miss("cross_entropy+entropy", c.node,
                              f"{n.name} must run eagerly ({eager}); the rewrite would fuse it away")
            return True
    return False


def _group_key(root: Root) -> Root:
    return Root(root.base, ())


def _set_strategy_of_existing_ops(gm: fx.GraphModule, ctx) -> bool:
    """ger_loss called directly: give its op the chunk size of this graph's profile."""
    changed = False
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in LOSS_FWD:
            V = (_shape(n.args[0]) or (None, None))[1]
            chunk = fleet.loss_chunk(torch.device(ctx.profile.device_type), V if isinstance(V, int) else None, profile=ctx.profile)
            changed |= graph.set_op_arg(n, "chunk", chunk)
            ctx.strategy(**{k: v for k, v in fleet.strategy(FAMILY, ctx.profile).items() if k != "why"})
    return changed


@dataclasses.dataclass
class Plan:
    target: fx.Node | tuple | None  # None: statistics that need no target (an entropy alone)
    ignore_index: int
    alpha: float
    extras: bool
    ce: Candidate | None
    smooth: tuple | None  # (eps, weight node) for weighted label smoothing
    vocab: set  # the N x V intermediates the rewrite makes dead
    lse_inf: bool = False  # L of torch.logsumexp's convention (every statistic is ``_lse_raw``)
    lse_inf_out: bool = False  # ... for the bare logsumexps only, beside log_softmax statistics


def _plan(ev: Evaluator, root: Root, group: list[Candidate], ctx) -> Plan | None:
    """Decide the single op call that serves every statistic of this logits tensor."""
    ces = [c for c in group if c.kind == "ce"]
    rows = [c for c in group if c.kind in ("row", "kl")]
    zy_targets = {id(c.row.target): c.row.target for c in rows if c.row.target is not None and "zy" in c.row.coefs}

    def refuse(reason: str, cands=None) -> None:
        for c in cands or group:
            ctx.near_miss("cross_entropy+entropy", c.node, reason)
        return None

    if len(ces) > 1:
        return refuse("several cross-entropy losses on one logits tensor")
    targets = ([ces[0].ce["target"]] if ces else []) + list(zy_targets.values())
    if not targets and all(c.kind == "row" and set(c.row.coefs) <= {"L"} for c in group):
        return None  # a logsumexp of some tensor: nothing to do with a loss
    # no target (an entropy bonus, a KL to the uniform alone, a policy's entropy logged
    # per token): the op computes every statistic of a row without one; it is given none
    # (``losses.row_stats``: a class-0 target whose nll nothing reads)
    if len({_strip_views(t) if isinstance(t, fx.Node) else t[1] for t in targets}) > 1:
        return refuse("statistics of one logits tensor with different targets")
    # vocabulary-level intermediates must not be used elsewhere (they would stay materialised)
    inside = {c.node for c in group}
    vocab = set()
    for c in group:
        vocab |= _vocab_closure(ev, c.operands)
    viewed = next((v for v in vocab if changes_rows(v)), None)
    if viewed is not None:
        return refuse(f"{ROW_VIEW_REASON} ({viewed.name})")
    for v in vocab:
        for u in v.users:
            if u not in inside and u not in vocab and not _is(u, _SHAPE_ONLY):
                return refuse(f"log-probabilities/probabilities ({v.name}) are also used by {u.name}: the N x V tensor would stay")
    # the statistics needed decide alpha and extras
    needed = set()
    alphas = set()
    for c in rows:
        needed |= set(c.row.coefs)
        if c.row.alpha is not None and ({"plogm", "ulogm"} & set(c.row.coefs)):
            alphas.add(c.row.alpha)
    if len(alphas) > 1:
        return refuse("two different GER mixtures on one logits tensor")
    alpha = alphas.pop() if alphas else 1.0
    if "zsum" in needed and alpha != 1.0:
        return refuse("a sum of logits together with a GER mixture (two passes)")
    smooth = None
    ce = ces[0] if ces else None
    if ce is not None and ce.ce["label_smoothing"] and ce.ce["weight"] is not None:
        if needed & {"zsum"}:
            return refuse("weighted label smoothing together with another KL(u||p) term")
        smooth = (ce.ce["label_smoothing"], ce.ce["weight"])
    if ce is not None and ce.ce["class_dim"] != len(_shape(ce.ce["input"])) - 1 and rows:
        return refuse("cross-entropy with classes in dim 1 together with hand-written terms")
    if ce is not None and zy_targets and ce.ce["ignore_index"] >= 0:
        # the op zeroes nll where target == ignore_index; a gather at that (valid) class
        # would then read L instead of z_y
        return refuse("a target log-probability read by gather beside a cross-entropy whose ignore_index "
                      "is a valid class")
    extras = bool(needed & {"ez", "plogm"})
    ignore_index = ce.ce["ignore_index"] if ce is not None else NO_IGNORE
    for c in group:  # the raw target logit, the logsumexps (dead once replaced, unless read elsewhere)
        vocab |= set(c.absorbed)
    lse_inf = any(_lse_raw(c) and "zy" in c.row.coefs for c in group) and all(_lse_raw(c) for c in group)
    # a bare logsumexp (a z-loss, verl's entropy) beside statistics of log_softmax's
    # convention: the op gives its L torch.logsumexp's +-inf and the others' NaN on a row
    # whose max is +-inf. Each of the others reads nll, reg or ent (NaN on such rows, their
    # gradient too, as eager's log_softmax backward), which the op's backward relies on.
    others = [c for c in group if not _lse_raw(c)]
    lse_inf_out = not lse_inf and bool(others) and any(_bare_lse(c) for c in group) and all(
        c.kind == "ce" or set(c.row.coefs) - {"L", "one"} for c in others)
    return Plan(targets[0] if targets else None, ignore_index, alpha, extras, ce, smooth, vocab, lse_inf,
                lse_inf_out)


def _reads_may_move(gm: fx.GraphModule, ev: Evaluator, group: list[Candidate], ctx) -> bool:
    """The op reads the logits, targets and weights once, before the first statistic it
    replaces; every statistic and intermediate it absorbs read them at its own position.
    Refused (near-miss naming the node) when something between writes one of them
    (through any alias) or switches modes: the statistics would differ from eager's."""
    g = gm.graph
    first = min((c.node for c in group), key=_order(g))
    reads = []
    for c in group:
        closure = _vocab_closure(ev, c.operands) | {c.node} | set(c.absorbed)
        inner = [(n, a) for n in closure for a in n.all_input_nodes if a not in closure] + list(c.reads)
        for n, a in inner:
            # and the views / upcasts between, each at its own position (a copy keeps
            # what it read: graph.snapshot_reads)
            reads.append((n, a))
            reads.extend(graph.snapshot_reads(a, c.root.base))
    effects = graph.Effects(gm)
    barrier = effects.first_barrier(reads, first)
    reason = graph.moved_reads_reason(barrier) if barrier is not None else None
    logits = group[0].root.base
    lv = _val(logits)
    if reason is None and isinstance(lv, torch.Tensor) and lv.requires_grad:
        # the op saves the logits for its backward, where eager's softmax / log_softmax
        # saved their outputs: a later write to the logits would raise autograd's
        # version error in ger only
        pos = effects.order
        later = [m for m in effects.writers_of(logits) if pos[m] > pos[first]]
        if later:
            reason = (f"{graph.describe(later[0])} writes the logits after the loss: the fused op saves them for "
                      "its backward (eager saves only the softmax outputs), so autograd would raise where eager runs")
    if reason is None:
        return True
    for c in group:
        ctx.near_miss("cross_entropy+entropy", c.node, reason)
    return False


def _hoist_operands(g: fx.Graph, group: list[Candidate], plan: Plan, ctx) -> bool:
    """The op goes before the first statistic it replaces; a target (or smoothing weight)
    computed later, e.g. ``y.flatten()`` written after an entropy term, is moved up to
    it when it is pure code that nothing in between mutates. Else a near-miss."""
    first = min((c.node for c in group), key=_order(g))
    target = plan.target[1] if isinstance(plan.target, tuple) else plan.target
    operands = ([target] if target is not None else []) + \
        ([plan.smooth[1]] if plan.smooth and isinstance(plan.smooth[1], fx.Node) else [])
    replaced = {c.node for c in group} | plan.vocab
    if graph.hoist_before(g, first, operands, forbid=replaced):
        return True
    for c in group:
        ctx.near_miss("cross_entropy+entropy", c.node, "the target is computed after a statistic that needs it, by "
                                                       "code that cannot be moved up")
    return False


def _strip_views(node):
    while isinstance(node, fx.Node) and _is(node, _VIEWS | {"unsqueeze", "squeeze"}):
        node = node.args[0]
    return node


def _vocab_closure(ev: Evaluator, nodes) -> set:
    out = set()
    stack = [n for n in nodes if isinstance(n, fx.Node)]
    while stack:
        n = stack.pop()
        if n in out or not isinstance(ev.memo.get(n), Vocab):
            continue
        out.add(n)
        stack.extend(a for a in n.all_input_nodes)
    return out


def _rewrite(gm: fx.GraphModule, root: Root, group: list[Candidate], plan: Plan, ctx) -> None:
    g = gm.graph
    first = min((c.node for c in group), key=_order(g))
    eager_saves = _eager_saves_logits(root.base, plan.vocab | {c.node for c in group})
    logits = root.base
    shp = _shape(logits)
    ce = plan.ce
    # the (N, C, d...) layout keeps the loss input as its root; class-last roots may be views
    class_dim = ce.ce["class_dim"] if ce is not None and ce.root.base is ce.ce["input"] else len(shp) - 1
    V = shp[class_dim]
    chunk = fleet.loss_chunk(torch.device(ctx.profile.device_type), V if isinstance(V, int) else None, profile=ctx.profile)
    with g.inserting_before(first):
        target = plan.target
        if isinstance(target, tuple):  # an index of shape (..., 1)
            target = g.call_method("squeeze", (target[1], -1))
        stats_kw = {"class_dim": class_dim, "smooth_eps": plan.smooth[0] if plan.smooth else None,
                    "smooth_weight": plan.smooth[1] if plan.smooth else None}
        if any(c.row is not None and c.row.nan != (None, None) for c in group):
            stats_kw["zmin"] = True  # the rows where eager's spelling is NaN (losses.row_statistic)
        if plan.lse_inf:
            stats_kw["lse_inf"] = True
        if plan.lse_inf_out:
            stats_kw["lse_inf_out"] = True
        stats = g.call_function(
            losses.row_stats,
            (logits, target, plan.alpha, plan.ignore_index, plan.extras, chunk),
            stats_kw,
        )
        stats.meta[EAGER_SAVES_LOGITS] = eager_saves
    views_cache: dict = {}
    for c in group:
        with g.inserting_before(c.node):
            if c.kind == "ce":
                new = g.call_function(
                    losses.cross_entropy_from_stats,
                    (stats, logits, c.ce["target"], c.ce["weight"], c.ce["ignore_index"], c.ce["reduction"],
                     c.ce["label_smoothing"], _dtype(c.node), class_dim),
                )
            else:
                like = _viewed(g, c.root, views_cache)
                coefs = tuple(sorted((k, v.encode() if isinstance(v, VPoly) else v) for k, v in c.row.coefs.items()))
                # a kl_div's per-row KL (reduced after): fp32, fp64 for fp64 logits (fp32 lost
                # 1e-8 of a float64 KL, stop-36 review)
                out_dtype = _dtype(c.node) if c.kind == "row" else (
                    torch.float64 if _dtype(c.root.base) == torch.float64 else torch.float32)
                nan_kw = {"nan": c.row.nan} if c.row.nan != (None, None) else {}
                if plan.lse_inf_out and _bare_lse(c):
                    nan_kw["lse_raw"] = True
                new = g.call_function(losses.row_statistic, (stats, like, coefs, c.row.keepdim, plan.alpha, out_dtype),
                                      nan_kw)
                if c.kind == "kl":
                    new = g.call_function(losses.kl_div_reduce, (new, like, c.kl_reduction, _dtype(c.node)))
        graph.copy_meta(new, c.node, values=True)
        c.node.replace_all_uses_with(new)
        g.erase_node(c.node)
        ctx.match(
            _pattern_name(c), [c.node, stats], alpha=plan.alpha, extras=plan.extras, chunk=chunk,
            statistics=sorted(c.row.coefs) if c.row else ["nll"],
        )
        plan.vocab.add(new)  # a replacement nobody reads (e.g. a logsumexp inside an entropy)
    ctx.strategy(**{k: v for k, v in fleet.strategy(FAMILY, ctx.profile).items() if k != "why"})
    # shape queries (x.size(-1)) of the intermediates read the logits' (equal) shape instead
    for v in plan.vocab:
        for u in list(v.users):
            if _is(u, _SHAPE_ONLY) and _shape(v) is not None:
                like = _viewed(g, root, views_cache) if shapes.known_equal(_shape(_viewed(g, root, views_cache)), _shape(v)) else None
                if like is not None:
                    u.replace_input_with(v, like)
    graph.drop_dead(g, plan.vocab)  # the N x V intermediates the rewrite left without users


def _viewed(g: fx.Graph, root: Root, cache: dict) -> fx.Node:
    """The root's views re-applied to its (pre-cast) base: free views, no N x V data."""
    if root.views not in cache:
        cache[root.views] = graph.apply_views(g, root.base, root.views)
    return cache[root.views]


def _order(g: fx.Graph):
    pos = {n: i for i, n in enumerate(g.nodes)}
    return lambda n: pos[n]


def _pattern_name(c: Candidate) -> str:
    if c.kind == "ce":
        t = _target_of(c.node)
        if t in NLL:
            return "nll_loss(log_softmax)"
        return "cross_entropy" + ("(label_smoothing)" if c.ce["label_smoothing"] else "")
    if c.kind == "kl":
        return "kl_div"
    keys = set(c.row.coefs)
    if keys & {"plogm", "ulogm"}:
        return "ger_mixture_term"
    if "ez" in keys:
        return "entropy"
    if "zy" in keys:
        return "target_log_prob" if not c.row.lse_inf else "target_log_prob(logsumexp)"
    if "zsum" in keys:
        return "sum_log_probs"
    return "row_statistic"




# ----------------------------------------------------------------------------- returned logits
#: ops whose result may share the storage of their first argument
_ALIASING = graph.VIEWS | graph.CASTS | {
    "unflatten", "unsqueeze", "squeeze", "view_as", "reshape_as", "transpose", "permute", "movedim", "swapaxes", "t",
    "expand", "expand_as", "narrow", "select", "detach", "as_strided", torch.unflatten, torch.squeeze,
    torch.unsqueeze, torch.transpose, torch.permute, torch.movedim, torch.swapaxes, torch.t, torch.narrow,
    torch.select, torch.detach, torch.as_strided, operator.getitem}


#: ops whose backward saves none of the inputs the logits reach them by (only their
#: outputs, an index, a mask or a shape); any other op reading the logits is taken to save
#: them (``_eager_saves_logits``)
_SAVES_NO_INPUT = {"log_softmax", "softmax", "exp", "add", "sub", "neg", "sum", "mean", "gather", "masked_fill",
                   "__add__", "__radd__", "__sub__", "__rsub__", "__neg__", "cross_entropy", "nll_loss",
                   torch.log_softmax, torch.softmax, torch.exp, torch.add, torch.sub, torch.neg, torch.sum, torch.mean,
                   torch.gather, torch.where, torch.masked_fill, torch.nn.functional.log_softmax,
                   torch.nn.functional.softmax, torch.nn.functional.cross_entropy, operator.add, operator.sub,
                   operator.neg}
_SCALED = {"mul", "div", "__mul__", "__rmul__", "__truediv__", torch.mul, torch.div, operator.mul, operator.truediv}
#: meta key of a loss-statistics node: whether eager's spelling saved the logits themselves
EAGER_SAVES_LOGITS = "ger_eager_saves_logits"


def _guard_row_outputs(g: fx.Graph, stats: fx.Node, logits: fx.Node) -> bool:
    """Each floating row output of ``stats`` (a ``losses.row_stats`` call) that requires
    grad read through ``ger::version_guard(out, [logits])``: the backward of any of them
    checks the logits' version (``protect_saved_logits``). Whether any was guarded (none
    in a graph traced under no_grad)."""
    guarded_any = False
    for u in list(stats.users):
        val = _val(u)
        if not (isinstance(val, torch.Tensor) and val.is_floating_point() and val.requires_grad):
            continue
        guarded_any = True
        with g.inserting_after(u):
            guarded = g.call_function(torch.ops.ger.version_guard.default, (u, [logits]))
        graph.copy_meta(guarded, u, values=True)
        u.replace_all_uses_with(guarded, delete_user_cb=lambda user: user is not guarded)
    return guarded_any


def _eager_saves_logits(logits: fx.Node, nodes) -> bool:
    """Whether eager's spelling of the loss saves the logits (or a view of them) for its
    backward: a product with them, a logsumexp of them, ``Categorical(logits=z)``...; a
    cross-entropy, softmax or log-softmax saves its output instead. Where the logits are
    returned, a write to them before the backward then raises autograd's error in eager,
    and the private copy the op reads keeps them for that check (``version_guard``)."""
    base = alias_base(logits)
    for n in nodes:
        if n.op not in ("call_function", "call_method") or n.target in _ALIASING:
            continue
        reads = [a for a in (*n.args, *n.kwargs.values()) if isinstance(a, fx.Node) and alias_base(a) is base]
        if not reads:
            continue
        t = n.target
        if t in _SAVES_NO_INPUT:
            continue
        if t in _SCALED and not any(isinstance(a, fx.Node) and alias_base(a) is not base and
                                    isinstance(_val(a), torch.Tensor) for a in n.args[:2]):
            continue  # scaled by a number (a temperature): nothing saved of the logits
        return True
    return False


def alias_base(n):
    """The tensor ``n`` may share storage with: up through views, and through casts that
    keep the dtype (``x.float()`` of a float32 tensor is ``x``; of a bfloat16 one, a copy)."""
    while isinstance(n, fx.Node) and n.op in ("call_method", "call_function") and n.args and \
            isinstance(n.args[0], fx.Node) and (n.target in _ALIASING):
        if n.target in graph.CASTS and _dtype(n) != _dtype(n.args[0]):
            break
        n = n.args[0]
    return n



def protect_saved_logits(gm: fx.GraphModule) -> list[str]:
    """The fused loss op saves its logits for the backward (eager's loss saves its
    log-softmax, a tensor of its own). Where those logits are also returned by the graph
    (or are a view of what it returns), the caller may write them in place before the
    backward: eager's gradient does not change, the op's would - silently under
    Inductor, whose outputs do not share the saved tensor's version counter. Such an op
    reads a private copy instead (one N x V copy, held to the backward; made by
    ``ger::version_guard``, which the partitioner saves rather than recomputes). Runs after the
    lm head pass: a head it fused writes and returns the logits itself, and saves none.
    Returns the names of the statistics nodes given a copy."""
    g = gm.graph
    out = next(n for n in g.nodes if n.op == "output")
    returned = {alias_base(a) for a in _compat.tree_leaves(out.args[0]) if isinstance(a, fx.Node)}
    copied = []
    for n in list(g.nodes):
        if n.op != "call_function" or n.target is not losses.row_stats:
            continue
        logits = n.args[0]
        v = _val(logits)
        base = alias_base(logits)
        if not (isinstance(v, torch.Tensor) and v.requires_grad):
            continue
        if base.op == "placeholder":
            # logits that are a graph input are the caller's own tensor: a write to it
            # before the backward (z.mul_(0.5) under no_grad) changes what the op saved.
            # Compiled by Inductor, nothing checked it (a silently different gradient);
            # eager's log_softmax saved its output and gives the old gradient. No copy
            # (it would hold N x V where Inductor holds the input itself): the op's row
            # outputs pass a version check of the logits (O(rows) copies), so the write
            # raises autograd's error, as plain Inductor's cross-entropy does
            if _guard_row_outputs(g, n, logits):
                copied.append(f"{n.name} (version check)")
            continue
        if base not in returned:
            continue
        # where eager's spelling saved the logits themselves, the copy keeps them for
        # autograd's version check (eager raises on the caller's write; so does ger)
        keep = [logits] if n.meta.get(EAGER_SAVES_LOGITS, True) else []
        with g.inserting_before(n):
            # an op of ger's, not a clone: AOTAutograd's partitioner would recompute a
            # clone in the backward from the returned tensor itself
            private = g.call_function(torch.ops.ger.version_guard.default, (logits, keep))
        graph.copy_meta(private, logits, values=True)
        n.args = (private, *n.args[1:])
        copied.append(n.name)
    return copied

