"""Simulated sites as real sites: each partition written as a source file behind a contract.

A simulation splits one population into sites; this module turns each part into what a real
site has -- a source table (SQLite, Parquet or CSV) with the customers' ids, direct
identifiers (name, email), consent flag and features, a data contract naming what may be read,
a site key and (created by the gate on first use) an encrypted site store -- so that every
simulated ClientApp reads its records through the same privacy gate as a deployed site
(:class:`GatedSites`).
"""

from __future__ import annotations

import csv
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from flwr.app import Context
from numpy.typing import NDArray

from client.contract import CONTRACT_FORMAT
from client.gate import SiteData, open_gate
from client.site_key import generate_key_file
from client.site_store import SiteStore
from common.errors import ConfigError, DataError
from common.features import FeatureSpec

SOURCE_FORMATS = ("sqlite", "parquet", "csv")
CONTRACT_FILE = "contract.yaml"


def _contract(features: tuple[FeatureSpec, ...], bounds: dict[str, tuple[float, float]],
              *, name: str, fmt: str, state_dir: Path) -> dict[str, Any]:
    source: dict[str, Any] = (
        {"url": "sqlite:///customers.sqlite", "table": "customers"} if fmt == "sqlite"
        else {"path": f"customers.{fmt}"})
    feats = []
    for f in features:
        entry: dict[str, Any] = {"name": f.name, "unit": f.unit, "label": f.title,
                                 "high": f.high_label, "low": f.low_label,
                                 "transform": f.transform}
        if f.name in bounds:
            entry["clip"] = [float(bounds[f.name][0]), float(bounds[f.name][1])]
        feats.append({k: v for k, v in entry.items() if v not in ("", None)})
    return {
        "contract": CONTRACT_FORMAT,
        "purpose": "segmentation",
        "site": {"name": name, "key_file": "site.key", "store": "sqlite:///site-store.sqlite",
                 "state_dir": str(state_dir)},
        "source": source,
        "subject_id": "customer_id",
        "direct_identifiers": ["name", "email"],
        "consent": {"mode": "column", "column": "consent"},
        "on_invalid": "error",
        "features": feats,
    }


def _write_table(path: Path, fmt: str, columns: dict[str, NDArray[Any]],
                 features: tuple[FeatureSpec, ...]) -> None:
    names = list(columns)
    n = len(next(iter(columns.values())))
    rows = zip(*(columns[c].tolist() for c in names), strict=True)
    if fmt == "sqlite":
        types = {c: "REAL" if c in {f.name for f in features} else "TEXT" for c in names}
        types["consent"] = "INTEGER"
        con = sqlite3.connect(path)
        try:
            con.execute("CREATE TABLE customers (" + ", ".join(
                f'"{c}" {types[c]}' for c in names) + ")")
            con.executemany(f"INSERT INTO customers VALUES ({', '.join('?' * len(names))})",
                            rows)
            con.commit()
        finally:
            con.close()
        return
    csv_path = path if fmt == "csv" else path.with_suffix(".tmp.csv")
    with csv_path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(names)
        for row in rows:
            writer.writerow([repr(v) if isinstance(v, float) else v for v in row])
    if fmt == "parquet":
        import duckdb

        ddb = duckdb.connect()
        try:
            kinds = {c: "DOUBLE" if c in {f.name for f in features} else "VARCHAR"
                     for c in names}
            kinds["consent"] = "BOOLEAN"
            spec = "{" + ", ".join(f"'{c}': '{kinds[c]}'" for c in names) + "}"
            ddb.execute(f"COPY (SELECT * FROM read_csv(?, header=true, columns={spec})) "
                        "TO ? (FORMAT parquet)", [str(csv_path), str(path)])
        finally:
            ddb.close()
        csv_path.unlink()
    assert n >= 0


def write_sites(
    population: Any,
    parts: list[NDArray[np.intp]],
    *,
    sites_dir: Path,
    state_dir: Path,
    fmt: str = "sqlite",
) -> tuple[Path, ...]:
    """Write one source + contract + key per site, or reuse the sites already there.

    Parameters
    ----------
    population : simulations.datasets.Population
        Consenting customers (and ``declined`` ones, written with consent false and spread
        over the sites in turn).
    parts : list of ndarray
        Row indices of each site.
    sites_dir : Path
        ``site-<i>/`` directories go here. Where every site's contract already exists, the
        sites are reused as they are (their sources, keys, stores, consent and erasures).
    state_dir : Path
        The sites' audit logs, site logs and ledgers (the run directory in simulation).
    fmt : str
        ``sqlite`` (default), ``parquet`` or ``csv``.

    Returns
    -------
    tuple of Path
        The contract of each site, in partition order.
    """
    if fmt not in SOURCE_FORMATS:
        raise ConfigError(f"federation.site_source={fmt!r} should be one of "
                          f"{', '.join(SOURCE_FORMATS)}.")
    contracts = tuple(sites_dir / f"site-{i}" / CONTRACT_FILE for i in range(len(parts)))
    if all(c.is_file() for c in contracts):
        return contracts
    features = population.features
    n_all = population.raw.shape[0]
    ids = population.ids if population.ids is not None else np.asarray(
        [f"R{i:07d}" for i in range(1, n_all + 1)])
    declined = population.declined
    for i, rows in enumerate(parts):
        site = sites_dir / f"site-{i}"
        site.mkdir(parents=True, exist_ok=True)
        columns: dict[str, NDArray[Any]] = {"customer_id": ids[rows]}
        for key, values in population.identifiers.items():
            columns[key] = values[rows]
        columns["consent"] = np.ones(len(rows), dtype=np.int64)
        for j, f in enumerate(features):
            columns[f.name] = population.raw[rows, j]
        if declined is not None and declined.ids is not None:
            mine = np.arange(i, declined.raw.shape[0], len(parts))
            extra = {"customer_id": declined.ids[mine],
                     **{k: v[mine] for k, v in declined.identifiers.items()},
                     "consent": np.zeros(len(mine), dtype=np.int64),
                     **{f.name: declined.raw[mine, j] for j, f in enumerate(features)}}
            columns = {k: np.concatenate([v, extra[k]]) for k, v in columns.items()}
        if fmt != "sqlite":
            columns["consent"] = np.where(columns["consent"] == 1, "true", "false")
        source = site / ("customers.sqlite" if fmt == "sqlite" else f"customers.{fmt}")
        source.unlink(missing_ok=True)
        _write_table(source, fmt, columns, features)
        document = _contract(features, population.bounds, name=str(i), fmt=fmt,
                             state_dir=state_dir.resolve())
        (site / CONTRACT_FILE).write_text(
            "# Data contract of a simulated site (written by simulations/site_sources.py).\n"
            + yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
        if not (site / "site.key").exists():
            generate_key_file(site / "site.key")
    return contracts


@dataclass(frozen=True)
class GatedSites:
    """Site loader: node ``partition-id`` reads its own source through its own gate.

    Picklable (paths only), so Flower's simulation engine can ship it to its workers.
    """

    contracts: tuple[str, ...]

    def __call__(self, context: Context) -> SiteData:
        """Return the records the node's gate lets through now."""
        pid = int(context.node_config["partition-id"])
        if not 0 <= pid < len(self.contracts):
            raise DataError(f"no site {pid}: the simulation has {len(self.contracts)} sites.")
        return open_gate(self.contracts[pid]).load().site

    def store(self, context: Context) -> SiteStore:
        """Return the node's site store (it keeps the head hash of the audit log)."""
        return open_gate(self.contracts[int(context.node_config["partition-id"])]).store
