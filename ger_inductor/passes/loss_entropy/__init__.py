"""loss + entropy subgraphs -> ``ger::loss_fwd`` (one read of the logits forward, one
fused elementwise kernel backward), on unmodified user code.

How it works. Rather than one template per spelling, the pass evaluates the Dynamo
graph symbolically. Every tensor derived from a logits tensor z (classes last) by
log_softmax / softmax / exp / log / products / sums / clamps is written as a linear
combination of a few *vocabulary terms* with per-row coefficients:

    z_j, 1, p_j, p_j z_j, log m_j, p_j log m_j      (m = alpha p + (1 - alpha) / V)

and every reduction over the classes (sum, mean, gather at the target, logsumexp,
F.cross_entropy, F.nll_loss, F.kl_div) as a linear combination of *row statistics*

    L = logsumexp z, z_y, sum_j z_j, E_p[z], sum_j p_j log m_j, sum_j u_j log m_j

which the op computes in one pass (nll = L - z_y, KL(u||p) gives sum z, the entropy
gives E_p[z], J_alpha and KL(p||m) give the log m sums). So log_softmax * softmax,
p * p.log(), torch.special.entr, Categorical(logits).entropy(), fairseq/transformers
label smoothing, F.kl_div to a uniform distribution, and the plain-torch GER criterion
all reduce to the same statistics. The reductions are replaced by O(rows) combinations
of the op's outputs; everything downstream (beta, masks, means over positions) is left
as the user wrote it. The N x V intermediates become dead and are removed.

Statistics that need no target (an entropy or a KL to the uniform with no
cross-entropy on the same logits: a policy's entropy bonus) are computed by the op
without one (``losses.row_stats(target=None)``).

Refused (near-misses, with the reason): a reduction over another dimension, a
log-probability tensor also used elsewhere, soft targets, products that are not
entropy-like, several targets on one logits tensor.

Layout: ``algebra`` (the values, no FX), ``evaluate`` (node -> value by op spelling),
``classify`` (loss-like reductions), ``rewrite`` (plan and graph rewrite, ``run``).
"""

from __future__ import annotations

from .algebra import NotRepresentable, Root, Row, Vocab, VPoly
from .classify import GATHER_ROWS_WHY, Candidate
from .evaluate import STATIC_CLASSES_REASON, SYMBOLIC_SCALAR_REASON, Evaluator
from .rewrite import EAGER_SAVES_LOGITS, FAMILY, GRAPH_FUNCTIONS, LOSS_FWD, NO_IGNORE, alias_base, protect_saved_logits, run

__all__ = ["EAGER_SAVES_LOGITS", "FAMILY", "GRAPH_FUNCTIONS", "LOSS_FWD", "NO_IGNORE", "alias_base", "protect_saved_logits", "GATHER_ROWS_WHY", "STATIC_CLASSES_REASON",
           "SYMBOLIC_SCALAR_REASON", "Candidate", "Evaluator", "NotRepresentable", "Root", "Row", "Vocab", "VPoly",
           "run"]
