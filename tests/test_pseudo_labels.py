"""MIC pseudo labels: k-means clusters by sample key, identical on every rank and across resumes."""

from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dmlray.evaluation.clustering import kmeans, nmi_score
from dmlray.training.pseudo_labels import PseudoLabels, center_by_class, gather_keys_and_embeddings

# non-ASCII keys: the state stores utf-8 bytes, and sorting is by code point
PREFIXES = ["cub/001", "cars/ü", "sop/日本", "x"]


def make_data(n: int = 60, dim: int = 5, seed: int = 0) -> tuple[list[str], torch.Tensor]:
    """Random keys (no order to the rows) and unstructured embeddings, so k-means depends on the order it sees."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen).tolist()
    keys = [f"{PREFIXES[i % len(PREFIXES)]}/{perm[i]:04d}" for i in range(n)]
    return keys, torch.randn(n, dim, generator=gen, dtype=torch.float64)


def as_map(labels: PseudoLabels, keys: list[str]) -> dict[str, int]:
    return dict(zip(keys, labels.lookup(keys).tolist(), strict=True))


def test_assignments_are_the_project_kmeans_on_key_sorted_rows():
    keys, x = make_data()
    labels = PseudoLabels(num_clusters=6, max_iter=10)
    assert not labels.ready
    labels.refresh(keys, x, seed=3)
    assert labels.ready and labels.generation == 1 and len(labels) == len(keys)

    pairs = sorted(zip(keys, range(len(keys)), strict=True))
    sorted_keys = [k for k, _ in pairs]
    expected = kmeans(x[[i for _, i in pairs]], 6, max_iter=10, seed=3)
    assert labels.lookup(sorted_keys).tolist() == expected.tolist()
    assert labels.cluster_sizes().tolist() == torch.bincount(expected, minlength=6).tolist()


def test_any_order_of_the_inputs_gives_the_same_key_to_label_map():
    keys, x = make_data()
    reference = PseudoLabels(6)
    reference.refresh(keys, x, seed=1)
    unsorted_maps = []
    for trial in range(3):
        perm = torch.randperm(len(keys), generator=torch.Generator().manual_seed(10 + trial)).tolist()
        shuffled = PseudoLabels(6)
        shuffled.refresh([keys[i] for i in perm], x[perm], seed=1)
        assert as_map(shuffled, keys) == as_map(reference, keys)
        unsorted_maps.append(dict(zip([keys[i] for i in perm], kmeans(x[perm], 6, seed=1).tolist(), strict=True)))
    # k-means alone depends on the row order: the sort by key is what makes the maps agree
    assert any(m != as_map(reference, keys) for m in unsorted_maps)


def test_well_separated_blobs_are_recovered():
    gen = torch.Generator().manual_seed(4)
    blobs, per_blob, dim = 5, 20, 8
    centres = 20.0 * torch.eye(blobs, dim)
    truth = torch.arange(blobs).repeat_interleave(per_blob)
    x = centres[truth] + 0.1 * torch.randn(blobs * per_blob, dim, generator=gen)
    keys = [f"img-{int(i)}" for i in torch.randperm(len(truth), generator=gen)]
    for seed in range(3):
        labels = PseudoLabels(blobs)
        labels.refresh(keys, x, seed=seed)
        assert nmi_score(truth, labels.lookup(keys)) == pytest.approx(1.0)


def test_center_by_class_subtracts_each_class_mean():
    keys, x = make_data(n=30)
    classes = torch.tensor([7, 3, 3, 9, 7] * 6)
    expected = x.clone()
    for c in classes.unique():
        rows = [i for i in range(len(x)) if classes[i] == c]
        expected[rows] = x[rows] - x[rows].mean(0)
    torch.testing.assert_close(center_by_class(x, classes), expected, rtol=0, atol=1e-12)


def test_class_centering_clusters_what_classes_share():
    """MIC's point: classes far apart, the same 3 'shared' modes inside each; centred k-means finds the modes."""
    gen = torch.Generator().manual_seed(6)
    n_classes, modes, per = 4, 3, 10
    cls = torch.arange(n_classes).repeat_interleave(modes * per)
    mode = torch.arange(modes).repeat_interleave(per).repeat(n_classes)
    x = (
        100.0 * torch.eye(n_classes, 8)[cls]
        + 5.0 * torch.eye(8)[4 + mode]
        + 0.1 * torch.randn(len(cls), 8, generator=gen)
    )
    keys = [f"k{i:03d}" for i in torch.randperm(len(cls), generator=gen).tolist()]
    plain, centred = PseudoLabels(modes), PseudoLabels(modes)
    plain.refresh(keys, x, seed=0)
    centred.refresh(keys, x, seed=0, class_labels=cls)
    assert nmi_score(mode, centred.lookup(keys)) == pytest.approx(1.0)
    assert nmi_score(mode, plain.lookup(keys)) < 0.5  # uncentred, the classes dominate

    # and it is the project's kmeans on the key-sorted, loop-centred rows
    order = sorted(range(len(keys)), key=keys.__getitem__)
    ref = x[order].double()
    for c in range(n_classes):
        rows = [i for i, j in enumerate(order) if cls[j] == c]
        ref[rows] -= ref[rows].mean(0)
    expected = kmeans(ref.float(), modes, seed=0)
    assert centred.lookup([keys[j] for j in order]).tolist() == expected.tolist()


def test_lookup_follows_the_keys_onto_the_device_asked_for():
    keys, x = make_data(n=20)
    labels = PseudoLabels(3)
    labels.refresh(keys, x, seed=0)
    full = as_map(labels, keys)
    batch = [keys[7], keys[2], keys[7]]
    out = labels.lookup(batch, device="cpu")
    assert out.dtype == torch.int64 and out.tolist() == [full[k] for k in batch]


def test_unknown_key_and_lookup_before_refresh_are_errors():
    keys, x = make_data(n=20)
    labels = PseudoLabels(3)
    with pytest.raises(RuntimeError, match="before the first refresh"):
        labels.lookup(keys[:2])
    labels.refresh(keys, x, seed=0)
    with pytest.raises(KeyError, match="never-clustered/42"):
        labels.lookup([keys[0], "never-clustered/42"])


def test_bad_refresh_inputs_are_errors_naming_them():
    keys, x = make_data(n=20)
    labels = PseudoLabels(3)
    with pytest.raises(ValueError, match="appears more than once"):
        labels.refresh([*keys[:-1], keys[0]], x, seed=0)
    with pytest.raises(ValueError, match="19 keys"):
        labels.refresh(keys[:-1], x, seed=0)
    with pytest.raises(ValueError, match="19 class labels for 20 keys"):
        labels.refresh(keys, x, seed=0, class_labels=torch.zeros(19, dtype=torch.long))
    with pytest.raises(ValueError, match="at least as many samples"):
        PseudoLabels(21).refresh(keys, x, seed=0)
    assert not labels.ready


def _round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_round_trips_through_weights_only_load():
    keys, x = make_data()
    labels = PseudoLabels(6)
    labels.refresh(keys, x, seed=0)
    labels.refresh(keys, x + 0.5 * torch.randn_like(x), seed=1)
    state = labels.state_dict()

    restored = PseudoLabels(6)
    restored.load_state_dict(_round_trip(state))
    assert restored.ready and restored.generation == 2
    assert as_map(restored, keys) == as_map(labels, keys)
    again = restored.state_dict()
    assert set(again) == set(state)
    for name, value in state.items():
        assert torch.equal(again[name], value) if isinstance(value, torch.Tensor) else again[name] == value

    # a state saved before the first refresh stays not ready
    fresh = PseudoLabels(6)
    fresh.load_state_dict(_round_trip(PseudoLabels(6).state_dict()))
    assert not fresh.ready and len(fresh) == 0
    with pytest.raises(ValueError, match="6 clusters, this run uses 7"):
        PseudoLabels(7).load_state_dict(state)


# --------------------------------------------------------------------------- 2 gloo ranks

WORLD = 2
SPLIT = [23, 37]  # unequal shares, as an embedded split gives


def _worker(rank: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        keys, x = make_data(n=sum(SPLIT))
        lo = sum(SPLIT[:rank])
        local_keys, local_x = keys[lo : lo + SPLIT[rank]], x[lo : lo + SPLIT[rank]]
        all_keys, all_x = gather_keys_and_embeddings(local_keys, local_x)
        labels = PseudoLabels(6)
        labels.refresh(all_keys, all_x, seed=5)
        error = ""
        try:  # each rank clustering only its own share is a wiring bug, caught on every rank
            PseudoLabels(6).refresh(local_keys, local_x, seed=5)
        except RuntimeError as exc:
            error = str(exc)
        torch.save({"keys": all_keys, "x": all_x, "state": labels.state_dict(), "error": error}, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_get_the_assignments_of_one_process_on_the_concatenated_data(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path / "res")), nprocs=WORLD, join=True)
    keys, x = make_data(n=sum(SPLIT))
    single = PseudoLabels(6)
    single.refresh(keys, x, seed=5)
    for rank in range(WORLD):
        out = torch.load(f"{tmp_path / 'res'}.{rank}", weights_only=True)
        assert out["keys"] == keys and torch.equal(out["x"], x)  # gathered in rank order
        on_rank = PseudoLabels(6)
        on_rank.load_state_dict(out["state"])
        assert as_map(on_rank, keys) == as_map(single, keys)
        assert "clustered other keys than rank 0" in out["error"]
