"""Plots of the paper's evaluation curves (matplotlib), each saved to a file whose path is returned.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot): nothing global changes, so importing
this module in a notebook or a GUI program leaves its backend alone, and it works without a display.

- :func:`plot_accuracy_vs_dim`: accuracy per representation size, one line per mode (the paper's Fig. 2-3).
- :func:`plot_adaptive_classification`: accuracy vs expected dims of the threshold cascade (Fig. 6).
- :func:`plot_adaptive_retrieval`: mAP@k or recall@k vs MFLOPs per query (Fig. 7-8).

The inputs are what :mod:`mrl_kernels.metrics` returns.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence


def _figure(size=(6.0, 4.2)):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("mrl_kernels.plots needs matplotlib: pip install 'matplotlib>=3.7'") from exc
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig, path) -> str:
    """Writes the figure (format from the file extension, PNG for .png) and returns the path; the folder
    is created when missing."""
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path


def _check_path(path) -> None:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise TypeError(f"path must be a non-empty str or os.PathLike, got {path!r}")


def _check_mapping(value, name: str) -> None:
    if not isinstance(value, Mapping) or len(value) == 0:
        raise TypeError(f"{name} must be a non-empty dict, got {type(value).__name__}")


def _check_points(points, name: str, keys: Sequence[str], positive: str | None = None) -> None:
    """A non-empty list of dicts, each holding the given keys; the key `positive` (an x on a log axis) > 0."""
    if not isinstance(points, Sequence) or isinstance(points, str) or len(points) == 0:
        raise TypeError(f"{name} must be a non-empty list of dicts, got {type(points).__name__}")
    for j, p in enumerate(points):
        if not isinstance(p, Mapping):
            raise TypeError(f"{name}[{j}] must be a dict, got {type(p).__name__}")
        missing = [key for key in keys if key not in p]
        if missing:
            raise ValueError(f"{name}[{j}] lacks the key(s) {missing}")
        if positive is not None and not p[positive] > 0:
            raise ValueError(f"{name}[{j}][{positive!r}] must be > 0 (a log axis), got {p[positive]!r}")


def _plain_log_axis(ax, label: str, base: int = 10, ticks=None) -> None:
    """A log x axis whose tick labels read 8, 16, 0.5, 2600 rather than 2^3 or 5 x 10^-1; ticks: the major
    ticks (default: 1, 2 and 5 times the powers of ten, so that a range under a decade still has labels)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator

    ax.set_xscale("log", base=base)
    if ticks is not None:
        ax.xaxis.set_major_locator(FixedLocator(sorted(set(ticks))))
        ax.xaxis.set_minor_locator(NullLocator())
    else:
        ax.xaxis.set_major_locator(LogLocator(base=base, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel(label)


def _powers_of_two(values) -> list[int]:
    """The powers of two from just below min(values) to just above max(values)."""
    low, high = math.floor(math.log2(min(values))), math.ceil(math.log2(max(values)))
    return [2 ** e for e in range(low, high + 1)]


def plot_accuracy_vs_dim(results: dict[str, dict[int, float]], path, title="Top-1 accuracy vs representation size",
                         ylabel="top-1 accuracy") -> str:
    """One line per mode: results {mode: {dim: accuracy}} (e.g. {"MRL": linear_top1(...), "FF": ...}),
    dims on a log2 x axis. Returns the saved path."""
    _check_mapping(results, "results")
    for mode, curve in results.items():
        _check_mapping(curve, f"results[{mode!r}]")
    _check_path(path)
    fig, ax = _figure()
    for mode, curve in results.items():
        dims = sorted(curve)
        ax.plot(dims, [curve[m] for m in dims], marker="o", label=str(mode))
    _plain_log_axis(ax, "representation size (dims)", 2, [m for curve in results.values() for m in curve])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_adaptive_classification(curves: dict[str, list[dict]], path, *,
                                 title="Adaptive classification: accuracy vs expected dims") -> str:
    """Accuracy against the expected representation size, one line per curve: curves {name: entries with
    "expected_dim" and "accuracy"}, e.g. {"MRL cascade": adaptive_classification(...)}. Fixed-size
    accuracies plot on the same axes as entries {"expected_dim": d, "accuracy": a}. Returns the path."""
    _check_mapping(curves, "curves")
    for name, entries in curves.items():
        _check_points(entries, f"curves[{name!r}]", ("expected_dim", "accuracy"), positive="expected_dim")
    _check_path(path)
    fig, ax = _figure()
    for name, entries in curves.items():
        entries = sorted(entries, key=lambda e: e["expected_dim"])
        ax.plot([e["expected_dim"] for e in entries], [e["accuracy"] for e in entries], marker=".", label=str(name))
    _plain_log_axis(ax, "expected representation size (dims)", 2,
                    _powers_of_two([e["expected_dim"] for entries in curves.values() for e in entries]))
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


_Y_LABELS = {"map": "mAP@k", "precision": "precision@k", "top1": "top-1 (1-NN)",
             "recall": "recall@k against exact full-dim search"}


def _point_label(p: Mapping) -> str:
    if "label" in p:
        return str(p["label"])
    if "dims" in p:
        stages = "→".join(str(m) for m in p["dims"])
        return f"{stages} ({', '.join(str(s) for s in p.get('shortlists', ()))})" if p.get("shortlists") else stages
    return ""


def plot_adaptive_retrieval(points: list[dict], path, *, y=None,
                            title="Adaptive retrieval: quality vs MFLOPs per query") -> str:
    """Quality against MFLOPs per query (log x axis): points are the dicts of
    :func:`~mrl_kernels.metrics.adaptive_retrieval` / :func:`~mrl_kernels.metrics.funnel_retrieval`
    (each needs "mflops" and the `y` key; a "label" key overrides the "16→64 (200)" label drawn from
    "dims" and "shortlists"). y: the key plotted, default "map" when every point has it, else "recall".
    Exact full-dim search is drawn as a star (from "mflops_exact" and "<y>_exact"; recall 1.0 by
    definition). Returns the saved path."""
    _check_points(points, "points", ("mflops",), positive="mflops")
    if y is None:
        y = "map" if all("map" in p for p in points) else "recall"
    _check_points(points, "points", (y,))
    _check_path(path)
    fig, ax = _figure()
    ax.plot([p["mflops"] for p in points], [p[y] for p in points], "o", label="adaptive / funnel")
    for p in points:
        ax.annotate(_point_label(p), (p["mflops"], p[y]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    exact_y = 1.0 if y == "recall" else None
    exact = sorted({(p["mflops_exact"], p.get(f"{y}_exact", exact_y)) for p in points
                    if "mflops_exact" in p and p.get(f"{y}_exact", exact_y) is not None})
    if exact:
        ax.plot([e[0] for e in exact], [e[1] for e in exact], "*", markersize=12, label="exact full-dim search")
    _plain_log_axis(ax, "MFLOPs per query")
    ax.set_ylabel(_Y_LABELS.get(y, y))
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)
