"""``torch.compile`` for the benchmarks' variants: each variant gets graphs of its own.

Dynamo keeps compiled graphs on the code object it starts tracing (a function's, a
module's ``forward``'s) and serves a call the first graph whose guards pass. Two
variants that compile the same function or the same model class with one backend
(``inductor`` and ``inductor`` with freezing; a graph compiled for one size and the
dynamic graph of a loop over sizes) would share those graphs: the second variant ran
the first one's code (stop-38 review of the harness). :func:`compile_apart` gives every
compiled callable a copy of the code object, so its graphs are its own, and no
``dynamo.reset`` between variants is needed (a reset dropped the graphs of the variants
built before it, which then recompiled inside their timed calls).
"""

from __future__ import annotations

import itertools
import types
from typing import Any, Callable

import torch

from ger_inductor import _compat

_ids = itertools.count()


def own_code(fn: Callable, tag: str) -> Callable:
    """``fn`` with a copy of its code object (closure, defaults and globals shared)."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{tag}")
    new = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    return new


def _forwarding(inner: Callable) -> Callable:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return inner(*args, **kwargs)

    return forward


class _FreezingAtFirstCall:
    """Inductor's ``freezing`` is read from its global config by some of its passes (the
    ``options`` dict does not reach them): the compiling first call runs under it."""

    def __init__(self, fn: Callable):
        self.fn, self.first = fn, True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.first:
            with _compat.inductor_config().patch(freezing=True):
                out = self.fn(*args, **kwargs)
            self.first = False
            return out
        return self.fn(*args, **kwargs)


def compile_apart(target: Any, backend: str, *, tag: str = "", freezing: bool = False, **kw: Any) -> Callable:
    """``torch.compile(target, backend=backend, **kw)`` with Dynamo graphs no other
    variant shares. A module gets an instance ``forward`` with code of its own (calling
    the forward it had: the class's, or an instance one such as the transformers
    integration sets); a function a copy. ``freezing``: its first call compiles with
    Inductor's freezing (eval under no_grad)."""
    tag = f"{tag or backend}_{next(_ids)}".replace("(", "_").replace(")", "").replace("[", "_").replace("]", "")
    tag = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in tag)
    if isinstance(target, torch.nn.Module):
        inner = target.__dict__.get("forward") or type(target).forward.__get__(target)
        target.forward = own_code(_forwarding(inner), tag)
        compiled = torch.compile(target, backend=backend, **kw)
    else:
        compiled = torch.compile(own_code(target, tag), backend=backend, **kw)
    return _FreezingAtFirstCall(compiled) if freezing else compiled
