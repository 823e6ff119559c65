"""The loss library: one module per family, every loss registered by name.

``build(name, **kwargs)`` makes a loss, ``names()`` lists them. All follow the pair
contract documented in ``dmlray.losses.base``.
"""

from dmlray.losses.base import PairLoss
from dmlray.losses.registry import build, loss_class, names, register

# importing a family registers its losses
from dmlray.losses import multi_similarity  # noqa: F401  (registers)

__all__ = ["PairLoss", "build", "loss_class", "names", "register"]
