"""Initialisation quality: federated cost / centralised k-means cost over many seeds.

Runs the protocol in-process (exactly what a Flower run computes, without transport) so that
many seeds fit in a minute. Usage::

    .venv/bin/python -m simulations.bench.init_quality [--seeds 10]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans

from common.features import apply_transforms
from common.kmeans import compute_stats
from server.coordinator import KMeansSettings
from simulations.datasets import (
    ByGroupPartition,
    CsvCustomers,
    DirichletPartition,
    Population,
    SyntheticCustomers,
)
from simulations.inprocess import run_inprocess

WHOLESALE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / \
    "wholesale_customers.csv"
VARIANTS: list[tuple[str, dict[str, object]]] = [
    ("random init, 1 run", {"init": "random", "n_init": 1}),
    ("random init, 6 runs", {"init": "random", "n_init": 6}),
    ("summary init, 1 run", {"init": "summary", "n_init": 1}),
    ("summary init, 6 runs (default)", {"init": "summary", "n_init": 6}),
]


def _ratios(population: Population, parts: list[np.ndarray], k: int, seeds: range,
            variant: dict[str, object]) -> tuple[list[float], list[int]]:
    ratios, rounds = [], []
    for seed in seeds:
        settings = KMeansSettings(k=k, seed=seed, **variant)  # type: ignore[arg-type]
        coordinator = run_inprocess([population.raw[p] for p in parts],
                                    features=population.features, settings=settings)
        assert coordinator.scaler is not None and coordinator.model_stats is not None
        x = coordinator.scaler.transform(apply_transforms(population.raw, population.features))
        centroids = coordinator.model_stats.sums / coordinator.model_stats.counts[:, None]
        reference = KMeans(k, n_init=10, random_state=seed).fit(x).inertia_
        ratios.append(compute_stats(x, centroids).cost / reference)
        rounds.append(len(coordinator.history))
    return ratios, rounds


def main() -> None:
    """Print a markdown table of cost ratios per dataset and initialisation variant."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    cases = []
    synthetic = SyntheticCustomers(num_customers=50_000, num_regions=5).load(seed=0)
    cases.append(("synthetic 50k, 5 regional sites", synthetic, 6,
                  ByGroupPartition().split(synthetic, num_sites=5, seed=0)))
    cases.append(("synthetic 50k, 20 Dirichlet(0.3) sites", synthetic, 6,
                  DirichletPartition(alpha=0.3).split(synthetic, num_sites=20, seed=0)))
    if WHOLESALE.is_file():
        wholesale = CsvCustomers(path=str(WHOLESALE), site_column="Region",
                                 features=["Fresh", "Milk", "Grocery", "Frozen",
                                           "Detergents_Paper", "Delicassen"],
                                 transform="log1p").load(seed=0)
        cases.append(("wholesale, k=5, 3 regional sites", wholesale, 5,
                      ByGroupPartition().split(wholesale, num_sites=3, seed=0)))
    print(f"seeds 0..{args.seeds - 1}; cost_ratio = federated cost / KMeans(n_init=10) cost\n")
    print("| data | initialisation | median ratio | worst ratio | mean rounds | seconds |")
    print("|---|---|---|---|---|---|")
    for name, population, k, parts in cases:
        for label, variant in VARIANTS:
            started = time.perf_counter()
            ratios, rounds = _ratios(population, parts, k, range(args.seeds), variant)
            print(f"| {name} | {label} | {np.median(ratios):.4f} | {max(ratios):.4f} | "
                  f"{np.mean(rounds):.1f} | {time.perf_counter() - started:.1f} |", flush=True)


if __name__ == "__main__":
    main()
