"""Customer CSV reading: DuckDB fast path vs the line-by-line reference reader, one run.

Usage::

    .venv/bin/python -m simulations.bench.csv_reader [--rows 1000000]

Writes a synthetic customer CSV (id, name, email, 7 features, region; the columns a real export
has), reads its 7 features and the site column with both readers (and the gzip-compressed copy
with the fast path), checks they return identical arrays, and prints seconds, the ratio and
peak memory (tracemalloc, Python allocations only).
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from client.csv_source import _read_reference, read_customer_csv
from simulations.datasets import synthetic_features
from simulations.synthetic import generate_customers


def _timed(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    seconds = time.perf_counter() - started
    tracemalloc.start()  # a second, traced call: tracing slows allocations, so not timed
    fn(*args, **kwargs)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, seconds, peak


def main() -> None:
    """Write the file, read it both ways, print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    features = synthetic_features()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "customers.csv"
        generate_customers(num_customers=args.rows, num_regions=5, seed=0).to_csv(path)
        gz = path.with_suffix(".csv.gz")
        with path.open("rb") as src, gzip.open(gz, "wb", compresslevel=1) as dst:
            shutil.copyfileobj(src, dst)
        kwargs = {"features": features, "site_column": "region"}
        fast, t_fast, m_fast = _timed(read_customer_csv, path, **kwargs)
        slow, t_slow, m_slow = _timed(_read_reference, path, **kwargs)
        zipped, t_gz, _ = _timed(read_customer_csv, gz, **kwargs)
    assert np.array_equal(fast.raw, slow.raw) and np.array_equal(fast.raw, zipped.raw)
    assert fast.sites is not None and slow.sites is not None
    assert fast.sites.tolist() == slow.sites.tolist()
    print(f"{args.rows:,} rows, {fast.raw.shape[1]} features + site column (identical results)")
    print("| reader | seconds | peak Python memory |\n|---|---|---|")
    print(f"| line-by-line reference | {t_slow:.2f} | {m_slow / 2**20:,.0f} MiB |")
    print(f"| DuckDB (fast path) | {t_fast:.2f} | {m_fast / 2**20:,.0f} MiB |")
    print(f"| DuckDB on .csv.gz | {t_gz:.2f} | - |")
    print(f"speed-up: {t_slow / t_fast:.1f}x")


if __name__ == "__main__":
    main()
