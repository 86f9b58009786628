"""Site key and site store throughput: pseudonyms, consent import and state, assignments.

Usage::

    .venv/bin/python -m simulations.bench.site_store [--subjects 250000] [--ids 1000000]
        [--url sqlite:///path/store.db | postgresql+psycopg://user@host/db]

Generates a fresh site key in a temporary directory, pseudonymises ``--ids`` synthetic customer
ids, then on a fresh store (a temporary SQLite file unless ``--url`` names an empty database):
imports one consent record per subject (every fifth withdrawn a day later, each payload
encrypted), computes the consent state over all of them (each payload decrypted), and writes
one segment assignment per subject. Prints wall and CPU seconds per step and the peak resident
memory of the process (``resource.getrusage``: includes the interpreter and the test data).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from client.site_key import generate_key_file
from client.site_store import SiteStore

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def _timed(label: str, step: Callable[[], Any]) -> Any:
    """Run one step and print its wall and CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = step()
    print(f"{label:<34} wall {time.perf_counter() - wall:6.3f} s   "
          f"cpu {time.process_time() - cpu:6.3f} s")
    return result


def _peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux, B on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def main() -> None:
    """Run the benchmark and print its numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=250_000)
    parser.add_argument("--ids", type=int, default=1_000_000)
    parser.add_argument("--url", default=None, help="store URL (default: a temporary SQLite)")
    args = parser.parse_args()
    n = args.subjects
    with tempfile.TemporaryDirectory(prefix="fedseg-bench-store-") as tmp:
        key = generate_key_file(Path(tmp) / "site.key")
        raw = [f"CUST-{i:09d}" for i in range(max(args.ids, n))]
        pseudonyms = _timed(f"pseudonymise({args.ids:,} ids)",
                            lambda: key.pseudonymise(raw[: args.ids]))
        ps = pseudonyms[:n] if len(pseudonyms) >= n else key.pseudonymise(raw[:n])
        records = [
            (p, T0 + timedelta(seconds=i), T0 + timedelta(days=1, seconds=i) if i % 5 == 0
             else None, "crm-export")
            for i, p in enumerate(ps)
        ]
        segment_ids = [i % 5 for i in range(n)]
        names = [f"segment-{s}" for s in segment_ids]
        url = args.url or f"sqlite:///{tmp}/store.db"
        with SiteStore(url, key) as store:
            _timed(f"import_consents({n:,})",
                   lambda: store.import_consents(records, purpose="segmentation"))
            active, withdrawn = _timed(
                f"consent_state({n:,})",
                lambda: store.consent_state("segmentation", T0 + timedelta(days=2)),
            )
            _timed(f"replace_assignments({n:,})",
                   lambda: store.replace_assignments(ps, segment_ids, names,
                                                     model_sha256="0" * 64, at=T0))
            print(f"consent_state: {len(active):,} active, {len(withdrawn):,} withdrawn; "
                  f"store {store.url}")
    print(f"peak RSS {_peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
