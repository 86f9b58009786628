"""SecAgg+ round time with fedseg's ChaCha20 masks vs Flower's stock 32-bit-seeded masks.

Each variant runs in its own process (a real Flower simulation on Ray, SecAgg+ on); the stock
variant puts Flower's generator back on both sides first (benchmark only). Usage::

    .venv/bin/python -m simulations.bench.secagg_prg [--sites 10 50] [--repeats 1]

Prints seconds per SecAgg+ round (median over the rounds after the first, which includes the
engine start) and the ratio chacha20 / stock.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def _restore_stock_prg_mod(message: Any, context: Any, call_next: Any) -> Any:
    """Benchmark-only ClientApp mod: put Flower's own mask generator back in this worker."""
    import client.app
    from common import mask_prg

    mask_prg.uninstall(*client.app.SECAGG_MODULES)
    return call_next(message, context)


def _worker(sites: int, prg: str, out: Path) -> None:
    from hydra import compose, initialize_config_dir

    import server.app
    from common import mask_prg
    from common.config import register_configs
    from simulations.run import run

    register_configs()
    overrides = [f"federation.num_sites={sites}", "partition=iid", "data.num_customers=20000",
                 "model.k=6", "strategy.n_init=2", "strategy.init_rounds=2",
                 "strategy.max_rounds=4", "centralized_reference=false"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    mods: tuple[Any, ...] = ()
    if prg == "stock":
        mask_prg.uninstall(*server.app.SECAGG_MODULES)
        mods = (_restore_stock_prg_mod,)
    run(cfg, output_dir=out, client_mods=mods)


def _measure(sites: int, prg: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
        proc = subprocess.run([sys.executable, "-m", "simulations.bench.secagg_prg", "--worker",
                               "--sites", str(sites), "--prg", prg, "--out", str(out)],
                              cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return float(np.median([m["seconds"] for m in lines[1:]]))


def main() -> None:
    """Run both variants for each site count and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prg", choices=["stock", "chacha20"], default="chacha20")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        _worker(args.sites[0], args.prg, args.out)
        return
    print("| sites | stock s/round | chacha20 s/round | ratio |")
    print("|---|---|---|---|")
    for sites in args.sites:
        stock, strong = [], []
        for _ in range(args.repeats):  # interleaved: the machine is shared and noisy
            stock.append(_measure(sites, "stock"))
            strong.append(_measure(sites, "chacha20"))
        s, c = float(np.median(stock)), float(np.median(strong))
        print(f"| {sites} | {s:.2f} | {c:.2f} | {c / s:.2f} |", flush=True)


if __name__ == "__main__":
    main()
