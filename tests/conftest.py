"""Shared fixtures: a SeaweedFS S3 server, packed glyph subsets, loopback-only services."""

from __future__ import annotations

import os

import pytest
from recipes import RECIPE_40

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """A SeaweedFS S3 server on loopback with enforced credentials (stopped at the end)."""
    from dmlray.devtools.seaweed import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"), buckets=["dmlray-test"])
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(seaweed, monkeypatch):
    """Point boto3 (and dmlray.data.storage) at the test server for one test."""
    for key, value in seaweed.env.items():
        monkeypatch.setenv(key, value)
    from dmlray.data import storage

    storage.reset_clients()  # drop clients made with other credentials
    yield seaweed
    storage.reset_clients()


@pytest.fixture(scope="session")
def glyphs_small(tmp_path_factory):
    """A packed 60-class glyph subset on local disk (30 train / 30 test classes)."""
    from dmlray.data.pack import Recipe, pack

    root = tmp_path_factory.mktemp("glyphs-small")
    pack(Recipe(dataset="glyphs", shard_bytes=64 * 1024, options={"max_classes": 60}), str(root), progress=False)
    return str(root)


@pytest.fixture(scope="session")
def glyphs_s3(seaweed):
    """The 40-class glyph subset packed into the test bucket; returns its s3:// root."""
    from dmlray.data.pack import pack

    url = "s3://dmlray-test/glyphs40"
    with seaweed.activated():
        pack(RECIPE_40, url, progress=False)
    return url


# modules whose fast tests start Ray in-process (a second Ray beside a cluster test breaks both)
SERIAL_MODULES = {"test_secrets"}
# modules whose slow tests start SeaweedFS or read large data but never Ray
NO_RAY_MODULES = {
    "test_data_s3",
    "test_datasets",
    "test_loss_terms",
    "test_loss_training",
    "test_models",
    "test_pk_stream",
    "test_stream_robustness",
}


def pytest_addoption(parser):
    parser.addoption(
        "--lane",
        choices=("all", "ray", "rest"),
        default="all",
        help="ray: only the tests that start Ray; rest: all the others (make test runs both at once)",
    )


def starts_ray(item) -> bool:
    """Whether a test starts Ray (a cluster, Serve, Tune, with Prometheus or a browser
    beside it): slow tests outside NO_RAY_MODULES, and every test of SERIAL_MODULES."""
    module = item.module.__name__
    return module in SERIAL_MODULES or (item.get_closest_marker("slow") is not None and module not in NO_RAY_MODULES)


def pytest_collection_modifyitems(config, items):
    """``--lane``: `make test` runs the tests that start Ray in one process, one after
    another (two Ray clusters on one host take each other's nodes), and the others beside
    it in a second process."""
    lane = config.getoption("lane")
    if lane == "all":
        return
    keep, drop = [], []
    for item in items:
        (keep if starts_ray(item) == (lane == "ray") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_unconfigure(config):
    """Leave with pytest's own status: Ray/torch teardown at interpreter exit can segfault
    after every test has passed, which would turn a green run red."""
    import sys

    status = getattr(config, "_dmlray_exitstatus", None)
    if status is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(status))


def pytest_sessionfinish(session, exitstatus):
    session.config._dmlray_exitstatus = exitstatus
