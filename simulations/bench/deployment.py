"""Round latency of a real deployment: SuperLink + SuperNodes on loopback, seconds per round.

Usage::

    .venv/bin/python -m simulations.bench.deployment [--sites 3] [--customers 900]
        [--programs fedseg-supernode,flower-supernode] [--privacy none,secagg,secagg_dp]
        [--out-dir DIR]

For every (SuperNode program, privacy) pair it starts, as real OS processes on 127.0.0.1, a
SuperLink with TLS and SuperNode authentication and ``--sites`` SuperNodes, each registered
under its name and reading its own site files (SQLite + data contract, written by
:func:`simulations.site_sources.write_sites`) through its privacy gate; submits the default
fedseg run with ``flwr run --stream``; and reads the seconds of every round from the
ServerApp's progress lines. Everything it started is stopped by PID before the next pair.

* ``fedseg-supernode``: Flower's SuperNode with the site's own long-lived ClientApp and short
  polls while a run is active (:mod:`client.supernode`).
* ``flower-supernode``: Flower 1.42 as shipped (a fresh ClientApp process per message, 3 s
  polls); the ServerApp still collects replies with :class:`server.grid.FastPollGrid`.

Prints a markdown table (median and max seconds per round, rounds, whole run) and writes the raw
numbers to ``<out-dir>/deployment-bench.json``. The bar (issue 9): a SecAgg+ round <= 5 s with
3 SuperNodes on loopback.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common.config import compose_config
from simulations.deployment import Deployment
from simulations.run import build_sites
from simulations.site_sources import write_sites

PRIVACY = {
    # (server overrides, site policy overrides)
    "none": ("privacy=none", "site.mechanism=none site.require_dp=false"),
    "secagg": ("privacy=secagg", "site.require_dp=false"),
    "secagg_dp": ("privacy=secagg_dp", ""),
}


def run_pair(root: Path, *, program: str, privacy: str, sites: int, customers: int,
             poll: float | None = None) -> dict[str, Any]:
    """Start a federation with ``program`` SuperNodes, run once, return the round seconds.

    ``poll`` (optional) sets both the SuperNodes' ``--fedseg-poll`` and the ServerApp's
    ``federation.poll_interval``; None keeps fedseg's defaults.
    """
    data = f"data.num_customers={customers} data.num_regions={sites} model.k=3"
    server_overrides, site_overrides = PRIVACY[privacy]
    extra: list[str] = []
    if poll is not None:
        server_overrides += f" federation.poll_interval={poll}"
        extra = ["--fedseg-poll", str(poll)] if program == "fedseg-supernode" else []
    cfg = compose_config(f"{data} {server_overrides} centralized_reference=false")
    population, parts = build_sites(cfg)
    contracts = write_sites(population, parts, sites_dir=root / "sites",
                            state_dir=root / "site-state")
    federation = Deployment(root / "deploy")
    try:
        federation.start_superlink()
        federation.start_sites(contracts, state_dir=root / "site-state",
                               site_overrides=site_overrides, program=program, extra=extra)
        started = time.perf_counter()
        result = federation.flwr_run(
            f'fedseg-overrides="{data} {server_overrides}" '
            f'fedseg-output-dir="{root / "out"}"', timeout=1800)
        seconds = time.perf_counter() - started
    finally:
        federation.stop()
    rounds = result.round_seconds()
    if not result.completed or not rounds:
        raise RuntimeError(f"{program}/{privacy}: run {result.status}:\n{result.output[-3000:]}")
    per_round = [r[3] for r in rounds]
    return {"program": program, "privacy": privacy, "sites": sites, "customers": customers,
            "poll": poll,
            "rounds": len(rounds), "round_seconds": per_round,
            "median": statistics.median(per_round), "max": max(per_round),
            "run_seconds": seconds, "status": result.status}


def main(argv: list[str] | None = None) -> None:
    """Entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--customers", type=int, default=900)
    parser.add_argument("--programs", default="fedseg-supernode,flower-supernode")
    parser.add_argument("--privacy", default="none,secagg,secagg_dp")
    parser.add_argument("--poll", type=float, default=None,
                        help="SuperNode and ServerApp poll interval (default: fedseg's)")
    parser.add_argument("--out-dir", type=Path, default=Path("outputs/bench"))
    args = parser.parse_args(argv)
    rows = []
    for program in args.programs.split(","):
        for privacy in args.privacy.split(","):
            with tempfile.TemporaryDirectory(prefix="fedseg-deploy-bench-") as tmp:
                row = run_pair(Path(tmp), program=program, privacy=privacy, sites=args.sites,
                               customers=args.customers, poll=args.poll)
            rows.append(row)
            print(f"{program:<17} {privacy:<9} rounds={row['rounds']:>2} "
                  f"median={row['median']:.2f}s max={row['max']:.2f}s "
                  f"run={row['run_seconds']:.1f}s", flush=True)
    print("\n| SuperNode | privacy | rounds | s/round median | s/round max | whole run (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['program']} | {r['privacy']} | {r['rounds']} | {r['median']:.2f} | "
              f"{r['max']:.2f} | {r['run_seconds']:.1f} |")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "deployment-bench.json"
    out.write_text(json.dumps({"machine": platform.platform(), "rows": rows}, indent=2) + "\n",
                   encoding="utf-8")
    print(f"\nraw numbers: {out}")


if __name__ == "__main__":
    main()
