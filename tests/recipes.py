"""Packing recipes shared by tests (a plain module: tests import it, unlike conftest)."""

from __future__ import annotations

from dmlray.data.pack import Recipe

# a 40-class glyph subset (20 train / 20 test classes): small enough for CI
RECIPE_40 = Recipe(dataset="glyphs", shard_bytes=64 * 1024, options={"max_classes": 40})

# pair losses of issue #17, checked against pytorch-metric-learning (values and gradients, with
# and without references) in test_losses_pml_new.py, and across ranks in test_distributed.py
PML_CHECKED_PAIR_LOSSES = frozenset(
    {
        "tuplet_margin",
        "ntxent",
        "generalized_lifted_structure",
        "intra_pair_variance",
        "snr_contrastive",
        "threshold_consistent_margin",
        "triplet_margin",
        "fast_ap",
    }
)

# a tiny glyphs run in-process through the CLI (`dmlray train demo ...`): seconds of training
TINY_RUN = [
    "run.num_workers=0",
    "train.steps=30",
    "data.classes_per_batch=8",
    "data.class_buffer=16",
    "memory.size=128",
    "memory.start=10",
    "optim.milestones=[]",
]
