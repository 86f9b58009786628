r"""Utility of differentially private federated k-means against non-private and central DP.

Usage::

    .venv/bin/python -m simulations.bench.dp_utility                 # the issue's table
    .venv/bin/python -m simulations.bench.dp_utility --sizes 5000 --eps 1 --seeds 0 1 2 \\
        --lloyd-rounds 2 3 4                                          # a design sweep

For every size, seed and epsilon it generates the default synthetic data (5 regional,
non-IID sites), runs the DP protocol in one process (:func:`simulations.inprocess.
run_inprocess_dp`: every site adds its own discrete Gaussian share, the sum is exact as with
SecAgg+), and measures the k-means cost of the published centroids on the pooled data in the
model's standardised space, divided by

* the cost of non-private centralised k-means (scikit-learn, ``n_init=10``) in the same space
  (``ratio``), and
* and reports beside it the *same mechanism run centrally* by a trusted curator on the pooled
  data with the same budget (one site, no collusion allowance, its own noise draws), and the
  ratio of the two medians (per-seed ratios of two independent noisy runs mostly compare
  their noise draws' luck).

It also reports ``ε = inf`` (the same fixed schedule without noise). Prints a markdown table
of medians and ranges over seeds. Every variant in a sweep is run on the same data and noise
seeds, so its numbers compare as ratios within one run.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from typing import Any

import numpy as np
from sklearn.cluster import KMeans

from common.dp import DEFAULT_SPLIT, DpPlan, calibrate, dp_rounds, honest_sites
from common.features import apply_transforms
from common.kmeans import compute_stats
from common.secure_sum import quantization_range_for
from server.coordinator import KMeansSettings
from simulations.datasets import ByGroupPartition, SyntheticCustomers
from simulations.inprocess import run_inprocess_dp

DEFAULTS = {"init_rounds": 2, "lloyd_rounds": 3, "candidates": 40, "clip": 2.5}


def make_plan(features: tuple, bounds: dict, *, epsilon: float, delta: float, init_rounds: int,
              lloyd_rounds: int, clip: float, split: dict | None = None) -> DpPlan:
    """Build a DP plan as the server does (calibrated with dp_accounting)."""
    rounds = dp_rounds(init_rounds, lloyd_rounds)
    if math.isinf(epsilon):
        sigma = {p: 1e-6 for p in rounds}  # no noise is added (run_inprocess_dp(noiseless))
    else:
        sigma = calibrate(epsilon, delta, rounds, split or DEFAULT_SPLIT)
    plan = DpPlan(epsilon=epsilon, delta=delta, sigma=sigma, rounds=rounds,
                  bounds=tuple(bounds[f.name] for f in features), clip=clip)
    if math.isinf(epsilon):
        return plan
    sites = 5
    limb_bits = quantization_range_for(sites).bit_length() - 1
    return plan.with_grid_for(features, limb_bits, sites)


def one(parts: list, pooled: np.ndarray, features: tuple, plan: DpPlan, *, k: int, seed: int,
        candidates: int, honest: int, noise_seed: bytes) -> tuple[float, np.ndarray, Any]:
    """Cost of the DP model in its standardised space and the non-private reference."""
    settings = KMeansSettings(k=k, seed=seed, min_segment_size=10)
    coord = run_inprocess_dp(parts, features=features, settings=settings, dp=plan,
                             init_candidates=candidates, honest=honest, noise_seed=noise_seed,
                             noiseless=math.isinf(plan.epsilon))
    model = coord.build_model(privacy={}, config={})
    scaled = model.scaler.transform(apply_transforms(pooled, features))
    return compute_stats(scaled, model.centroids_scaled).cost, scaled, model


def main() -> None:
    """Run the sweep and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 5_000])
    parser.add_argument("--eps", type=float, nargs="+",
                        default=[0.25, 0.5, 1.0, 2.0, 4.0, 8.0, math.inf])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--delta", type=float, default=1e-6)
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--init-rounds", type=int, nargs="+", default=[DEFAULTS["init_rounds"]])
    parser.add_argument("--lloyd-rounds", type=int, nargs="+",
                        default=[DEFAULTS["lloyd_rounds"]])
    parser.add_argument("--candidates", type=int, nargs="+", default=[DEFAULTS["candidates"]])
    parser.add_argument("--clip", type=float, nargs="+", default=[DEFAULTS["clip"]])
    parser.add_argument("--split", nargs="+", default=[None],
                        help="budget split moments,init,lloyd,profile, e.g. 0.06,0.24,0.42,0.28")
    parser.add_argument("--no-central-dp", action="store_true",
                        help="skip the central-DP comparison (faster sweeps)")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = []
    for size in args.sizes:
        for seed in args.seeds:
            population = SyntheticCustomers(num_customers=size).load(seed=seed)
            features = population.features
            bounds = SyntheticCustomers().declared_bounds()
            parts_idx = ByGroupPartition().split(population, num_sites=5, seed=seed)
            parts = [population.raw[p] for p in parts_idx]
            honest = honest_sites(len(parts), dropouts=0, collusion_fraction=1 / 3)
            for eps, ir, lr, cand, clip, split_text in itertools.product(
                    args.eps, args.init_rounds, args.lloyd_rounds, args.candidates, args.clip,
                    args.split):
                split = None if split_text is None else dict(zip(
                    ("moments", "init", "lloyd", "profile"),
                    (float(v) for v in split_text.split(",")), strict=True))
                plan = make_plan(features, bounds, epsilon=eps, delta=args.delta,
                                 init_rounds=ir, lloyd_rounds=lr, clip=clip, split=split)
                nseed = f"{size}-{seed}-{eps}".encode()
                cost, scaled, _ = one(parts, population.raw, features, plan, k=args.k,
                                      seed=seed, candidates=cand, honest=honest,
                                      noise_seed=nseed)
                ref = KMeans(n_clusters=args.k, n_init=10, random_state=seed).fit(scaled)
                central = None
                if not args.no_central_dp:
                    # Evaluated like the federated model: in its own standardised space,
                    # against non-private k-means in that space.
                    c_cost, c_scaled, _ = one([population.raw], population.raw, features, plan,
                                              k=args.k, seed=seed, candidates=cand, honest=1,
                                              noise_seed=nseed + b"c")
                    c_ref = KMeans(n_clusters=args.k, n_init=10, random_state=seed).fit(c_scaled)
                    central = c_cost / c_ref.inertia_ * ref.inertia_
                rows.append({"size": size, "seed": seed, "eps": eps, "init_rounds": ir,
                             "lloyd_rounds": lr, "candidates": cand, "clip": clip,
                             "split": split_text or "default",
                             "ratio": cost / ref.inertia_,
                             "central_dp": None if central is None else central / ref.inertia_})
    keys = ("size", "eps", "init_rounds", "lloyd_rounds", "candidates", "clip", "split")
    print("| customers | ε | init rounds | Lloyd rounds | candidates | clip | split | cost ratio "
          "vs non-private central (median [min, max]) | central DP vs non-private (median "
          "[min, max]) | federated / central DP (medians) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for group_key, group in itertools.groupby(sorted(rows, key=lambda r: [r[k] for k in keys]),
                                              key=lambda r: tuple(r[k] for k in keys)):
        members = list(group)
        ratio = [r["ratio"] for r in members]
        cdp = [r["central_dp"] for r in members if r["central_dp"] is not None]
        size, eps, ir, lr, cand, clip, split_name = group_key

        def fmt(v: list) -> str:
            if not v:
                return "-"
            return f"{np.median(v):.4f} [{min(v):.4f}, {max(v):.4f}]"

        versus = f"{np.median(ratio) / np.median(cdp):.4f}" if cdp else "-"
        print(f"| {size:,} | {eps:g} | {ir} | {lr} | {cand} | {clip:g} | {split_name} | "
              f"{fmt(ratio)} | "
              f"{fmt(cdp)} | {versus} |")
    print(f"\n{len(rows)} runs in {time.perf_counter() - started:.0f} s; δ={args.delta:g}, "
          f"k={args.k}, 5 regional sites, noise calibrated for {honest} honest sites.")


if __name__ == "__main__":
    main()
