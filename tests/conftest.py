"""Shared test fixtures: isolated compile state, expect-test base class, GPU skips."""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch

import ger_inductor
from ger_inductor import _compat

# Measured strategy selection (ger_inductor/autotune.py) times forms on this machine, so
# its choices vary with load: the suite runs with it off by default, and
# tests/test_autotune.py switches it on explicitly, with a private store.
os.environ.setdefault("GER_AUTOTUNE", "0")

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA/ROCm GPU (this machine has none)")


@pytest.fixture(autouse=True)
def compile_state():
    """Each test starts with a reset Dynamo, cleared counters and reports, and a fresh
    (empty, private) Inductor cache, so cache hits can only come from the test itself."""
    _compat.dynamo_reset()
    _compat.counters().clear()
    ger_inductor.clear_reports()
    with _compat.fresh_cache():
        yield
    _compat.dynamo_reset()


def rewrite_backend(options: dict, on_graph=None, reports: list | None = None):
    """A ``torch.compile`` backend that runs ger's passes through the public
    ``ger_inductor.backend.rewrite`` (what ``backend="ger"`` runs before Inductor) and
    executes the rewritten graph eagerly: the rewrite decisions and their numbers,
    without AOTAutograd or code generation. ``on_graph(before_text, gm)`` sees each graph;
    ``reports`` collects each graph's report."""
    from ger_inductor.backend import rewrite
    from ger_inductor.debug import graph_text

    def backend(gm, example_inputs):
        before = graph_text(gm) if on_graph is not None else None
        gm, report = rewrite(gm, example_inputs, {"strict": True, **options})
        if on_graph is not None:
            on_graph(before, gm)
        if reports is not None:
            reports.append(report)
        return gm.forward

    return backend


def compiler_params(names, codegen: set[str]) -> list:
    """pytest params ``(name, compiler)`` for spelling tables: the names in ``codegen``
    compile through Inductor (code generation, the lowering's numbers on that spelling),
    the others with ``compiler="aot_eager"`` (ger's rewrite under AOTAutograd, the op's
    eager kernels), which decides the same rewrite at a fraction of the compile time.
    The lowerings themselves are tested on their own (test_ger_loss, test_distill)."""
    names = list(names)
    missing = set(codegen) - set(names)
    assert not missing, f"codegen names not in the table: {sorted(missing)}"
    return [pytest.param(n, "inductor" if n in codegen else "aot_eager", id=f"{n}-{'inductor' if n in codegen else 'aot'}")
            for n in names]


@pytest.fixture
def quiet_ger():
    """ger's log at ERROR and warnings off: for tests that compile many programs."""
    logging.getLogger("ger_inductor").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    logging.getLogger("ger_inductor").setLevel(logging.NOTSET)


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


def pytest_report_header(config):
    return [f"torch {torch.__version__}, cuda available: {HAS_CUDA}, threads: {torch.get_num_threads()}"]
