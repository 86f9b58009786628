"""Choosing k from secure-sum figures: the BIC formula, the recommendation, the sweep table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import multivariate_normal
from sklearn.cluster import KMeans

from server.model_selection import (
    KRun,
    bic_spherical,
    elbow,
    read_run,
    recommend,
    score_runs,
)
from simulations.sweep import compare_sweep, run_objective, write_comparison


def _blobs(k: int = 4, n: int = 2400, d: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=8.0, size=(k, d))
    sizes = rng.multinomial(n, [0.4, 0.3, 0.2, 0.1][:k] if k == 4 else [1 / k] * k)
    return np.vstack([rng.normal(loc=c, size=(m, d)) for c, m in zip(centres, sizes,
                                                                         strict=True)])


def _runs(x: np.ndarray, ks: range) -> list[KRun]:
    runs = []
    for k in ks:
        fit = KMeans(n_clusters=k, n_init=5, random_state=0).fit(x)
        sizes = tuple(int(c) for c in np.bincount(fit.labels_, minlength=k))
        runs.append(KRun(k=k, published=k, customers=float(len(x)), features=x.shape[1],
                         cost=float(fit.inertia_), converged=True, sizes=sizes,
                         run_dir=f"job-{k}"))
    return runs


def test_bic_is_the_hard_assignment_gaussian_likelihood_minus_its_penalty():
    x = _blobs()
    k, (n, d) = 4, x.shape
    fit = KMeans(n_clusters=k, n_init=5, random_state=0).fit(x)
    sizes = np.bincount(fit.labels_, minlength=k)
    variance = fit.inertia_ / (d * (n - k))
    log_likelihood = sum(
        np.log(sizes[j] / n) + multivariate_normal.logpdf(x[i], mean=fit.cluster_centers_[j],
                                                          cov=variance * np.eye(d))
        for i, j in enumerate(fit.labels_))
    expected = log_likelihood - (k * d + k) / 2 * math.log(n)
    assert bic_spherical(sizes=list(sizes), cost=float(fit.inertia_), k=k,
                         features=d) == pytest.approx(expected, rel=1e-9)


def test_the_true_number_of_spherical_segments_is_recommended():
    runs = score_runs(_runs(_blobs(), range(2, 9)))
    rec = recommend(runs)
    assert rec.k == 4 and rec.elbow is not None and f"elbow is at k={rec.elbow}" in rec.reason
    assert [r.k for r in runs] == list(range(2, 9)) and all(r.bic is not None for r in runs)


def test_a_run_that_merged_segments_is_never_recommended():
    runs = _runs(_blobs(), range(2, 7))
    merged = [KRun(**{**r.__dict__, "published": r.k - 1}) if r.k == 4 else r for r in runs]
    rec = recommend(score_runs(merged))
    assert rec.k != 4 and "k=4 merged small segments" in rec.reason


def test_without_a_released_cost_nothing_is_recommended():
    runs = [KRun(k=k, published=k, customers=100.0, features=3, cost=None, converged=None,
                 sizes=(50, 50), run_dir="dp") for k in (2, 3)]
    rec = recommend(score_runs(runs))
    assert rec.k is None and "differential privacy" in rec.reason


def test_elbow_needs_three_points_and_finds_the_knee():
    assert elbow([2, 3], [10.0, 5.0]) is None
    assert elbow([1, 2, 3, 4, 5, 6], [100.0, 50.0, 12.0, 10.0, 9.0, 8.5]) == 3


def _job(root: Path, name: str, k: int, cost: float | None) -> None:
    job = root / name
    job.mkdir()
    (job / "segments.json").write_text(json.dumps({
        "features": [{"name": "a"}, {"name": "b"}], "scaling": {"count": 1000.0},
        "segments": [{"size": 1000 // k} for _ in range(k)],
        "training": {"k_requested": k}}), encoding="utf-8")
    (job / "summary.json").write_text(json.dumps(
        {"k": k, "federated_cost": cost, "converged": True}), encoding="utf-8")


def test_a_sweep_lists_failed_jobs_and_writes_its_comparison(tmp_path: Path):
    _job(tmp_path, "0_model.k=2", 2, 900.0)
    _job(tmp_path, "1_model.k=3", 3, 400.0)
    (tmp_path / "2_model.k=4").mkdir()  # a job that failed before writing anything
    runs, failed, rec = compare_sweep(tmp_path)
    assert [r.k for r in runs] == [2, 3] and failed == ["2_model.k=4"]
    assert read_run(tmp_path / "1_model.k=3").cost == 400.0
    page = write_comparison(tmp_path, runs, failed, rec)
    table = (tmp_path / "k_selection.csv").read_text(encoding="utf-8").splitlines()
    assert table[0].startswith("k,published,") and len(table) == 3
    saved = json.loads((tmp_path / "k_selection.json").read_text(encoding="utf-8"))
    assert saved["recommended_k"] == rec.k and saved["failed"] == ["2_model.k=4"]
    assert "2_model.k=4" in page.read_text(encoding="utf-8")


def test_a_runs_objective_is_the_bic_the_k_comparison_reports():
    x = _blobs()
    run = score_runs(_runs(x, range(4, 5)))[0]
    labels = KMeans(n_clusters=4, n_init=5, random_state=0).fit(x).labels_
    common = {"k": 4, "features": x.shape[1], "published_sizes": list(run.sizes),
              "pooled_labels": labels}
    federated = run_objective("bic", federated_cost=run.cost, pooled_cost=1.0, **common)
    assert federated == {"name": "bic", "value": run.bic}
    # pooled: the same formula on the pooled cost and the pooled segments' sizes
    pooled = run_objective("pooled_bic", federated_cost=None, pooled_cost=run.cost, **common)
    assert pooled["value"] == pytest.approx(run.bic, rel=1e-12)
    # under DP the federated cost is not released: no value, and the reason says what to do
    dp = run_objective("bic", federated_cost=None, pooled_cost=run.cost, **common)
    assert dp["value"] is None and "privacy=secagg" in dp["reason"]


def test_the_objective_chooses_k_where_raw_cost_cannot():
    x = _blobs()
    runs = score_runs(_runs(x, range(2, 9)))
    costs = [r.cost for r in runs]
    assert costs == sorted(costs, reverse=True)  # cost always falls with k
    values = {r.k: run_objective("bic", k=r.k, features=r.features,
                                 published_sizes=list(r.sizes), federated_cost=r.cost,
                                 pooled_cost=0.0, pooled_labels=np.zeros(1, dtype=np.intp))
              ["value"] for r in runs}
    assert max(values, key=values.__getitem__) == 4  # the 4 true segments
