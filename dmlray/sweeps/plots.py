"""Pictures of a sweep: the metric against step for every trial, and against each swept value.

matplotlib's object API on an Agg canvas made per figure: nothing at import, no pyplot
state, safe on headless machines. Rows are ``dmlray.sweeps.tune.TrialRow``s.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dmlray.evaluation.plots import _new_figure as new_figure
from dmlray.evaluation.plots import _save as save_png
from dmlray.jobs.run_folder import is_number

STYLE = {
    "finished": ("-", "o"),
    "stopped_early": ("--", "x"),
    "error": (":", "s"),
    "interrupted": ("-.", "^"),
    "pending": (":", "."),
    "running": ("-.", "^"),
}


def _save(fig: Any, path: str | Path) -> Path:
    fig.tight_layout()
    return save_png(fig, path)


def curves(path: str | Path, rows: list, metric: str) -> Path:
    """The metric at each evaluation against step, one line per trial (dashed: stopped early)."""
    fig = new_figure(8, 5)
    ax = fig.add_subplot(1, 1, 1)
    for row in rows:
        if not row.history:
            continue
        steps, values = zip(*row.history, strict=True)
        line, marker = STYLE.get(row.state, ("-", "o"))
        ax.plot(steps, values, linestyle=line, marker=marker, markersize=4, label=f"{row.trial} ({row.state})")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial")
    ax.grid(alpha=0.3)
    if any(row.history for row in rows):
        ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def _numeric(values: list) -> bool:
    return all(is_number(v) for v in values)


def params(path: str | Path, rows: list, settings: Any) -> Path:
    """The final metric of each trial against each swept value (log axis for loguniform)."""
    keys = list(settings.space)
    fig = new_figure(4.2 * max(1, len(keys)), 4)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, max(1, len(keys)), i + 1)
        kind = next(iter(settings.space[key]))
        points = [
            (r.params.get(key), r.last, r.state)
            for r in rows
            if r.last is not None and not (isinstance(r.last, float) and math.isnan(r.last))
        ]
        values = [p[0] for p in points]
        if _numeric(values):
            xs = values
            # log axis for log-sampled keys, and for choices spanning orders of magnitude
            spread = values and min(values) > 0 and max(values) / min(values) >= 100
            if kind == "loguniform" or spread:
                ax.set_xscale("log")
        else:  # categories in the order the space lists them
            order = (
                [str(c) for c in settings.space[key][kind]] if kind == "choice" else sorted({str(v) for v in values})
            )
            xs = [order.index(str(v)) if str(v) in order else len(order) for v in values]
            ax.set_xticks(range(len(order)))
            ax.set_xticklabels(order, rotation=30)
        for state in sorted({p[2] for p in points}):
            sel = [(x, p[1]) for x, p in zip(xs, points, strict=True) if p[2] == state]
            ax.scatter([s[0] for s in sel], [s[1] for s in sel], marker=STYLE.get(state, ("-", "o"))[1], label=state)
        ax.set_xlabel(key)
        ax.set_ylabel(f"final {settings.metric}")
        ax.grid(alpha=0.3)
        if points:
            ax.legend(fontsize=7, loc="best")
    return _save(fig, path)
