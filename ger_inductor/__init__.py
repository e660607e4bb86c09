"""ger_inductor: a torch.compile backend for conv->BN->activation stacks and
cross-entropy losses with entropy regularisers (label smoothing, confidence penalty,
Generalized Entropy Regularization).

    model = torch.compile(model, backend="ger")          # no import needed
    from ger_inductor import ger_loss, GERLoss           # the GER loss family
    from ger_inductor import ger_distill_loss, ger_token_stats  # distillation / RL rows

Importing this package is light: it registers the ``ger::`` custom ops (schemas only)
and nothing else - no Inductor import, no CUDA initialisation, no pattern tracing.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .autotune import clear_decisions, decisions, export_decisions, import_decisions
from .debug import GraphReport, clear_reports, last_report, reports
from .distill import (TokenStats, ger_distill_loss, ger_distill_reference, ger_linear_distill_loss,
                      ger_linear_token_stats, ger_token_stats, ger_token_stats_reference)
from .distributed import ger_distill_loss_vocab_parallel, ger_loss_vocab_parallel, ger_token_stats_vocab_parallel
from .fleet import PINNED_PROFILES, DeviceProfile
from .lm_head import ger_linear_loss
from .losses import GERLoss, ger_loss, ger_loss_reference
from .options import GerOptions

__all__ = [
    "__version__",
    "ger_loss",
    "GERLoss",
    "ger_loss_reference",
    "ger_loss_vocab_parallel",
    "ger_distill_loss_vocab_parallel",
    "ger_token_stats_vocab_parallel",
    "ger_linear_loss",
    "ger_distill_loss",
    "ger_distill_reference",
    "ger_linear_distill_loss",
    "ger_token_stats",
    "ger_linear_token_stats",
    "ger_token_stats_reference",
    "TokenStats",
    "GerOptions",
    "DeviceProfile",
    "PINNED_PROFILES",
    "GraphReport",
    "last_report",
    "reports",
    "clear_reports",
    "decisions",
    "export_decisions",
    "import_decisions",
    "clear_decisions",
]
