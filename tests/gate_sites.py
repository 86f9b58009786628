"""Build small real sites for gate tests: a source file, a contract, a key."""

from __future__ import annotations

import csv
import sqlite3
from pathlib import Path
from typing import Any

import yaml

from client.site_key import generate_key_file

HEADER = ["customer_id", "name", "email", "spend", "visits", "channel", "member", "consent"]
ROWS = [
    ["A1", "Ann Smith", "ann@example.com", "120.5", "3", "web", "yes", "true"],
    ["A2", "Bob Jones", "bob@example.com", "5000", "40", "store", "no", "true"],
    ["A3", "Cy Young", "cy@example.com", "75", "2", "store", "no", "false"],
    ["A4", "Di Ross", "di@example.com", "10", "12", "web", "yes", "true"],
]


def contract_doc(**changes: Any) -> dict[str, Any]:
    """A valid customer-level contract over HEADER (changes replace top-level keys)."""
    doc: dict[str, Any] = {
        "contract": "fedseg.data-contract/1",
        "purpose": "segmentation",
        "site": {"name": "north"},
        "source": {"path": "customers.csv"},
        "subject_id": "customer_id",
        "direct_identifiers": ["name", "email"],
        "consent": {"mode": "column", "column": "consent"},
        "features": [
            {"name": "spend", "unit": "EUR", "label": "Annual spend", "high": "big spenders",
             "low": "small spenders", "clip": [0, 1000], "transform": "log1p"},
            {"name": "visits", "unit": "visits/year"},
            {"name": "channel", "type": "categorical", "vocabulary": ["store", "web"]},
            {"name": "member", "type": "boolean", "label": "loyalty member"},
        ],
    }
    doc.update(changes)
    return doc


def write_csv(path: Path, rows: list[list[str]], header: list[str] | None = None) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header or HEADER)
        writer.writerows(rows)
    return path


def write_sqlite(path: Path, rows: list[list[str]], *, table: str = "customers",
                 header: list[str] | None = None) -> Path:
    header = header or HEADER
    con = sqlite3.connect(path)
    con.execute(f"CREATE TABLE {table} (" + ", ".join(f'"{h}"' for h in header) + ")")
    con.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * len(header))})", rows)
    con.commit()
    con.close()
    return path


def make_site(tmp: Path, *, rows: list[list[str]] | None = None, **changes: Any) -> Path:
    """Write customers.csv, contract.yaml and site.key into ``tmp``; return the contract."""
    tmp.mkdir(parents=True, exist_ok=True)
    write_csv(tmp / "customers.csv", ROWS if rows is None else rows)
    contract = tmp / "contract.yaml"
    contract.write_text(yaml.safe_dump(contract_doc(**changes), sort_keys=False), "utf-8")
    if not (tmp / "site.key").exists():
        generate_key_file(tmp / "site.key")
    return contract
