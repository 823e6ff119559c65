"""The loss library: one module per family, every loss registered by name.

``build(name, **kwargs)`` makes a loss, ``names()`` lists them. All follow the pair
contract documented in ``dmlray.losses.base``; row-wise pair losses run on the chunked
engine of ``dmlray.losses.rowwise``.
"""

# importing a family registers its losses
from dmlray.losses import (  # noqa: F401  (registers)
    adversarial,
    arcface,
    binomial_deviance,
    cbml,
    circle,
    classification,
    cluster,
    contrastive,
    cosface,
    dynamic_soft_margin,
    fast_ap,
    generalized_lifted_structure,
    histogram,
    instance,
    intra_pair_variance,
    large_margin_softmax,
    lifted_structure,
    manifold,
    margin,
    multi_similarity,
    nca,
    npair,
    ntxent,
    p2sgrad,
    pnp,
    proxy,
    ranked_list,
    smooth_ap,
    snr_contrastive,
    softtriple,
    supcon,
    threshold_consistent_margin,
    triplet,
    triplet_margin,
    tuplet_margin,
)
from dmlray.losses.base import PairLoss
from dmlray.losses.registry import build, loss_class, names, register
from dmlray.losses.rowwise import RowwiseLoss

__all__ = ["PairLoss", "RowwiseLoss", "build", "loss_class", "names", "register"]
