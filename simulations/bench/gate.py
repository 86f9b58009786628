"""The privacy gate at scale: transaction and customer-level sources, end to end.

Usage::

    .venv/bin/python -m simulations.bench.gate [--transactions 5000000] [--customers 250000]
        [--rows 1000000] [--repeat 3] [--out-dir DIR] [--seed 0]

Setup (not timed) writes, with DuckDB ``range()`` SQL (seeded, deterministic hashes):

* a transaction-level source of ``--transactions`` lines for ``--customers`` customers
  (``customer_id``, ``order_id``, ``ts``, ``amount``, ``category`` among 5 values and an ``email``
  direct identifier), as Parquet and as CSV, every customer with at least one order;
* a site key and an encrypted site store whose consent ledger grants 90% of the customers,
  then erases 100 and withdraws 100 of them;
* a customer-level CSV of ``--rows`` rows (``customer_id``, ``name``, ``email``, 7 numeric
  features, ``consent`` true/false) and its contract (``consent: {mode: column}``).

Each configuration then runs in a fresh subprocess (so ``ru_maxrss`` is its own peak):

* ``tx-parquet`` / ``tx-csv``: ``PrivacyGate.open`` then ``gate.load()`` on a fresh gate per
  repeat (no cache), split into stages (``read_source``, validation, HMAC pseudonyms,
  ``consent_state``, ``erased``, the rest), then a second, cached ``load()`` on the same gate;
* ``ref-csv``: ``client.csv_source._read_reference`` on the customer CSV (the line-by-line loop);
* ``duckdb-csv``: ``client.csv_source.read_customer_csv`` (DuckDB fast path);
* ``gate-csv``: the whole gate on the customer CSV.

Prints a markdown table (best and median of the repeats, customers out, peak RSS) against the
bars (5,000,000 transactions to 250,000 customers through the gate in at most 5 s; a
1,000,000-row customer CSV through the gate at least 10x faster than the reference loop) and
writes the raw numbers to ``<out-dir>/gate-bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CATEGORIES = ("food", "fashion", "home", "beauty", "electronics")
CUSTOMER_FEATURES = ("recency", "frequency", "monetary", "basket", "tenure", "returns",
                     "discount")
AS_OF = "2026-01-01"
PURPOSE = "segmentation"
TX_BAR_SECONDS = 5.0
CSV_BAR_RATIO = 10.0
CONFIGS = ("tx-parquet", "tx-csv", "ref-csv", "duckdb-csv", "gate-csv")


# -- setup -----------------------------------------------------------------------------------


def _customer_id(expr: str) -> str:
    """Return the SQL (DuckDB) of the customer id ``C0000042`` for an integer expression."""
    return f"'C' || lpad(CAST({expr} AS VARCHAR), 8, '0')"


def _customer_id_value(i: int) -> str:
    """Return the customer id ``C0000042`` of an integer (as :func:`_customer_id` writes it)."""
    return f"C{i:08d}"


def write_transactions(directory: Path, *, transactions: int, customers: int,
                       seed: int) -> dict[str, Path]:
    """Write the transaction source as Parquet and CSV (two lines per order).

    Order ``o`` belongs to customer ``o`` for the first ``customers`` orders (so each has at
    least one when ``transactions >= 2 * customers``), to a hashed customer after that.

    Returns
    -------
    dict of str to Path
        ``parquet`` and ``csv`` files.
    """
    import duckdb

    categories = "[" + ", ".join(f"'{c}'" for c in CATEGORIES) + "]"
    order = "(i // 2)"
    owner = (f"CASE WHEN {order} < {customers} THEN {order} "
             f"ELSE hash({order}, {seed}) % {customers} END")
    span = 2 * 365 * 86400
    sql = (
        f"SELECT {_customer_id(owner)} AS customer_id, "
        f"'O' || CAST({order} AS VARCHAR) AS order_id, "
        f"TIMESTAMP '2024-01-01' + to_seconds(CAST(hash(i, {seed}, 1) % {span} AS BIGINT)) AS ts, "
        f"round(CAST(hash(i, {seed}, 2) % 20000 AS DOUBLE) / 100 + 0.5, 2) AS amount, "
        f"{categories}[CAST(hash(i, {seed}, 3) % 5 AS BIGINT) + 1] AS category, "
        f"lower({_customer_id(owner)}) || '@example.com' AS email "
        f"FROM range({transactions}) t(i)"
    )
    paths = {"parquet": directory / "transactions.parquet", "csv": directory / "transactions.csv"}
    con = duckdb.connect()
    try:
        con.execute(f"CREATE TABLE tx AS {sql}")
        con.execute(f"COPY tx TO '{paths['parquet']}' (FORMAT parquet)")
        con.execute(f"COPY tx TO '{paths['csv']}' (FORMAT csv, HEADER true)")
    finally:
        con.close()
    return paths


def write_customers(path: Path, *, rows: int, seed: int) -> Path:
    """Write the customer-level CSV: id, name, email, 7 numeric features, consent."""
    import duckdb

    features = ", ".join(
        f"round(CAST(hash(i, {seed}, {10 + j}) % 1000000 AS DOUBLE) / 100, 2) AS {name}"
        for j, name in enumerate(CUSTOMER_FEATURES))
    sql = (
        f"SELECT {_customer_id('i')} AS customer_id, "
        f"'Customer ' || CAST(i AS VARCHAR) AS name, "
        f"lower({_customer_id('i')}) || '@example.com' AS email, {features}, "
        f"CASE WHEN hash(i, {seed}, 9) % 10 < 8 THEN 'true' ELSE 'false' END AS consent "
        f"FROM range({rows}) t(i)"
    )
    con = duckdb.connect()
    try:
        con.execute(f"COPY ({sql}) TO '{path}' (FORMAT csv, HEADER true)")
    finally:
        con.close()
    return path


def _tx_contract(source: str) -> dict[str, Any]:
    return {
        "contract": "fedseg.data-contract/1",
        "purpose": PURPOSE,
        "site": {"name": "bench", "key_file": "site.key", "store": "sqlite:///site-store.sqlite"},
        "source": {"path": source, "level": "transaction"},
        "subject_id": "customer_id",
        "direct_identifiers": ["email"],
        "consent": {"mode": "ledger"},
        "transactions": {"timestamp": "ts", "amount": "amount", "order_id": "order_id",
                         "category": "category", "as_of": AS_OF},
        "features": [
            {"name": "recency_days", "aggregate": "recency_days", "unit": "days"},
            {"name": "frequency", "aggregate": "frequency", "unit": "orders"},
            {"name": "monetary", "aggregate": "monetary", "unit": "EUR",
             "clip": [0, 1_000_000], "transform": "log1p"},
            {"name": "avg_basket", "aggregate": "average_basket", "unit": "EUR"},
            {"name": "tenure_days", "aggregate": "tenure_days", "unit": "days"},
            {"name": "food_share", "aggregate": "category_share", "category": "food"},
        ],
        "on_invalid": "error",
    }


def _customer_contract(source: str) -> dict[str, Any]:
    # Consent lives in a column: this site's ledger holds only its 100 withdrawals and 100
    # erasures (its own store), not the transaction site's 225,000 imported grants.
    return {
        "contract": "fedseg.data-contract/1",
        "purpose": PURPOSE,
        "site": {"name": "bench", "key_file": "site.key",
                 "store": "sqlite:///site-store-customers.sqlite"},
        "source": {"path": source},
        "subject_id": "customer_id",
        "direct_identifiers": ["name", "email"],
        "consent": {"mode": "column", "column": "consent"},
        "features": [{"name": name, "clip": [0, 100_000],
                      **({"transform": "log1p"} if name == "monetary" else {})}
                     for name in CUSTOMER_FEATURES],
        "on_invalid": "error",
    }


def write_site(directory: Path, *, customers: int, seed: int) -> dict[str, float]:
    """Write the site key and store; import consents for 90%, erase 100, withdraw 100.

    Returns
    -------
    dict of str to float
        Setup seconds per step (not part of any bar).
    """
    import numpy as np

    from client.site_key import generate_key_file
    from client.site_store import SiteStore

    timings: dict[str, float] = {}
    key = generate_key_file(directory / "site.key", force=True)
    store_file = directory / "site-store.sqlite"
    store_file.unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(customers, size=round(0.9 * customers), replace=False))
    started = time.perf_counter()
    pseudonyms = key.pseudonymise([f"C{i:08d}" for i in chosen])
    granted = datetime(2025, 1, 1, tzinfo=UTC)
    with SiteStore(f"sqlite:///{store_file}", key) as store:
        imported = time.perf_counter()
        store.import_consents([(p, granted, None, "bench-import") for p in pseudonyms],
                              purpose=PURPOSE)
        timings["import_consents_s"] = time.perf_counter() - imported
        picks = rng.choice(len(pseudonyms), size=min(200, len(pseudonyms)), replace=False)
        at = datetime(2025, 6, 1, tzinfo=UTC)
        for n, i in enumerate(picks):
            if n < 100:
                store.erase(pseudonyms[i], at=at, reason="bench erasure")
            else:
                store.withdraw(pseudonyms[i], purpose=PURPOSE, at=at, source="bench")
    timings["site_setup_s"] = time.perf_counter() - started
    timings["ledger_consents"] = float(len(pseudonyms))
    customer_store = directory / "site-store-customers.sqlite"
    customer_store.unlink(missing_ok=True)
    with SiteStore(f"sqlite:///{customer_store}", key) as store:
        at = datetime(2025, 6, 1, tzinfo=UTC)
        for n, i in enumerate(rng.choice(customers, size=200, replace=False)):
            pseudonym = key.pseudonym(_customer_id_value(int(i)))
            if n < 100:
                store.erase(pseudonym, at=at, reason="bench erasure")
            else:
                store.withdraw(pseudonym, purpose=PURPOSE, at=at, source="bench")
    return timings


def setup(directory: Path, *, transactions: int, customers: int, rows: int,
          seed: int) -> dict[str, Any]:
    """Write every source, contract, the key and the store into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {}
    started = time.perf_counter()
    tx = write_transactions(directory, transactions=transactions, customers=customers,
                            seed=seed)
    info["write_transactions_s"] = time.perf_counter() - started
    started = time.perf_counter()
    write_customers(directory / "customers.csv", rows=rows, seed=seed)
    info["write_customers_s"] = time.perf_counter() - started
    info.update(write_site(directory, customers=customers, seed=seed))
    docs = {"contract-tx-parquet.yaml": _tx_contract(tx["parquet"].name),
            "contract-tx-csv.yaml": _tx_contract(tx["csv"].name),
            "contract-customers.yaml": _customer_contract("customers.csv")}
    for name, doc in docs.items():
        (directory / name).write_text(yaml.safe_dump(doc, sort_keys=False), "utf-8")
    info["file_bytes"] = {p.name: p.stat().st_size for p in
                          (tx["parquet"], tx["csv"], directory / "customers.csv")}
    return info


# -- workers (one configuration per subprocess) ----------------------------------------------


def _peak_rss_mib() -> float:
    """Peak resident set of this process (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Stages:
    """Wall time of the gate's stages, by wrapping the functions ``load()`` calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + \
                    time.perf_counter() - started
        return timed


def _gate_worker(contract: Path, repeat: int) -> dict[str, Any]:
    import client.gate as gate_module
    from client.gate import PrivacyGate

    read_source, validate = gate_module.read_source, gate_module._validate
    runs: list[dict[str, Any]] = []
    report: dict[str, Any] = {}
    for _ in range(repeat):
        stages = _Stages()
        gate_module.read_source = stages.wrap("read_source", read_source)
        gate_module._validate = stages.wrap("validate", validate)
        started = time.perf_counter()
        gate = PrivacyGate.open(contract)
        opened = time.perf_counter() - started
        object.__setattr__(gate.key, "pseudonymise",
                           stages.wrap("hmac", gate.key.pseudonymise))
        store: Any = gate.store
        store.consent_state = stages.wrap("consent_state", store.consent_state)
        store.erased = stages.wrap("erased", store.erased)
        try:
            started = time.perf_counter()
            data = gate.load()
            cold = time.perf_counter() - started
            s = dict(stages.seconds)
            s["validate"] = s.get("validate", 0.0) - s.get("hmac", 0.0)
            s["rest"] = cold - sum(s.values())
            started = time.perf_counter()
            warm_data = gate.load()
            warm = time.perf_counter() - started
        finally:
            gate.close()
            gate_module.read_source = read_source
            gate_module._validate = validate
        assert warm_data.report.used == data.report.used
        report = data.report.to_dict()
        runs.append({"seconds": cold, "open_s": opened, "warm_s": warm, "stages": s,
                     "out": int(data.site.raw.shape[0])})
    return {"runs": runs, "report": report}


def _reader_worker(kind: str, path: Path, repeat: int) -> dict[str, Any]:
    from client.csv_source import _read_reference, read_customer_csv
    from common.features import FeatureSpec

    features = tuple(FeatureSpec(name=n, transform="log1p" if n == "monetary" else "none")
                     for n in CUSTOMER_FEATURES)
    reader = _read_reference if kind == "ref-csv" else read_customer_csv
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = reader(path, features=features)
        runs.append({"seconds": time.perf_counter() - started, "out": int(result.raw.shape[0])})
        del result
    return {"runs": runs}


def worker(config: str, directory: Path, repeat: int) -> dict[str, Any]:
    """Run one configuration ``repeat`` times in this process; return its numbers."""
    baseline = _peak_rss_mib()
    if config.startswith("tx-"):
        result = _gate_worker(directory / f"contract-{config}.yaml", repeat)
    elif config == "gate-csv":
        result = _gate_worker(directory / "contract-customers.yaml", repeat)
    else:
        result = _reader_worker(config, directory / "customers.csv", repeat)
    result.update(config=config, peak_rss_mib=_peak_rss_mib(), start_rss_mib=baseline)
    return result


def _spawn(config: str, directory: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``--worker config`` in a fresh interpreter; return the JSON it prints.

    Linux carries a process's peak RSS across ``fork`` + ``exec``, so the parent stays small
    (setup runs in a worker too) and each worker's ``start_rss_mib`` shows that floor.
    """
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.bench.gate", "--worker", config,
         "--out-dir", str(directory), "--repeat", str(args.repeat),
         "--transactions", str(args.transactions), "--customers", str(args.customers),
         "--rows", str(args.rows), "--seed", str(args.seed)],
        cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{config} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# -- report ----------------------------------------------------------------------------------


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    seconds = [r["seconds"] for r in result["runs"]]
    out = {"best_s": min(seconds), "median_s": statistics.median(seconds),
           "out": result["runs"][-1]["out"], "peak_rss_mib": result["peak_rss_mib"]}
    if "warm_s" in result["runs"][0]:
        out["warm_s"] = min(r["warm_s"] for r in result["runs"])
        best = min(result["runs"], key=lambda r: r["seconds"])
        out["stages_of_best"] = best["stages"]
        out["excluded"] = result["report"].get("excluded", {})
    return out


def _table(summaries: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    names = {"tx-parquet": f"gate, {args.transactions:,} tx (Parquet)",
             "tx-csv": f"gate, {args.transactions:,} tx (CSV)",
             "ref-csv": f"reference loop, {args.rows:,}-row customer CSV",
             "duckdb-csv": "read_customer_csv (DuckDB), same file",
             "gate-csv": "gate, same customer CSV (consent column)"}
    lines = ["| configuration | best s | median s | cached load s | rows out | peak RSS MiB |",
             "|---|---|---|---|---|---|"]
    for config, s in summaries.items():
        warm = f"{s['warm_s']:.3f}" if "warm_s" in s else "-"
        lines.append(f"| {names[config]} | {s['best_s']:.2f} | {s['median_s']:.2f} | {warm} "
                     f"| {s['out']:,} | {s['peak_rss_mib']:,.0f} |")
    stage_names = ("read_source", "validate", "hmac", "consent_state", "erased", "rest")
    lines += ["", "Stages of the best run (s):", "",
              "| configuration | " + " | ".join(stage_names) + " |",
              "|---|" + "---|" * len(stage_names)]
    for config, s in summaries.items():
        if "stages_of_best" in s:
            st = s["stages_of_best"]
            lines.append(f"| {config} | " + " | ".join(f"{st.get(k, 0.0):.2f}"
                                                      for k in stage_names) + " |")
    lines.append("")
    expected = round(0.9 * args.customers) - min(200, round(0.9 * args.customers))
    for config in ("tx-parquet", "tx-csv", "gate-csv"):
        if config in summaries:
            lines.append(f"- {config} excluded: {summaries[config]['excluded']}")
    for config in ("tx-parquet", "tx-csv"):
        if config in summaries and summaries[config]["out"] != expected:
            lines.append(f"- WARNING {config}: {summaries[config]['out']:,} customers out, "
                         f"expected {expected:,} (90% consent, 100 erased, 100 withdrawn).")
    for config in ("tx-parquet", "tx-csv"):
        if config in summaries:
            best = summaries[config]["best_s"]
            verdict = "meets" if best <= TX_BAR_SECONDS else "misses"
            lines.append(f"- {config}: best {best:.2f} s {verdict} the "
                         f"<= {TX_BAR_SECONDS:g} s bar.")
    if "ref-csv" in summaries and "gate-csv" in summaries:
        ratio = summaries["ref-csv"]["best_s"] / summaries["gate-csv"]["best_s"]
        verdict = "meets" if ratio >= CSV_BAR_RATIO else "misses"
        lines.append(f"- reference / gate on the customer CSV: {ratio:.1f}x ({verdict} the "
                     f">= {CSV_BAR_RATIO:g}x bar).")
    if "ref-csv" in summaries and "duckdb-csv" in summaries:
        ratio = summaries["ref-csv"]["best_s"] / summaries["duckdb-csv"]["best_s"]
        lines.append(f"- reference / read_customer_csv: {ratio:.1f}x.")
    return "\n".join(lines)


def _uptime() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    """Set up the sources, run each configuration in a subprocess, print and save results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=5_000_000)
    parser.add_argument("--customers", type=int, default=250_000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where the data and gate-bench.json go (default: a temp dir)")
    parser.add_argument("--only", nargs="+", choices=CONFIGS, default=list(CONFIGS),
                        help="configurations to run")
    parser.add_argument("--worker", choices=(*CONFIGS, "setup"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "setup":
        print(json.dumps(setup(args.out_dir, transactions=args.transactions,
                               customers=args.customers, rows=args.rows, seed=args.seed)))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.out_dir, args.repeat)))
        return
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="fedseg-gate-bench-"))
    data_dir = out_dir / "data"
    print(f"setup in {data_dir} ...", flush=True)
    info = _spawn("setup", data_dir, args)
    results: dict[str, Any] = {}
    load = {"before": _uptime()}
    for config in args.only:
        print(f"running {config} x{args.repeat} ...", flush=True)
        results[config] = _spawn(config, data_dir, args)
    load["after"] = _uptime()
    summaries = {c: _summary(r) for c, r in results.items()}
    table = _table(summaries, args)
    print()
    print(f"{args.transactions:,} transactions / {args.customers:,} customers; "
          f"{args.rows:,}-row customer CSV; {args.repeat} repeat(s); {os.cpu_count()} CPUs; "
          f"loadavg before {load['before']}, after {load['after']}")
    print()
    print(table)
    doc = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "python": platform.python_version(), "loadavg": load},
           "setup": info, "summary": summaries, "raw": results}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gate-bench.json").write_text(json.dumps(doc, indent=2), "utf-8")
    print(f"\nraw numbers: {out_dir / 'gate-bench.json'}")


if __name__ == "__main__":
    main()
