"""The foundation issue's bars, measured with real Flower simulations (the CLI, SecAgg+ on).

Usage::

    .venv/bin/python -m simulations.bench.bars [--out /tmp/fedseg-bars]

Runs ``python -m simulations.run`` for: the default job (SecAgg+ with DP, epsilon=1); the
default job with exact sums (``privacy=secagg``) and with ``privacy=none`` to compare the SecAgg+
and plain centroids; 20 Dirichlet(0.3) sites for seeds 0, 1, 2 and ``data=wholesale model.k=5``
(when ../shared/data is present), both with exact sums. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
WHOLESALE = ROOT.parent / "shared" / "data" / "wholesale_customers.csv"


def _run(out: Path, *overrides: str) -> dict:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.run([sys.executable, "-m", "simulations.run", *overrides,
                           f"hydra.run.dir={out}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"run {overrides} failed:\n{proc.stderr[-2000:]}")
    summary: dict = json.loads((out / "summary.json").read_text())
    return summary


def _centroids(out: Path) -> np.ndarray:
    doc = json.loads((out / "segments.json").read_text())
    return np.array([s["centroid_scaled"] for s in doc["segments"]])


def main() -> None:
    """Run the bar simulations and print their numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/fedseg-bars"))
    args = parser.parse_args()
    rows = []
    default = _run(args.out / "default")
    rows.append(("default (5 regional sites, SecAgg+ and DP eps=1)", default))
    rows.append(("default, privacy=secagg (exact sums)",
                 _run(args.out / "default-secagg", "privacy=secagg")))
    plain = _run(args.out / "default-plain", "privacy=none")
    rows.append(("default, privacy=none", plain))
    for seed in (0, 1, 2):
        rows.append((f"20 Dirichlet(0.3) sites, seed {seed}",
                     _run(args.out / f"dirichlet-{seed}", "federation.num_sites=20",
                          "partition=dirichlet", "partition.alpha=0.3", f"seed={seed}",
                          "privacy=secagg")))
    if WHOLESALE.is_file():
        rows.append(("wholesale, k=5 (3 sites)",
                     _run(args.out / "wholesale", "data=wholesale", f"data.path={WHOLESALE}",
                          "model.k=5", "privacy=secagg")))
    print("| run | cost_ratio | ari_vs_truth | rounds | seconds | bytes/site/round |")
    print("|---|---|---|---|---|---|")
    for name, s in rows:
        ari = "-" if s["ari_vs_truth"] is None else f"{s['ari_vs_truth']:.3f}"
        print(f"| {name} | {s['cost_ratio']:.4f} | {ari} | {s['rounds']} | {s['seconds']:.1f} | "
              f"{s['bytes_uploaded_per_site_round']:,.0f} |")
    dirichlet = [s["cost_ratio"] for name, s in rows if name.startswith("20 Dirichlet")]
    print(f"\nmedian cost_ratio over the 3 Dirichlet seeds: {np.median(dirichlet):.4f}")
    a, b = _centroids(args.out / "default-secagg"), _centroids(args.out / "default-plain")
    print(f"SecAgg+ vs plain centroids: max relative difference "
          f"{np.abs(a - b).max() / np.abs(b).max():.2e}")


if __name__ == "__main__":
    main()
