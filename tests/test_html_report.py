"""The HTML retrieval report's ranking of queries and per-class recall, against a loop over
fully sorted similarities, and the page it renders."""

from __future__ import annotations

import torch

from dmlray.evaluation.html_report import per_class_recall, ranked_queries, render_report


def _data(n: int, classes: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, 8, generator=g, dtype=torch.float64), dim=1)
    return {
        "embeddings": x,
        "labels": torch.randint(0, classes, (n,), generator=g),
        "keys": [f"k{i}" for i in range(n)],
    }


def _first_correct_loop(q: dict, g: dict, i: int, leave_one_out: bool, depth: int) -> int:
    sims = g["embeddings"] @ q["embeddings"][i]
    order = sorted(range(len(sims)), key=lambda j: (-float(sims[j]), j))
    if leave_one_out:
        order.remove(i)
    for rank, j in enumerate(order[:depth]):
        if int(g["labels"][j]) == int(q["labels"][i]):
            return rank
    return min(depth, len(order))


def test_queries_are_ranked_by_their_first_right_neighbour_as_a_loop_finds_it():
    for gallery in (None, _data(60, 6, 1)):
        query = _data(40, 6, 0)
        rows = ranked_queries(query, gallery, depth=10)
        assert sorted(r.index for r in rows) == list(range(40))
        for row in rows:
            want = _first_correct_loop(query, gallery or query, row.index, gallery is None, 10)
            assert row.first_correct == want, row.index
            if gallery is None:
                assert row.index not in row.neighbours  # leave-one-out: never its own neighbour
        firsts = [r.first_correct for r in rows]
        assert firsts == sorted(firsts, reverse=True)  # worst first


def test_per_class_recall_counts_top1_hits_per_query_class():
    query = _data(50, 5, 2)
    rows = ranked_queries(query, None, depth=5)
    recall = per_class_recall(rows, query["labels"].tolist())
    for c in range(5):
        members = [i for i in range(50) if int(query["labels"][i]) == c]
        hits = [_first_correct_loop(query, query, i, True, 5) == 0 for i in members]
        if members:
            assert recall[c] == (sum(hits) / len(hits), len(hits))


def test_the_page_is_self_contained_and_escapes_its_text():
    query = _data(20, 4, 3)
    rows = ranked_queries(query, None, depth=5)
    pixel = "data:image/png;base64,AAAA"
    page = render_report(
        title="<b>run</b> & co",
        metrics={"dmlray": {"recall@1": 0.5}},
        worst=rows[:3],
        query=query,
        gallery=None,
        images={k: pixel for k in query["keys"]},
        class_recall=per_class_recall(rows, query["labels"].tolist()),
        top=4,
    )
    assert "&lt;b&gt;run&lt;/b&gt; &amp; co" in page and "<b>run</b>" not in page
    assert page.count("<div class='query'>") == 3 and page.count(pixel) == 3 * 5
    assert "0.5000" in page and "<script" not in page
