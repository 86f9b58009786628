"""The data contract: one YAML file per site saying what the site may read and how.

A site's data team signs off on this file. It names the source (a CSV, ``.csv.gz`` or Parquet
file, or a table behind a SQLAlchemy URL), the subject-id column, the direct identifiers the
gate must never load, the feature allowlist (type, unit, bounds, transform, and the words a
marketer reads), for transaction-level sources the aggregation to customer features, where
consent lives, the purpose, and what to do with invalid rows. Everything else in the source is
never read.

The schema is one set of pydantic models (:class:`DataContract`): a wrong key, type or value is
reported as ``<file>: <key path>: <what was expected>``. Relative paths (source file, key file,
SQLite URLs) are resolved against the contract's own directory.

Example (``conf/contracts/customers.yaml`` holds a commented one)::

    contract: fedseg.data-contract/1
    purpose: segmentation
    site: {name: north}
    source: {path: customers.parquet}
    subject_id: customer_id
    direct_identifiers: [name, email, phone]
    consent: {mode: column, column: consent}
    features:
      - {name: monetary, unit: EUR/year, label: Annual spend, high: big spenders,
         low: small spenders, clip: [0, 100000], transform: log1p}
      - {name: channel, type: categorical, vocabulary: [store, web, app]}
"""

from __future__ import annotations

import unicodedata
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.errors import ConfigError
from common.features import FeatureSpec

CONTRACT_FORMAT = "fedseg.data-contract/1"
PURPOSES = ("segmentation",)
AGGREGATES = ("recency_days", "frequency", "monetary", "average_basket", "tenure_days",
              "category_share")
"""Customer features a transaction-level source can be aggregated to (see ``client.sources``)."""

_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


def _fold(name: str) -> str:
    """Fold a column name for comparison with direct identifiers (NFKC, trimmed, casefold)."""
    return unicodedata.normalize("NFKC", name).strip().casefold()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteSettings(_Strict):
    """Where the site keeps its secret, its store and its files (relative to the contract).

    ``state_dir`` holds the audit log (``audit/site-<name>.jsonl``), the site log, the round
    ledger and the privacy ledger.
    """

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    key_file: str = "site.key"
    store: str = "sqlite:///site-store.sqlite"
    state_dir: str = "."


class SourceSpec(_Strict):
    """The table the site reads: a file (``path``) or a SQL table (``url`` + ``table``)."""

    path: str | None = None
    url: str | None = None
    table: str | None = None
    format: Literal["csv", "parquet", "sql"] | None = None
    level: Literal["customer", "transaction"] = "customer"

    @model_validator(mode="after")
    def _one_source(self) -> SourceSpec:
        if (self.path is None) == (self.url is None):
            raise ValueError("give exactly one of source.path (a CSV or Parquet file) or "
                             "source.url (a SQLAlchemy URL, with source.table)")
        if self.url is not None and not self.table:
            raise ValueError("source.url needs source.table (the table to read)")
        if self.url is not None:
            from sqlalchemy.engine import make_url
            from sqlalchemy.exc import ArgumentError

            try:
                make_url(self.url)
            except (ArgumentError, ValueError):
                raise ValueError("source.url is not a SQLAlchemy URL (e.g. "
                                 "sqlite:///customers.sqlite or "
                                 "postgresql+psycopg://user@host:5432/db)") from None
        if self.path is not None and self.format == "sql":
            raise ValueError("source.format=sql needs source.url, not source.path")
        return self

    @property
    def kind(self) -> str:
        """``csv``, ``parquet`` or ``sql`` (from ``format``, else the path's suffix)."""
        if self.format is not None:
            return self.format
        if self.url is not None:
            return "sql"
        assert self.path is not None
        name = self.path.lower()
        if name.endswith((".parquet", ".pq")):
            return "parquet"
        return "csv"


class TransactionSpec(_Strict):
    """Columns of a transaction-level source and the date the features are computed at."""

    timestamp: str
    amount: str
    as_of: date | datetime
    order_id: str | None = None
    category: str | None = None

    @property
    def as_of_utc(self) -> datetime:
        """``as_of`` as an aware UTC datetime (a date means its midnight, UTC)."""
        value = self.as_of
        if not isinstance(value, datetime):
            value = datetime(value.year, value.month, value.day)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else \
            value.astimezone(UTC)


class ConsentSpec(_Strict):
    """Where consent lives.

    ``ledger``: only the site store's consent ledger (``fedseg-site consent import|grant``).
    ``column``: a boolean column of a customer-level source says who agreed; a withdrawal in
    the ledger (``fedseg-site consent withdraw``) still overrides it.
    """

    mode: Literal["ledger", "column"] = "ledger"
    column: str | None = None

    @model_validator(mode="after")
    def _column(self) -> ConsentSpec:
        if (self.mode == "column") != (self.column is not None):
            raise ValueError("consent.mode=column needs consent.column, and only it")
        return self


class FeatureContract(_Strict):
    """One allowed feature: its type, unit, bounds, transform and reader-facing words."""

    name: Annotated[str, Field(pattern=_NAME)]
    column: str | None = None
    aggregate: Literal["recency_days", "frequency", "monetary", "average_basket",
                       "tenure_days", "category_share"] | None = None
    category: str | None = None
    type: Literal["numeric", "boolean", "categorical"] = "numeric"
    unit: str = ""
    label: str = ""
    high: str = ""
    low: str = ""
    clip: tuple[float, float] | None = None
    transform: Literal["none", "log1p"] = "none"
    vocabulary: list[str] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> FeatureContract:
        if self.type == "categorical":
            if not self.vocabulary:
                raise ValueError("a categorical feature needs its vocabulary (the allowed "
                                 "values, declared: never learned from the data)")
            if len(set(self.vocabulary)) != len(self.vocabulary):
                raise ValueError("vocabulary lists a value twice")
        elif self.vocabulary is not None:
            raise ValueError("only categorical features take a vocabulary")
        if self.type != "numeric" and (self.clip is not None or self.transform != "none"):
            raise ValueError("clip and transform apply to numeric features only")
        if self.clip is not None:
            low, high = self.clip
            if not low < high:
                raise ValueError(f"clip [{low}, {high}] needs low < high")
            if self.transform == "log1p" and low <= -1:
                raise ValueError("log1p needs clip low > -1")
        if self.aggregate is not None:
            if self.column is not None:
                raise ValueError("give column (customer-level) or aggregate "
                                 "(transaction-level), not both")
            if self.type != "numeric":
                raise ValueError("aggregated features are numeric")
            if (self.aggregate == "category_share") != (self.category is not None):
                raise ValueError("aggregate category_share needs category (and only it)")
        elif self.category is not None:
            raise ValueError("category is for aggregate: category_share")
        return self

    @property
    def source_column(self) -> str:
        """The source column read for this feature (customer-level sources)."""
        return self.column or self.name


class DataContract(_Strict):
    """A site's data contract (module docstring)."""

    contract: Literal["fedseg.data-contract/1"]
    purpose: Literal["segmentation"] = "segmentation"
    site: SiteSettings
    source: SourceSpec
    subject_id: str
    direct_identifiers: list[str] = Field(default_factory=list)
    consent: ConsentSpec = ConsentSpec()
    transactions: TransactionSpec | None = None
    features: Annotated[list[FeatureContract], Field(min_length=1)]
    on_invalid: Literal["error", "quarantine"] = "error"
    base_dir: Path = Field(default=Path("."), exclude=True)

    @model_validator(mode="after")
    def _consistent(self) -> DataContract:
        names = [f.name for f in self.features]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"features {twice} are declared twice")
        identifiers = set(self.direct_identifiers)
        transaction = self.source.level == "transaction"
        if transaction and self.transactions is None:
            raise ValueError("source.level=transaction needs a transactions section "
                             "(timestamp, amount, as_of columns)")
        if not transaction and self.transactions is not None:
            raise ValueError("a transactions section needs source.level=transaction")
        if transaction and self.consent.mode == "column":
            raise ValueError("a transaction-level source keeps consent in the ledger "
                             "(consent.mode=ledger; fedseg-site consent import FILE)")
        used: dict[str, str] = {"subject_id": self.subject_id}
        if self.consent.column:
            used["consent.column"] = self.consent.column
        for f in self.features:
            if transaction and f.aggregate is None:
                raise ValueError(f"feature {f.name!r}: a transaction-level source needs an "
                                 f"aggregate (one of {', '.join(AGGREGATES)})")
            if not transaction and f.aggregate is not None:
                raise ValueError(f"feature {f.name!r}: aggregate needs "
                                 "source.level=transaction")
            if f.aggregate == "category_share" and (
                    self.transactions is None or self.transactions.category is None):
                raise ValueError(f"feature {f.name!r}: category_share needs "
                                 "transactions.category")
            if not transaction:
                used[f"features.{f.name}"] = f.source_column
        if self.transactions is not None:
            for key in ("timestamp", "amount", "order_id", "category"):
                column = getattr(self.transactions, key)
                if column is not None:
                    used[f"transactions.{key}"] = column
        folded = {_fold(i) for i in identifiers}
        for key, column in used.items():
            if _fold(column) in folded:
                raise ValueError(f"{key} reads column {column!r}, which the contract lists as "
                                 "a direct identifier: direct identifiers are never loaded")
        if not transaction:
            columns = [c for k, c in used.items() if k.startswith("features.")]
            shared = sorted({c for c in columns if columns.count(c) > 1} |
                            ({self.subject_id} & set(columns)))
            if shared:
                raise ValueError(f"column(s) {shared} are read for two purposes")
        return self

    # -- derived, public views ---------------------------------------------------------------

    def feature_specs(self) -> tuple[FeatureSpec, ...]:
        """Return the public feature list (a categorical feature gives one 0/1 column per value)."""
        specs: list[FeatureSpec] = []
        for f in self.features:
            label = f.label or f.name.replace("_", " ")
            if f.type == "categorical":
                assert f.vocabulary is not None
                for value in f.vocabulary:
                    specs.append(FeatureSpec(
                        name=f"{f.name}={value}", unit="share", label=f"{label}: {value}",
                        kind="category", group=f.name,
                        high_label=f"mostly {value}" if not f.high else f"{f.high} {value}",
                        low_label=f"rarely {value}" if not f.low else f"{f.low} {value}"))
            else:
                specs.append(FeatureSpec(
                    name=f.name, unit="share" if f.type == "boolean" else f.unit,
                    transform=f.transform, label=label,
                    kind="boolean" if f.type == "boolean" else "numeric",
                    high_label=f.high or (label if f.type == "boolean" else ""),
                    low_label=f.low or (f"not {label}" if f.type == "boolean" else "")))
        return tuple(specs)

    def declared_bounds(self) -> dict[str, tuple[float, float]]:
        """Raw bounds per public feature: ``clip`` for numeric ones, [0, 1] for the others."""
        bounds: dict[str, tuple[float, float]] = {}
        for f, specs in zip(self.features, self._specs_per_feature(), strict=True):
            for spec in specs:
                if f.type != "numeric":
                    bounds[spec.name] = (0.0, 1.0)
                elif f.clip is not None:
                    bounds[spec.name] = (float(f.clip[0]), float(f.clip[1]))
        return bounds

    def _specs_per_feature(self) -> list[list[FeatureSpec]]:
        specs = iter(self.feature_specs())
        return [[next(specs) for _ in range(len(f.vocabulary or [None]))]
                if f.type == "categorical" else [next(specs)] for f in self.features]

    def resolve(self, location: str) -> Path:
        """Resolve a path from the contract, relative to the contract's directory."""
        path = Path(location).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def resolve_url(self, url: str) -> str:
        """Resolve a SQLAlchemy URL; a relative SQLite file is taken relative to the contract."""
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////") \
                and url != "sqlite:///:memory:":
            return "sqlite:///" + str(self.resolve(url[len("sqlite:///"):]))
        return url

    @property
    def source_location(self) -> str:
        """The source as a user reads it: the resolved file path or the URL and table."""
        if self.source.path is not None:
            return str(self.resolve(self.source.path))
        from sqlalchemy.engine import make_url

        shown = make_url(self.resolve_url(str(self.source.url))).render_as_string(
            hide_password=True)
        return f"{shown} table {self.source.table}"

    @property
    def key_path(self) -> Path:
        """The site key file."""
        return self.resolve(self.site.key_file)

    @property
    def state_dir(self) -> Path:
        """The site's directory of logs and ledgers."""
        return self.resolve(self.site.state_dir)

    @property
    def store_url(self) -> str:
        """The site store's SQLAlchemy URL."""
        return self.resolve_url(self.site.store)


def _key_path(loc: tuple[Any, ...], data: Any) -> str:
    """``features.2.type`` -> ``features[2] (name 'x').type`` where the item has a name."""
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            label = f"[{item}]"
            if isinstance(node, list) and 0 <= item < len(node) and isinstance(node[item], dict) \
                    and "name" in node[item]:
                label += f" (name {node[item]['name']!r})"
            parts.append(label)
            node = node[item] if isinstance(node, list) and 0 <= item < len(node) else None
        else:
            parts.append(("." if parts else "") + str(item))
            node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts) or "(top level)"


def parse_contract(data: Any, *, where: str, base_dir: Path | None = None) -> DataContract:
    """Validate a parsed contract document.

    Parameters
    ----------
    data : object
        The YAML document (a mapping).
    where : str
        The file name, for messages.
    base_dir : Path, optional
        Directory relative paths are resolved against (default: the current directory).

    Raises
    ------
    ConfigError
        Naming the file, the key path and what was expected, one line per problem.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"data contract {where}: expected a mapping of keys (contract, site, "
                          f"source, subject_id, features, ...), got {type(data).__name__}.")
    try:
        contract = DataContract.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = _key_path(tuple(err["loc"]), data)
            message = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown key (check its spelling; the schema is in client/contract.py)"
            elif err["type"] == "missing":
                message = "required key is missing"
            lines.append(f"  {key}: {message}")
        raise ConfigError(f"data contract {where} is not valid:\n" + "\n".join(lines)) from None
    return contract.model_copy(update={"base_dir": base_dir or Path(".")})


def load_contract(path: str | Path) -> DataContract:
    """Read and validate a data contract YAML file.

    Parameters
    ----------
    path : str or Path
        The contract file.

    Raises
    ------
    ConfigError
        The file is missing, not YAML, or not a valid contract (message names the key).
    """
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"data contract {where} not found.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"data contract {where} cannot be read ({exc}).") from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"data contract {where} is nested too deeply to be a contract."
                          ) from None
    except ValueError as exc:  # e.g. a date that cannot exist (as_of: 2026-13-45)
        raise ConfigError(f"data contract {where} is not valid YAML: {exc}.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"data contract {where} is not valid YAML{at}: {problem}.") from None
    return parse_contract(data, where=where, base_dir=path.resolve().parent)


def source_columns(contract: DataContract) -> list[str]:
    """Every source column the contract reads (the projection), in a stable order."""
    columns = [contract.subject_id]
    if contract.consent.column:
        columns.append(contract.consent.column)
    if contract.transactions is not None:
        t = contract.transactions
        columns += [c for c in (t.timestamp, t.amount, t.order_id, t.category) if c]
    else:
        columns += [f.source_column for f in contract.features]
    seen: list[str] = []
    for c in columns:
        if c not in seen:
            seen.append(c)
    return seen


def quote_identifier(name: str) -> str:
    """Quote a column name for SQL (double quotes, doubled inside)."""
    return '"' + name.replace('"', '""') + '"'

