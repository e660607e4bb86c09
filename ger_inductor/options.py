"""``GerOptions``: the typed, frozen settings parsed from ``torch.compile(options=...)``.

Unknown keys raise ``ValueError`` listing the valid keys; a wrongly typed value raises
``TypeError`` naming the key and the expected type. Nothing here touches global state.
"""

from __future__ import annotations

import dataclasses
import json
import os
from types import MappingProxyType
from typing import Any, Mapping

#: Pattern families, in pipeline order. One source of truth: passes/, docs and tests
#: import this tuple.
PASS_FAMILIES: tuple[str, ...] = ("conv_bn_act", "loss_entropy", "lm_head")

DUMP_DIR_ENV = "GER_DUMP_DIR"

#: what compiles the rewritten graph: Inductor, or AOTAutograd running it eagerly
COMPILERS: tuple[str, ...] = ("inductor", "aot_eager")


def _fields_doc() -> dict[str, str]:
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(GerOptions)}


@dataclasses.dataclass(frozen=True)
class GerOptions:
    """Settings of one ``ger`` compile. Build with :meth:`GerOptions.parse`.

    >>> GerOptions.parse({"strict": True}).strict
    True
    """

    strict: bool = dataclasses.field(
        default=False, metadata={"doc": "re-raise any compile/pass error instead of falling back to eager"}
    )
    dump_dir: str | None = dataclasses.field(
        default=None,
        metadata={"doc": f"folder for graph dumps (before/after every pass, diff, report); env {DUMP_DIR_ENV}"},
    )
    passes: Mapping[str, bool] = dataclasses.field(
        default_factory=lambda: MappingProxyType({name: True for name in PASS_FAMILIES}),
        metadata={"doc": "enable/disable pattern families by name, e.g. {'conv_bn_act': False}"},
    )
    eager_ops: frozenset[str] = dataclasses.field(
        default_factory=frozenset,
        metadata={"doc": "ops forced to run eagerly, by name ('aten.mm', 'torch.matmul', 'relu') or callable"},
    )
    device_profile: str = dataclasses.field(
        default="auto", metadata={"doc": "'auto' (detect per device) or a pinned profile name (see `python -m ger_inductor fleet`)"}
    )
    inductor_config: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}),
        metadata={"doc": "extra torch._inductor.config patches for this compile only"},
    )
    lm_head_chunk: int | None = dataclasses.field(
        default=None,
        metadata={"doc": "rows per chunk of the fused lm-head loss (default: the device profile's choice)"},
    )
    autotune: bool = dataclasses.field(
        default=True,
        metadata={"doc": "measure a rewrite site's fused form against Inductor's at compile time and keep the faster "
                         "(lm head sites; decisions stored on disk); default on, env GER_AUTOTUNE=0 turns the "
                         "default off"},
    )
    autotune_store: str | None = dataclasses.field(
        default=None,
        metadata={"doc": "file of measured decisions (default <Inductor cache dir>/ger/decisions.json; env "
                         "GER_AUTOTUNE_STORE)"},
    )
    reparameterize: bool = dataclasses.field(
        default=False,
        metadata={"doc": "eval: merge summed conv -> BN branches of one input into ONE convolution (RepVGG's "
                         "re-parameterisation); equal to eager for finite inputs, but an inf or NaN in the input "
                         "spreads differently (0 * inf at the zero-padded taps), so off by default (a near-miss)"},
    )
    compiler: str = dataclasses.field(
        default="inductor",
        metadata={"doc": "'inductor' (default), or 'aot_eager': ger's rewrites run by AOTAutograd without code "
                         "generation (debugging, fuzzing)"},
    )

    # ------------------------------------------------------------------ parsing
    @classmethod
    def parse(cls, options: Mapping[str, Any] | "GerOptions" | None) -> "GerOptions":
        if isinstance(options, GerOptions):
            return options
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise TypeError(f"ger options must be a dict, got {type(options).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown ger option(s) {unknown}; valid options are: "
                + ", ".join(f"{k} ({d})" for k, d in _fields_doc().items())
            )
        kw: dict[str, Any] = {}
        if "strict" in options:
            kw["strict"] = _expect_bool("strict", options["strict"])
        dump_dir = options.get("dump_dir", os.environ.get(DUMP_DIR_ENV) or None)
        if dump_dir is not None:
            if not isinstance(dump_dir, (str, os.PathLike)):
                raise TypeError(f"ger option 'dump_dir' must be a str or os.PathLike, got {type(dump_dir).__name__}")
            # absolute now: a chdir before a backward compiles must not move the dump
            kw["dump_dir"] = os.path.abspath(os.fspath(dump_dir)) if os.fspath(dump_dir) else None
        if "passes" in options:
            kw["passes"] = _parse_passes(options["passes"])
        if "eager_ops" in options:
            kw["eager_ops"] = _parse_eager_ops(options["eager_ops"])
        if "device_profile" in options:
            prof = options["device_profile"]
            if not isinstance(prof, str):
                raise TypeError(f"ger option 'device_profile' must be a str, got {type(prof).__name__}")
            from .fleet import PINNED_PROFILES

            if prof != "auto" and prof not in PINNED_PROFILES:
                raise ValueError(
                    f"ger option 'device_profile'={prof!r} is not a known profile; valid: "
                    + ", ".join(["auto", *PINNED_PROFILES])
                )
            kw["device_profile"] = prof
        if "inductor_config" in options:
            kw["inductor_config"] = _parse_inductor_config(options["inductor_config"])
        if options.get("lm_head_chunk") is not None:
            v = options["lm_head_chunk"]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ger option 'lm_head_chunk' must be a positive int (rows per chunk), got {v!r}")
            kw["lm_head_chunk"] = v
        if "autotune" in options:
            kw["autotune"] = _expect_bool("autotune", options["autotune"])
        else:
            from .autotune import enabled_by_default

            kw["autotune"] = enabled_by_default()
        if options.get("autotune_store") is not None:
            v = options["autotune_store"]
            if not isinstance(v, (str, os.PathLike)):
                raise TypeError(f"ger option 'autotune_store' must be a str or os.PathLike, got {type(v).__name__}")
            kw["autotune_store"] = os.path.abspath(os.fspath(v))
        if "reparameterize" in options:
            kw["reparameterize"] = _expect_bool("reparameterize", options["reparameterize"])
        if "compiler" in options:
            v = options["compiler"]
            if not isinstance(v, str):
                raise TypeError(f"ger option 'compiler' must be a str, got {type(v).__name__}")
            if v not in COMPILERS:
                raise ValueError(f"ger option 'compiler'={v!r} is not known; valid: {', '.join(COMPILERS)}")
            kw["compiler"] = v
        return cls(**kw)

    # ------------------------------------------------------------------ helpers
    def pass_enabled(self, name: str) -> bool:
        return bool(self.passes.get(name, True))

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "strict": self.strict,
            "dump_dir": self.dump_dir,
            "passes": dict(sorted(self.passes.items())),
            "eager_ops": sorted(self.eager_ops),
            "device_profile": self.device_profile,
            "inductor_config": {k: repr(v) for k, v in sorted(self.inductor_config.items())},
            "lm_head_chunk": self.lm_head_chunk,
            "autotune": self.autotune,
            "autotune_store": self.autotune_store,
            "reparameterize": self.reparameterize,
            "compiler": self.compiler,
        }

    def cache_key(self) -> str:
        """What of the options affects generated code (dump_dir and strict do not)."""
        d = self.to_json_dict()
        d.pop("dump_dir")
        d.pop("strict")
        d.pop("autotune_store")  # where decisions are kept; a decision itself shows in the graph
        return json.dumps(d, sort_keys=True)


def _expect_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"ger option {key!r} must be a bool, got {type(value).__name__} ({value!r})")
    return value


def _parse_passes(value: Any) -> Mapping[str, bool]:
    if isinstance(value, Mapping):
        items = dict(value)
    elif isinstance(value, (list, tuple, set, frozenset)):
        # a collection lists the families to run; the others are disabled
        if not all(isinstance(v, str) for v in value):
            raise TypeError("ger option 'passes' given as a collection must hold family names (str)")
        items = {name: (name in value) for name in PASS_FAMILIES}
        items.update({u: True for u in set(value) - set(PASS_FAMILIES)})  # reported below
    else:
        raise TypeError(
            f"ger option 'passes' must be a dict {{family: bool}} or a list of family names, got {type(value).__name__}"
        )
    unknown = sorted(set(items) - set(PASS_FAMILIES))
    if unknown:
        raise ValueError(f"ger option 'passes': unknown pattern family {unknown}; valid families: {', '.join(PASS_FAMILIES)}")
    for k, v in items.items():
        if not isinstance(v, bool):
            raise TypeError(f"ger option 'passes'[{k!r}] must be a bool, got {type(v).__name__}")
    full = {name: True for name in PASS_FAMILIES}
    full.update(items)
    return MappingProxyType(full)


def op_name(op: Any) -> str:
    """Canonical string for an op given by the user or found on an FX node."""
    if isinstance(op, str):
        return op
    from . import _compat

    if _compat.is_op_overload(op):
        return f"{op.namespace}.{op._opname}"  # e.g. aten.mm (overload-insensitive)
    if _compat.is_op_packet(op):
        return f"{op._qualified_op_name.replace('::', '.')}"
    mod = getattr(op, "__module__", None) or ""
    name = getattr(op, "__qualname__", None) or getattr(op, "__name__", None) or repr(op)
    if name.startswith("_VariableFunctionsClass."):  # torch.relu and other builtins
        mod, name = "torch", name.split(".", 1)[1]
    elif name.startswith(("TensorBase.", "_TensorBase.")):
        mod, name = "torch", "Tensor." + name.split(".", 1)[1]
    if mod.startswith("torch._C._nn"):
        mod = "torch.nn.functional"
    return f"{mod}.{name}" if mod else name


def _parse_eager_ops(value: Any) -> frozenset[str]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(
            f"ger option 'eager_ops' must be a list of op names or callables, got {type(value).__name__}"
        )
    out = set()
    for v in value:
        if isinstance(v, str):
            if not v:
                raise ValueError("ger option 'eager_ops' holds an empty op name")
            known = _names_an_op(v)
            if not known and "." not in v:
                # a short name may be a custom op's, a higher-order op's or an allowed
                # function's (node_op_aliases gives their nodes one): said, not refused
                import warnings

                warnings.warn(f"ger option 'eager_ops': {v!r} names no torch, torch.Tensor, torch.nn.functional, "
                              "operator or aten op; it forces only a custom op or function of that name", stacklevel=3)
            elif not known:
                raise ValueError(
                    f"ger option 'eager_ops': {v!r} names no op (looked up in torch, torch.Tensor, "
                    "torch.nn.functional, operator, aten and the torch.ops namespaces): a misspelt name would "
                    "force nothing"
                )
            out.add(v)
        elif callable(v):
            out.add(op_name(v))
        else:
            raise TypeError(f"ger option 'eager_ops' entries must be str or callable, got {type(v).__name__}")
    return frozenset(out)


def _names_an_op(name: str) -> bool:
    """Whether an ``eager_ops`` name resolves to something a graph node can be (the names
    ``fallback.node_op_aliases`` gives nodes: qualified, short, ``torch.``/``aten.``/
    ``Tensor.`` prefixed, a ``torch.ops`` namespace's op)."""
    import importlib
    import operator

    import torch

    def resolve(dotted: str) -> bool:
        head, *rest = dotted.split(".")
        try:
            obj = importlib.import_module(head)
        except ImportError:
            return False
        for i, part in enumerate(rest):
            nxt = getattr(obj, part, None)
            if nxt is None:
                try:  # a submodule not imported yet (torch.nn.functional, ...)
                    nxt = importlib.import_module(".".join([head, *rest[: i + 1]]))
                except ImportError:
                    return False
            obj = nxt
        return True

    def has_op(namespace: str, op: str) -> bool:
        try:
            return hasattr(getattr(torch.ops, namespace), op)
        except (AttributeError, RuntimeError):
            return False

    parts = name.split(".")
    if len(parts) == 1:
        return any(hasattr(m, name) for m in (torch, torch.Tensor, torch.nn.functional, operator)) or has_op("aten", name)
    if parts[0] == "Tensor":
        return hasattr(torch.Tensor, parts[1])
    if len(parts) in (2, 3) and has_op(parts[0], parts[1]):  # aten.mm, aten.mm.default, mylib.op
        return True
    return resolve(name)


def _parse_inductor_config(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"ger option 'inductor_config' must be a dict, got {type(value).__name__}")
    from . import _compat

    cfg = _compat.inductor_config()
    current = cfg.get_config_copy()
    for key, v in value.items():
        if key not in current:
            raise ValueError(f"ger option 'inductor_config': {key!r} is not a torch._inductor.config key")
        if key == "post_grad_custom_post_pass":
            raise ValueError("ger option 'inductor_config': 'post_grad_custom_post_pass' is ger's own (its post-grad "
                             "passes run there); a pass of yours would be replaced, not run")
        old = current[key]
        ok = v is None or (isinstance(v, bool) if isinstance(old, bool) else
              isinstance(v, int) and not isinstance(v, bool) if isinstance(old, int) else
              isinstance(v, (int, float)) and not isinstance(v, bool) if isinstance(old, float) else
              isinstance(v, str) if isinstance(old, str) else True)  # (None: the Optional keys)
        if not ok:
            raise TypeError(f"ger option 'inductor_config': {key!r} takes a {type(old).__name__} "
                            f"(now {old!r}), got {type(v).__name__} {v!r}")
    return MappingProxyType(dict(value))
