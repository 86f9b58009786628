r"""``model=ae_kmeans`` against ``model=kmeans``: quality over seeds, client drift, local cost.

Usage::

    .venv/bin/python -m simulations.bench.ae_kmeans                  # in-process, 3 seeds
    .venv/bin/python -m simulations.bench.ae_kmeans --flower         # + real SecAgg+ runs

For every seed it generates the mixed-type customers (``data=mixed``: 6 regional, non-IID
sites) and the default synthetic ones (``data=synthetic``) and reports the adjusted Rand index
against the true segments of

* ``kmeans``: fedseg's federated k-means on one-hot + standardised features (run in-process,
  :func:`simulations.inprocess.run_inprocess`; its sums equal SecAgg+'s to ``2**-24``);
* ``ae federated``: the federated autoencoder + k-means in its embedding with the default
  settings (Gumbel-softmax bottleneck, local SGD with SCAFFOLD's correction, server Adam), run
  in-process (:func:`simulations.inprocess.run_inprocess_ae`);
* ``ae central``: the same code and settings with one site holding the pooled data (a trusted
  curator);
* ``ae first design``: the first recipe, federated (:data:`FIRST_DESIGN`: FedAvg of two local
  Adam epochs through a noisy 2-d ``tanh`` bottleneck, 20 rounds), for comparison;
* with ``--flower``: ``python -m simulations.run model=ae_kmeans privacy=secagg data=mixed``
  -- a real Flower simulation with SecAgg+ -- its ARI, seconds, and per-site CPU seconds and
  upload bytes per training round from its ``metrics.jsonl``.

It also times one round of local training (``local_epochs`` over 20,000 customers) on this
machine, median of 3. All variants in one run share data and seeds; compare them as ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import adjusted_rand_score

from common.autoencoder import (
    AESettings,
    TabularLayout,
    build_model,
    embed,
    local_train,
    standardise,
)
from common.features import apply_transforms
from server.coordinator import KMeansSettings
from simulations.datasets import ByGroupPartition, MixedCustomers, Population, SyntheticCustomers
from simulations.inprocess import run_inprocess, run_inprocess_ae


def _kmeans_ari(population: Population, parts: list[Any], settings: KMeansSettings) -> float:
    coordinator = run_inprocess([population.raw[p] for p in parts],
                                features=population.features, settings=settings)
    model = coordinator.build_model(privacy={}, config={})
    return float(adjusted_rand_score(population.labels, model.assign(population.raw)))


def _ae_ari(population: Population, parts: list[Any], settings: KMeansSettings,
            ae: AESettings) -> tuple[float, float, int, list[dict[str, Any]]]:
    """ARI, seconds, dead-code splits and the candidates and moves of one in-process run.

    Each candidate: its released last-round loss and the ARI of its customers' most likely
    codes (a diagnostic that needs the truth; the run chooses by the loss only); each
    merge-and-split move: its codes, its loss and the kept model's, whether it was kept.
    """
    started = time.perf_counter()
    coordinator = run_inprocess_ae([population.raw[p] for p in parts],
                                   features=population.features, settings=settings, ae=ae)
    model = coordinator.build_model(privacy={}, config={})
    ari = float(adjusted_rand_score(population.labels, model.assign(population.raw)))
    seconds = time.perf_counter() - started
    assert coordinator.scaler is not None
    layout = TabularLayout.from_features(population.features)
    x = standardise(apply_transforms(population.raw, population.features), layout,
                    coordinator.scaler.mean, coordinator.scaler.std)
    r = int(ae.rounds)
    candidates = [{"loss": round(loss, 5),
                   "loss_last10": round(float(np.mean(coordinator.ae_loss[(c + 1) * r - 10:
                                                                          (c + 1) * r])), 5),
                   "code_ari": round(float(adjusted_rand_score(
                       population.labels,
                       embed(w, x, layout=layout, settings=ae).argmax(axis=1))), 3)}
                  for c, (loss, w) in enumerate(zip(coordinator.candidate_losses,
                                                    coordinator.candidate_weights, strict=True))]
    moves = [{key: (round(v, 5) if isinstance(v, float) else v) for key, v in move.items()
              if key in ("merged", "emptied", "source", "loss", "loss_before", "kept")}
             for move in coordinator.move_log]
    if moves:
        final = embed(coordinator.weights, x, layout=layout, settings=ae).argmax(axis=1)
        moves.append({"loss_before_moves": coordinator.settled_loss,
                      "final_code_ari": round(float(adjusted_rand_score(population.labels,
                                                                        final)), 3)})
    return ari, seconds, len(coordinator.code_splits), candidates + moves


FIRST_DESIGN: dict[str, Any] = {"embed_dim": 2, "lr": 3e-3, "rounds": 20, "bottleneck": "tanh",
                                 "local_optimizer": "adam", "local_steps": 0,
                                 "local_epochs": 2, "server_optimizer": "average",
                                 "drift_correction": "none", "moves": 0}
"""The first ``model=ae_kmeans`` recipe (2026-11-30), as :class:`AESettings` changes."""


def _flower_run(seed: int, customers: int) -> dict[str, Any]:
    from common.config import compose_config
    from simulations.run import run

    cfg = compose_config(f"model=ae_kmeans privacy=secagg data=mixed seed={seed} "
                         f"data.num_customers={customers} centralized_reference=false")
    with tempfile.TemporaryDirectory() as tmp:
        summary = run(cfg, output_dir=tmp)
        metrics = [json.loads(line) for line in
                   (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    training = [m for m in metrics if m["phase"] == "ae_train"]
    return {"ari": summary["ari_vs_truth"], "seconds": summary["seconds"],
            "cpu_per_site_round": statistics.median(m["cpu_seconds_per_site"]
                                                    for m in training),
            "cpu_max_site_round": max(m["cpu_seconds_max_site"] for m in training),
            "bytes_per_site_round": statistics.median(m["bytes_uploaded_per_site"]
                                                      for m in training),
            "seconds_per_round": statistics.median(m["seconds"] for m in training)}


def local_round_seconds(ae: AESettings, *, customers: int = 20_000, reps: int = 3) -> float:
    """Median seconds of one round of local training on ``customers`` mixed-type records.

    With SCAFFOLD the round includes both gradient passes (at the weights and at the anchor).
    """
    population = MixedCustomers(num_customers=int(customers / 0.88)).load(seed=0)
    raw = population.raw[:customers]
    layout = TabularLayout.from_features(population.features)
    t = apply_transforms(raw, population.features)
    x = standardise(t, layout, t.mean(axis=0), t.std(axis=0) + 1e-12)
    params = build_model(layout, ae).get_flat()
    times = []
    for rep in range(reps):
        started = time.perf_counter()
        local_train(params, x, layout=layout, settings=ae, rng=np.random.default_rng(rep),
                    anchor=params, control=np.full_like(params, 1e-3))
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--customers", type=int, default=30_000)
    parser.add_argument("--flower", action="store_true",
                        help="also run real Flower simulations with SecAgg+ (minutes each)")
    parser.add_argument("--data", nargs="+", choices=("mixed", "synthetic"),
                        default=["mixed", "synthetic"], help="the data sets to run")
    parser.add_argument("--no-first-design", action="store_true",
                        help="skip the first recipe (FedAvg, tanh) for comparison")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="AESettings changes, e.g. lr=0.05 split_share=0 moves=0")
    parser.add_argument("--runs", nargs="*", choices=("federated", "central"),
                        default=["federated", "central"],
                        help="the in-process autoencoder runs to make (none: only k-means and, "
                             "with --flower, the Flower runs)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    base = AESettings(device="cpu")
    changes = {}
    for item in args.set:
        key, _, value = item.partition("=")
        changes[key] = type(getattr(base, key))(value)
    ae = replace(base, **changes)
    print(f"autoencoder: {ae.to_dict()}")
    rows = []
    sources: dict[str, MixedCustomers | SyntheticCustomers] = {
        "mixed": MixedCustomers(num_customers=args.customers),
        "synthetic": SyntheticCustomers(num_customers=args.customers, num_regions=5)}
    for data_name in args.data:
        source = sources[data_name]
        for seed in args.seeds:
            population = source.load(seed=seed)
            parts = ByGroupPartition().split(population, num_sites=len(
                np.unique(population.groups)), seed=seed)
            k = len(population.label_names)
            settings = KMeansSettings(k=k, seed=seed)
            seeded = replace(ae, seed=seed)
            row: dict[str, Any] = {"data": data_name, "seed": seed, "sites": len(parts)}
            row["kmeans"] = _kmeans_ari(population, parts, settings)
            pooled = [np.arange(population.raw.shape[0])]
            for run_name in args.runs:
                (row[f"ae {run_name}"], row[f"s {run_name}"], row[f"splits {run_name}"],
                 row[f"candidates {run_name}"]) = _ae_ari(
                    population, parts if run_name == "federated" else pooled, settings, seeded)
            if not args.no_first_design:
                row["ae first design"] = _ae_ari(population, parts, settings,
                                                 replace(seeded, **FIRST_DESIGN))[0]
            if args.flower and data_name == "mixed":
                row["flower"] = _flower_run(seed, args.customers)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print("| data | seed | sites | kmeans ARI | ae federated ARI | ae central ARI | "
          "federated - central | ae first design (federated) ARI | SecAgg+ Flower run ARI |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        flower = r.get("flower", {}).get("ari")
        first = r.get("ae first design")
        fed, central = r.get("ae federated"), r.get("ae central")

        def cell(value: float | None, sign: str = "") -> str:
            return "-" if value is None else f"{value:{sign}.3f}"

        print(f"| {r['data']} | {r['seed']} | {r['sites']} | {r['kmeans']:.3f} | "
              f"{cell(fed)} | {cell(central)} | "
              f"{cell(None if fed is None or central is None else fed - central, '+')} | "
              + ("-" if first is None else f"{first:.3f}") + " | "
              + ("-" if flower is None else f"{flower:.3f}") + " |")
    flower_rows = [r for r in rows if "flower" in r]
    if flower_rows:
        print()
        print("| seed | run s | s per training round | CPU s per site and round (median / "
              "max site) | bytes uploaded per site and round |")
        print("|---|---|---|---|---|")
        for r in flower_rows:
            f = r["flower"]
            print(f"| {r['seed']} | {f['seconds']:.0f} | {f['seconds_per_round']:.2f} | "
                  f"{f['cpu_per_site_round']:.2f} / {f['cpu_max_site_round']:.2f} | "
                  f"{f['bytes_per_site_round']:,.0f} |")
    print()
    work = (f"{ae.local_steps} steps of {ae.batch_size}" if ae.local_steps
            else f"{ae.local_epochs} epochs")
    print(f"one round of local training on 20,000 customers ({work}"
          f"{', SCAFFOLD gradient passes' if ae.control_variates else ''}): "
          f"{local_round_seconds(ae):.2f} s (median of 3)"
          + (f"; the {ae.candidates} candidates train one after the other, so a run has "
             f"{ae.candidates}x the rounds" if ae.candidates > 1 else ""))


if __name__ == "__main__":
    main()
