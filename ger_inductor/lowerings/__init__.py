"""Inductor lowerings of the ``ger::`` ops, written in Inductor IR (device-agnostic:
C++ on CPU, Triton on GPUs). Registered once per process, on the first ``ger``
compile or the first trace of a ger op (its fake implementation), never at import."""

from __future__ import annotations

import threading

_lock = threading.Lock()
_registered = False


def ensure_registered() -> None:
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        from . import ger_loss  # noqa: F401  (registers on import)
        from . import conv_bn  # noqa: F401  (registers on import)
        from . import distill  # noqa: F401  (registers on import)

        _registered = True
