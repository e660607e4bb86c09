"""``ger::`` custom ops: schema, fake implementation, autograd and eager kernel
(the fallback and the oracle of the lowering). Importing registers the schemas only."""

from . import ger_loss  # noqa: F401
from . import conv_bn  # noqa: F401
from . import linear_loss  # noqa: F401
from . import distill  # noqa: F401

__all__ = ["ger_loss"]
