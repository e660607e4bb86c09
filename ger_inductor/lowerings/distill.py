"""Inductor IR lowerings of ``ger::distill_fwd`` and ``ger::distill_bwd``.

The math of ``ops/distill.py`` (the row math of ``ger_inductor.distill``), written once
in Inductor IR, so it becomes C++ on CPU and Triton on GPUs.

Forward, per row pair (z_s, z_t), a = z_s / T, b = z_t / T:

    loop 1   M1 = max z_s, max z_t; Ms = M1 / T (= max a exactly), Mt = max z_t / T
    loop 2   Ss = sum e^(a - Ms), St = sum e^(b - Mt) (S1 = sum e^(z_s - M1) for the hard
             CE at T != 1, in the same loop)        Ls = Ms + log Ss, Lt = ...
             fwd / rev: in the same loop the KL's sum on the shifted logits
             (``_Pair.kl_one_sweep``: no loop 3, one exponential per element fewer)
    loop 3   mix: sum p_t log(p_t/m), sum p_s log(p_s/m) (``distill._log_ratios``, one
             log per element for beta in [0.25, 0.75], two logaddexp nearer the ends),
             with p = e^(log p), 0 where p == 0 (plain products, and for mix a fixed form,
             in the modes that copy a user's spelling: distill.KL_MODES / MIX_MODES)

Inductor puts the reductions into one kernel, and on CPU every loop over the classes
under ONE loop over the rows (a row pair is read from memory once, then from cache):
the two sums read both maxima (``lse_pair``) and the row outputs sit behind an extern
copy of the last sums (``row_outputs``), so that Inductor's CPU backend keeps its
outer-loop fusion, also where the user's code works on a per-row output (tests count
the loops). No N x V buffer is written. Backward: ONE elementwise
pass over the row pair writing d/dz_s (and d/dz_t when the teacher needs a gradient),
p recomputed from the saved log-sum-exps; the per-row factors (the incoming gradients
over T) are (R,) buffers, and for fp32 gradients the hard CE's -g at the target is one
scattered add per row after the pass (``_add_at_targets``): both were per-element work
that cost a quarter of the pass at 2048 x 32000. ``ger::token_fwd`` / ``token_bwd`` (the
per-token log p(y) and entropy of policy-gradient training) are lowered the same way.
Tested against the eager kernels (tests/test_distill.py).
"""

from __future__ import annotations

import math

import torch

from .. import _compat
from ..distill import LOG_FORM_BETAS, split_kind
from ..ops.distill import compute_dtype

aten = torch.ops.aten
#: temperatures at which the hard CE's exponential is a power of the tempered one
#: (T -> number of squarings): ``_Pair.hard_lse``
SQUARING_T = {2.0: 1, 4.0: 2}


class _Pair:
    """Loaders and IR helpers of (R, V) student / teacher rows."""

    def __init__(self, zs, zt, y, T: float):
        self.ir = _compat.inductor_ir()
        _, self.ops = _compat.inductor_ops()
        self.R, self.V = zs.get_size()
        self.device = zs.get_device()
        self.s_dtype, self.t_dtype = zs.get_dtype(), zt.get_dtype()
        self.cdt = compute_dtype(self.s_dtype, self.t_dtype)
        self._zs, self._zt = zs.make_loader(), zt.make_loader()
        self._y = y.make_loader() if y is not None else None
        self.T = float(T)
        self._raw_max: dict = {}
        self._last_reduction = None
        self._s_exp = None  # e^(z_s / T - max z_s / T) as the student's sum forms it (``hard_lse``)

    def const(self, v: float):
        return self.ops.constant(v, self.cdt)

    def xmul(self, w, x):
        """w * x, 0 where w == 0 (ops/ger_loss.xmul)."""
        ops = self.ops
        return ops.where(ops.eq(w, self.const(0.0)), self.const(0.0), ops.mul(w, x))

    def pmul(self, w, x, mode: str):
        """w * x: plain in the modes that copy eager's products, else 0 where w == 0."""
        return self.xmul(w, x) if mode == "" else self.ops.mul(w, x)

    def kl_term(self, w, lw, lo, mode: str):
        """w (lw - lo) with the products of ``mode`` (distill._kl_rows); also on shifted
        logits, w = e^(lw) unnormalised (``kl_one_sweep``)."""
        ops = self.ops
        if mode == "ce":
            return ops.neg(ops.mul(w, lo))
        if mode == "ieee":
            return ops.mul(w, ops.sub(lw, lo))
        if mode == "xlogy":
            return ops.sub(self.xmul(w, lw), ops.mul(w, lo))
        return self.xmul(w, ops.sub(lw, lo))

    def kl_one_sweep(self, kind: str, mode: str):
        """(Ls, Lt, K) loaders for the KL kinds: after the two row maxima, ONE sweep over
        the row pair forms both sums of exponentials and the KL's own sum on shifted
        logits z' = x - max x, e = exp(z'_w):

            KL(p_w || p_o) = X / S_w + log S_o - log S_w      X = sum_j e_w,j (z'_w,j - z'_o,j)

        (with the products of ``mode``: distill._kl_rows; "ce" has no - log S_w). One
        exponential per element and one sweep fewer than the KL's sum on log-probabilities
        after the log-sum-exps. Eager's NaN / inf exactly: p_w = exp(z'_w - log S_w) may be
        0 where e_w is not, which decides a class whose o logit is -inf (p * inf: +inf, or
        NaN at p = 0; "": 0 at p = 0). Those classes are judged after the sweep from the
        smallest / largest z'_w among them (p is monotone in z'_w), as log_softmax forms p:
        (x - max) - log S; in mode "" they are left out of X, in the others X keeps them
        (their +inf / NaN agrees with the judgement)."""
        ops = self.ops
        Ms, Mt = self.tempered_max("s"), self.tempered_max("t")

        def sa(r, j):
            return ops.sub(self.a(r, j), Ms([r]))

        def sb(r, j):
            return ops.sub(self.b(r, j), Mt([r]))

        w_, o_ = (sb, sa) if kind == "fwd" else (sa, sb)
        ninf = lambda: self.const(-math.inf)  # noqa: E731  (constants inside each inner function)
        pinf = lambda: self.const(math.inf)  # noqa: E731

        def special(r, j):  # the o logit is -inf, the w logit is not
            return ops.and_(ops.eq(o_(r, j), ninf()), ops.ne(w_(r, j), ninf()))

        self._s_exp = lambda r, j: ops.exp(sa(r, j))  # noqa: E731
        Ss = self.reduction(self._s_exp, "sum")
        St = self.reduction(lambda r, j: ops.exp(sb(r, j)), "sum")
        # "": the largest such w logit decides (0 * inf = 0: +inf once one p > 0), and those
        # classes are left out of X. The others: the smallest (p * inf: NaN once one p is
        # 0), and X keeps them: their term is +inf (e_w > 0) or NaN (e_w = 0, and then p_w
        # = 0 too: p_w <= e_w), which K's +inf / NaN below only confirms - three vector
        # operations per element fewer. A class whose w logit is -inf too counts there (W
        # = -inf, NaN): eager's 0 * (-inf) is NaN in those modes. No such class: -inf / +inf.
        if mode == "":
            X = self.reduction(lambda r, j: ops.where(special(r, j), self.const(0.0),
                                                      self.kl_term(ops.exp(w_(r, j)), w_(r, j), o_(r, j), mode)), "sum")
            W = self.reduction(lambda r, j: ops.where(special(r, j), w_(r, j), ninf()), "max")
        else:
            X = self.reduction(lambda r, j: self.kl_term(ops.exp(w_(r, j)), w_(r, j), o_(r, j), mode), "sum")
            W = self.reduction(lambda r, j: ops.where(ops.eq(o_(r, j), ninf()), w_(r, j), pinf()), "min")
        Sw, So = (St, Ss) if kind == "fwd" else (Ss, St)

        def K(idx):
            log_sw = ops.log(Sw(idx))
            out = ops.add(ops.truediv(X(idx), Sw(idx)), ops.log(So(idx)))
            if mode != "ce":
                out = ops.sub(out, log_sw)
            zero = self.const(0.0)
            if mode == "":  # 0 * inf = 0 (xmul): +inf once one such p is > 0
                any_special = ops.ne(W(idx), ninf())
                extra = ops.where(ops.gt(ops.exp(ops.sub(W(idx), log_sw)), zero), pinf(), zero)
            else:  # p * inf: NaN once one such p is 0, else +inf
                any_special = ops.ne(W(idx), pinf())
                extra = ops.where(ops.eq(ops.exp(ops.sub(W(idx), log_sw)), zero), self.const(math.nan), pinf())
            return ops.add(out, ops.where(any_special, extra, zero))

        Ls = lambda idx: ops.add(Ms(idx), ops.log(Ss(idx)))  # noqa: E731
        Lt = lambda idx: ops.add(Mt(idx), ops.log(St(idx)))  # noqa: E731
        return Ls, Lt, K

    def kl_grad(self, w, lw, lo, K, mode: str):
        """w (lw - lo - K) with the products of ``mode`` (distill._kl_grad)."""
        ops = self.ops
        if mode == "xlogy":
            raise ValueError("ger: the gradient of the xlogy side of a KL is not formed (eagerly NaN wherever its "
                             "probability is 0); the loss pass refuses such a site, and the public API never asks")
        if mode == "ce":
            return ops.mul(w, ops.sub(ops.neg(lo), K))
        d = ops.sub(ops.sub(lw, lo), K)
        return ops.mul(w, d) if mode == "ieee" else self.xmul(w, d)

    def zs(self, a, j):
        return self.ops.to_dtype(self._zs([a, j]), self.cdt)

    def zt(self, a, j):
        return self.ops.to_dtype(self._zt([a, j]), self.cdt)

    def tempered(self, x):
        return x if self.T == 1.0 else self.ops.truediv(x, self.const(self.T))

    def a(self, r, j):
        return self.tempered(self.zs(r, j))

    def b(self, r, j):
        return self.tempered(self.zt(r, j))

    def reduction(self, fn, rtype: str):
        """A per-row reduction over the classes (its own loop over the classes; under one
        loop over the rows with the others where Inductor's CPU backend fuses them)."""
        out = self.ir.Reduction.create(
            device=self.device, dst_dtype=self.cdt, src_dtype=self.cdt,
            inner_fn=lambda idx, ridx: fn(idx[0], ridx[0]),
            ranges=[self.R], reduction_ranges=[self.V], reduction_type=rtype,
        )
        out.realize()
        self._last_reduction = out
        return out.make_loader()

    def raw_max(self, side: str):
        """A loader of max_j z(r, j) of the student's ("s") or the teacher's ("t") logits
        before the temperature: one max loop per side, shared by every statistic."""
        if side not in self._raw_max:
            self._raw_max[side] = self.reduction(self.zs if side == "s" else self.zt, "max")
        return self._raw_max[side]

    def tempered_max(self, side: str):
        """max_j z(r, j) / T as max_j z(r, j), divided once per row: equal, NaN and inf
        included, since x -> x / T (T > 0, correctly rounded) never decreases. The max loop
        has no division, and the hard CE's shift (T = 1) is the same loop."""
        M = self.raw_max(side)
        return lambda idx: self.tempered(M(idx))

    def lse(self, side: str, tempered: bool = True):
        """(a loader of LSE_j x(r, j), x = z / T (``tempered``) or z, of one side, as IEEE as
        distill._lse: max, then sum of e^(x - max))."""
        ops = self.ops
        x = {("s", True): self.a, ("t", True): self.b, ("s", False): self.zs, ("t", False): self.zt}[side, tempered]
        M = self.tempered_max(side) if tempered else self.raw_max(side)
        S = self.reduction(lambda r, j: ops.exp(ops.sub(x(r, j), M([r]))), "sum")
        return lambda idx: ops.add(M(idx), ops.log(S(idx)))

    def lse_pair(self):
        """(Ls, Lt): both rows' log-sum-exps at T, each sum also reading the other row's
        maximum without using it (``where(Mo == Mo, Ms, Ms)``): the two sums then share data,
        Inductor's CPU backend fuses every loop of the pair under one loop over the rows
        (a row pair stays in cache between the max loop, the sums and the JSD's own loop)
        instead of one sweep over all rows per reduction."""
        ops = self.ops
        M = {"s": self.tempered_max("s"), "t": self.tempered_max("t")}
        x = {"s": self.a, "t": self.b}

        def shift(side, r):
            other = M["t" if side == "s" else "s"]([r])
            m = M[side]([r])
            return ops.where(ops.eq(other, other), m, m)

        self._s_exp = lambda r, j: ops.exp(ops.sub(x["s"](r, j), shift("s", r)))  # noqa: E731
        S = {"s": self.reduction(self._s_exp, "sum"),
             "t": self.reduction(lambda r, j: ops.exp(ops.sub(x["t"](r, j), shift("t", r))), "sum")}
        return tuple((lambda idx, side=side: ops.add(M[side](idx), ops.log(S[side](idx)))) for side in ("s", "t"))

    def hard_lse(self):
        """A loader of LSE_j z_s(r, j), the hard CE's log-sum-exp at T = 1, for T != 1.

        At T = 2 or 4 (``SQUARING_T``) its sum reuses the student's tempered exponential,
        in the same sweep: z_s / T - max z_s / T = (z_s - max z_s) / T exactly (a power of
        two), so e^(z_s - max z_s) = (e^(z_s / T - max z_s / T))^T, one or two products
        instead of an exponential per element (within a few ulp of it; where the power
        underflows, so does the exponential but for subnormals). Other T: its own sum."""
        ops = self.ops
        if self.T in SQUARING_T and self._s_exp is not None:
            e_s = self._s_exp

            def term(r, j):
                e = e_s(r, j)
                for _ in range(SQUARING_T[self.T]):
                    e = ops.mul(e, e)
                return e
            M1, S1 = self.raw_max("s"), self.reduction(term, "sum")
            return lambda idx: ops.add(M1(idx), ops.log(S1(idx)))
        return self.lse("s", tempered=False)

    def after(self, value, reads):
        """A loader of ``value`` that also reads the row loaders ``reads`` without using
        them (where(x == x, v, v)): a dependency for Inductor's fusion heuristics only."""
        ops = self.ops

        def fn(idx):
            v = value(idx)
            for x in reads:
                xv = x(idx)
                v = ops.where(ops.eq(xv, xv), v, v)
            return v
        return fn

    def row_outputs(self, fns):
        """(R,) buffers of the row loaders ``fns`` (None: an empty buffer).

        On CPU each also reads, without using it, an extern copy of the last reduction's
        row values (R floats, ``aten.clone``). Inductor's CPU backend runs the loops over
        the classes under one loop over the rows only when every node of the fused group
        loops over the rows the same way; a pointwise node over the rows (vectorised along
        them) that joins the group, such as a row output or the user's code on it
        (``per_token_kl * mask``), makes it fall back to one sweep over all rows per loop.
        Behind the extern copy the row outputs and their consumers cannot join it.

        Each output is realised (an (R,) buffer), never inlined into its consumers: a row
        output such as log p(y) reads the logits, and inlined into a consumer that Inductor
        schedules late (a chunked head's writes of each chunk's rows into one (N,) tensor)
        it would keep every chunk's logits alive until then."""
        reads = []
        if self.device.type == "cpu" and self._last_reduction is not None:
            reads = [_compat.inductor_fallback(aten.clone.default)(self._last_reduction).make_loader()]
        outs = []
        for fn in fns:
            if fn is None:
                outs.append(self.empty(self.cdt))
                continue
            out = self.pointwise(self.after(fn, reads), [self.R], self.cdt)
            out.realize()
            outs.append(out)
        return outs

    def row_buffer(self, fn):
        """A per-row value (compute type) for an elementwise pass over the classes: on CPU
        an (R,) buffer computed once per row. Inlined, the incoming gradient's own code (a
        mean's division, an expand of a scalar) would run once per vector of classes, the
        compiler unable to hoist loads that may alias the output. Elsewhere ``fn`` itself."""
        if self.device.type != "cpu":
            return fn
        b = self.pointwise(fn, [self.R], self.cdt)
        b.realize()
        return b.make_loader()

    def pointwise(self, fn, ranges, dtype):
        return self.ir.Pointwise.create(device=self.device, dtype=dtype, inner_fn=fn, ranges=list(ranges))

    def empty(self, dtype):
        return _compat.inductor_lowerings()[aten.empty.memory_format]([0], dtype=dtype, device=self.device)

    def logaddexp_c(self, x, c: float):
        """logaddexp(x, c) for a finite constant c, as torch.logaddexp: max + log1p(e^-|x - c|)
        (+inf at x = +inf, c at x = -inf, NaN at NaN)."""
        ops = self.ops
        cc = self.const(c)
        return ops.add(ops.maximum(x, cc), ops.log1p(ops.exp(ops.neg(ops.abs(ops.sub(x, cc))))))

    def log_ratios(self, lpt, lps, pt, ps, beta: float, mode: str = ""):
        """(log(p_t/m), log(p_s/m)): the expressions of distill._log_ratios (``mode``: MIX_MODES)."""
        ops = self.ops
        lo, hi = LOG_FORM_BETAS
        if mode == "pm" or (mode in ("", "lse") and lo <= beta <= hi):
            log_m = ops.log(ops.add(ops.mul(self.const(beta), pt), ops.mul(self.const(1.0 - beta), ps)))
            if mode == "lse":  # both probabilities 0: eager's log m is finite there (distill._log_ratios)
                log_m = ops.where(ops.eq(log_m, self.const(-math.inf)), self.const(0.0), log_m)
            return ops.sub(lpt, log_m), ops.sub(lps, log_m)
        r = ops.sub(lpt, lps)
        la, lb = math.log(beta), math.log1p(-beta)
        return (ops.neg(self.logaddexp_c(ops.sub(self.const(lb), r), la)),
                ops.neg(self.logaddexp_c(ops.add(self.const(la), r), lb)))


def _add_at_targets(P: _Pair, grad, gn, ignore_index: int):
    """grad[r, y_r] -= gn[r] for every row whose target is a class (not ``ignore_index``, in
    [0, V)) (the hard CE's one-hot term): an accumulating ``index_put_`` of R values, after
    the elementwise pass. Any other row adds -0.0 at class 0, which changes no value (x + -0 = x)."""
    ops = P.ops
    low = _compat.inductor_lowerings()

    def valid(r):
        y = ops.to_dtype(P._y([r]), torch.int64)
        inside = ops.and_(ops.ge(y, ops.constant(0, torch.int64)), ops.lt(y, ops.index_expr(P.V, torch.int64)))
        return ops.and_(ops.ne(y, ops.constant(ignore_index, torch.int64)), inside)

    rows = P.pointwise(lambda idx: ops.index_expr(idx[0], torch.int64), [P.R], torch.int64)
    cols = P.pointwise(lambda idx: ops.where(valid(idx[0]), ops.to_dtype(P._y(idx), torch.int64),
                                             ops.constant(0, torch.int64)), [P.R], torch.int64)
    vals = P.pointwise(lambda idx: ops.where(valid(idx[0]), ops.neg(gn(idx)), P.const(-0.0)), [P.R], P.cdt)
    return low[aten.index_put_.default](grad, [rows, cols], vals, True)


def _register() -> None:
    @_compat.register_lowering(torch.ops.ger.distill_fwd.default, type_promotion_kind=None)
    def distill_fwd(zs, zt, y, kind, beta, wt, ws, T, hard, ignore_index, chunk, rev):
        P = _Pair(zs, zt, y, T)
        ops = P.ops
        kind, mode = split_kind(kind)
        kt = ks = None
        if kind in ("fwd", "rev"):
            Ls, Lt, K = P.kl_one_sweep(kind, mode)
            if kind == "fwd":
                kt = K
            else:
                ks = K
        else:
            Ls, Lt = P.lse_pair()
        Ls1 = (P.hard_lse() if P.T != 1.0 else Ls) if hard else None

        def logs(r, j):
            return ops.sub(P.a(r, j), Ls([r])), ops.sub(P.b(r, j), Lt([r]))

        if kind == "mix":
            def both(r, j):
                lps, lpt = logs(r, j)
                ps, pt = ops.exp(lps), ops.exp(lpt)
                return ps, pt, P.log_ratios(lpt, lps, pt, ps, beta, mode)

            def kt_fn(r, j):
                _, pt, (ltm, _) = both(r, j)
                return P.pmul(pt, ltm, mode)

            def ks_fn(r, j):
                ps, _, (_, lsm) = both(r, j)
                return P.pmul(ps, lsm, mode)
            kt = P.reduction(kt_fn, "sum")
            ks = P.reduction(ks_fn, "sum")

        zero = lambda idx: P.const(0.0)  # noqa: E731
        kt_out = (lambda idx: kt(idx)) if kt is not None else zero
        ks_out = (lambda idx: ks(idx)) if ks is not None else zero
        if kind == "fwd":
            D_fn = kt_out
        elif kind == "rev":
            D_fn = ks_out
        else:
            D_fn = lambda idx: ops.add(ops.mul(P.const(wt), kt(idx)), ops.mul(P.const(ws), ks(idx)))  # noqa: E731

        def nll_fn(idx):  # the hard CE per row
            (r,) = idx
            j = ops.indirect_indexing(P._y([r]), P.V, check=True, wrap_neg=False)
            return ops.sub(Ls1([r]), P.zs(r, j))
        return tuple(P.row_outputs([D_fn, nll_fn if hard else None, Ls, Lt, Ls1 if hard else None, kt_out, ks_out]))

    @_compat.register_lowering(torch.ops.ger.distill_bwd.default, type_promotion_kind=None)
    def distill_bwd(gD, gn, zs, zt, y, Ls, Lt, Ls1, kt, ks, kind, beta, wt, ws, T, hard, ignore_index, need_s,
                    need_t, chunk, rev):
        P = _Pair(zs, zt, y, T)
        ops = P.ops
        kind, mode = split_kind(kind)
        gmul = P.xmul if mode == "" else ops.mul  # eager's spellings: g * NaN is NaN even where g == 0
        Ls_, Lt_ = Ls.make_loader(), Lt.make_loader()
        kt_, ks_ = kt.make_loader(), ks.make_loader()
        gD_ = gD.make_loader() if gD is not None else None
        gn_ = gn.make_loader() if (gn is not None and hard) else None
        Ls1_ = Ls1.make_loader() if gn_ is not None and P.T != 1.0 else None
        c1 = None
        if Ls1_ is not None and P.T in SQUARING_T:
            # p1 = e^(z_s - Ls1) = ps^T c1, c1 = e^(T Ls - Ls1) per row (Ss^T / S1, in
            # [1, V^(T-1)]): products instead of an exponential per element (``hard_lse``)
            c1 = P.pointwise(lambda idx: ops.exp(ops.sub(ops.mul(P.const(P.T), Ls_(idx)), Ls1_(idx))), [P.R], P.cdt)
            c1.realize()
            c1 = c1.make_loader()

        cpu = P.device.type == "cpu"
        gq = P.row_buffer(lambda idx: ops.truediv(ops.to_dtype(gD_(idx), P.cdt), P.const(P.T))) \
            if gD_ is not None else None
        gn_ = P.row_buffer(lambda idx, f=gn_: ops.to_dtype(f(idx), P.cdt)) if gn_ is not None else None
        # fp32 gradients on CPU: the hard CE's -g at the target is added after the
        # elementwise pass, one scattered add per row (``_add_at_targets``), instead of a
        # compare of 64-bit indices and two blends per element
        scatter_y = cpu and gn_ is not None and P.s_dtype == torch.float32

        def pre(r, j):
            lps = ops.sub(P.a(r, j), Ls_([r]))
            lpt = ops.sub(P.b(r, j), Lt_([r]))
            return lps, lpt, ops.exp(lps), ops.exp(lpt)

        def g_of(r):
            return gq([r])

        def ds_fn(idx):
            r, j = idx
            lps, lpt, ps, pt = pre(r, j)
            out = None
            if gD_ is not None:
                if kind == "fwd":
                    da = ops.sub(ps, pt)
                elif kind == "rev":
                    da = P.kl_grad(ps, lps, lpt, ks_([r]), mode)
                else:
                    lsm = P.log_ratios(lpt, lps, pt, ps, beta, mode)[1]
                    da = ops.mul(P.const(ws), P.pmul(ps, ops.sub(lsm, ks_([r])), mode))
                out = gmul(g_of(r), da)
            if gn_ is not None:
                if P.T == 1.0:
                    p1 = ps
                elif c1 is not None:
                    p1 = ps
                    for _ in range(SQUARING_T[P.T]):
                        p1 = ops.mul(p1, p1)
                    p1 = ops.mul(p1, c1([r]))
                else:
                    p1 = ops.exp(ops.sub(P.zs(r, j), Ls1_([r])))
                g = gn_([r])
                if scatter_y:
                    h = P.xmul(g, p1)
                else:
                    is_y = ops.eq(ops.index_expr(j, torch.int64), ops.to_dtype(P._y([r]), torch.int64))
                    h = ops.add(P.xmul(g, p1), ops.where(is_y, ops.neg(g), P.const(0.0)))
                out = h if out is None else ops.add(out, h)
            if out is None:
                out = P.const(0.0)
            return ops.to_dtype(out, P.s_dtype)

        def dt_fn(idx):
            r, j = idx
            lps, lpt, ps, pt = pre(r, j)
            if gD_ is None:
                return ops.to_dtype(P.const(0.0), P.t_dtype)
            if kind == "fwd":
                db = P.kl_grad(pt, lpt, lps, kt_([r]), mode)
            elif kind == "rev":
                db = ops.sub(pt, ps)
            else:
                ltm = P.log_ratios(lpt, lps, pt, ps, beta, mode)[0]
                db = ops.mul(P.const(wt), P.pmul(pt, ops.sub(ltm, kt_([r])), mode))
            return ops.to_dtype(gmul(g_of(r), db), P.t_dtype)

        full = [P.R, P.V]
        g_s = P.pointwise(ds_fn, full, P.s_dtype) if need_s else P.empty(P.s_dtype)
        if need_s and scatter_y:
            g_s = _add_at_targets(P, g_s, gn_, ignore_index)
        g_t = P.pointwise(dt_fn, full, P.t_dtype) if need_t else P.empty(P.t_dtype)
        return g_s, g_t


    @_compat.register_lowering(torch.ops.ger.token_fwd.default, type_promotion_kind=None)
    def token_fwd(z, y, T, chunk, rev):
        P = _Pair(z, z, y, T)  # one row: the "student" side only
        ops = P.ops
        L = P.lse("s")

        def h_fn(r, j):  # -p log p, 0 where p == 0
            lp = ops.sub(P.a(r, j), L([r]))
            return ops.neg(P.xmul(ops.exp(lp), lp))

        H = P.reduction(h_fn, "sum")

        def logp_fn(idx):
            (r,) = idx
            j = ops.indirect_indexing(P._y([r]), P.V, check=True, wrap_neg=False)
            return ops.sub(P.a(r, j), L([r]))

        return tuple(P.row_outputs([logp_fn, H, L]))

    @_compat.register_lowering(torch.ops.ger.token_bwd.default, type_promotion_kind=None)
    def token_bwd(g_lp, g_H, z, y, L, H, T, chunk, rev):
        P = _Pair(z, z, y, T)
        ops = P.ops
        L_, H_ = L.make_loader(), H.make_loader()
        cpu = P.device.type == "cpu"
        glp, gH = ((P.row_buffer(lambda idx, f=g.make_loader(): ops.to_dtype(f(idx), P.cdt)) if g is not None else None)
                   for g in (g_lp, g_H))
        scatter_y = cpu and glp is not None and P.s_dtype == torch.float32

        def fn(idx):  # [g_lp (onehot - p) - g_H p (log p + H)] / T
            r, j = idx
            lp = ops.sub(P.a(r, j), L_([r]))
            p = ops.exp(lp)
            out = P.const(0.0)
            if gH is not None:
                out = ops.sub(out, P.xmul(gH([r]), P.xmul(p, ops.add(lp, H_([r])))))
            if glp is not None:
                g = glp([r])
                out = ops.sub(out, P.xmul(g, p))
                if not scatter_y:
                    is_y = ops.eq(ops.index_expr(j, torch.int64), ops.to_dtype(P._y([r]), torch.int64))
                    out = ops.add(out, ops.where(is_y, g, P.const(0.0)))
            if P.T != 1.0:
                out = ops.truediv(out, P.const(P.T))
            return ops.to_dtype(out, P.s_dtype)

        out = P.pointwise(fn, [P.R, P.V], P.s_dtype)
        if scatter_y:  # + g_lp / T at the target, one scattered add per row (_add_at_targets)
            out = _add_at_targets(P, out, lambda idx: ops.neg(ops.truediv(glp(idx), P.const(P.T))), -(2 ** 62))
        return out


_register()
