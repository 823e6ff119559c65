"""Instance loss: cross-entropy of each sample's similarities to the batch, one class per instance."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmlray.losses.base import WithinBatchLoss, similarity
from dmlray.losses.registry import register


def label_ranks(labels: torch.Tensor) -> torch.Tensor:
    """(B,) rank of each label among the batch's distinct labels (``torch.unique``'s inverse).

    Counted on a (B, B) mask instead of ``torch.unique``, whose data-dependent output size
    syncs with the host on a GPU.
    """
    same = labels.unsqueeze(1) == labels.unsqueeze(0)
    earlier = torch.ones_like(same).tril(diagonal=-1)
    first = ~(same & earlier).any(dim=1)  # j is its label's first occurrence
    return (first.unsqueeze(0) & (labels.unsqueeze(0) < labels.unsqueeze(1))).sum(dim=1)


@register("instance")
class InstanceLoss(WithinBatchLoss):
    """L_i = −log softmax_j(γ·s_ij)[r_i], r_i the rank of y_i among the batch's distinct labels; mean.

    The logits are anchor i's cosines with *every* sample of the batch, itself included,
    and the target is a column: the sample at position r_i. Paper: "Dual-Path
    Convolutional Image-Text Embeddings with Instance Loss", Zheng et al., ACM TOMM 2020,
    in pytorch-metric-learning's batch form. Default (PML's): γ = 64.

    Labels are instance ids: the target column must hold a sample of the anchor's own
    instance, ``labels[r_i] == labels[i]`` — the batch begins with one sample of each
    instance in increasing id order (e.g. image-text pairs ``[0..n−1, 0..n−1]``). PML does
    not check this and computes a loss towards another instance's sample when it fails;
    with ``check_labels`` (the default) such labels raise ValueError, which costs one
    host sync (a bool) per call; ``check_labels=False`` skips it.

    References are refused (``supports_references = False``, as PML): the targets index
    the batch. Target columns depend on the whole batch's labels, so across ranks the
    global batch is computed on every rank (``rank_decomposable = False``).
    """

    rank_decomposable = False

    def __init__(self, gamma: float = 64.0, check_labels: bool = True):
        super().__init__()
        self.gamma = gamma
        self.check_labels = check_labels

    def batch_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if labels.shape != (embeddings.shape[0],):
            raise ValueError(f"labels must be ({embeddings.shape[0]},), got {tuple(labels.shape)}")
        if embeddings.shape[0] == 0:
            return embeddings.sum() * 0.0
        target = label_ranks(labels)
        if self.check_labels:
            _check_instance_columns(labels, target)
        logits = similarity(embeddings, embeddings) * self.gamma
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return F.cross_entropy(logits, target)


def _check_instance_columns(labels: torch.Tensor, target: torch.Tensor) -> None:
    bad = labels[target] != labels
    if bool(bad.any()):
        rows = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(
            "instance loss: labels are instance ids whose rank among the batch's distinct ids must "
            "be the position of a sample of that id (the batch starts with one sample of each id, "
            f"in increasing order); anchors {rows} fail: labels[:8]={labels[:8].tolist()}"
        )
