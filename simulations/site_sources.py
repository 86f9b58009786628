"""Simulated sites as real sites: each partition written as a source file behind a contract.

A simulation splits one population into sites; this module turns each part into what a real
site has -- a source table (SQLite, Parquet or CSV) with the customers' ids, direct
identifiers (name, email), consent flag and features, a data contract naming what may be read,
a site key and (created by the gate on first use) an encrypted site store -- so that every
simulated ClientApp reads its records through the same privacy gate as a deployed site
(:class:`GatedSites`).

Columns are typed as a real source would hold them: a numeric feature is a number column, a
boolean feature a boolean column (``INTEGER`` 0/1 in SQLite, ``BOOLEAN`` in Parquet,
``true``/``false`` in CSV) declared ``type: boolean``, and the consecutive one-hot columns
``<feature>=<value>`` of one categorical feature one text column holding the value, declared
``type: categorical`` with its vocabulary in the feature list's order -- so the gate's
:meth:`~client.contract.DataContract.feature_specs` and matrix are the population's own.
"""

from __future__ import annotations

import csv
import hashlib
import json
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


def _feature_groups(features: tuple[FeatureSpec, ...]) -> list[tuple[str, list[int]]]:
    """Split the feature list into source columns: (column name, feature indices).

    A numeric or boolean feature is one column; the consecutive ``kind="category"`` columns of
    one ``group`` are one text column named after the group.
    """
    out: list[tuple[str, list[int]]] = []
    for j, f in enumerate(features):
        if f.kind == "category" and out and features[out[-1][1][-1]].group == f.group \
                and features[out[-1][1][-1]].kind == "category":
            out[-1][1].append(j)
        else:
            out.append((f.group if f.kind == "category" else f.name, [j]))
    return out


def _value(spec: FeatureSpec) -> str:
    """Return the vocabulary value of one one-hot column ``<group>=<value>``."""
    prefix = f"{spec.group}="
    if not spec.name.startswith(prefix):
        raise ConfigError(f"feature {spec.name!r} of categorical feature {spec.group!r} should "
                          f"be named {prefix}<value>.")
    return spec.name[len(prefix):]


def _contract_features(features: tuple[FeatureSpec, ...],
                       bounds: dict[str, tuple[float, float]]) -> list[dict[str, Any]]:
    """Return the contract's ``features`` section whose gate output is exactly ``features``."""
    feats = []
    for column, members in _feature_groups(features):
        f = features[members[0]]
        entry: dict[str, Any]
        if f.kind == "category":
            values = [_value(features[j]) for j in members]
            suffix = f": {values[0]}"
            label = f.title[:-len(suffix)] if f.title.endswith(suffix) else ""
            entry = {"name": column, "type": "categorical", "label": label,
                     "vocabulary": values}
        elif f.kind == "boolean":
            entry = {"name": f.name, "type": "boolean", "label": f.title, "high": f.high_label,
                     "low": f.low_label}
        else:
            entry = {"name": f.name, "unit": f.unit, "label": f.title, "high": f.high_label,
                     "low": f.low_label, "transform": f.transform}
            if f.name in bounds:
                entry["clip"] = [float(bounds[f.name][0]), float(bounds[f.name][1])]
        feats.append({k: v for k, v in entry.items() if v not in ("", None)})
    return feats


def _contract(features: tuple[FeatureSpec, ...], bounds: dict[str, tuple[float, float]],
              *, name: str, fmt: str, state_dir: Path) -> dict[str, Any]:
    source: dict[str, Any] = (
        {"url": "sqlite:///customers.sqlite", "table": "customers"} if fmt == "sqlite"
        else {"path": f"customers.{fmt}"})
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
        "features": _contract_features(features, bounds),
    }


def _feature_columns(features: tuple[FeatureSpec, ...],
                     raw: NDArray[np.float64]) -> dict[str, NDArray[Any]]:
    """Source columns of the records ``raw``: numbers, 0/1 flags (int), category values (str)."""
    columns: dict[str, NDArray[Any]] = {}
    for column, members in _feature_groups(features):
        f = features[members[0]]
        if f.kind == "category":
            block = raw[:, members]
            valid = np.all((block == 0.0) | (block == 1.0), axis=1) & (block.sum(axis=1) == 1.0)
            if not np.all(valid):
                row = int(np.flatnonzero(~valid)[0])
                raise DataError(f"record {row}: the one-hot columns of categorical feature "
                                f"{column!r} are {block[row].tolist()}; expected exactly one 1 "
                                "and 0 elsewhere.", column=column)
            values = np.asarray([_value(features[j]) for j in members], dtype=np.str_)
            columns[column] = values[np.argmax(block, axis=1)]
        elif f.kind == "boolean":
            flag = raw[:, members[0]]
            if not np.all((flag == 0.0) | (flag == 1.0)):
                row = int(np.flatnonzero((flag != 0.0) & (flag != 1.0))[0])
                raise DataError(f"record {row}: boolean feature {column!r} is {flag[row]!r}; "
                                "expected 0 or 1.", column=column)
            columns[column] = flag.astype(np.int64)
        else:
            columns[column] = raw[:, members[0]]
    return columns


def _write_table(path: Path, fmt: str, columns: dict[str, NDArray[Any]],
                 features: tuple[FeatureSpec, ...]) -> None:
    names = list(columns)
    kinds = {column: features[members[0]].kind for column, members in _feature_groups(features)}
    rows = zip(*(columns[c].tolist() for c in names), strict=True)
    if fmt == "sqlite":
        sql_types = {"numeric": "REAL", "boolean": "INTEGER", "category": "TEXT"}
        types = {c: sql_types[kinds[c]] if c in kinds else "TEXT" for c in names}
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
            duck_types = {"numeric": "DOUBLE", "boolean": "BOOLEAN", "category": "VARCHAR"}
            types = {c: duck_types[kinds[c]] if c in kinds else "VARCHAR" for c in names}
            types["consent"] = "BOOLEAN"
            spec = "{" + ", ".join(f"'{c}': '{types[c]}'" for c in names) + "}"
            ddb.execute(f"COPY (SELECT * FROM read_csv(?, header=true, columns={spec})) "
                        "TO ? (FORMAT parquet)", [str(csv_path), str(path)])
        finally:
            ddb.close()
        csv_path.unlink()


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
    written_for = {"population": population.description, "sites": len(parts), "format": fmt,
                   "fingerprint": sites_fingerprint(population, parts)}
    marker = sites_dir / SITES_MARKER
    if all(c.is_file() for c in contracts):
        _check_reuse(marker, written_for)
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
        columns.update(_feature_columns(features, population.raw[rows]))
        if declined is not None and declined.ids is not None:
            mine = np.arange(i, declined.raw.shape[0], len(parts))
            extra = {"customer_id": declined.ids[mine],
                     **{k: v[mine] for k, v in declined.identifiers.items()},
                     "consent": np.zeros(len(mine), dtype=np.int64),
                     **_feature_columns(features, declined.raw[mine])}
            columns = {k: np.concatenate([v, extra[k]]) for k, v in columns.items()}
        if fmt != "sqlite":
            columns["consent"] = np.where(columns["consent"] == 1, "true", "false")
            for column, members in _feature_groups(features):
                if features[members[0]].kind == "boolean":
                    columns[column] = np.where(columns[column] == 1, "true", "false")
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
    marker.write_text(json.dumps(written_for, indent=2) + "\n", encoding="utf-8")
    return contracts


SITES_MARKER = "fedseg-sites.json"
"""Written beside the ``site-<i>/`` directories: which population and split they hold."""


def sites_fingerprint(population: Any, parts: list[NDArray[np.intp]]) -> str:
    """SHA-256 over the simulated customers and their split (what the site sources hold)."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(population.raw, dtype=np.float64).tobytes())
    for rows in parts:
        digest.update(len(rows).to_bytes(8, "little"))
        digest.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    if population.declined is not None:
        digest.update(np.ascontiguousarray(population.declined.raw, dtype=np.float64).tobytes())
    return digest.hexdigest()


def _check_reuse(marker: Path, wanted: dict[str, Any]) -> None:
    """Refuse to reuse sites written for another population (a rerun into the same directory).

    Reusing them would federate the old customers while the run reports on the new ones.
    """
    if not marker.is_file():  # written before fedseg recorded it: nothing to compare
        return
    try:
        held = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{marker}: unreadable ({exc}); delete it to rewrite the simulated "
                          "sites, or point federation.sites_dir elsewhere.") from exc
    if held.get("fingerprint") != wanted["fingerprint"]:
        raise ConfigError(
            f"the simulated sites under {marker.parent} hold another population "
            f"({held.get('population')!r}, {held.get('sites')} sites) than this run's "
            f"({wanted['population']!r}, {wanted['sites']} sites): reusing them would "
            "federate the old customers while reporting on the new ones. Use a new run "
            f"directory, point federation.sites_dir elsewhere, or delete {marker.parent} "
            "(its consent changes and erasures go with it).")


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
