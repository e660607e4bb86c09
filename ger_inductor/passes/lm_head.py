"""lm head -> GER loss: ``linear`` / ``matmul`` feeding a loss the ``loss_entropy`` pass
rewrote (or ``ger_loss`` itself) becomes ``ger::linear_loss_fwd``, chunked over the
tokens, so the N x V logits and their gradient are never materialised.

Runs after ``loss_entropy``. Its candidates are that pass's statistics nodes
(``losses.row_stats``) and direct ``ger::loss_fwd`` calls; walking up from their logits
through views (that keep the classes last) and upcasts it looks for

    F.linear(h, W[, b]) / nn.Linear / h @ W.T / torch.matmul(h, W_t) / h.mm(W_t)

(a tied embedding weight is just a weight). The logits must have no other user than the
loss - except the graph's output: logits returned beside the loss (transformers' causal
LMs with ``labels=``) are written by the op as it forms them, and in a graph that needs
gradients the head is fused anyway; their own gradient is attached outside the compiled
graph (``detach_logits_outputs``). Another use (an accuracy) is a near-miss.

Gradients. When the graph's loss (its one output that depends on the statistics) is a
scalar and every operation between the statistics and it is linear (sums, means,
scalings, masks, the rewritten cross-entropy / entropy / KL reductions), the pass copies
that O(rows) subgraph, differentiates the copy at zero statistics to get the per-row
coefficients, and the op forms the gradients in its forward sweep; ``ger::grad_carrier``
adds a zero to the loss that brings the upstream gradient to h, W and b. A loss that is
not linear but a sum of per-row terms (a PPO objective) is copied into a module the
unrolled op differentiates per chunk at that chunk's statistics (``_not_rowwise``,
``lm_head.rowwise_coefficients``). Otherwise (``reduction='none'`` returned, a loss used
twice, a non-linear use of a reduction) the backward sweeps the chunks again; the report
says which and why. A temperature (``logits / T``, ``logits.div_(T)``) between the head
and the loss is the op's; a ``ger_linear_token_stats`` call is written as the plain head
and statistics first (``_expand_token_head``) and put back where it is not fused.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx as fx

from .. import _compat, autotune, fleet, lm_head, losses, shapes
from ..shapes import known_equal
from ..ops import ger_loss as _loss_op
from . import graph
from .graph import CASTS as _CASTS, SHAPE_ONLY as _SHAPE_ONLY, VIEWS as _VIEWS
from .graph import arg as _arg, dtype as _dtype, is_op as _is, shape as _shape, target_of as _target_of, val as _val
from .loss_entropy import EAGER_SAVES_LOGITS, LOSS_FWD, NO_IGNORE

FAMILY = "lm_head"
GRAPH_FUNCTIONS = lm_head.GRAPH_FUNCTIONS

_LINEAR = {torch._C._nn.linear, torch.nn.functional.linear}
_MATMUL = {operator.matmul, torch.matmul, torch.mm, "matmul", "mm", "__matmul__"}
#: functions the loss pass inserts that read the logits for their shape only
_SHAPE_READERS = {losses.cross_entropy_from_stats, losses.row_statistic, losses.kl_div_reduce}
#: methods that read only their tensor's dtype and device
_NEW_TENSOR = {"new_zeros", "new_ones", "new_empty", "new_full"}
_VIEW_LIKE = _VIEWS | {"unsqueeze", "squeeze", "view_as", "reshape_as", torch.unsqueeze, torch.squeeze}

# operations y = f(x, ...) linear in the arguments that depend on the statistics
_ADDITIVE = {operator.add, operator.sub, operator.iadd, operator.isub, operator.neg, operator.pos, torch.add, torch.sub,
             torch.neg, "add", "sub", "neg", "add_", "sub_", "__add__", "__sub__", "__radd__", "__rsub__", "__neg__"}
_SCALING = {operator.mul, operator.imul, torch.mul, "mul", "mul_", "__mul__", "__rmul__"}
_DIVIDING = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "div_", "true_divide", "__truediv__"}
_REDUCING = {torch.sum, torch.mean, "sum", "mean"}
_SELECTING = {operator.getitem, "view", "reshape", "flatten", "squeeze", "unsqueeze", "expand", "expand_as", "contiguous",
              "clone", "permute", "transpose", "t", "select", "narrow", "view_as", "reshape_as", "detach", torch.reshape,
              torch.flatten, torch.squeeze, torch.unsqueeze, torch.transpose, torch.permute, torch.clone, torch.select,
              torch.narrow, torch.detach}
_MASKING = {torch.where, "masked_fill", "masked_fill_", torch.masked_fill}
_SUMS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub, "add", "sub", "__add__",
         "__radd__", "__sub__", "__rsub__"}
_PERMUTES = {"transpose", "permute", "movedim", "swapaxes", "t", torch.transpose, torch.permute, torch.movedim,
             torch.swapaxes, torch.t}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclasses.dataclass
class Plan:
    src: fx.Node
    kind: str  # "row_stats" | "loss_fwd"
    chain: list  # nodes from the linear's output down to the loss's logits (views/casts)
    h: fx.Node
    weight: fx.Node | None  # None: insert W_t.t()
    weight_t: fx.Node | None
    bias: fx.Node | None
    module: str | None  # call_module target of an nn.Linear
    target: fx.Node
    alpha: float
    ignore_index: int
    extras: bool
    smooth_eps: object = None
    smooth_weight: object = None
    base: object = None
    needs: int = 0
    mode: str = "no_grad"
    why: str = ""
    exit: fx.Node | None = None
    path: list = dataclasses.field(default_factory=list)
    zeroed: set = dataclasses.field(default_factory=set)  # read as 0 by the copy
    row_index: object = None  # logits[row_index] right after the head: applied to h instead
    # set by _settle: the copied loss code moves after ``last`` (reorder); what eager saves
    reorder: bool = False
    last: fx.Node | None = None
    keep: dict = dataclasses.field(default_factory=dict)
    returned: bool = False  # the graph returns the head's logits as well: the op writes them
    chunk: int | None = None  # rows per chunk the measured selection chose
    temperature: float = 1.0  # the loss reads (head output) / temperature
    low_div: bool = False  # ... divided in the input dtype before the upcast
    inplace_div: fx.Node | None = None  # ``logits.div_(T)``, its result unused: erased by the rewrite
    rowwise: bool = False  # in_forward with coefficients per chunk from its statistics (a non-linear loss)


def run(gm: fx.GraphModule, ctx) -> bool:
    changed = False
    expanded = {e.stats: e for e in (_expand_token_head(gm, *call) for call in _token_head_calls(gm)) if e is not None}
    for src in list(gm.graph.nodes):
        if src.op != "call_function" or not (src.target is losses.row_stats or src.target in LOSS_FWD):
            continue
        if ctx.eager_reason(src) is not None:
            continue
        before = len(ctx.record.near_misses)
        if _try(gm, src, ctx, library_call=src in expanded):
            changed = True
            if src in expanded:
                expanded.pop(src).finish(gm)
                ctx.record.matches[-1].detail.update(
                    call="ger_linear_token_stats", selection="not measured: replaces the call's own chunk loop, which "
                    "recomputes the logits in the backward (four matmuls to three)")
        elif src in expanded:
            # the library call stays as it was called (its own chunked head); what the pass
            # would have done with its plain form is reported as such
            expanded.pop(src).restore()
            for i in range(before, len(ctx.record.near_misses)):
                m = ctx.record.near_misses[i]
                ctx.record.near_misses[i] = dataclasses.replace(
                    m, reason=f"ger_linear_token_stats kept as called (its own chunked head, the backward recomputing "
                              f"the logits): {m.reason}")
    for e in expanded.values():  # never planned (statistics that must run eagerly): as called
        e.restore()
    _split_near_misses(gm, ctx)
    return changed


def _try(gm: fx.GraphModule, src: fx.Node, ctx, library_call: bool = False) -> bool:
    """Plan, settle, select and rewrite the head of the statistics ``src``: whether it was.
    ``library_call``: ``src`` stands for a ``ger_linear_token_stats`` call, whose own form
    (what stays if this returns False) is chunked too and recomputes the logits in the
    backward: the fused form replaces it where it forms the gradients in the forward (the
    same chunks, one matmul fewer), and only there; no measurement against the unfused
    head, which is not the alternative."""
    plan = _plan(gm, src, ctx)
    if plan is None:
        return False
    # the linear and the views after it are fused away: none of them may be an eager node
    eager = next(((n, ctx.eager_reason(n)) for n in plan.chain if ctx.eager_reason(n) is not None), None)
    if eager is not None:
        ctx.near_miss("linear+loss", src, f"{eager[0].name} must run eagerly ({eager[1]}); the rewrite would fuse it away")
        return False
    # the fused op computes the head where the statistics were: the linear's reads
    # of h, W and b move there
    lin_out = plan.chain[0]
    barrier = graph.Effects(gm).first_barrier([(lin_out, a) for a in lin_out.all_input_nodes], src)
    if barrier is not None:
        ctx.near_miss("linear+loss", src, graph.moved_reads_reason(barrier))
        return False
    _settle(gm, plan)
    if plan.returned and plan.mode == "recompute" and _eager_saves_logits(plan):
        ctx.near_miss("linear+loss", src, f"the logits ({plan.chain[0].name}) are also returned by the graph, the "
                      "loss code saves them (eager raises autograd's error when they are written before the "
                      f"backward) and its gradients are recomputed ({plan.why}): the lm head is left unfused")
        return False
    if plan.returned and plan.mode != "no_grad" and not _compat.donated_buffers_on():
        # measured: with donated buffers off, a second backward (retain_graph=True, which
        # then raises no error) read saved gradient buffers the first had overwritten in
        # place (the scaled gradient of h fused with the returned h's tangent): wrong
        # gradients above the head, where eager and Inductor give them right
        ctx.near_miss("linear+loss", src, f"the logits ({plan.chain[0].name}) are returned and "
                      "torch._functorch.config.donated_buffer is False (so retain_graph=True raises no error): "
                      "a second backward through the fused head would read gradient buffers the first reused; "
                      "the lm head is left unfused")
        return False
    if library_call:
        if plan.mode == "no_grad":
            ctx.near_miss("linear+loss", src, "no gradient is needed: the fused head would do what the call's own "
                          "chunk loop does")
            return False
        if plan.mode != "in_forward":
            ctx.near_miss("linear+loss", src, "the fused head would recompute the logits in the backward too ("
                          f"{plan.why}): nothing to gain over the call's own chunk loop")
            return False
    elif not _selected(gm, plan, ctx):
        return False
    _rewrite(gm, plan, ctx)
    return True


# ----------------------------------------------------------------------------- the library's token head
def _token_head_calls(gm: fx.GraphModule) -> list:
    """``ger_linear_token_stats`` calls in the graph, as (HOP node, h, W, b, y, T): Dynamo
    records its chunk loop (``distill._LinearTokenRows``) as an ``autograd_function_apply``
    whose forward body forms ``F.linear(h[rows], W, b)`` and ``ger::token_fwd`` of those
    logits at the temperature T, and returns (log p(y), entropy) first."""
    hop = _compat.autograd_function_hop()
    if hop is None:
        return []
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is not hop or len(n.args) < 3:
            continue
        body = n.args[0]
        if not (isinstance(body, fx.Node) and body.op == "get_attr"):
            continue
        try:
            fwd = gm.get_submodule(body.target)
        except AttributeError:
            continue
        parts = _token_head_parts(fwd, n.args[2:]) if isinstance(fwd, fx.GraphModule) else None
        if parts is not None:
            out.append((n, *parts))
    return out


def _token_head_parts(fwd: fx.GraphModule, hop_args) -> tuple | None:
    phs = [x for x in fwd.graph.nodes if x.op == "placeholder"]
    if len(phs) != len(hop_args):
        return None
    arg_of = dict(zip(phs, hop_args))
    lins = [x for x in fwd.graph.nodes if _is(x, _LINEAR)]
    toks = [x for x in fwd.graph.nodes if x.op == "call_function" and str(x.target) in ("ger.token_fwd",
                                                                                          "ger.token_fwd.default")]
    if not lins or len(lins) != len(toks):
        return None

    def root(a):
        while isinstance(a, fx.Node) and a.op == "call_function" and a.target is operator.getitem:
            a = a.args[0]
        return a

    heads = {(root(_arg(x, 0, "input")), _arg(x, 1, "weight"), _arg(x, 2, "bias")) for x in lins}
    temps = {t.args[2] if len(t.args) > 2 else None for t in toks}
    targets = {root(t.args[1]) for t in toks}
    if len(heads) != 1 or len(temps) != 1 or len(targets) != 1 or any(t.args[0] not in lins for t in toks):
        return None
    (h, W, b), (T,), (y,) = heads.pop(), temps, targets
    if not all(isinstance(x, fx.Node) and x in arg_of for x in (h, W, y)) or (b is not None and b not in arg_of):
        return None
    if isinstance(T, bool) or not isinstance(T, (int, float)):
        return None
    out = next(x for x in fwd.graph.nodes if x.op == "output").args[0]
    if not (isinstance(out, (tuple, list)) and out and isinstance(out[0], (tuple, list)) and len(out[0]) == 2):
        return None
    return arg_of[h], arg_of[W], arg_of.get(b), arg_of[y], float(T)


@dataclasses.dataclass
class _Expanded:
    """A ``ger_linear_token_stats`` call written as the plain head and statistics the
    pass fuses (``linear -> / T -> row_stats``, log p(y) = -nll, entropy = ent), so that
    the fused head sees the objective built on them (a PPO objective's gradients then
    form in the forward: three matmuls where the library call's backward recomputes the
    logits, four). ``restore`` puts the call back where the pass does not fuse it."""

    call: tuple  # the call's node (target, args, kwargs, meta), taken out of the graph while the pass plans
    stats: fx.Node
    new: list
    outputs: list  # (index, meta, replacement) of the call's output getitems

    def restore(self) -> None:
        g = self.stats.graph
        target, args, kwargs, meta = self.call
        with g.inserting_before(self.new[0]):
            hop = g.call_function(target, args, kwargs)
            hop.meta.update(meta)
            for i, m, rep in self.outputs:
                old = g.call_function(operator.getitem, (hop, i))
                old.meta.update(m)
                rep.replace_all_uses_with(old)
        for n in reversed(self.new):
            if not n.users:
                g.erase_node(n)

    def finish(self, gm: fx.GraphModule) -> None:
        g = gm.graph
        for a in self.call[1][:2]:  # the bodies' get_attr nodes
            if isinstance(a, fx.Node) and not a.users:
                g.erase_node(a)


def _expand_token_head(gm: fx.GraphModule, hop: fx.Node, h, W, b, y, T: float) -> _Expanded | None:
    if any(not (u.op == "call_function" and u.target is operator.getitem and u.args[1] in (0, 1)) for u in hop.users):
        return None
    hv, wv, yv = _val(h), _val(W), _val(y)
    bv = _val(b) if b is not None else None
    if not all(isinstance(v, torch.Tensor) for v in (hv, wv, yv)) or hv.dtype not in _FLOAT_DTYPES:
        return None
    fake = _compat.fake_mode_of([hv, wv, yv])
    if fake is None:
        return None
    cd = _loss_op.compute_dtype(hv.dtype)
    g = gm.graph
    new: list = []

    def add(node, value):
        node.meta["example_value"] = value
        graph.copy_meta(node, hop)
        new.append(node)
        return node

    with g.inserting_before(hop), fake:
        lv = torch.nn.functional.linear(hv, wv, bv)
        lin = add(g.call_function(torch._C._nn.linear, (h, W, b)), lv)
        z, zv = lin, lv
        if hv.dtype != cd:
            zv = zv.to(cd)
            z = add(g.call_method("to", (lin, cd)), zv)
        if T != 1.0:
            zv = zv / T
            z = add(g.call_function(operator.truediv, (z, T)), zv)
        sv = losses.row_stats(zv, yv, 1.0, NO_IGNORE, True, 0)
        stats = add(g.call_function(losses.row_stats, (z, y, 1.0, NO_IGNORE, True, 0)), sv)
        nll = add(g.call_function(operator.getitem, (stats, 0)), sv[0])
        logp = add(g.call_function(operator.neg, (nll,)), -sv[0])
        ent = add(g.call_function(operator.getitem, (stats, 3)), sv[3])
    outputs = []
    for u in list(hop.users):
        rep = logp if u.args[1] == 0 else ent
        u.replace_all_uses_with(rep)
        outputs.append((u.args[1], dict(u.meta), rep))
        g.erase_node(u)
    call = (hop.target, hop.args, dict(hop.kwargs), dict(hop.meta))
    g.erase_node(hop)  # not left in place while the pass plans: an opaque call reads as a barrier
    return _Expanded(call, stats, new, outputs)


#: the graph break transformers' ``PreTrainedModel.loss_function`` causes on each call when
#: the model's ``loss_type`` is not set (GPT-2, for one): ``logger.warning_once``
_HF_LOSS_TYPE_HINT = (
    "; transformers logs a warning inside `model.loss_function` when the model has no known loss_type: set "
    "`model.loss_type = \"ForCausalLM\"` before compiling (or add that logger's warning_once to "
    "torch._dynamo.config.ignore_logging_functions) and the head and loss are traced into one graph"
)


def _split_near_misses(gm: fx.GraphModule, ctx) -> None:
    """An lm head whose logits leave a graph that a graph break ends: the loss after the
    break cannot be fused with it. Ordinary graphs that return logits are not reported."""
    split = _compat.graph_split_reason(gm)
    if split is None or split[0] != "graph_break":
        return
    why = split[1]
    min_vocab = int(fleet.strategy(FAMILY, ctx.profile).get("min_vocab", 0)) if ctx.options.lm_head_chunk is None else 2
    out = next(n for n in gm.graph.nodes if n.op == "output")
    for n in gm.graph.nodes:
        lin = _linear_parts(gm, n) if n.op in ("call_function", "call_method", "call_module") else None
        s = _shape(n)
        if lin is None or s is None or len(s) < 2 or not isinstance(s[-1], int) or s[-1] < max(min_vocab, 2):
            continue
        cur, leaves = n, False
        for _ in range(8):  # through views and casts
            if out in cur.users:
                leaves = True
                break
            nxt = [u for u in cur.users if _is(u, _VIEW_LIKE | _CASTS) or _selects_rows(u)]
            if len(nxt) != 1:
                break
            cur = nxt[0]
        if leaves:
            hf = any("warning_once" in r and "loss_type" in r for r in _compat.graph_break_reasons())
            hint = _HF_LOSS_TYPE_HINT if hf else ""
            ctx.near_miss("linear+loss", n, f"the logits ({n.name}, {s[-1]} classes) leave the graph at a graph "
                          f"break, so a loss after the break is not fused with the head ({why}){hint}")


# ----------------------------------------------------------------------------- matching
def _plan(gm: fx.GraphModule, src: fx.Node, ctx) -> Plan | None:
    def miss(reason: str, node=None) -> None:
        ctx.near_miss("linear+loss", node or src, reason)
        return None

    logits = src.args[0]
    shp = _shape(logits)
    if shp is None:
        return None
    a = graph.op_args(src)
    target, alpha, ignore_index, extras = a["target"], a["alpha"], a["ignore_index"], a["extras"]
    if src.target is losses.row_stats:
        kind = "row_stats"
        class_dim = a["class_dim"] % len(shp)
        smooth_eps, smooth_weight, base = a["smooth_eps"], a["smooth_weight"], None
        classes_last = class_dim == len(shp) - 1
    else:
        kind = "loss_fwd"
        base = a["base"]
        smooth_eps = smooth_weight = None
        classes_last = len(shp) == 3 and known_equal(shp[2], 1)
    # walk up: views keeping the classes last, upcasts; the loss's input may move the
    # classes from last to ``class_dim`` (``logits.transpose(1, 2)`` for (N, C, d) losses)
    chain = [logits]
    cur = logits
    if not classes_last and kind == "row_stats" and _moves_classes_to(logits, class_dim):
        cur = logits.args[0]
        chain.append(cur)
        classes_last = True
    while (_is(cur, _VIEW_LIKE | _CASTS) or _selects_rows(cur) or _temperature_of(cur) is not None) \
            and isinstance(cur.args[0], fx.Node):
        cur = cur.args[0]
        chain.append(cur)
    lin = _linear_parts(gm, cur)
    if lin is None:
        if _is(cur, _DIVIDING | _SCALING) and len(cur.args) == 2 and isinstance(cur.args[0], fx.Node):
            up = cur.args[0]
            while _is(up, _VIEW_LIKE | _CASTS):
                up = up.args[0]
            if isinstance(up, fx.Node) and _linear_parts(gm, up) is not None:
                what = "multiplied" if _is(cur, _SCALING) else "divided"
                by = cur.args[1]
                hint = ""
                if isinstance(by, fx.Node) and _is(by, {"item"}):
                    hint = (" (a Python float passed as an argument: with dynamic=True Dynamo passes it as a tensor "
                            "and reads it back with .item(); torch._dynamo.config.specialize_float = True keeps it a "
                            "constant)")
                kind = "" if isinstance(by, (int, float)) and not cur.kwargs else f", not a Python number{hint}"
                return miss(f"the logits are {what} by {getattr(by, 'name', by)}{kind}: only a division by a constant "
                            "temperature (logits / T) is fused", cur)
        if _is(cur, _PERMUTES):
            up = cur.args[0]
            while _is(up, _VIEW_LIKE | _CASTS):
                up = up.args[0]
            if isinstance(up, fx.Node) and _linear_parts(gm, up) is not None:
                return miss(f"a permutation between the lm head and the loss ({cur.name}) reorders the rows", cur)
        return None
    h, weight, weight_t, bias, module = lin
    w_dtype = gm.get_submodule(module).weight.dtype if module is not None else _dtype(
        weight if weight is not None else weight_t)
    if None in (_dtype(cur), _dtype(h), w_dtype):
        return None
    if _dtype(cur) != _dtype(h) or _dtype(cur) != w_dtype:
        # autocast: the head computes in autocast's dtype (bf16 logits from fp32 h and W);
        # the fused head computes in W's, and would return logits of another dtype
        return miss(f"the lm head ({cur.name}) computes in {_dtype(cur)} from {_dtype(h)} inputs and {w_dtype} "
                    "weights (autocast): the fused head computes in the weights' dtype, so it would not give "
                    "eager's numbers", cur)
    if target is None:
        return miss("the loss statistics on this lm head's logits need no target (an entropy alone): the fused head "
                    "is built around a target; ger_linear_token_stats returns a head's per-token entropy without "
                    "the N x V logits")
    for n in chain:
        if _is(n, _CASTS):
            a, b = _dtype(n.args[0]), _dtype(n)
            if a is None or b is None or b not in _FLOAT_DTYPES:
                return None
            if a != b and not (b == torch.float32 and a in (torch.float16, torch.bfloat16)):
                return miss(f"the logits are cast from {a} to {b} before the loss: the fused head computes in "
                            f"{_loss_op.compute_dtype(a)}, so it would not give the same numbers", n)
    chain.reverse()  # linear output first
    temperature, low_div = 1.0, False
    # a division of the logits: in the chain (``logits / T``, ``logits /= T``), or an
    # in-place ``logits.div_(T)`` whose result is unused - the loss reads the written tensor
    side = [u for n in chain for u in n.users if _is(u, _IN_PLACE_DIV) and u.args[0] is n and not u.users
            and _temperature_of(u) is not None]
    temps = [n for n in chain if _temperature_of(n) is not None] + side
    if len(temps) > 1:
        return miss("the logits are divided by constants more than once between the lm head and the loss: only one "
                    "division (logits / T) is fused", temps[1])
    inplace_div = side[0] if side else None
    if inplace_div is not None:
        n = inplace_div.args[0]
        reader = chain[chain.index(n) + 1] if chain.index(n) + 1 < len(chain) else src
        order = {x: i for i, x in enumerate(gm.graph.nodes)}
        if order[inplace_div] > order[reader]:
            return miss(f"the logits ({n.name}) are divided in place by {inplace_div.name} after the loss reads them",
                        inplace_div)
    if temps:
        tn = temps[0]
        temperature = _temperature_of(tn)
        if not (math.isfinite(temperature) and temperature > 0):
            return miss(f"the logits are divided by {temperature} ({tn.name}): only a finite temperature > 0 is fused",
                        tn)
        hd, td = _dtype(h), _dtype(tn)
        if td is None or hd not in _FLOAT_DTYPES:
            return None
        if td == _loss_op.compute_dtype(hd):
            low_div = False
        elif td == hd:
            low_div = True
        else:
            return miss(f"the logits are divided by the temperature in {td} ({tn.name}), neither the lm head's dtype "
                        f"{hd} nor its compute dtype: the fused head would not give the same numbers", tn)
    selects = [n for n in chain if _selects_rows(n)]
    if selects and (len(selects) > 1 or selects[0] is not chain[1]):
        return miss("rows of the logits are selected after a view: only a selection right after the lm head "
                    "(e.g. logits[..., :-1, :]) is applied to its input instead", selects[0])
    V = (_shape(cur) or (None,))[-1]
    if not classes_last:
        return miss("the classes are not the last dimension of the loss's logits")
    for n in chain:
        s = _shape(n)
        if n is logits and _moves_classes_to(n, class_dim if kind == "row_stats" else -1):
            continue
        if s is None or not (known_equal(s[-1], V) or (n is logits and kind == "loss_fwd"
                                                        and known_equal(s[-2:], (V, 1)))):
            return miss(f"a view between the lm head and the loss ({n.name}) moves the classes", n)
    hs = _shape(h)
    if hs is None or len(hs) < 2:
        return miss("the lm head's input is not a batch of rows (..., H)", h)
    if _dtype(h) not in _FLOAT_DTYPES:
        return None
    # the logits must serve the loss only - or be returned as they are (the head's own
    # output, as transformers' causal LMs return it beside the loss)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    returned = False
    for i, n in enumerate(chain):
        nxt = chain[i + 1] if i + 1 < len(chain) else src
        for u in n.users:
            if u is nxt or _shape_only_user(u, n):
                continue
            if u is out and i == 0:
                returned = True
                continue
            if u is inplace_div:
                continue
            return miss(f"the logits ({n.name}) are also used by {u.name}: the N x V tensor must exist, "
                        "the lm head is left unfused", u)
    lv = _val(cur)
    needs = 0
    if isinstance(lv, torch.Tensor) and lv.requires_grad:
        for bit, node in ((1, h), (2, weight if weight is not None else weight_t), (4, bias)):
            v = _val(node) if isinstance(node, fx.Node) else None
            if isinstance(v, torch.Tensor) and v.requires_grad:
                needs |= bit
        if module is not None:
            mod = gm.get_submodule(module)
            needs |= (2 if mod.weight.requires_grad else 0) | (4 if mod.bias is not None and mod.bias.requires_grad else 0)
    if returned and any(_is(t, _IN_PLACE_DIV) for t in temps):
        return miss(f"the logits ({chain[0].name}) are returned by the graph and divided in place by {temps[0].name} "
                    "(the graph returns the divided logits): the lm head is left unfused", temps[0])
    if returned:
        why = _returned_logits_refusal(out, chain[0], needs, selects)
        if why:
            return miss(f"the logits ({chain[0].name}) are also returned by the graph, and {why}: the lm head is "
                        "left unfused", out)
    plan = Plan(src, kind, chain, h, weight, weight_t, bias, module, target, float(alpha), int(ignore_index),
                bool(extras), smooth_eps, smooth_weight, base, needs, row_index=selects[0].args[1] if selects else None,
                returned=returned, temperature=temperature, low_div=low_div, inplace_div=inplace_div)
    if needs:
        _choose_gradient_mode(gm, plan)
        if plan.rowwise:
            why = _rowwise_refusal(gm, plan, ctx)
            if why:
                plan.mode, plan.rowwise, plan.why = "recompute", False, f"{plan.why}; {why}"
    return plan


def _rowwise_refusal(gm: fx.GraphModule, plan: Plan, ctx) -> str | None:
    """Why the per-chunk coefficients cannot be used here (None: they can). They need the
    unrolled form (a chunk's coefficients are computed between its statistics and its
    gradient, which only the traced chunk loop allows): static rows, a profile that
    unrolls, a chunk count within its limit, and no logits to write."""
    strat = fleet.strategy(FAMILY, ctx.profile)
    unroll = int(strat.get("unroll", 0))
    N = _val(plan.target).numel() if isinstance(_val(plan.target), torch.Tensor) else None
    V = (_shape(plan.chain[0]) or (None,))[-1]
    if unroll <= 0:
        return f"the profile {ctx.profile.name} does not unroll the chunk loop"
    if not isinstance(N, int) or not isinstance(V, int):
        return "the number of rows is symbolic (the chunk loop is unrolled only for static rows)"
    if plan.returned:
        return "the graph returns the logits (the unrolled chunk loop does not write them)"
    chunk = _chunk_rows(ctx, V, N, plan, lean=True)
    if chunk and -(-N // chunk) > unroll:
        return f"{-(-N // chunk)} chunks, more than the profile unrolls ({unroll})"
    return None


def _eager_saves_logits(plan: Plan) -> bool:
    """Whether eager's loss code saves the logits themselves for its backward (the loss
    pass's analysis; ``ger_loss`` called directly saves them)."""
    return bool(plan.src.meta.get(EAGER_SAVES_LOGITS, True)) if plan.kind == "row_stats" else True


def _returned_logits_refusal(out: fx.Node, lin_out: fx.Node, needs: int, selects: list) -> str | None:
    """Why a head whose logits the graph returns is not fused (None: it is, and the op
    writes the logits as it forms them). The fusion pays only in training: it keeps the
    loss's N x V gradient (and AOTAutograd's N x V zero gradient of the returned logits)
    out of the step."""
    if not needs:
        return "no gradient is needed (fusing then saves nothing: the logits are written anyway)"
    if selects:
        return "rows are selected between the head and the loss (the loss reads fewer rows than are returned)"
    if not isinstance(out.args[0], (tuple, list)) or lin_out not in out.args[0]:
        return "they are returned inside a structure (only a flat output tuple is handled)"
    return None


_IN_PLACE_DIV = {operator.itruediv, "div_"}
#: a product of the logits with a value (not a temperature the pass fuses: near-miss only)
_SCALING = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}


def _temperature_of(n) -> float | None:
    """T where ``n`` divides a tensor by a Python number T (``logits / T``, ``logits /= T``
    on a tensor nothing else reads: Dynamo's graph then reads the division's result),
    else None."""
    if not (isinstance(n, fx.Node) and _is(n, _DIVIDING)) or len(n.args) != 2 or n.kwargs:
        return None
    T = n.args[1]
    if isinstance(T, bool) or not isinstance(T, (int, float)):
        return None
    return float(T)


def _selects_rows(n) -> bool:
    """``n`` is ``x[index]`` whose index leaves the last dimension (the classes) whole and
    selects by ints and slices only (e.g. the shift ``logits[..., :-1, :]``): the same
    index applied to the head's input selects the same rows."""
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target is operator.getitem):
        return False
    v = _val(n.args[0])
    if not isinstance(v, torch.Tensor):
        return False
    idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
    if not all(isinstance(i, (int, slice)) or i is Ellipsis for i in idx) or list(idx).count(Ellipsis) > 1:
        return False
    if idx and idx[-1] is Ellipsis:
        return True
    if Ellipsis in idx or len(idx) == v.dim():
        last = idx[-1]
        return isinstance(last, slice) and last == slice(None, None, None)
    return len(idx) < v.dim()


def _moves_classes_to(n: fx.Node, k: int) -> bool:
    """``n`` is a transpose/permute/movedim moving the last dimension to ``k`` and keeping
    the order of the others (so its rows, the other dimensions, are the input's)."""
    if not isinstance(n, fx.Node) or not _is(n, _PERMUTES):
        return False
    s = _shape(n.args[0])
    if s is None or k < 0:
        return False
    nd = len(s)
    args = [a for a in n.args[1:]]
    try:
        if _target_of(n) in ("permute", torch.permute):
            perm = list(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else list(args)
            perm = [d % nd for d in perm]
        else:
            a, b = (d % nd for d in args[:2])
            perm = list(range(nd))
            if _target_of(n) in ("movedim", torch.movedim):
                perm.remove(a)
                perm.insert(b, a)
            else:
                perm[a], perm[b] = perm[b], perm[a]
    except (TypeError, ValueError, IndexError):
        return False
    return perm == list(range(k)) + [nd - 1] + list(range(k, nd - 1))


def _linear_parts(gm: fx.GraphModule, n: fx.Node):
    """(h, W (V, H) or None, W_t (H, V) or None, bias, module) of an lm-head node."""
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        if isinstance(mod, torch.nn.Linear) and len(n.args) == 1 and not n.kwargs:
            return n.args[0], None, None, None, n.target
        return None
    if _is(n, _LINEAR):
        h = _arg(n, 0, "input")
        w = _arg(n, 1, "weight")
        b = _arg(n, 2, "bias")
        if isinstance(h, fx.Node) and isinstance(w, fx.Node) and (b is None or isinstance(b, fx.Node)):
            ws = _shape(w)
            if ws is not None and len(ws) == 2:
                return h, w, None, b, None
        return None
    if _is(n, _MATMUL) and len(n.args) == 2 and not n.kwargs:
        h, wt = n.args
        if isinstance(h, fx.Node) and isinstance(wt, fx.Node):
            ws = _shape(wt)
            if ws is not None and len(ws) == 2:
                return h, None, wt, None, None
    return None


def _shape_only_user(u: fx.Node, n: fx.Node) -> bool:
    """``u`` reads only the shape of ``n`` (directly or through views)."""
    if _is(u, _SHAPE_ONLY) or (u.op == "call_function" and u.target is getattr and u.args[1] in ("shape", "dtype", "device")):
        return True
    if _is(u, _NEW_TENSOR) and u.args and u.args[0] is n and all(a is not n for a in [*u.args[1:], *u.kwargs.values()]):
        return True  # ``logits.new_zeros(())``: reads the dtype and device
    if u.op == "call_function" and u.target in _SHAPE_READERS:
        return u.args[0] is not n  # the logits may be a shape argument, never the statistics
    if _is(u, _VIEW_LIKE | _CASTS) and u.args[0] is n:
        return all(_shape_only_user(w, u) for w in u.users)
    return False


# ----------------------------------------------------------------------------- gradient mode
def _forward_closure(src: fx.Node, values_only: bool = True) -> list:
    """The nodes whose *values* depend on ``src``. Another head's gradient machinery is
    not followed: its coefficients feed only gradients (``linear_row_stats``' values do
    not depend on ``coefs``, ``add_carrier`` adds a zero)."""
    seen = {src}
    stack = [src]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u.op == "output" or u in seen or (values_only and not _value_edge(n, u)):
                continue
            seen.add(u)
            stack.append(u)
    return [n for n in src.graph.nodes if n in seen]


def _value_edge(n: fx.Node, u: fx.Node) -> bool:
    if u.op != "call_function":
        return True
    if u.target is lm_head.stat_coefficients:
        return False
    if u.target is lm_head.linear_row_stats:
        return any(a is n for a in u.args) or any(v is n for k, v in u.kwargs.items() if k != "coefs")
    if u.target is lm_head.add_carrier:
        return u.args[0] is n
    return True


def _choose_gradient_mode(gm: fx.GraphModule, plan: Plan) -> None:
    plan.mode, plan.why = "recompute", ""
    if any(isinstance(_val(n), torch.Tensor) and _val(n).dtype == torch.float16 for n in (plan.h, plan.chain[0])):
        # gradients formed in the forward are at an upstream gradient of 1: in float16 the
        # small ones underflow (p / N of a 32000-class row is ~1e-9), where eager scales
        # first by the loss scale (GradScaler's 65536) and keeps them (stop-38 review)
        plan.why = ("float16 head: gradients formed in the forward would underflow where a loss scale keeps them; "
                    "they are formed in the backward, scaled first, as eagerly")
        return
    D = _forward_closure(plan.src)
    in_d = set(D)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    exits = [n for n in D if n in out.all_input_nodes]
    # outputs that need no gradient (a logged clip fraction: comparisons, counts) keep
    # eager's values when the statistics are the op's constants; the loss is the one left
    exits = [n for n in exits if not (isinstance(_val(n), torch.Tensor) and not _val(n).requires_grad)] or exits
    if len(exits) != 1:
        plan.why = (f"{len(exits)} graph outputs depend on the loss statistics" if exits
                    else "no graph output depends on the loss statistics")
        return
    L = exits[0]
    lv = _val(L)
    numel = lv.numel() if isinstance(lv, torch.Tensor) else None
    if not isinstance(numel, int) or numel != 1 or lv.dtype not in _FLOAT_DTYPES:
        plan.why = f"the output {L.name} is not a scalar loss (e.g. reduction='none')"
        return
    # the nodes between the statistics and L, and every in-place op that writes one of
    # their tensors (``nll.masked_fill_(pad, 0)`` as transformers' LabelSmoother does: its
    # result is unused, L reads the written tensor): the copy must run those writes too,
    # or its coefficients miss them
    effects = graph.Effects(gm)
    anc: set = set()

    def close(seed: fx.Node) -> None:
        anc.add(seed)
        stack = [seed]
        while stack:
            n = stack.pop()
            for a in n.all_input_nodes:
                if a in in_d and a not in anc and a is not plan.src:
                    anc.add(a)
                    stack.append(a)

    close(L)
    while True:
        roots = frozenset().union(*(effects.roots_of(n) for n in anc))
        writers = [w for w in D if w not in anc and w is not plan.src and effects.writes.get(w, frozenset()) & roots]
        if not writers:
            break
        for w in writers:
            if effects.order[w] > effects.order[L]:
                plan.why = f"{graph.describe(w)} writes the loss code's values after the loss is formed"
                return
            close(w)
    path = [n for n in D if n in anc and n is not plan.src]
    mine = set(path)
    for n in path:
        # the copy runs each write again: it may write only what the copy itself creates
        # (never the statistics' own buffers, an input, a parameter or a buffer)
        written = effects.writes.get(n, frozenset())
        if effects.kinds.get(n) == "unknown" or not written <= mine:
            plan.why = f"{graph.describe(n)} writes in place a tensor the loss code did not create"
            return
    nonlinear = next((w for w in (_nonlinear(n, in_d) for n in path) if w), None)
    if nonlinear:
        # not linear: the coefficients depend on the statistics; where the loss is a sum of
        # per-row terms, each chunk's coefficients follow from that chunk's statistics
        why = _not_rowwise(plan, path, in_d)
        if why:
            plan.why = f"{nonlinear}, and {why}"
            return
        plan.why = f"not linear in the statistics ({nonlinear}) but a sum of per-row terms: coefficients per chunk"
    # values the copy reads that come from another loss's statistics (two heads in one
    # loss): only their sum with this head's terms is allowed - the copy then reads a 0
    # instead, which keeps the heads' coefficient computations independent
    in_path = set(path)
    other = {n for n in gm.graph.nodes if n is not plan.src and n.op == "call_function"
             and (n.target in (losses.row_stats, lm_head.linear_row_stats) or n.target in LOSS_FWD)}
    zeroed = set()
    for n in path:
        reads = [n.args[0]] if n.op == "call_function" and n.target is lm_head.add_carrier else n.all_input_nodes
        for a in reads:
            if not isinstance(a, fx.Node) or a in in_path or a is plan.src or a in zeroed or not _depends_on(a, other):
                continue
            v = _val(a)
            if not (isinstance(v, torch.Tensor) and v.dim() == 0 and _only_added(a, in_path)):
                plan.why = f"the loss combines this head's terms with another loss's ({a.name}) other than by a sum"
                return
            zeroed.add(a)
    plan.mode, plan.exit, plan.path, plan.zeroed = "in_forward", L, path, zeroed
    plan.rowwise = bool(nonlinear)


# element-by-element operations (besides the sums, products, quotients, masks and casts of
# ``_nonlinear``): each output element depends on the elements at its own position
_ELEMENTWISE = {
    torch.exp, torch.log, torch.log1p, torch.expm1, torch.exp2, torch.log2, torch.log10, torch.sqrt, torch.rsqrt,
    torch.abs, torch.sigmoid, torch.tanh, torch.relu, torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max,
    torch.minimum, torch.maximum, torch.fmin, torch.fmax, torch.square, torch.reciprocal, torch.pow, torch.sign,
    torch.nan_to_num, torch.lt, torch.le, torch.gt, torch.ge, torch.eq, torch.ne, torch.logical_and, torch.logical_or,
    torch.logical_not, torch.nn.functional.relu, torch.nn.functional.softplus, torch.nn.functional.logsigmoid,
    torch.special.expm1, torch.special.log1p, operator.pow, operator.abs, operator.lt, operator.le, operator.gt,
    operator.ge, operator.eq, operator.ne, operator.and_, operator.or_, operator.invert,
    "exp", "log", "log1p", "expm1", "exp2", "log2", "log10", "sqrt", "rsqrt", "abs", "sigmoid", "tanh", "relu", "clamp",
    "clip", "clamp_min", "clamp_max", "minimum", "maximum", "fmin", "fmax", "square", "reciprocal", "pow", "sign",
    "nan_to_num", "lt", "le", "gt", "ge", "eq", "ne", "logical_and", "logical_or", "logical_not", "__pow__",
    "__rpow__", "__abs__", "__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__", "__and__", "__or__",
    "__invert__", "type_as",
}
# views that keep the elements in row-major order (a value of the rows' shape stays aligned
# with every other such value of the same shape)
_ORDER_KEEPING = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "clone", "detach", "view_as",
                  "reshape_as", torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.clone,
                  torch.detach} | _CASTS
# the loss pass's functions that read the statistics row by row (a value per row)
_PER_ROW = {losses.row_statistic}


def _not_rowwise(plan: Plan, path: list, in_d: set) -> str | None:
    """Why the loss is not known to be a sum of per-row terms (None: it is): from the
    statistics, element-by-element operations (any, e.g. a PPO ratio exp(logp - old),
    clipping, minimum) and views, then reductions, and after a reduction only linear
    operations. Then d loss / d (row i's statistics) depends on row i's statistics only,
    so the op can form each chunk's coefficients from that chunk's statistics. Two
    statistics-dependent operands of one operation must be aligned: the same shape, both
    reached from the statistics through element-by-element operations and order-keeping
    views only."""
    src = plan.src
    state: dict = {}  # node -> ("row", token) | ("red", None)
    fresh = iter(range(1, 1 << 30))

    def name(n):
        t = _target_of(n)
        return getattr(t, "__name__", t)

    for n in path:
        if n.op not in ("call_function", "call_method"):
            return f"{n.name} ({n.op}) is not a function call"
        deps = [a for a in n.all_input_nodes if a is src or (a in in_d and a in state)]
        if any(a is src for a in deps):
            if n.target is operator.getitem or n.target in _PER_ROW or (
                    n.target is losses.cross_entropy_from_stats and graph.op_args(n).get("reduction") == "none"):
                state[n] = ("row", 0)
            elif _nonlinear(n, in_d) is None:
                state[n] = ("red", None)
            else:
                return f"{n.name} ({name(n)}) reads the statistics in a way not known to act row by row"
            continue
        kinds = [state[a] for a in deps]
        if not kinds:
            continue
        if any(k[0] == "red" for k in kinds):
            why = _nonlinear(n, in_d)
            if why:
                return f"{why} after a reduction over rows (the loss is not a sum of per-row terms)"
            state[n] = ("red", None)
            continue
        if _is(n, _REDUCING):
            if n.kwargs.get("dtype") not in (None, *_FLOAT_DTYPES):
                return f"{n.name} reduces to a non-float dtype"
            state[n] = ("red", None)
            continue
        shapes = [_shape(a) for a in deps]
        out_shape = _shape(n)
        if any(s is None for s in shapes) or out_shape is None:
            return f"{n.name}: unknown shapes"
        if _is(n, _ORDER_KEEPING) and not _is(n, _PERMUTES):
            state[n] = ("row", kinds[0][1])
            continue
        if _is(n, _ELEMENTWISE | _ADDITIVE | _SCALING | _MASKING | _DIVIDING) or _binary_min_max(n):
            if _is(n, _DIVIDING) and n.kwargs.get("rounding_mode") is not None:
                return f"{n.name} rounds"
            if len(deps) > 1 and (len({k[1] for k in kinds}) != 1 or any(tuple(x) != tuple(out_shape) for x in shapes)):
                return (f"{n.name} ({name(n)}) combines values of the statistics that are not aligned row by row "
                        "(a broadcast, a permutation or a selection between them)")
            same = all(tuple(x) == tuple(out_shape) for x in shapes)
            state[n] = ("row", kinds[0][1] if same else next(fresh))
            continue
        if _is(n, _SELECTING | _PERMUTES) or n.target is operator.getitem:
            state[n] = ("row", next(fresh))
            continue
        return f"{n.name} ({name(n)}) is not known to act element by element"
    return None


def _depends_on(n: fx.Node, sources: set) -> bool:
    seen, stack = set(), [n]
    while stack:
        x = stack.pop()
        if x in sources:
            return True
        for a in x.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return False


def _only_added(a: fx.Node, in_path: set) -> bool:
    """``a`` enters the loss code only as a term of a sum (or difference)."""
    return all(_is(u, _SUMS) for u in a.users if u in in_path)


def _nonlinear(n: fx.Node, in_d: set) -> str | None:
    """Why ``n`` is not linear in its statistics-dependent inputs (None if it is)."""
    def dep(a) -> bool:
        return isinstance(a, fx.Node) and a in in_d

    args = list(n.args) + list(n.kwargs.values())
    deps = [a for a in args if dep(a)]
    if n.op == "call_function" and n.target is lm_head.add_carrier:  # another head's loss plus a zero
        return None if not any(dep(a) for a in args[1:]) else "stats in a gradient carrier"
    if n.op == "call_function" and n.target in _SHAPE_READERS:
        return None if not any(dep(a) for a in args[1:]) or n.target is losses.kl_div_reduce else "stats in a shape argument"
    if _is(n, _ADDITIVE | _SELECTING | _REDUCING):
        if _is(n, _REDUCING) and n.kwargs.get("dtype") not in (None, *_FLOAT_DTYPES):
            return f"{n.name} reduces to a non-float dtype"
        return None
    if _is(n, _SCALING):
        return None if len(deps) <= 1 else f"{n.name} multiplies two terms of the loss statistics (not linear)"
    if _is(n, _DIVIDING):
        if n.kwargs.get("rounding_mode") is not None:
            return f"{n.name} rounds"
        return None if len(deps) == 1 and dep(n.args[0]) and not dep(n.args[1]) else f"{n.name} divides by the loss statistics"
    if _is(n, _MASKING):
        cond = n.args[0] if _target_of(n) is torch.where else (n.args[1] if len(n.args) > 1 else n.kwargs.get("mask"))
        return None if not dep(cond) and not (len(n.args) > 2 and _target_of(n) is not torch.where and dep(n.args[2])) \
            else f"{n.name} masks with the loss statistics"
    if _is(n, _CASTS):
        v = _val(n)
        return None if isinstance(v, torch.Tensor) and v.dtype in _FLOAT_DTYPES else f"{n.name} casts to a non-float dtype"
    return f"{n.name} ({getattr(_target_of(n), '__name__', _target_of(n))}) is not known to be linear in the loss statistics"


def _saved_by_eager(plan: Plan) -> dict:
    """The tensors from outside the loss code that eager saves for its backward, each
    with the first node that reads it (where eager saves it), so that the in-forward mode
    (whose backward needs none of them) still lets autograd's version counter raise
    eager's error when one is written before the backward: the loss op's target,
    smoothing weight and base (a cross-entropy saves its target), and per copied op what
    its eager backward keeps of an operand that does not depend on the statistics - a
    product's other factor, a divisor, a mask or condition, a tensor index. A sum saves
    nothing."""
    in_path = set(plan.path)
    out: dict = {}

    def add(a, reader: fx.Node) -> None:
        if isinstance(a, (list, tuple)):
            for x in a:
                add(x, reader)
        elif isinstance(a, fx.Node) and a not in in_path and a is not plan.src and a not in out \
                and isinstance(_val(a), torch.Tensor):
            out[a] = reader

    src = plan.src
    add([plan.target, plan.smooth_weight, plan.base], src)
    if plan.kind == "loss_fwd" and plan.base is not None:
        add(graph.op_args(src)["log_base"], src)
    for n in plan.path:
        if n.op not in ("call_function", "call_method"):
            continue
        if _is(n, _SCALING):
            add(list(n.args[:2]), n)
        elif _is(n, _DIVIDING):
            other = n.args[1] if len(n.args) > 1 else n.kwargs.get("other")
            add(other, n)
            if isinstance(other, fx.Node) and (other in in_path or other is plan.src):
                add(n.args[0], n)  # dividing by the statistics (a per-row loss): eager saves the numerator too
        elif _is(n, _MASKING):
            add(n.args[0] if _target_of(n) is torch.where else (n.args[1] if len(n.args) > 1 else n.kwargs.get("mask")), n)
        elif n.target is operator.getitem and len(n.args) > 1:
            add(n.args[1], n)
        elif n.target is losses.cross_entropy_from_stats:  # its target and class weights
            add([graph.op_args(n)[k] for k in ("target", "weight")], n)
        elif _is(n, _SAVES_OPERANDS) or _binary_min_max(n):  # a non-linear loss (per-row coefficients): the other operands
            add(list(n.args) + list(n.kwargs.values()), n)
    return out


def _binary_min_max(n: fx.Node) -> bool:
    """``torch.min(a, b)`` / ``torch.max(a, b)`` of two tensors (TRL's GRPO clipping): an
    element-by-element minimum / maximum, saving both operands; not ``min(x)`` nor ``min(x, dim)``."""
    return _is(n, {torch.min, torch.max, "min", "max"}) and len(n.args) == 2 and not n.kwargs \
        and isinstance(n.args[1], fx.Node) and isinstance(_val(n.args[1]), torch.Tensor)


#: element-by-element operations whose eager backward saves every tensor operand
_SAVES_OPERANDS = {torch.minimum, torch.maximum, torch.fmin, torch.fmax, torch.clamp, torch.clip, torch.pow,
                   operator.pow, "minimum", "maximum", "fmin", "fmax", "clamp", "clip", "pow", "__pow__", "__rpow__"}


def _written_while_saved(plan: Plan, keep: dict, effects: graph.Effects) -> fx.Node | None:
    """A write to a tensor eager saves, after eager's save (its first read) and up to the
    loss: the gradient carrier, after the loss, would save the written version and miss
    eager's error. (Writes after the loss bump the version the carrier saved.)"""
    end = effects.order[plan.exit]
    for t, reader in keep.items():
        roots = effects.roots_of(t)
        start = effects.order[reader]
        for n, i in effects.order.items():
            if start < i <= end and effects.writes.get(n, frozenset()) & roots:
                return n
    return None


# ----------------------------------------------------------------------------- selection
def _prior(plan: Plan, ctx) -> str | None:
    """Why the profile's static table refuses the site (None: it fuses it)."""
    V = (_shape(plan.chain[0]) or (None,))[-1]
    min_vocab = int(fleet.strategy(FAMILY, ctx.profile).get("min_vocab", 0))
    if plan.returned and ctx.profile.device_type == "cpu" and _dtype(plan.h) in (torch.bfloat16, torch.float16):
        # the op's chunk loop runs eagerly here (the unrolled form cannot write the logits)
        return ("the logits are returned and are bfloat16/float16 on a CPU: the fused head writing them was "
                "heavier and slower than Inductor's (406 vs 375 MiB, 1.38x at 2048 x 512 x 32000 bf16); "
                "the option lm_head_chunk fuses it anyway")
    if isinstance(V, int) and V < min_vocab:
        return (f"{V} classes, below this profile's min_vocab ({min_vocab}): the logits are small and the unfused "
                "head is as fast; the option lm_head_chunk fuses it anyway")
    return None


def _selected(gm: fx.GraphModule, plan: Plan, ctx) -> bool:
    """Whether the site is rewritten: ``lm_head_chunk`` forces it; else the measured
    decision (``autotune``) where the site can be measured, else the profile's prior.
    Where the logits are returned there are up to three fused forms, leanest first: a
    quarter of the rows per chunk, half of them, and the largest chunk the memory rule
    allows; the first that is not slower than Inductor's form beyond noise is kept
    (``plan.chunk``)."""
    if ctx.options.lm_head_chunk is not None:
        return True
    prior = _prior(plan, ctx)
    site = _site_class(gm, plan, ctx, None)
    if isinstance(site, str):  # not measured: the prior decides
        if ctx.options.autotune:
            ctx.strategy(selection=f"prior ({site})")
        if prior is not None:
            ctx.near_miss("linear+loss", plan.src, prior)
        return prior is None
    store = autotune.store_path(ctx.options.autotune_store)
    N = shapes.hint(_val(plan.target).numel())
    V = shapes.hint(_val(plan.chain[0]).shape[-1])
    chunks = [_chunk_rows(ctx, V, N, plan, lean=True)]
    if plan.returned:
        for c in (_chunk_rows(ctx, V, N, plan, lean=True, parts=2), _chunk_rows(ctx, V, N, plan)):
            if c not in chunks:
                chunks.append(c)
    d = None
    for chunk in chunks:
        site = _site_class(gm, plan, ctx, chunk)
        key = autotune.site_key(FAMILY, ctx.profile, site)
        try:
            # leaner: where the rows take more than one chunk, or where the logits are
            # returned (the unfused head's step then holds them, their zero gradient and
            # the loss's: three N x V tensors; the fused op the logits and at most one
            # N x V of chunk buffers, ``_chunk_rows``)
            d = autotune.decide(FAMILY, key, lambda c=chunk: _measure(gm, plan, ctx, c), store,
                                fused_leaner=site["chunks"] > 1 or plan.returned)
        except Exception as e:  # noqa: BLE001 - a failed measurement leaves the prior in charge
            if ctx.options.strict:
                raise
            ctx.report.add_fallback("autotune", f"measuring the lm head at {plan.src.name} failed; the profile's "
                                    "prior decides", exc=e, node=plan.src.name)
            if prior is not None:
                ctx.near_miss("linear+loss", plan.src, prior)
            return prior is None
        ctx.decision(plan.src, d)
        if d.choice == "ger":
            if site.get("symbolic_rows"):
                ctx.strategy(measured_rows=f"{N} (the example's; the rows are symbolic)")
            else:
                plan.chunk = chunk
            return True
    why = ("the fused head is slower here" if d.ratio > 1 + autotune.TOLERANCE else
           "the fused head is not faster beyond noise here, and in one chunk it is not the leaner")
    ctx.near_miss("linear+loss", plan.src, f"measured on {ctx.profile.name}: {why} ({d.one_line()}); the "
                  "unfused head is kept (options autotune=False or lm_head_chunk fuse it anyway)")
    return False


def _site_class(gm: fx.GraphModule, plan: Plan, ctx, chunk: int | None) -> dict | str:
    """The site's shape class with ``chunk`` rows per chunk (the decision's key), or why
    it is not measured."""
    if not ctx.options.autotune:
        return "autotune is off"
    if ctx.options.compiler != "inductor":
        return "not compiled by Inductor"
    hv, wv, tv = _val(plan.h), _val(plan.chain[0]), _val(plan.target)
    if not all(isinstance(v, torch.Tensor) for v in (hv, wv, tv)):
        return "no example values"
    H, V, N = hv.shape[-1], wv.shape[-1], tv.numel()
    symbolic = not all(isinstance(x, int) for x in (H, V, N)) or not isinstance(hv.numel(), int)
    if symbolic:
        # symbolic rows: where the fused head would recompute the logits in the backward
        # (four matmuls to Inductor's three), it is timed at the example sizes, as the
        # graph runs it (the op's chunk loop); other modes keep the prior
        H, V, N = (shapes.hint(x) for x in (H, V, N))
        if plan.mode != "recompute" or plan.returned or None in (H, V, N) or shapes.hint(hv.shape) is None:
            return "symbolic sizes"
    floor = int(fleet.strategy(FAMILY, ctx.profile).get("autotune_min_mib", 0)) << 20
    if N * V * 4 < floor:
        return "below the profile's autotune_min_mib"
    if not autotune.fits(hv.device, 4 * (3 * N * V + V * H + N * H)):  # logits, their grads, W and h
        return "the unfused form would not fit in free memory"
    if plan.module is not None:
        mod = gm.get_submodule(plan.module)
        wdt, bias = mod.weight.dtype, mod.bias is not None
    else:
        wdt, bias = _dtype(plan.weight if plan.weight is not None else plan.weight_t), plan.bias is not None
    # the fused op holds one (chunk, V) buffer: leaner than the unfused head only where the
    # rows take more than one chunk (with one, it holds a full N x V buffer too, and the
    # fp32 grad_W from the forward to the backward: measured 156 vs 125 MiB at
    # 1024 x 256 x 32000 on CPU)
    chunks = -(-N // max(1, chunk or _chunk_rows(ctx, V, N, plan, lean=True)))
    return {"rows": 1 << max(0, (N - 1).bit_length()), "chunks": chunks, "H": H, "V": V, "dtype": str(hv.dtype),
            "wdtype": str(wdt),
            "bias": bias, "returned": plan.returned,
            "needs": plan.needs, "mode": plan.mode, "kind": plan.kind, "alpha": plan.alpha, "extras": plan.extras,
            "smoothing": plan.smooth_weight is not None, "base": plan.base is not None,
            "loss": _loss_signature(plan),
            # (only where set: the keys of earlier decisions stay as they were)
            **({"rowwise": True} if plan.rowwise else {}),
            **({"temperature": plan.temperature, "low_div": plan.low_div} if plan.temperature != 1.0 else {}),
            **({"symbolic_rows": True} if symbolic else {}),
            # what else shapes the two forms' code: Inductor's settings (mode, options),
            # ger's options and sources, the thread count (the site's graph carries its
            # own casts: the context's autocast does not apply, see _measure)
            "context": {**{k: v for k, v in autotune.compile_context(_measure_patches(ctx)).items()
                           if k != "autocast"},
                        "options": ctx.options.cache_key(), "sources": _sources()}}


def _sources() -> str:
    from . import sources_hash

    return sources_hash()


def _measure_patches(ctx) -> dict:
    """Inductor settings a measurement compiles both forms with: the backend's (mode,
    profile, option ``inductor_config``), CUDA graphs left out (the timing calls are
    not recorded)."""
    from . import cacheable_functions_patch

    patches = {**ctx.mode_patches, **fleet.inductor_patches(ctx.profile), **cacheable_functions_patch(),
               **dict(ctx.options.inductor_config)}
    patches.pop("triton.cudagraphs", None)
    return patches


def _chunk_rows(ctx, V, rows, plan: Plan, lean: bool = False, parts: int = 4) -> int:
    """Rows per chunk of the fused op: the profile's (or the option's), at most the rows.
    Where the logits are returned, the op's chunk buffers (the compute-dtype logits, a
    second one for the entropy and general-alpha terms, a low-precision copy of the
    gradient for bf16/fp16) hold at most one N x V tensor of the logits' dtype, half of
    what Inductor's unfused step adds to the logits (their zero gradient and the loss's);
    ``lean``: at most 1/``parts`` of the rows (at least 128) as well. Chunks cost time on
    the CPU (2048 x 512 x 32000 fp32, warm allocator: a quarter of the rows per chunk
    1.05x Inductor's step, one chunk 1.01x; at 512 x 256 x 32000 the quarter was the
    faster), so the selection measures them in turn (``_selected``). Peak of a Qwen3
    config's ``labels=`` step (512 x 256 x 32000 fp32, logits returned; Inductor 138
    MiB): a quarter 60 MiB, half 75, one chunk 106."""
    chunk = fleet.lm_head_chunk(ctx.profile, V, ctx.options.lm_head_chunk)
    if isinstance(rows, int) and rows > 0 and chunk:
        chunk = min(chunk, rows)
        if plan.returned and ctx.options.lm_head_chunk is None:
            dt = _dtype(plan.h)
            isz = torch.empty((), dtype=dt).element_size() if dt is not None else 4
            csz = 8 if dt == torch.float64 else 4
            per_row = csz * (2 if (plan.extras or plan.alpha != 1.0) else 1) + (isz if isz < csz else 0)
            chunk = max(1, min(chunk, (rows * isz) // per_row))
            if lean:
                chunk = min(chunk, max(128, -(-rows // parts)))
    return chunk


def _loss_signature(plan: Plan) -> list[str]:
    """The loss code after the statistics, op by op (part of the shape class: a z-loss
    or an entropy term costs differently from a plain cross-entropy)."""
    return [str(getattr(_target_of(n), "__name__", _target_of(n))) for n in plan.path] if plan.mode == "in_forward" else []


def _measure(gm: fx.GraphModule, plan: Plan, ctx, chunk: int) -> tuple:
    """Time the site both ways: its head and loss statistics as one small graph (the form
    Inductor compiles without this rewrite), and the same graph after this pass (the fused
    op), forward and backward as the site needs. (The site's graph carries its own casts:
    no autocast of the context that compiles it applies.)"""
    with torch.autocast(_val(plan.h).device.type, enabled=False):
        return _measure_forms(gm, plan, ctx, chunk)


def _measure_forms(gm: fx.GraphModule, plan: Plan, ctx, chunk: int) -> tuple:
    from . import PassContext, snapshot_graph
    from ..debug import GraphReport, PassRecord

    mini = None
    rows = _measured_rows(plan, chunk)
    if rows is not None:
        try:  # fewer rows; a graph whose views spell the row count as constants cannot take them
            mini, inputs, leaves, msrc = _site_graph(gm, plan, ctx, rows)
            ctx.strategy(measured_rows=f"{shapes.hint(_val(msrc.args[1]).numel())} of {shapes.hint(_val(plan.target).numel())}")
        except Exception:  # noqa: BLE001 - measured at the full size instead
            mini = None
    if mini is None:
        mini, inputs, leaves, msrc = _site_graph(gm, plan, ctx)
    fused = fx.GraphModule(torch.nn.Module(), snapshot_graph(mini.graph))
    fsrc = next(n for n in fused.graph.nodes if n.name == msrc.name)
    sub = PassContext(dataclasses.replace(ctx.options, lm_head_chunk=chunk, autotune=False,
                                          strict=True), ctx.profile, GraphReport(-1, "autotune", []),
                      record=PassRecord(FAMILY, 0.0, False))
    fplan = _plan(fused, fsrc, sub)
    if fplan is not None:
        _settle(fused, fplan)
    if fplan is None or fplan.mode != plan.mode or fplan.rowwise != plan.rowwise:
        raise RuntimeError(f"the measurement graph plans differently ({None if fplan is None else fplan.mode} vs "
                           f"{plan.mode}): {[m.reason for m in sub.record.near_misses]}")
    _rewrite(fused, fplan, sub)
    fused.graph.lint()
    fused.recompile()
    wrap = detach_logits_outputs(fused) if plan.returned else None
    mini.recompile()
    out_vals = next(n for n in mini.graph.nodes if n.op == "output").args[0]
    if plan.returned:
        out_vals = out_vals[:-1]  # the returned logits: no gradient reaches them
    grads = [torch.ones(shapes.hint(tuple(v.meta["example_value"].shape)), dtype=v.meta["example_value"].dtype,
                        device=v.meta["example_value"].device) for v in out_vals] if plan.mode == "recompute" else None

    def finish(out):
        if plan.mode == "in_forward":
            (out[0] if isinstance(out, (list, tuple)) else out).backward()
        elif plan.mode == "recompute":
            torch.autograd.backward(list(out)[:len(grads)], grads)
        for t in leaves:
            t.grad = None

    t = autotune.compile_and_time({"ger": (fused, inputs, finish, wrap), "inductor": (mini, inputs, finish, None)},
                                  _val(plan.h).device, _measure_patches(ctx))
    return t["ger"], t["inductor"]


#: a site whose (rows, V) logits exceed this many elements is timed on fewer rows (at
#: least two of the fused op's chunks): both forms' time grows with the rows, and timing
#: a large head at full size costs minutes (4096 x 1024 x 128256 fp32 on 2 CPU cores:
#: a 267 s first compile against Inductor's 33 s)
MEASURE_MAX_ELEMENTS = 1 << 27


def _measured_rows(plan: Plan, chunk: int) -> int | None:
    """The rows to time the site on, where fewer than its own (None: all of them)."""
    tv, V = _val(plan.target), shapes.hint((_shape(plan.chain[0]) or (None,))[-1])
    if not isinstance(tv, torch.Tensor) or not isinstance(V, int) or not isinstance(shapes.hint(tv.numel()), int):
        return None
    N = shapes.hint(tv.numel())
    if N * V <= MEASURE_MAX_ELEMENTS:
        return None
    want = max(2 * max(1, chunk or 0), MEASURE_MAX_ELEMENTS // V)
    return want if want < N else None


def _site_graph(gm: fx.GraphModule, plan: Plan, ctx, rows: int | None = None):
    """The site as a graph of its own: placeholders for what it reads (random tensors of
    the same shapes, dtypes and devices), the head, the views and casts after it, the
    loss statistics, and the loss as the site uses them - a sum of the statistics with
    fixed coefficients where the gradients are formed in the forward, the statistics
    themselves otherwise. Returns (graph module, inputs, leaves needing grad, stats node).

    ``rows``: about this many rows instead (the leading dimension of the head's input
    scaled down, and that of every other input that shares it); raises where the site
    cannot take them (a view that names the row count, or a weight dimension equal to
    the leading one)."""
    g = fx.Graph()
    env: dict = {}
    inputs: list = []
    leaves: list = []
    V = shapes.hint((_shape(plan.chain[0]) or (None,))[-1])
    gen = torch.Generator().manual_seed(0)
    hv0 = _val(plan.h)
    h_shape = shapes.hint(tuple(hv0.shape))  # symbolic rows: the example's (``_site_class``)
    lead = lead2 = None
    if rows is not None:
        N0 = math.prod(h_shape[:-1])
        lead = h_shape[0]
        lead2 = max(1, -(-lead * rows // N0))
        if hv0.dim() < 2 or lead2 >= lead or lead in (V, h_shape[-1]):
            raise RuntimeError("the site's rows cannot be scaled down")

    def rand_like(v: torch.Tensor, role: str) -> torch.Tensor:
        shape, dev = shapes.hint(tuple(v.shape)), v.device
        if shape is None:
            raise RuntimeError("a size without an example value")
        if lead is not None and role not in ("weight", "bias") and shape and shape[0] == lead:
            shape = (lead2,) + shape[1:]
        if v.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            return torch.randint(0, V, shape, generator=gen, dtype=v.dtype).to(dev)
        if v.dtype == torch.bool:
            return (torch.rand(shape, generator=gen) > 0.5).to(dev)
        x = torch.randn(shape, generator=gen) if role in ("h", "weight", "bias") else torch.rand(shape, generator=gen) + 0.5
        if role == "weight":
            x = x / math.sqrt(max(1, shape[-1] if plan.weight_t is None else shape[0]))
        return x.to(dev, v.dtype)

    def place(node, role: str, value=None, grad: bool = False):
        v = value if value is not None else _val(node)
        if not isinstance(v, torch.Tensor):
            raise RuntimeError(f"{getattr(node, 'name', node)}: no tensor value to measure with")
        t = rand_like(v, role)
        if grad:
            t.requires_grad_(True)
            leaves.append(t)
        p = g.placeholder(f"{role}_{len(inputs)}")
        inputs.append(t)
        if node is not None:
            env[node] = p
        return p

    needs = plan.needs
    h = place(plan.h, "h", grad=bool(needs & 1))
    if plan.module is not None:
        mod = gm.get_submodule(plan.module)
        w = place(None, "weight", mod.weight, grad=bool(needs & 2))
        b = place(None, "bias", mod.bias, grad=bool(needs & 4)) if mod.bias is not None else None
        lin = g.call_function(torch.nn.functional.linear, (h, w, b))
    else:
        wnode = plan.weight if plan.weight is not None else plan.weight_t
        w = place(wnode, "weight", grad=bool(needs & 2))
        b = place(plan.bias, "bias", grad=bool(needs & 4)) if plan.bias is not None else None
        lin = g.call_function(torch.nn.functional.linear, (h, w, b)) if plan.weight is not None \
            else g.call_function(torch.matmul, (h, w))
    lin.meta["example_value"] = _val(plan.chain[0])
    env[plan.chain[0]] = lin

    def arg(a):
        if a in env:
            return env[a]
        if isinstance(_val(a), torch.Tensor):
            return place(a, "target" if a is plan.target else "input")
        raise RuntimeError(f"{a.name}: the site reads a non-tensor value ({type(_val(a)).__name__})")

    for n in [*plan.chain[1:], plan.src]:
        d = plan.inplace_div
        if d is not None and d not in env and d.args[0] in env:  # ``logits.div_(T)`` before the next reader
            env[d] = g.node_copy(d, arg)
        env[n] = g.node_copy(n, arg)
    src = env[plan.src]
    if plan.mode == "in_forward":
        # the loss code itself, from the statistics to the scalar loss
        for n in plan.path:
            env[n] = g.node_copy(n, arg)
        outs = (env[plan.exit],)
    else:
        outs = tuple(g.call_function(operator.getitem, (src, i)) for i in range(4 if plan.extras else 3))
    g.output(outs + ((lin,) if plan.returned else ()))  # the returned logits last
    mini = fx.GraphModule(torch.nn.Module(), g)
    _fill_values(mini, inputs)
    if lead is not None and _val(src)[0].shape != _val(src.args[1]).shape:
        raise RuntimeError("the site's statistics do not follow its scaled rows")
    return mini, inputs, leaves, src


def _fill_values(mini: fx.GraphModule, inputs: list) -> None:
    """Fake values for every node of the measurement graph, under one fresh fake mode."""
    mode = _compat.new_fake_mode()
    vals = {}
    it = iter(inputs)
    for n in mini.graph.nodes:
        if n.op == "placeholder":
            vals[n] = mode.from_tensor(next(it))
        elif n.op in ("call_function", "call_method"):
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: vals[a])
            with mode:
                vals[n] = n.target(*args, **kwargs) if n.op == "call_function" else getattr(args[0], n.target)(*args[1:], **kwargs)
        else:
            continue
        n.meta["example_value"] = vals[n]


# ----------------------------------------------------------------------------- rewrite
def _stable_toposort(g: fx.Graph) -> None:
    """Order the nodes topologically, each as early as its original position and its
    inputs allow (Kahn's algorithm, ties broken by the original order)."""
    import heapq

    nodes = list(g.nodes)
    idx = {n: i for i, n in enumerate(nodes)}
    pending = {n: len(set(n.all_input_nodes)) for n in nodes}
    ready = [(idx[n], n) for n in nodes if pending[n] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, n = heapq.heappop(ready)
        order.append(n)
        for u in n.users:
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, (idx[u], u))
    if len(order) != len(nodes):
        raise RuntimeError("lm_head: the rewritten graph has a cycle")
    for prev, n in zip(order, order[1:]):
        if prev.next is not n:
            prev.append(n)


def _settle(gm: fx.GraphModule, plan: Plan) -> None:
    """The gradient mode the rewrite will use, final: the in-forward mode falls back to
    recompute where the copied loss code cannot move to the op, or where a tensor eager
    saves is written before the loss. Sets ``plan.reorder``, ``plan.last``, ``plan.keep``."""
    g = gm.graph
    src = plan.src
    pos = {n: i for i, n in enumerate(g.nodes)}
    # the op goes where the statistics were; the copied loss code may read values defined
    # later (a mask computed after the loss): a stable topological sort then moves it, and
    # what depends on it, after them - unless that would move code across an in-place
    # operation or a grad-mode switch
    reorder, last = False, None
    if plan.mode == "in_forward":
        in_path = set(plan.path)
        reads = [(n, a) for n in plan.path for a in n.all_input_nodes if a not in in_path and a is not src]
        last = max((a for _, a in reads), key=lambda a: pos[a], default=None)
        effects = graph.Effects(gm)
        barrier = effects.first_barrier(reads, src, ignore=in_path)
        if barrier is None and last is not None and pos[last] > pos[src]:
            # the op and the copy then run after ``last``: everything they read moves there
            lin_out_reads = [(plan.chain[0], a) for a in plan.chain[0].all_input_nodes]
            src_reads = [(src, a) for a in src.all_input_nodes]
            barrier = effects.first_barrier(reads + lin_out_reads + src_reads, last.next, ignore=in_path)
            reorder = barrier is None
        if barrier is not None:
            plan.mode, plan.why = "recompute", (f"{graph.describe(barrier)} writes what the copied loss code reads, or "
                                                "switches modes, between the loss statistics and its inputs")
    keep: dict = {}
    if plan.mode == "in_forward":
        keep = _saved_by_eager(plan)
        w = _written_while_saved(plan, keep, effects)
        if w is not None:
            plan.mode, plan.why = "recompute", (f"{graph.describe(w)} writes a tensor the loss saves for its backward "
                                                "before the loss is formed (its version must be checked)")
    if plan.mode != "in_forward":
        plan.rowwise = False
    plan.reorder, plan.last, plan.keep = reorder, last, keep


def _rewrite(gm: fx.GraphModule, plan: Plan, ctx) -> None:
    g = gm.graph
    src = plan.src
    lin_out = plan.chain[0]
    V = (_shape(lin_out) or (None,))[-1]
    tv = _val(plan.target)
    chunk = plan.chunk or _chunk_rows(ctx, V, tv.numel() if isinstance(tv, torch.Tensor) else None, plan, lean=True)
    reorder, last, keep = plan.reorder, plan.last, plan.keep
    h_head = plan.h  # the head's own input (the logits before a row selection are its rows)
    if plan.row_index is not None:
        with g.inserting_before(lin_out):
            plan.h = g.call_function(operator.getitem, (plan.h, plan.row_index))
    with g.inserting_before(lin_out):
        if plan.module is not None:
            weight = g.get_attr(f"{plan.module}.weight")
            mod = gm.get_submodule(plan.module)
            bias = g.get_attr(f"{plan.module}.bias") if mod.bias is not None else None
        else:
            weight = plan.weight if plan.weight is not None else g.call_method("t", (plan.weight_t,))
            bias = plan.bias
        # what is left of the logits for the code that reads their shape
        def stand_in(i: int, dtype):
            s = g.call_function(lm_head.logits_stand_in, (plan.h if i else h_head, weight, dtype))
            for v in plan.chain[1:i + 1]:
                # views, and the transpose of an (N, C, d) loss input; a row selection is
                # already in plan.h
                if not _is(v, _CASTS) and not _selects_rows(v) and _temperature_of(v) is None:
                    s = g.call_function(v.target, (s, *v.args[1:]), dict(v.kwargs)) if v.op == "call_function" \
                        else g.call_method(v.target, (s, *v.args[1:]), dict(v.kwargs))
            return s

        out_node = next(n for n in g.nodes if n.op == "output")
        if plan.inplace_div is not None:  # the op divides by the temperature itself
            g.erase_node(plan.inplace_div)
        redirect = []
        for i, n in enumerate(plan.chain):
            for u in list(n.users):
                if u is src or (i + 1 < len(plan.chain) and u is plan.chain[i + 1]) or (plan.returned and u is out_node):
                    continue
                if _is(u, _CASTS):  # a cast read for its shape: a stand-in of the cast's dtype
                    redirect.append((u, None, stand_in(i, _dtype(u))))
                else:
                    redirect.append((u, n, stand_in(i, _dtype(n))))
    for u, n, s in redirect:
        if n is None:
            u.replace_all_uses_with(s)
            g.erase_node(u)
        else:
            u.replace_input_with(n, s)
    kw = {"smooth_eps": plan.smooth_eps, "smooth_weight": plan.smooth_weight, "base": plan.base}
    if plan.kind == "loss_fwd" and plan.base is not None:  # the op's log base as given (0 for a smoothing weight)
        kw["log_base"] = graph.op_args(src)["log_base"]
    args = (plan.h, weight, bias, plan.target, plan.alpha, plan.ignore_index, plan.extras, chunk)
    strat = fleet.strategy(FAMILY, ctx.profile)
    unroll = int(strat.get("unroll", 0))
    if _dtype(h_head) in (torch.float32, torch.float64) and not strat.get("unroll_fp32", True):
        unroll = 0
    kw["unroll"] = unroll
    if plan.temperature != 1.0:
        kw.update(temperature=plan.temperature, low_div=plan.low_div)
    cdt = _loss_op.compute_dtype(_dtype(h_head))
    if plan.mode != "in_forward":
        with g.inserting_before(src):
            stats = g.call_function(lm_head.linear_row_stats, args, {**kw, "needs": plan.needs})
    elif plan.rowwise:
        # a non-linear sum of per-row terms: the loss code, copied into a module of its own,
        # is differentiated per chunk at that chunk's statistics (``linear_row_stats(tail=)``)
        tail, ext = _tail_module(plan)
        k = 0
        while hasattr(gm, f"ger_rowwise_loss_{k}"):
            k += 1
        gm.add_submodule(f"ger_rowwise_loss_{k}", tail)
        with g.inserting_before(last.next if reorder else src):
            t_attr = g.get_attr(f"ger_rowwise_loss_{k}")
            stats = g.call_function(lm_head.linear_row_stats, args, {**kw, "unroll": 0, "tail": t_attr,
                                                                      "tail_inputs": tuple(ext), "needs": plan.needs})
    else:
        # the copy runs the loss code's nodes in their order, in-place writes included; when
        # it reads values defined after the statistics, it goes after the last of them as a
        # whole (a topological sort of a copy placed earlier would run a write after a read
        # that follows it in the source: no data edge orders them)
        with g.inserting_before(last.next if reorder else src):
            leaves = g.call_function(lm_head.stat_leaves, (plan.target, cdt, plan.extras))
            env = {src: leaves}
            _copy_loss_code(g, plan, env, lambda a: env.get(a, a))
            coefs = g.call_function(lm_head.stat_coefficients, (env[plan.exit], leaves))
            stats = g.call_function(lm_head.linear_row_stats, args, {**kw, "coefs": coefs, "needs": plan.needs})
    if plan.returned:
        stats.kwargs = {**stats.kwargs, "logits": True}
        with g.inserting_after(stats):
            lo = g.call_function(operator.getitem, (stats, 8))
        with g.inserting_after(lo):
            ret = g.call_function(lm_head.logits_output, (lo, plan.h, weight, bias))
        graph.copy_meta(ret, lin_out, values=True)
        out_node.replace_input_with(lin_out, ret)
    src.replace_all_uses_with(stats)
    graph.copy_meta(stats, src)
    g.erase_node(src)
    if plan.mode == "in_forward":
        L = plan.exit
        # returned logits that eager's loss code saves: the carrier keeps them too, so a
        # caller's write before the backward raises autograd's error, as in eager
        kept = tuple(keep) + ((lo,) if plan.returned and _eager_saves_logits(plan) else ())
        with g.inserting_after(L):
            new_l = g.call_function(lm_head.add_carrier, (L, stats, plan.h, weight, bias, kept))
        graph.copy_meta(new_l, L, values=True)
        L.replace_all_uses_with(new_l, delete_user_cb=lambda u: u is not new_l)
    for n in reversed(plan.chain):
        if not n.users:
            g.erase_node(n)
    if reorder:
        _stable_toposort(g)
    ctx.match(
        "linear+" + ("ger_loss" if plan.kind == "loss_fwd" else "loss"), [lin_out, stats],
        chunk=chunk, gradients=plan.mode, why=plan.why or None, alpha=plan.alpha, extras=plan.extras,
        unroll=int(strat.get("unroll", 0)) if plan.rowwise else unroll,
        **({"logits": "written and returned"} if plan.returned else {}),
        **({"temperature": plan.temperature} if plan.temperature != 1.0 else {}),
        **({"coefficients": "per chunk"} if plan.rowwise else {}),
    )
    ctx.strategy(**{k: v for k, v in fleet.strategy(FAMILY, ctx.profile).items() if k != "why"})


def _tail_module(plan: Plan) -> tuple[fx.GraphModule, list]:
    """The loss code from the statistics to the loss as a module of its own:
    ``tail(stats, *inputs) -> loss``, and the nodes of the graph that are its inputs (in
    order). Another head's statistics it reads are zeros (they are only added)."""
    skip = set(plan.path) | {plan.src} | set(plan.zeroed)
    ext: list = []
    for n in plan.path:
        reads = [n.args[0]] if n.op == "call_function" and n.target is lm_head.add_carrier else n.all_input_nodes
        for a in reads:
            if a not in skip and a not in ext:
                ext.append(a)
    tg = fx.Graph()
    env = {plan.src: tg.placeholder("stats")}
    for i, a in enumerate(ext):
        env[a] = tg.placeholder(f"x{i}")
    _copy_loss_code(tg, plan, env, lambda a: env[a])
    tg.output(env[plan.exit])
    return fx.GraphModule(torch.nn.Module(), tg), ext


def _copy_loss_code(g: fx.Graph, plan: Plan, env: dict, lookup) -> None:
    """Copy the loss code (``plan.path``, in order, in-place writes included) into ``g``
    at its insertion point, reading ``lookup(node)`` for each input; another head's
    statistics it reads are zeros (they are only added)."""
    for a in plan.zeroed:
        env[a] = g.call_function(torch.zeros, ((),), {"dtype": _dtype(a), "device": _val(a).device})
    for n in plan.path:
        if n.op == "call_function" and n.target is lm_head.add_carrier:
            env[n] = lookup(n.args[0])  # another head's zero: not needed here
            continue
        env[n] = g.node_copy(n, lookup)


# ----------------------------------------------------------------------------- returned logits
def detach_logits_outputs(gm: fx.GraphModule):
    """Take the ``logits_output`` nodes out of the graph before it is compiled: the graph
    returns the logits the fused op wrote (not differentiable) and, as extra outputs, the
    head's h, W and b; the returned function applies ``lm_head.logits_output`` to the
    compiled graph's outputs. Inside the graph, AOTAutograd would make the logits a
    differentiable output, and then every backward gets an N x V zero gradient for them
    (autograd materialises the gradients of a function's unused outputs) and runs the
    head's two gradient matmuls on it. Outside, that backward runs only when a gradient
    reaches the logits, as in eager. Returns None when the graph has no such node."""
    g = gm.graph
    out = next(n for n in g.nodes if n.op == "output")
    marks = [n for n in g.nodes if n.op == "call_function" and n.target is lm_head.logits_output
             and set(n.users) == {out}]
    if not marks or not isinstance(out.args[0], (tuple, list)):
        return None
    outs = list(out.args[0])
    n_orig = len(outs)
    specs = []
    for m in marks:
        z, h, w, b = m.args
        at = len(outs)
        outs += [h, w] + ([b] if b is not None else [])
        pos = [i for i, o in enumerate(outs[:n_orig]) if o is m]
        for i in pos:
            outs[i] = z
        specs.append((pos, at, b is not None))
    out.args = (type(out.args[0])(outs),) + tuple(out.args[1:])
    for m in marks:
        g.erase_node(m)
    g.lint()
    gm.recompile()

    def finish(raw):
        res = list(raw)
        tail = res[n_orig:]
        res = res[:n_orig]
        for pos, at, has_b in specs:
            k = at - n_orig
            z = lm_head.logits_output(res[pos[0]], tail[k], tail[k + 1], tail[k + 2] if has_b else None)
            for i in pos:
                res[i] = z
        return tuple(res) if isinstance(raw, tuple) else res

    def wrap(compiled):
        def run(*args):  # as Dynamo calls a backend's function
            return finish(compiled(*args))

        return run

    return wrap
