"""loss + entropy subgraphs -> ger::loss_fwd (work in progress)."""
from __future__ import annotations


def run(gm, ctx) -> bool:
    return False
