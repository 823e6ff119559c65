"""MIC's pseudo labels (Roth et al., ICCV 2019): k-means clusters of the training split, by sample key.

Every so many steps the trainer embeds the whole training split with the auxiliary head,
clusters it, and each sample's cluster becomes its auxiliary label for a margin loss on
that head. The training stream yields ``(images, labels, keys)``, so labels are kept per
sample key, not per position: they follow an image through any shuffle, rank split or
resume.

Every rank ends with the same key -> cluster map: the inputs are sorted by key before
clustering (input order and rank order do not matter), the seed is explicit, and under a
process group rank 0's assignments are broadcast (GPUs of different kinds may round
differently) after checking that every rank clustered the same keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

# the deterministic per-group sums k-means itself uses (index_add_ is not, on CUDA)
from dmlray.evaluation.clustering import _cluster_sums, kmeans
from dmlray.training.distributed import all_gather_list, all_gather_variable, broadcast_object, world

__all__ = ["PseudoLabels", "center_by_class", "gather_keys_and_embeddings"]


def gather_keys_and_embeddings(keys: Sequence[str], embeddings: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """Every rank's (keys, embeddings) concatenated in rank order, on every rank; detached.

    Ranks may hold different numbers of rows. A collective: call it on every rank. The
    identity at world size 1. (``embed_split`` already returns gathered ``keys`` and
    ``embeddings``; this is for embeddings computed some other way.)
    """
    if len(keys) != embeddings.shape[0]:
        raise ValueError(f"{len(keys)} keys for {embeddings.shape[0]} embeddings")
    return all_gather_list(list(keys)), all_gather_variable(embeddings.detach())


def center_by_class(embeddings: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
    """Each row minus the mean of its class (MIC's ``cluster_mode='mean'``).

    MIC centres its first clustering this way: with the class means gone, k-means groups
    what is shared across classes (pose, colour, background) instead of the classes.
    Deterministic on any device.
    """
    labels = torch.as_tensor(class_labels, device=embeddings.device).reshape(-1)
    if labels.numel() != embeddings.shape[0]:
        raise ValueError(f"{labels.numel()} class labels for {embeddings.shape[0]} embeddings")
    classes, inverse = torch.unique(labels, return_inverse=True)
    sums, counts = _cluster_sums(embeddings, inverse, classes.numel())
    return embeddings - (sums / counts[:, None]).to(embeddings.dtype)[inverse]


def _keys_digest(sorted_keys: Sequence[str]) -> str:
    """sha256 of the sorted keys, length-prefixed so no two key lists collide by joining."""
    h = hashlib.sha256()
    for key in sorted_keys:
        raw = key.encode("utf-8")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.hexdigest()


def _encode_keys(keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys as one uint8 tensor of their utf-8 bytes and int64 offsets (len + 1): weights_only-safe."""
    raw = [k.encode("utf-8") for k in keys]
    offsets = torch.zeros(len(raw) + 1, dtype=torch.int64)
    if raw:
        offsets[1:] = torch.cumsum(torch.tensor([len(r) for r in raw], dtype=torch.int64), 0)
    blob = torch.from_numpy(np.frombuffer(b"".join(raw), dtype=np.uint8).copy())
    return blob, offsets


def _decode_keys(blob: torch.Tensor, offsets: torch.Tensor) -> list[str]:
    data = bytes(blob.cpu().numpy().astype(np.uint8))
    ends = offsets.cpu().tolist()
    if not ends or ends[0] != 0 or ends[-1] != len(data) or any(a > b for a, b in zip(ends, ends[1:], strict=False)):
        raise ValueError(f"pseudo-label state: key offsets do not describe the {len(data)} key bytes")
    return [data[a:b].decode("utf-8") for a, b in zip(ends, ends[1:], strict=False)]


class PseudoLabels:
    """A key -> k-means cluster map of the training split, refreshed by the trainer.

    ``ready`` is False until the first ``refresh`` (or a loaded state that had one): the
    trainer skips the auxiliary term until then. A key that was not clustered is an error
    naming it in ``lookup``, never a silent label.
    """

    def __init__(self, num_clusters: int, max_iter: int = 25):
        """``num_clusters``: k of k-means (MIC: 30 on CUB/Cars, 200 on SOP);
        ``max_iter``: Lloyd iterations at most (``clustering.kmeans``' default)."""
        if num_clusters < 1:
            raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        self.num_clusters = num_clusters
        self.max_iter = max_iter
        self.generation = 0  # number of refreshes so far (carried through state_dict)
        self._keys: list[str] = []  # sorted
        self._assignments = torch.zeros(0, dtype=torch.int64)  # cluster of self._keys[i]
        self._label_of: dict[str, int] = {}

    @property
    def ready(self) -> bool:
        """True once a clustering is held."""
        return self.generation > 0

    def __len__(self) -> int:
        return len(self._keys)

    def refresh(
        self,
        keys: Sequence[str],
        embeddings: torch.Tensor,
        seed: int,
        class_labels: torch.Tensor | None = None,
    ) -> None:
        """Cluster ``embeddings`` (row i belongs to ``keys[i]``; the whole split) into new labels.

        With ``class_labels`` (row i's class) each row first loses its class mean
        (``center_by_class``; MIC does this for its first clustering). k-means runs on the
        embeddings' device over the rows sorted by key, so any order of the same
        (key, embedding) pairs gives the same map. Vary ``seed`` per refresh (e.g.
        run seed + generation) for fresh k-means starts. Under an initialised process group
        this is a collective: every rank must call it with the same keys (checked) and
        ends with rank 0's assignments.
        """
        n = len(keys)
        if embeddings.ndim != 2 or embeddings.shape[0] != n:
            raise ValueError(f"refresh: {n} keys for embeddings of shape {tuple(embeddings.shape)}")
        if not 1 <= self.num_clusters <= n:
            raise ValueError(f"refresh: {self.num_clusters} clusters need at least as many samples, got {n}")
        order = sorted(range(n), key=keys.__getitem__)
        sorted_keys = [keys[i] for i in order]
        for a, b in zip(sorted_keys, sorted_keys[1:], strict=False):
            if a == b:
                raise ValueError(f"refresh: sample key {a!r} appears more than once")
        index = torch.tensor(order, dtype=torch.long, device=embeddings.device)
        x = embeddings.detach()[index]
        if class_labels is not None:
            classes = torch.as_tensor(class_labels, device=x.device).reshape(-1)
            if classes.numel() != n:
                raise ValueError(f"refresh: {classes.numel()} class labels for {n} keys")
            x = center_by_class(x, classes[index])
        assignments = kmeans(x, self.num_clusters, max_iter=self.max_iter, seed=seed).cpu()
        assignments = self._agree_across_ranks(sorted_keys, assignments)
        self._set(sorted_keys, assignments)
        self.generation += 1

    def _agree_across_ranks(self, sorted_keys: list[str], assignments: torch.Tensor) -> torch.Tensor:
        """Rank 0's assignments on every rank, after checking every rank clustered the same keys."""
        rank, world_size = world()
        if world_size == 1:
            return assignments
        digests = all_gather_list([_keys_digest(sorted_keys)])
        if len(set(digests)) > 1:
            differing = [r for r, d in enumerate(digests) if d != digests[0]]
            raise RuntimeError(
                f"refresh: ranks {differing} clustered other keys than rank 0; gather the whole split first"
            )
        return broadcast_object(assignments if rank == 0 else None)

    def _set(self, sorted_keys: list[str], assignments: torch.Tensor) -> None:
        self._keys = sorted_keys
        self._assignments = assignments.to(torch.int64)
        self._label_of = dict(zip(sorted_keys, self._assignments.tolist(), strict=True))

    def lookup(self, keys: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
        """The pseudo labels (int64, on ``device``) of a batch's sample keys."""
        if not self.ready:
            raise RuntimeError("pseudo labels looked up before the first refresh (check .ready)")
        try:
            labels = [self._label_of[k] for k in keys]
        except KeyError:
            missing = [k for k in keys if k not in self._label_of]
            raise KeyError(
                f"{len(missing)} sample key(s) were not in the last clustering "
                f"({len(self._keys)} keys, generation {self.generation}), e.g. {missing[0]!r}"
            ) from None
        return torch.tensor(labels, dtype=torch.int64, device=device)

    def cluster_sizes(self) -> torch.Tensor:
        """Samples per cluster (int64, ``num_clusters`` long): for logging empty or giant clusters."""
        return torch.bincount(self._assignments, minlength=self.num_clusters)

    def state_dict(self) -> dict:
        """Tensors and plain values only, so ``torch.load(weights_only=True)`` reads it back."""
        blob, offsets = _encode_keys(self._keys)
        return {
            "num_clusters": self.num_clusters,
            "generation": self.generation,
            "key_bytes": blob,
            "key_offsets": offsets,
            "assignments": self._assignments.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_clusters"]) != self.num_clusters:
            raise ValueError(
                f"pseudo-label state has {int(state['num_clusters'])} clusters, this run uses {self.num_clusters}"
            )
        keys = _decode_keys(state["key_bytes"], state["key_offsets"])
        assignments = torch.as_tensor(state["assignments"]).cpu().to(torch.int64).reshape(-1)
        if assignments.numel() != len(keys):
            raise ValueError(f"pseudo-label state: {assignments.numel()} assignments for {len(keys)} keys")
        if assignments.numel() and not (0 <= int(assignments.min()) and int(assignments.max()) < self.num_clusters):
            raise ValueError(f"pseudo-label state: assignments outside [0, {self.num_clusters})")
        if keys != sorted(keys) or len(set(keys)) != len(keys):
            raise ValueError("pseudo-label state: keys are not sorted and unique")
        generation = int(state["generation"])
        if generation > 0 and not keys:
            raise ValueError(f"pseudo-label state: generation {generation} without keys")
        self._set(keys, assignments)
        self.generation = generation
