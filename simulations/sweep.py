"""The end of a sweep: one comparison of its runs and, for a sweep over k, a recommended k.

Registered as a Hydra callback in ``conf/config.yaml``; it runs when a multirun ends::

    .venv/bin/python -m simulations.run -m model.k=3,4,5,6,7,8 privacy=secagg

It reads every job's ``segments.json`` / ``summary.json`` under the sweep directory and writes
beside them ``k_selection.csv`` (one row per run), ``k_selection.json`` (rows and the
recommendation) and ``k_selection.html`` (the table and a plot of cost and BIC against k, one
self-contained page), then prints the table and the recommendation. Scores: see
:mod:`server.model_selection`. A job that failed is listed as failed, never skipped silently.

It also holds what one run returns to a tuning sweeper (:func:`run_objective`, the ``objective``
key): ``hydra/sweeper=tune`` (``conf/hydra/sweeper/tune.yaml``, Optuna) maximises it over
``model.k``, ``strategy.max_rounds`` and ``strategy.n_init`` together.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from hydra.experimental.callback import Callback
from numpy.typing import NDArray
from omegaconf import DictConfig

from common.errors import FedsegError
from server.model_selection import (
    KRun,
    Recommendation,
    bic_spherical,
    read_run,
    recommend,
    score_runs,
)

CSV_NAME = "k_selection.csv"
JSON_NAME = "k_selection.json"
HTML_NAME = "k_selection.html"


def _say(message: str) -> None:
    print(f"[fedseg] {message}", flush=True)


def run_objective(name: str, *, k: int, features: int, published_sizes: list[int],
                  federated_cost: float | None, pooled_cost: float,
                  pooled_labels: NDArray[np.intp]) -> dict[str, Any]:
    """Score one run for a tuning sweeper: higher is better (``summary.json``'s ``objective``).

    Raw cost always falls as k grows, so it cannot choose k; both objectives are the X-means BIC
    of :func:`server.model_selection.bic_spherical`, which charges each extra centre.

    Parameters
    ----------
    name : {"bic", "pooled_bic"}
        ``bic``: the federated BIC, exactly the one ``k_selection.*`` reports for the run (the
        final round's secure-sum cost and the published segment sizes). ``pooled_bic``: the same
        formula on the simulation's evaluation of the published model on the pooled data (its
        cost and its segments' sizes there): simulation only, but defined under differential
        privacy, where the federated cost is not released.
    k : int
        Segments requested.
    features : int
        Dimensions of the model's feature space (as :func:`server.model_selection.read_run`).
    published_sizes : list of int
        Published segment sizes (noisy under DP).
    federated_cost : float or None
        The final round's secure-sum cost (None under DP).
    pooled_cost : float
        Cost of the published model on the pooled data.
    pooled_labels : ndarray
        Each pooled customer's published segment.

    Returns
    -------
    dict
        ``name``, ``value`` (None when undefined) and, when None, ``reason``.
    """
    if name == "bic":
        if federated_cost is None:
            return {"name": name, "value": None, "reason": (
                "differential privacy does not release the federated cost: tune with "
                "privacy=secagg, or objective=pooled_bic (simulation only)")}
        return {"name": name, "value": bic_spherical(
            sizes=published_sizes, cost=federated_cost, k=k, features=features)}
    if name == "pooled_bic":
        sizes = np.bincount(pooled_labels, minlength=len(published_sizes)).tolist()
        return {"name": name, "value": bic_spherical(
            sizes=sizes, cost=pooled_cost, k=k, features=features)}
    raise FedsegError(f"unknown objective {name!r}")


def compare_sweep(sweep_dir: str | Path) -> tuple[list[KRun], list[str], Recommendation]:
    """Score every finished job of a sweep; name the jobs that wrote no model."""
    root = Path(sweep_dir)
    runs, failed = [], []
    for job in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (job / "summary.json").is_file():
            failed.append(job.name)
            continue
        try:
            runs.append(read_run(job))
        except FedsegError as exc:
            failed.append(f"{job.name} ({exc})")
    scored = score_runs(runs)
    return scored, failed, recommend(scored)


def _plot(runs: list[KRun], chosen: int | None) -> str | None:
    points = [(r.k, r.cost, r.bic) for r in runs if r.cost is not None and r.bic is not None]
    if len(points) < 2:
        return None
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.0, 3.2))
    fig.set_layout_engine("constrained")
    left, right = fig.subplots(1, 2)
    ks = [p[0] for p in points]
    left.plot(ks, [p[1] for p in points], marker="o")
    left.set_title("federated cost (elbow)", fontsize=9)
    right.plot(ks, [p[2] for p in points], marker="o", color="#DD8452")
    right.set_title("BIC (higher is better)", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("k", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        if chosen is not None:
            ax.axvline(chosen, color="black", linestyle="--", linewidth=1)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=96)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def write_comparison(sweep_dir: str | Path, runs: list[KRun], failed: list[str],
                     rec: Recommendation) -> Path:
    """Write ``k_selection.{csv,json,html}`` into the sweep directory; return the HTML path."""
    root = Path(sweep_dir)
    rows = [r.to_row() for r in runs]
    columns = ["k", "published", "customers", "features", "cost", "bic", "converged", "run_dir"]
    with (root / CSV_NAME).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (root / JSON_NAME).write_text(json.dumps(
        {"runs": rows, "failed": failed, "recommended_k": rec.k, "elbow_k": rec.elbow,
         "reason": rec.reason}, indent=2) + "\n", encoding="utf-8")
    body = "".join(
        f"<tr{' class=chosen' if r.k == rec.k else ''}><td>{r.k}</td><td>{r.published}</td>"
        f"<td>{_num(r.cost)}</td><td>{_num(r.bic)}</td><td>{html.escape(str(r.converged))}"
        f"</td><td>{html.escape(Path(r.run_dir).name)}</td></tr>" for r in runs)
    plot = _plot(runs, rec.k)
    image = "" if plot is None else (
        f'<img src="data:image/png;base64,{plot}" alt="cost and BIC against k">')
    failures = "" if not failed else (
        "<p>Jobs without a model: " + html.escape(", ".join(failed)) + "</p>")
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<title>fedseg: choosing k</title><style>body{font-family:system-ui,sans-serif;"
        "margin:2em auto;max-width:60em}table{border-collapse:collapse}td,th{border:1px solid"
        " #ddd;padding:.3em .6em;text-align:right}tr.chosen{background:#e7f5e9;font-weight:"
        "bold}</style></head><body><h1>Choosing k</h1>"
        f"<p><b>Recommended k: {rec.k if rec.k is not None else '–'}</b> — "
        f"{html.escape(rec.reason)}</p>{image}"
        "<table><tr><th>k</th><th>published</th><th>federated cost</th><th>BIC</th>"
        f"<th>converged</th><th>run</th></tr>{body}</table>{failures}"
        "<p>Scores use only the final round's secure-sum cost and the published segment "
        "sizes (server/model_selection.py).</p></body></html>\n")
    path = root / HTML_NAME
    path.write_text(page, encoding="utf-8")
    return path


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:,.1f}"


def print_comparison(runs: list[KRun], failed: list[str], rec: Recommendation) -> None:
    """Print the table and the recommendation."""
    _say(f"{'k':>3} {'published':>9} {'federated cost':>15} {'BIC':>14} {'converged':>9}")
    for r in runs:
        mark = "  <- recommended" if r.k == rec.k else ""
        _say(f"{r.k:>3} {r.published:>9} {_num(r.cost):>15} {_num(r.bic):>14} "
             f"{r.converged!s:>9}{mark}")
    for job in failed:
        _say(f"warning: job {job} wrote no model (see its log in the sweep directory)")
    if rec.k is not None:
        _say(f"recommended k={rec.k}: {rec.reason}")
    else:
        _say(f"no k recommended: {rec.reason}")


class SweepSummary(Callback):
    """Hydra callback: compare the runs when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Score the sweep's runs, write ``k_selection.*`` and print the comparison."""
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        runs, failed, rec = compare_sweep(sweep_dir)
        if len(runs) + len(failed) < 2:
            return
        print_comparison(runs, failed, rec)
        path = write_comparison(sweep_dir, runs, failed, rec)
        _say(f"comparison: {path}")
