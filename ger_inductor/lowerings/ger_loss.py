"""Inductor IR lowerings of ``ger::loss_fwd`` and ``ger::loss_bwd``.

Written once in Inductor IR (``ir.Reduction`` / ``ir.Pointwise`` and the ``ops``
handlers), so the same code becomes C++/OpenMP on CPU and Triton on GPUs.

Forward: per row of logits z (V classes) the statistics
  M = max z, S = sum e^(z-M)                       always
  Z = sum z, U = sum u z                           alpha = 1 (uniform / given u)
  T = sum e^(z-M) z                                entropy, alpha = 0
  R = sum e^(z-M) log u                            alpha = 0, given u
  KL(p||m), KL(u||m) (need L = M + log S first)    0 < alpha < 1: the one extra pass
then nll, reg, lse, ent, aux per row in the same kernel's epilogue. Two strategies,
chosen per device profile (``fleet.STRATEGIES["loss_entropy"]``, set by the loss pass) and carried by the op's ``chunk``
argument, so the graph and the cache key say which one runs:

* rows (chunk = 0; CPUs): reductions over whole rows, which Inductor fuses into one
  kernel: a max loop, then one loop for every sum - a second pass over a row that is
  still in cache (a row of V = 32000 fp32 is 128 KiB). On GPUs, the max and S come
  from one online-softmax pass.
* chunks (chunk = K; GPUs): a split reduction. Each chunk of K classes is reduced by a
  persistent reduction (the chunk sits in registers: the logits are read once for the
  max AND every sum), writing small per-chunk partials; a second tiny reduction
  combines them (sums of e^(z - M_c) rescaled by e^(M_c - M)).

Backward: ONE elementwise pass reading the logits and writing the gradient,
p_j = exp(z_j - L) recomputed from the saved log-sum-exp. No N x V buffer besides
the gradient itself.

The math is the eager kernel's (ops/ger_loss.py); tests compare the two.
"""

from __future__ import annotations

import math

import sympy
import torch

from .. import _compat
from ..ops.ger_loss import LOG_FORM_ALPHAS, RATIO_LOG_CAP, compute_dtype

aten = torch.ops.aten




def _realized(box):
    """Reductions must be realized into buffers before other IR loads them."""
    box.realize()
    return box


class _Row:
    """Loaders and IR helpers shared by the forward and backward lowerings."""

    def __init__(self, logits, target, base, log_base):
        self.ir = _compat.inductor_ir()
        _, self.ops = _compat.inductor_ops()
        A, V, D = logits.get_size()
        self.A, self.V, self.D = A, V, D
        self.device = logits.get_device()
        self.in_dtype = logits.get_dtype()
        self.cdt = compute_dtype(self.in_dtype)
        self._z = logits.make_loader()
        self._t = target.make_loader()
        self.t_dtype = target.get_dtype()
        self._u = base.make_loader() if base is not None else None
        self._lu = log_base.make_loader() if log_base is not None else None
        self.uniform = base is None
        self.V_static = int(V) if isinstance(V, (int, sympy.Integer)) else None

    def v_float(self):
        """V as a compute-dtype value (a literal when static)."""
        if self.V_static is not None:
            return self.const(float(self.V_static))
        return self.ops.index_expr(self.V, self.cdt)

    def log_v(self):
        if self.V_static is not None:
            return self.const(math.log(self.V_static))
        return self.ops.log(self.v_float())

    # ---- scalar helpers
    def const(self, v: float):
        return self.ops.constant(v, self.cdt)

    def xmul(self, w, x):
        """w * x, with 0 where w == 0 (0 * -inf = 0, as x log x at 0)."""
        ops = self.ops
        return ops.where(ops.eq(w, self.const(0.0)), self.const(0.0), ops.mul(w, x))

    # ---- loads
    def z(self, a, j, d):
        return self.ops.to_dtype(self._z([a, j, d]), self.cdt)

    def u(self, j):
        if self._u is None:
            if self.V_static is not None:
                return self.const(1.0 / self.V_static)
            return self.ops.truediv(self.const(1.0), self.v_float())
        return self.ops.to_dtype(self._u([j]), self.cdt)

    def log_u(self, j):
        if self._lu is None:
            return self.ops.neg(self.log_v())
        return self.ops.to_dtype(self._lu([j]), self.cdt)

    def target(self, a, d):
        return self._t([a, d])

    def valid(self, t, ignore_index: int):
        return self.ops.ne(t, self.ops.constant(ignore_index, self.t_dtype))

    # ---- IR nodes
    def reduction(self, fn, rtype: str, ranges=None):
        out = self.ir.Reduction.create(
            device=self.device,
            dst_dtype=self.cdt,
            src_dtype=self.cdt,
            inner_fn=(lambda idx, ridx: fn(idx[0], ridx[0], idx[1])) if ranges is None else fn,
            ranges=[self.A, self.D] if ranges is None else ranges,
            reduction_ranges=[self.V],
            reduction_type=rtype,
        )
        return _realized(out)

    def online_softmax(self):
        """(M, S) per row: one online pass on GPUs, else max then sum (two loops).

        Inductor generates ``online_softmax_reduce`` for Triton only, and torch 2.11
        cannot split it; we use it where the reduction is not split.
        """
        inner = lambda idx, ridx: self.z(idx[0], ridx[0], idx[1])  # noqa: E731
        if _compat.online_softmax_ok(self.device, self.cdt, inner, [self.A, self.D], [self.V]):
            M, S = self.ir.OnlineSoftmaxReduction.create(
                device=self.device,
                dst_dtype=self.cdt,
                src_dtype=self.cdt,
                inner_fn=inner,
                ranges=[self.A, self.D],
                reduction_ranges=[self.V],
                num_output=2,
            )
            return _realized(M), _realized(S)
        M = self.reduction(lambda a, j, d: self.z(a, j, d), "max")
        m = M.make_loader()
        S = self.reduction(lambda a, j, d: self.ops.exp(self.ops.sub(self.z(a, j, d), m([a, d]))), "sum")
        return M, S

    def pointwise(self, fn, ranges=None, dtype=None):
        return self.ir.Pointwise.create(
            device=self.device,
            dtype=dtype or self.cdt,
            inner_fn=fn,
            ranges=list(ranges if ranges is not None else [self.A, self.D]),
        )

    def log_ratios(self, lp, lu, p, u, alpha: float):
        """(log(p/m), log(u/m)): the expressions of ops.ger_loss.log_ratio_p_m."""
        ops = self.ops
        one = self.const(1.0)
        zero = self.const(0.0)
        lo, hi = LOG_FORM_ALPHAS
        if lo <= alpha <= hi:
            log_m = ops.log(ops.add(ops.mul(self.const(alpha), p), ops.mul(self.const(1.0 - alpha), u)))
            return ops.sub(lp, log_m), ops.sub(lu, log_m)
        cap_t, cap = self.const(RATIO_LOG_CAP), self.const(math.exp(-RATIO_LOG_CAP))
        if alpha >= 0.5:
            t = ops.sub(lu, lp)
            beyond = ops.gt(t, cap_t)
            ratio = ops.truediv(u, ops.maximum(p, ops.mul(u, cap)))
            log_p_m = ops.where(
                beyond, ops.neg(ops.add(self.const(math.log1p(-alpha)), t)),
                ops.neg(ops.log1p(ops.mul(self.const(1.0 - alpha), ops.sub(ratio, one)))),
            )
            log_u_m = ops.where(
                ops.logical_or(ops.eq(p, zero), beyond), self.const(-math.log1p(-alpha)), ops.add(t, log_p_m)
            )
        else:
            t = ops.sub(lp, lu)
            beyond = ops.gt(t, cap_t)
            ratio = ops.truediv(p, ops.maximum(u, ops.mul(p, cap)))
            log_u_m = ops.where(
                beyond, ops.neg(ops.add(self.const(math.log(alpha)), t)),
                ops.neg(ops.log1p(ops.mul(self.const(alpha), ops.sub(ratio, one)))),
            )
            log_p_m = ops.where(
                ops.logical_or(ops.eq(u, zero), beyond), self.const(-math.log(alpha)), ops.add(t, log_u_m)
            )
        return log_p_m, log_u_m


class _Stats:
    """Row statistics over the vocabulary, by the ``rows`` or the ``chunks`` strategy."""

    def __init__(self, r: _Row, chunk: int):
        self.r = r
        self.K = int(chunk) if chunk and chunk > 0 else 0
        if self.K:
            self.C = _compat.ceil_div(r.V, self.K)

    # ---- chunked helpers: class j = c * K + k, masked past V
    def _masked(self, c, k, fn, other: float):
        r, ops = self.r, self.r.ops
        j = c * self.K + k
        inside = ops.lt(ops.index_expr(j, torch.int64), ops.index_expr(r.V, torch.int64))
        return ops.masked(inside, lambda: fn(j), other)  # other: a Python scalar

    def _partial(self, fn, rtype: str):
        """Per-chunk reduction over K classes: ranges (A, C, D), a persistent reduction on GPUs."""
        r = self.r
        return _realized(
            r.ir.Reduction.create(
                device=r.device, dst_dtype=r.cdt, src_dtype=r.cdt,
                inner_fn=lambda idx, ridx: fn(idx[0], idx[1], ridx[0], idx[2]),
                ranges=[r.A, self.C, r.D], reduction_ranges=[self.K], reduction_type=rtype,
                reduction_hint=_compat.reduction_hint_inner(),
            )
        )

    def _over_chunks(self, fn, rtype: str):
        r = self.r
        return _realized(
            r.ir.Reduction.create(
                device=r.device, dst_dtype=r.cdt, src_dtype=r.cdt,
                inner_fn=lambda idx, ridx: fn(idx[0], ridx[0], idx[1]),
                ranges=[r.A, r.D], reduction_ranges=[self.C], reduction_type=rtype,
            )
        )

    # ---- the statistics
    def softmax_stats(self, scaled: dict, plain: dict):
        """M, S and sums per row: ``scaled[name](a, j, d, e)`` is summed as e * value with
        e = e^(z - M) (0 where e == 0); ``plain[name](a, j, d)`` is summed as is."""
        r, ops = self.r, self.r.ops
        if not self.K:
            M, S = r.online_softmax()
            m_ = M.make_loader()

            def e(a, j, d):
                return ops.exp(ops.sub(r.z(a, j, d), m_([a, d])))

            out = {n: r.reduction(lambda a, j, d, f=f: r.xmul(e(a, j, d), f(a, j, d)), "sum").make_loader() for n, f in scaled.items()}
            out.update({n: r.reduction(f, "sum").make_loader() for n, f in plain.items()})
            return M.make_loader(), S.make_loader(), out
        ninf = -math.inf
        Mc = self._partial(lambda a, c, k, d: self._masked(c, k, lambda j: r.z(a, j, d), ninf), "max")
        mc = Mc.make_loader()

        def ec(a, c, k, d):
            return self._masked(c, k, lambda j: ops.exp(ops.sub(r.z(a, j, d), mc([a, c, d]))), 0.0)

        Sc = self._partial(ec, "sum").make_loader()
        parts = {
            n: self._partial(
                lambda a, c, k, d, f=f: r.xmul(ec(a, c, k, d), self._masked(c, k, lambda j: f(a, j, d), 0.0)), "sum"
            ).make_loader()
            for n, f in scaled.items()
        }
        plain_parts = {
            n: self._partial(lambda a, c, k, d, f=f: self._masked(c, k, lambda j: f(a, j, d), 0.0), "sum").make_loader()
            for n, f in plain.items()
        }
        M = self._over_chunks(lambda a, c, d: mc([a, c, d]), "max")
        m_ = M.make_loader()

        def rescale(a, c, d):  # e^(M_c - M)
            return ops.exp(ops.sub(mc([a, c, d]), m_([a, d])))

        S = self._over_chunks(lambda a, c, d: ops.mul(Sc([a, c, d]), rescale(a, c, d)), "sum")
        out = {
            n: self._over_chunks(lambda a, c, d, p=p: r.xmul(rescale(a, c, d), p([a, c, d])), "sum").make_loader()
            for n, p in parts.items()
        }
        out.update({n: self._over_chunks(lambda a, c, d, p=p: p([a, c, d]), "sum").make_loader() for n, p in plain_parts.items()})
        return m_, S.make_loader(), out

    def sums(self, terms: dict):
        """Plain per-row sums (the extra pass of general alpha, after L is known)."""
        r = self.r
        if not self.K:
            return {n: r.reduction(f, "sum").make_loader() for n, f in terms.items()}
        out = {}
        for n, f in terms.items():
            part = self._partial(lambda a, c, k, d, f=f: self._masked(c, k, lambda j: f(a, j, d), 0.0), "sum").make_loader()
            out[n] = self._over_chunks(lambda a, c, d, p=part: p([a, c, d]), "sum").make_loader()
        return out


def _add_at_targets(r: _Row, grad, g, ignore_index: int):
    """grad[a, t[a, d], d] -= g[a, d] for every row whose target is a class of these logits
    (not ``ignore_index``, in [0, V): the vocabulary-parallel backward passes V for a class
    another rank owns): an accumulating ``index_put_`` of A x D values after the
    elementwise pass. Any other row adds -0.0 at class 0, which changes no value (x + -0 = x)."""
    ops = r.ops

    def valid(a, d):
        t = r.target(a, d)
        t64 = ops.to_dtype(t, torch.int64)
        inside = ops.and_(ops.ge(t64, ops.constant(0, torch.int64)),
                          ops.lt(t64, ops.index_expr(r.V, torch.int64)))
        return ops.and_(r.valid(t, ignore_index), inside)

    rows = r.pointwise(lambda idx: ops.index_expr(idx[0], torch.int64), dtype=torch.int64)
    cols = r.pointwise(lambda idx: ops.where(valid(*idx), ops.to_dtype(r.target(*idx), torch.int64),
                                             ops.constant(0, torch.int64)), dtype=torch.int64)
    deps = r.pointwise(lambda idx: ops.index_expr(idx[1], torch.int64), dtype=torch.int64)
    vals = r.pointwise(lambda idx: ops.where(valid(*idx), ops.neg(g(idx)), r.const(-0.0)))
    return _compat.inductor_lowerings()[aten.index_put_.default](grad, [rows, cols, deps], vals, True)


def _register() -> None:
    ops_fwd = torch.ops.ger.loss_fwd.default
    ops_bwd = torch.ops.ger.loss_bwd.default

    @_compat.register_lowering(ops_fwd, type_promotion_kind=None)
    def loss_fwd(logits, target, base, log_base, alpha, ignore_index, extras, chunk, lse_inf=False,
                 lse_inf_out=False, rev=0):
        r = _Row(logits, target, base, log_base)
        ops = r.ops
        alpha = float(alpha)
        stats = _Stats(r, chunk)

        scaled, plain = {}, {}
        if extras or alpha == 0.0:
            scaled["T"] = lambda a, j, d: r.z(a, j, d)
        if alpha == 0.0 and not r.uniform:
            scaled["R"] = lambda a, j, d: r.log_u(j)
        if alpha == 1.0:
            if r.uniform:
                plain["Z"] = lambda a, j, d: r.z(a, j, d)
            else:
                # not guarded: u_j z_j = 0 * -inf is NaN, as in F.cross_entropy's weighted smoothing
                plain["U"] = lambda a, j, d: ops.mul(r.u(j), r.z(a, j, d))
        m_, s_, ld = stats.softmax_stats(scaled, plain)

        def L(a, d, inf_rows=lse_inf):
            out = ops.add(m_([a, d]), ops.log(s_([a, d])))
            if inf_rows:  # torch.logsumexp's: M itself on a row whose max is +-inf (ops.ger_loss.fwd_math)
                m = m_([a, d])
                out = ops.where(ops.eq(ops.abs(m), r.const(math.inf)), m, out)
            return out

        if 0.0 < alpha < 1.0:  # the extra pass: KL(p||m) and KL(u||m) need L

            def ratios(a, j, d):
                lpj = ops.sub(r.z(a, j, d), L(a, d))
                pj = ops.exp(lpj)
                return pj, r.log_ratios(lpj, r.log_u(j), pj, r.u(j), alpha)

            def kl_pm(a, j, d):
                pj, (log_p_m, _) = ratios(a, j, d)
                return r.xmul(pj, log_p_m)

            def kl_um(a, j, d):
                _, (_, log_u_m) = ratios(a, j, d)
                return r.xmul(r.u(j), log_u_m)

            ld.update(stats.sums({"KLpm": kl_pm, "KLum": kl_um}))

        if alpha == 1.0 and not r.uniform:
            # sum_j u_j log u_j: a V-sized reduction, once
            ulogu = r.reduction(
                lambda idx, ridx: r.xmul(r.u(ridx[0]), r.log_u(ridx[0])), "sum", ranges=[]
            ).make_loader()

        def ez(a, d):  # E_p[z] = T / S
            return ops.truediv(ld["T"]([a, d]), s_([a, d]))

        def nll_fn(idx):
            a, d = idx
            t = r.target(a, d)
            ok = r.valid(t, ignore_index)
            ts = ops.where(ok, t, ops.constant(0, r.t_dtype))
            j = ops.indirect_indexing(ts, r.V, check=True, wrap_neg=False)
            return ops.where(ok, ops.sub(L(a, d), r.z(a, j, d)), r.const(0.0))

        def reg_fn(idx):
            a, d = idx
            if alpha == 1.0:  # KL(u||p) = sum u log u - sum u z + L (for any u: gradient p - u)
                if r.uniform:
                    return ops.sub(ops.sub(L(a, d), ops.truediv(ld["Z"]([a, d]), r.v_float())), r.log_v())
                return ops.add(ops.sub(ulogu([]), ld["U"]([a, d])), L(a, d))
            if alpha == 0.0:  # KL(p||u) = E_p[z] - L - E_p[log u]
                kl = ops.sub(ez(a, d), L(a, d))
                if r.uniform:
                    return ops.add(kl, r.log_v())
                return ops.sub(kl, ops.truediv(ld["R"]([a, d]), s_([a, d])))
            return ops.add(
                ops.truediv(ld["KLpm"]([a, d]), r.const(1.0 - alpha)),
                ops.truediv(ld["KLum"]([a, d]), r.const(alpha)),
            )

        def aux_fn(idx):
            if 0.0 < alpha < 1.0:
                return ld["KLpm"](idx)
            if alpha == 0.0:
                return reg_fn(idx)
            return r.const(0.0)

        nll = r.pointwise(nll_fn)
        reg = r.pointwise(reg_fn)
        # ``lse_inf_out``: the L output alone of torch.logsumexp's convention (fwd_math)
        lse = r.pointwise(lambda idx: L(*idx, inf_rows=lse_inf or lse_inf_out))
        aux = r.pointwise(aux_fn)
        if extras:
            ent = r.pointwise(lambda idx: ops.sub(L(*idx), ez(*idx)))
        else:
            ent = _compat.inductor_lowerings()[aten.empty.memory_format]([0], dtype=r.cdt, device=r.device)
        return nll, reg, lse, ent, aux

    @_compat.register_lowering(ops_bwd, type_promotion_kind=None)
    def loss_bwd(grad_nll, grad_reg, grad_lse, grad_ent, logits, target, base, log_base, lse, ent, reg, aux, alpha,
                 ignore_index, rev=0):
        r = _Row(logits, target, base, log_base)
        ops = r.ops
        alpha = float(alpha)
        cpu = r.device.type == "cpu"

        def row_buffer(box, valid_only: bool = False):
            """CPU: the incoming gradient of a statistic as an (A, D) buffer in the compute
            type (``valid_only``: 0 at ignored targets), computed once per row. Inlined into
            the elementwise pass, its own code (a mean's division, an expand of a scalar)
            would run once per vector of classes (the compiler cannot hoist loads that may
            alias the output)."""
            if box is None:
                return None
            load = box.make_loader()

            def fn(idx):
                v = ops.to_dtype(load(idx), r.cdt)
                if valid_only:
                    v = ops.where(r.valid(r.target(*idx), ignore_index), v, r.const(0.0))
                return v
            if not cpu:
                return fn
            b = r.pointwise(fn)
            b.realize()
            return b.make_loader()

        L_ = lse.make_loader()
        gn = row_buffer(grad_nll, valid_only=True)
        gr = row_buffer(grad_reg)
        gl = row_buffer(grad_lse)
        ge = row_buffer(grad_ent)
        ent_ = ent.make_loader() if grad_ent is not None else None
        reg_ = reg.make_loader()
        aux_ = aux.make_loader()
        # CPU, gradients in the compute type: -g at the target is one scattered add per row
        # after the elementwise pass (``_add_at_targets``), as eager's log_softmax backward
        # forms it (g p - g), instead of a compare of 64-bit indices and a blend per element
        scatter_y = cpu and gn is not None and r.in_dtype == r.cdt

        def fn(idx):
            a, j, d = idx
            z = r.z(a, j, d)
            L = L_([a, d])
            lp = ops.sub(z, L)
            p = ops.exp(lp)
            g = r.const(0.0)
            if gn is not None and scatter_y:
                g = ops.add(g, ops.mul(gn([a, d]), p))
            elif gn is not None:
                t = r.target(a, d)
                is_y = ops.eq(ops.index_expr(j, r.t_dtype), t)
                g = ops.add(g, ops.mul(gn([a, d]), ops.sub(p, ops.where(is_y, r.const(1.0), r.const(0.0)))))
            if gr is not None:
                if alpha == 0.0:
                    dj = r.xmul(p, ops.sub(ops.sub(lp, r.log_u(j)), reg_([a, d])))
                elif alpha == 1.0:
                    dj = ops.sub(p, r.u(j))
                else:
                    lpm = r.log_ratios(lp, r.log_u(j), p, r.u(j), alpha)[0]
                    dj = ops.truediv(r.xmul(p, ops.sub(lpm, aux_([a, d]))), r.const(1.0 - alpha))
                g = ops.add(g, ops.mul(gr([a, d]), dj))
            if gl is not None:
                g = ops.add(g, ops.mul(gl([a, d]), p))
            if ge is not None:
                ezv = ops.sub(L, ent_([a, d]))
                g = ops.sub(g, ops.mul(ge([a, d]), r.xmul(p, ops.sub(z, ezv))))
            return ops.to_dtype(g, r.in_dtype)

        out = r.pointwise(fn, ranges=[r.A, r.V, r.D], dtype=r.in_dtype)
        if scatter_y:
            out = _add_at_targets(r, out, gn, ignore_index)
        return out


def _register_scaled_grad() -> None:
    """``ger::scaled_grad``: a plain product, ``ger::version_guard`` a copy (the kept
    tensors only pin saved inputs)."""
    aten = torch.ops.aten

    @_compat.register_lowering(torch.ops.ger.scaled_grad.default, type_promotion_kind=None)
    def _lower(grad, g, keep):
        low = _compat.inductor_lowerings()
        if grad.get_dtype() not in (torch.bfloat16, torch.float16) or g.get_dtype() != torch.float32:
            return low[aten.mul.Tensor](grad, g)
        # a low-precision gradient and a compute-dtype scale: the product in the scale's
        # dtype, rounded once (aten.mul's lowering would cast the scale down first)
        convert = low[torch.ops.prims.convert_element_type.default]
        return convert(low[aten.mul.Tensor](convert(grad, g.get_dtype()), g), grad.get_dtype())

    @_compat.register_lowering(torch.ops.ger.version_guard.default, type_promotion_kind=None)
    def _lower_guard(x, keep):  # ``ger::version_guard``: a copy (the kept tensors only pin saved inputs)
        return _compat.inductor_lowerings()[aten.clone.default](x)

    @_compat.register_lowering(torch.ops.ger.lowp_div.default, type_promotion_kind=None)
    def _lower_lowp_div(x, divisor):
        """x / divisor with eager's two roundings to x's dtype (its value as stored, and the
        quotient), written as Inductor's own emulate_precision_casts does: a downcast that
        the C++ backend's cast cache cannot skip, then the upcast to the compute type."""
        ir = _compat.inductor_ir()
        _, ops = _compat.inductor_ops()
        dt = x.get_dtype()
        load = x.make_loader()

        cpu = x.get_device().type == "cpu"

        def rounded(v):
            if cpu:
                # through the bits (a 16-bit integer): the C++ backend caches "this bf16
                # value came from that fp32 one" and would read the unrounded value back
                low = ops.to_dtype(v, dt)
                bits = ops.to_dtype_bitcast(low, torch.int16, dt)
                return ops.to_dtype_bitcast(bits, dt, torch.int16)
            # Triton: Inductor's own emulate_precision_casts pattern (a downcast kept, then
            # the compute type); benchmarks/gpu_check_lm_head.py checks it on CUDA
            return ops.to_dtype(ops.to_dtype(v, dt, use_compute_types=False), dt)

        # eager's kernel: CPU divides; CUDA multiplies by the fp32 reciprocal of a scalar
        # divisor (BinaryDivTrueKernel.cu), a different rounding for some T (0.6, 1.2)
        inv = float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(float(divisor), dtype=torch.float32))

        def fn(idx):
            v = rounded(load(idx))
            if cpu:
                q = ops.truediv(v, ops.constant(float(divisor), torch.float32))
            else:
                q = ops.mul(v, ops.constant(inv, torch.float32))
            return rounded(q)
        return ir.Pointwise.create(device=x.get_device(), dtype=dt, inner_fn=fn, ranges=list(x.get_size()))


_register()
_register_scaled_grad()
