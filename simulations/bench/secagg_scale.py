r"""SecAgg+ against plain rounds at 10, 100 and 1,000 simulated sites, in one benchmark run.

Usage::

    .venv/bin/python -m simulations.bench.secagg_scale                       # 10 and 100 sites
    .venv/bin/python -m simulations.bench.secagg_scale --sites 100 1000 --stock 100

Each configuration is a real Flower simulation on Ray (the default model, ``partition=iid``,
``--customers-per-site`` synthetic customers per site, every site behind its privacy gate) in
its own process, run one after the other:

* ``none``: exact sums without secure aggregation (``privacy=none``);
* ``secagg``: SecAgg+ as fedseg runs it (``privacy=secagg``: ChaCha20 masks, X25519 key
  agreement and secret sharing over GF(2**521 - 1) from :mod:`common.secagg_primitives`, the
  next round's set-up answered with each unmask (three exchanges per round after the first,
  :mod:`server.secagg_prekeys`), the one-pass, signalled dispatch of :mod:`simulations.engine`);
* ``secagg-stock`` (only for the site counts given to ``--stock``): the same, with Flower 1.42's
  own P-384 key agreement, pycryptodome secret sharing and engine dispatch put back on both
  sides -- what a round cost before those replacements (benchmark only; never in a run; the
  set-up riding on the unmask stays).

Reported per configuration: rounds, seconds per round (median over the rounds after the first,
which includes the engine start), SecAgg+ over plain for the same site count, the whole run's
seconds, and the peak resident memory of the run's whole process tree (driver + Ray workers,
sampled every 0.5 s from /proc). Raw numbers go to ``--out`` as JSON. The bars (issue 11): a
SecAgg+ round at 100 sites <= 4x the plain round; at 1,000 sites <= 12x the 100-site round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("none", "secagg", "secagg-stock")


def _restore_stock_mod(message: Any, context: Any, call_next: Any) -> Any:
    """Benchmark-only ClientApp mod: put Flower's own SecAgg+ primitives back in this worker."""
    import client.app
    from common import secagg_primitives

    secagg_primitives.uninstall(*client.app.PRIMITIVE_MODULES)
    return call_next(message, context)


def _worker(sites: int, variant: str, customers: int, out: Path, extra: list[str]) -> None:
    from hydra import compose, initialize_config_dir

    import server.app
    from common import secagg_primitives
    from common.config import register_configs
    from simulations import engine
    from simulations.run import run

    register_configs()
    overrides = [f"privacy={'none' if variant == 'none' else 'secagg'}", "partition=iid",
                 f"federation.num_sites={sites}", f"data.num_customers={customers * sites}",
                 "centralized_reference=false", "quiet=true", "site.min_sites=3", *extra]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    mods: tuple[Any, ...] = ()
    if variant == "secagg-stock":
        secagg_primitives.uninstall(*server.app.PRIMITIVE_MODULES)
        engine.install = lambda flower_version=None: None  # keep Flower's dispatch
        mods = (_restore_stock_mod,)
    run(cfg, output_dir=out, client_mods=mods)


def _tree_rss_kib(root: int) -> int:
    """Resident memory of ``root`` and all its descendants (KiB), from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", encoding="utf-8") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except OSError:
            continue
        pid, parent = int(entry), int(fields.get("PPid", "0").strip() or 0)
        children.setdefault(parent, []).append(pid)
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0])
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def measure(sites: int, variant: str, customers: int, *, extra: tuple[str, ...] = (),
            say: Any = print) -> dict[str, Any]:
    """Run one configuration in its own process; return its row."""
    with tempfile.TemporaryDirectory(prefix="fedseg-secagg-scale-") as tmp:
        out = Path(tmp)
        env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
        cmd = [sys.executable, "-m", "simulations.bench.secagg_scale", "--worker",
               "--sites", str(sites), "--variant", variant,
               "--customers-per-site", str(customers), "--out", str(out),
               *(f"--override={o}" for o in extra)]
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.5):
                peak[0] = max(peak[0], _tree_rss_kib(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        assert proc.stdout is not None
        output = proc.stdout.read()
        proc.wait()
        done.set()
        sampler.join()
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{output[-4000:]}")
        metrics = [json.loads(line) for line in
                   (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    seconds = [float(m["seconds"]) for m in metrics]
    row = {"sites": sites, "variant": variant, "customers": customers * sites,
           "rounds": len(metrics), "first_round_s": seconds[0],
           "seconds_per_round": statistics.median(seconds[1:] or seconds),
           "whole_run_s": wall, "peak_rss_mib": peak[0] / 1024}
    say(f"[bench] {sites} sites {variant}: {row['rounds']} rounds, "
        f"{row['seconds_per_round']:.2f} s/round, whole run {wall:.1f} s, "
        f"peak {row['peak_rss_mib']:.0f} MiB", flush=True)
    return row


def render(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the rows, with SecAgg+/plain and growth against the previous size."""
    plain = {r["sites"]: r["seconds_per_round"] for r in rows if r["variant"] == "none"}
    secagg = {r["sites"]: r["seconds_per_round"] for r in rows if r["variant"] == "secagg"}
    lines = ["| sites | customers | variant | rounds | s/round (median after round 1) | "
             "over plain | SecAgg+ growth vs previous size | whole run s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    sizes = sorted(secagg)
    for r in rows:
        over = (f"{r['seconds_per_round'] / plain[r['sites']]:.2f}x"
                if r["variant"] != "none" and r["sites"] in plain else "")
        growth = ""
        if r["variant"] == "secagg" and sizes.index(r["sites"]) > 0:
            before = sizes[sizes.index(r["sites"]) - 1]
            growth = (f"{r['seconds_per_round'] / secagg[before]:.2f}x for "
                      f"{r['sites'] / before:g}x sites")
        lines.append(f"| {r['sites']:,} | {r['customers']:,} | {r['variant']} | {r['rounds']} | "
                     f"{r['seconds_per_round']:.2f} | {over} | {growth} | "
                     f"{r['whole_run_s']:.1f} | {r['peak_rss_mib']:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the configurations and print the table."""
    parser = argparse.ArgumentParser(prog="python -m simulations.bench.secagg_scale",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--stock", type=int, nargs="*", default=[],
                        help="site counts also run with Flower's stock secret sharing and "
                             "dispatch (slow: ~25 s per round at 100 sites)")
    parser.add_argument("--customers-per-site", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None, help="JSON file of the raw rows")
    parser.add_argument("--override", action="append", default=[],
                        help="a Hydra override for every run, e.g. "
                             "--override=federation.cpus_per_site=0.5")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, default="secagg", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.sites[0], args.variant, args.customers_per_site, args.out, args.override)
        return 0
    rows = []
    for sites in args.sites:
        variants = ["none", "secagg"] + (["secagg-stock"] if sites in args.stock else [])
        for variant in variants:
            rows.append(measure(sites, variant, args.customers_per_site,
                                extra=tuple(args.override)))
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    print(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
