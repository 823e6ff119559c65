"""Data and the float64 reference shared by the exact k-NN tests."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch


def tied_data(n: int, dim: int, seed: int) -> torch.Tensor:
    """Small integers (many exact ties) and some duplicated rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (n, dim), generator=g).float()
    dup = torch.randint(0, n, (n // 10,), generator=g)
    x[torch.randint(0, n, (n // 10,), generator=g)] = x[dup]
    return x


def random_unit(n: int, dim: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True)


def reference(q: torch.Tensor, g: torch.Tensor, k: int, loo: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Full float64 similarity rows, stable descending sort (ties to the lower index)."""
    s = q.double() @ g.double().T
    if loo:
        s.fill_diagonal_(float("-inf"))
    v, i = torch.sort(s, dim=1, descending=True, stable=True)
    return v[:, :k], i[:, :k]


def results_from_threads(search: Callable[[], torch.Tensor], threads: int = 3, repeats: int = 3) -> list[torch.Tensor]:
    """``search()`` run ``repeats`` times in each of ``threads`` threads at once (a service
    answering requests in a thread pool); its results, or the first error raised."""
    results: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def repeat() -> None:
        try:
            for _ in range(repeats):
                results.append(search())
        except BaseException as error:  # noqa: BLE001 - raised below
            errors.append(error)

    workers = [threading.Thread(target=repeat) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    if errors:
        raise errors[0]
    assert len(results) == threads * repeats, "a search thread did not finish within 120 s"
    return results


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` meanwhile, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
