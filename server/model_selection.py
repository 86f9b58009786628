"""Choosing k: compare the runs of a sweep with scores the server can compute from secure sums.

A sweep (``python -m simulations.run -m model.k=3,4,5,6,7,8``) ends with a comparison of its
runs (:class:`simulations.sweep.SweepSummary`, a Hydra callback): per k, the federated cost,
the segments published, and two model-selection scores, then a recommended k. Both scores use
only what the server already learned through SecAgg+ -- the final round's exact cost and the
published segment sizes -- never a customer:

* **elbow**: the k after which adding a segment stops paying (the point of the cost curve
  furthest below the chord from the smallest to the largest k, "kneedle");
* **BIC** under a spherical Gaussian approximation with one shared variance in the
  standardised space (Pelleg & Moore's X-means criterion): with ``n`` customers, ``d``
  features, segment sizes ``n_j`` and cost ``SSE``,
  ``sigma^2 = SSE / (d (n - k))``,
  ``log L = sum_j n_j log(n_j / n) - n d / 2 log(2 pi sigma^2) - d (n - k) / 2``,
  ``BIC = log L - p / 2 log n`` with ``p = k d + k`` (centres, weights and the variance).
  Higher is better.

The recommendation is the **smallest k whose BIC is within** :data:`BIC_TOLERANCE` (1 %) **of
the BIC range of the best** among runs that merged no segment: past the true number of
segments a spherical BIC keeps creeping up on real, skewed segments (measured on the default
synthetic data: 6 true segments, BIC highest at 7 by 0.5 % of its range), and a marketer is
better served by the simpler of two equally good segmentations. The highest-BIC k and the
elbow are reported beside it. Under differential privacy the cost is not released, so no score
is computed; the table says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import DataError

BIC_TOLERANCE = 0.01
"""A k whose BIC is within this fraction of the sweep's BIC range of the best counts as tied."""


@dataclass(frozen=True)
class KRun:
    """One run of a sweep, as the comparison reads it.

    Attributes
    ----------
    k : int
        Segments requested (``model.k``).
    published : int
        Segments published (after merging small ones).
    customers : float
        Customers counted by the secure sums (the model's scaling count).
    features : int
    cost : float or None
        The federated cost of the final round (None under DP: not released).
    converged : bool or None
    bic : float or None
        Filled by :func:`score_runs`.
    run_dir : str
    """

    k: int
    published: int
    customers: float
    features: int
    cost: float | None
    converged: bool | None
    sizes: tuple[int, ...]
    run_dir: str
    bic: float | None = None

    def to_row(self) -> dict[str, Any]:
        """Return a flat dict for CSV / JSON (without the sizes)."""
        row = asdict(self)
        row.pop("sizes")
        return row


def read_run(run_dir: str | Path) -> KRun:
    """Read one run directory (``segments.json``, ``summary.json``, ``metrics.jsonl``).

    Raises
    ------
    DataError
        A file is missing or not valid JSON.
    """
    root = Path(run_dir)
    try:
        model = json.loads((root / "segments.json").read_text(encoding="utf-8"))
        summary = json.loads((root / "summary.json").read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError("the run wrote no model or summary (did it fail?).",
                        path=str(exc.filename)) from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON ({exc.msg}).", path=str(root)) from exc
    # The server's own figure: the last round's secure-sum cost (the profile round's).
    cost = summary.get("federated_cost")
    return KRun(
        k=int(summary.get("k") or model["training"]["k_requested"]),
        published=len(model["segments"]),
        customers=float(model["scaling"]["count"]),
        features=len(model["features"]),
        cost=None if cost is None else float(cost),
        converged=summary.get("converged"),
        sizes=tuple(int(s["size"]) for s in model["segments"]),
        run_dir=str(root),
    )


def bic_spherical(*, sizes: tuple[int, ...] | list[int], cost: float, k: int,
                  features: int) -> float:
    """X-means BIC of a k-means solution from its cost and segment sizes (higher is better).

    Parameters
    ----------
    sizes : sequence of int
        Customers per segment (published sizes; a merged segment's customers are in its
        neighbour's).
    cost : float
        Sum of squared distances to the centres, in the standardised space.
    k : int
        Centres fitted.
    features : int
        Dimensions of the standardised space.
    """
    n_j = np.asarray([s for s in sizes if s > 0], dtype=np.float64)
    n = float(n_j.sum())
    d = float(features)
    if n <= k or cost <= 0:
        return float("-inf")
    variance = cost / (d * (n - k))
    log_likelihood = float(np.sum(n_j * np.log(n_j / n))) \
        - n * d / 2.0 * math.log(2.0 * math.pi * variance) - d * (n - k) / 2.0
    params = k * d + k
    return log_likelihood - params / 2.0 * math.log(n)


def elbow(ks: list[int], costs: list[float]) -> int | None:
    """Return the k furthest below the chord of the normalised cost curve (None: < 3 k)."""
    if len(ks) < 3:
        return None
    x = np.asarray(ks, dtype=np.float64)
    y = np.asarray(costs, dtype=np.float64)
    x = (x - x.min()) / max(x.max() - x.min(), 1e-12)
    y = (y - y.min()) / max(y.max() - y.min(), 1e-12)
    chord = y[0] + (y[-1] - y[0]) * (x - x[0]) / max(x[-1] - x[0], 1e-12)
    return int(ks[int(np.argmax(chord - y))])


def score_runs(runs: list[KRun]) -> list[KRun]:
    """Return the runs sorted by k, each with its BIC (None without a released cost)."""
    scored = []
    for run in sorted(runs, key=lambda r: (r.k, r.run_dir)):
        bic = None if run.cost is None else bic_spherical(
            sizes=run.sizes, cost=run.cost, k=run.k, features=run.features)
        scored.append(KRun(**{**asdict(run), "sizes": run.sizes, "bic": bic}))
    return scored


@dataclass(frozen=True)
class Recommendation:
    """The recommended k and why."""

    k: int | None
    elbow: int | None
    reason: str


def recommend(runs: list[KRun]) -> Recommendation:
    """Pick k: the smallest k tied with the best BIC among runs that merged no segment."""
    with_cost = [r for r in runs if r.bic is not None]
    if not with_cost:
        return Recommendation(None, None, "no run released its cost (differential privacy "
                              "keeps it): compare the runs' segments in their reports.")
    by_k: dict[int, KRun] = {}
    for run in with_cost:  # one run per k: the best BIC among repeats (seeds)
        if run.k not in by_k or (run.bic or -math.inf) > (by_k[run.k].bic or -math.inf):
            by_k[run.k] = run
    ks = sorted(by_k)
    knee = elbow(ks, [by_k[k].cost or 0.0 for k in ks])
    complete = [by_k[k] for k in ks if by_k[k].published == by_k[k].k]
    if not complete:
        return Recommendation(None, knee, "every run merged segments below the minimum size: "
                              "ask for fewer segments.")
    bics = [r.bic for r in complete if r.bic is not None]
    top = max(bics)
    span = top - min(bics)
    best = next(r for r in complete if r.bic is not None and r.bic >= top - BIC_TOLERANCE * span)
    highest = max(complete, key=lambda r: (r.bic or -math.inf, -r.k))
    merged = [k for k in ks if by_k[k].published < k]
    if best is highest:
        reason = f"highest BIC ({top:,.1f})"
    else:
        reason = (f"the smallest k within {BIC_TOLERANCE:.0%} of the BIC range of the highest "
                  f"(k={highest.k}, BIC {top:,.1f} vs {best.bic:,.1f})")
    if merged:
        reason += f"; k={','.join(map(str, merged))} merged small segments and were not chosen"
    if knee is not None:
        reason += f"; the cost curve's elbow is at k={knee}"
    return Recommendation(best.k, knee, reason)
