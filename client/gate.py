"""The privacy gate: the only way a site's records reach a computation.

``PrivacyGate.load()`` runs, in order, at the start of every round a site answers (and for
every ``fedseg-site`` command that needs the data):

1. **contract** -- read only the columns the contract names (:mod:`client.sources`);
2. **validation** -- a missing or duplicate subject id, an unparseable or non-finite number, a
   boolean that is not one, a category outside the declared vocabulary, a row that does not
   split into the header's fields: with ``on_invalid: error`` the first one stops the site with
   file, row and column named; with ``on_invalid: quarantine`` every such row is excluded and
   counted by reason (never silently dropped);
3. **pseudonymisation** -- subject ids become HMAC-SHA256 pseudonyms under the site key; the raw
   ids go no further than this module (they are dropped before :class:`GatedData` is built);
4. **consent** -- only subjects with active consent for the contract's purpose at this moment
   (ledger, or consent column overridden by any withdrawal in the ledger);
5. **erasure** -- subjects in the erasure log are excluded whatever the source says;
6. **minimisation and transforms** -- declared features only, clipped to declared bounds
   (counted), booleans as 0/1, categories one-hot over their declared vocabulary.

The source read, validation and pseudonymisation are cached per process while the source
file is unchanged (size and modification time); consent and erasure are read from the store
on every call, so a withdrawal or an erasure takes effect at the next round of a running
federation.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from client import pseudonyms
from client.contract import DataContract, load_contract
from client.site_key import SiteKey
from client.site_store import SiteStore
from client.sources import SourceRows, normalise_id, read_source
from common.errors import DataError
from common.features import FeatureSpec, apply_transforms


@dataclass(frozen=True)
class SiteData:
    """The records a site computes on: consenting customers, declared features only.

    Attributes
    ----------
    raw : ndarray of shape (n_samples, n_features)
        Raw feature values.
    features : tuple of FeatureSpec
        The public feature list (order of ``raw``'s columns).
    """

    raw: NDArray[np.float64]
    features: tuple[FeatureSpec, ...]

    def __post_init__(self) -> None:
        if self.raw.ndim != 2 or self.raw.shape[1] != len(self.features):
            raise DataError(
                f"site data of shape {self.raw.shape} should have {len(self.features)} columns."
            )

    @cached_property
    def transformed(self) -> NDArray[np.float64]:
        """Features after their declared transforms (before global standardisation)."""
        return apply_transforms(self.raw, self.features)


@dataclass(frozen=True)
class GateReport:
    """What the gate let through and what it excluded, by reason (counts only).

    Attributes
    ----------
    source : str
        The source read.
    rows_read : int
        Customer rows in the source (for transaction sources: customers aggregated).
    used : int
        Rows that passed every step.
    excluded : dict of str to int
        ``invalid``, ``erased``, ``withdrawn``, ``no_consent``.
    invalid_by_reason : dict of str to int
        Invalid rows per column and reason (quarantine mode; empty otherwise).
    clipped : dict of str to int
        Values clipped to the declared bounds, per feature.
    transactions : dict
        For transaction sources: transactions read, invalid, after ``as_of``.
    at : str
        The moment consent was evaluated (ISO 8601, UTC).
    """

    source: str
    rows_read: int
    used: int
    excluded: dict[str, int]
    invalid_by_reason: dict[str, int]
    clipped: dict[str, int]
    transactions: dict[str, Any] = field(default_factory=dict)
    at: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class GatedData:
    """The gate's output: the site's computable records and their pseudonyms, aligned.

    Attributes
    ----------
    site : SiteData
    digests : ndarray of uint8, shape (n, 32)
        Each row's pseudonym as its HMAC-SHA256 digest.
    report : GateReport
    """

    site: SiteData
    digests: NDArray[np.uint8]
    report: GateReport

    @cached_property
    def pseudonyms(self) -> NDArray[Any]:
        """Each row's pseudonym, 64 hex characters (built on first use)."""
        return pseudonyms.to_hex(self.digests)


@dataclass(frozen=True)
class _Validated:
    """Source rows after validation and pseudonymisation (cached between rounds).

    ``digests`` holds the pseudonyms as 32-byte HMAC digests (:mod:`client.pseudonyms`); their
    64-character hex form (``pseudonyms``) is built only when a command asks for it.
    """

    matrix: NDArray[np.float64]
    digests: NDArray[np.uint8]
    consent: NDArray[np.bool_] | None
    rows_read: int
    invalid: dict[str, int]
    clipped: dict[str, int]
    transactions: dict[str, Any]
    location: str

    @cached_property
    def pseudonyms(self) -> NDArray[Any]:
        """The rows' pseudonyms (64 hex characters each)."""
        return pseudonyms.to_hex(self.digests)

    @property
    def size(self) -> int:
        """Number of valid rows."""
        return int(self.digests.shape[0])

    def marks(self, wanted: set[str]) -> NDArray[np.bool_]:
        """Boolean mask of the rows whose pseudonym is in ``wanted``."""
        if not wanted:
            return np.zeros(self.size, dtype=bool)
        return pseudonyms.member_mask(self.digests, pseudonyms.from_hex(wanted))


def _first(mask: NDArray[np.bool_]) -> int | None:
    hits = np.flatnonzero(mask)
    return None if hits.size == 0 else int(hits[0])


def _validate(contract: DataContract, rows: SourceRows, key: SiteKey) -> _Validated:
    """Apply the contract's validity rules, pseudonymise, build the feature matrix."""
    where = rows.location
    n = len(rows)
    if n == 0 and not rows.rejected and not rows.transactions.get("invalid"):
        raise DataError("the source holds no customer rows (an empty site); expected at least "
                        "one.", path=where)
    problems: list[tuple[NDArray[np.bool_], str, str | None, str]] = []
    # Every id is normalised and hashed in one batch; duplicates are found among the digests
    # (equal digests <=> equal normalised ids); the raw ids go no further.
    if rows.id_column is not None:
        digests, status = key.column_digests(rows.id_column)
    else:
        digests, status = key.digests(rows.id_values().tolist(), strip=True)
    missing_id = status == pseudonyms.MISSING
    problems.append((missing_id, "missing subject id", contract.subject_id,
                     "a subject id (it is empty)"))
    duplicate = pseudonyms.duplicate_rows(digests, missing_id)
    problems.append((duplicate, "duplicate subject id", contract.subject_id,
                     "each subject once (this id also appears in another row)"))
    for f in contract.features:
        values = rows.values[f.name]
        if f.type == "categorical":
            bad = values < 0
            expected = f"one of the declared vocabulary {f.vocabulary}"
        elif f.type == "boolean":
            bad = np.isnan(values)
            expected = "a boolean (true/false, yes/no, 1/0)"
        else:
            bad = np.isnan(values)
            expected = f"a finite number{f' in {f.unit}' if f.unit else ''}"
            if f.transform == "log1p" and f.clip is None:
                with np.errstate(invalid="ignore"):
                    too_low = values <= -1
                problems.append((too_low, f"{f.name}: <= -1 for log1p", f.source_column,
                                 "a value > -1 (log1p)"))
        column = f.source_column if f.aggregate is None else f.name
        problems.append((bad, f"{f.name}: invalid value", column, expected))
    if rows.consent is not None:
        problems.append((np.isnan(rows.consent), "consent: not a boolean",
                         contract.consent.column, "a boolean (true/false, yes/no, 1/0)"))
    invalid = np.zeros(n, dtype=bool)
    invalid_counts: dict[str, int] = {}
    for mask, reason, named, wanted in problems:
        count = int(np.count_nonzero(mask))
        if not count:
            continue
        if contract.on_invalid == "error":
            i = _first(mask)
            assert i is not None
            raise DataError(f"expected {wanted}. {count} row(s) have this problem; fix the "
                            "source or set on_invalid: quarantine in the contract to exclude "
                            "and count them.", path=where,
                            row=int(rows.rows[i]), column=named)
        invalid_counts[reason] = count
        invalid |= mask
    if rows.rejected:
        line, reason = rows.rejected[0]
        if contract.on_invalid == "error":
            raise DataError(f"line {line}: {reason} (the row does not split into the header's "
                            f"fields); {len(rows.rejected)} such line(s). Fix the file or set "
                            "on_invalid: quarantine.", path=where)
        invalid_counts["malformed row"] = len(rows.rejected)
    if rows.transactions.get("invalid"):
        if contract.on_invalid == "error":
            first = rows.transactions.get("first_invalid_row")
            raise DataError(f"{rows.transactions['invalid']} transaction(s) have an empty id, "
                            "an unparseable timestamp or a non-numeric amount "
                            f"({rows.transactions.get('invalid_by_column') or 'see source'}); "
                            "fix the source or set on_invalid: quarantine.", path=where,
                            row=first)
        invalid_counts["invalid transaction"] = int(rows.transactions["invalid"])
    keep: NDArray[np.bool_] | slice = ~invalid
    if not invalid.any():
        keep = slice(None)  # every row: no copies
    specs = contract.feature_specs()
    matrix = np.empty((n - int(np.count_nonzero(invalid)), len(specs)), dtype=np.float64)
    clipped: dict[str, int] = {}
    col = 0
    for f in contract.features:
        values = rows.values[f.name][keep]
        if f.type == "categorical":
            for k in range(len(f.vocabulary or [])):
                matrix[:, col] = np.asarray(values == k, dtype=np.float64)
                col += 1
            continue
        if f.clip is not None:
            low, high = f.clip
            outside = int(np.count_nonzero((values < low) | (values > high)))
            if outside:
                clipped[f.name] = outside
            np.clip(values, low, high, out=matrix[:, col])
        else:
            matrix[:, col] = values
        col += 1
    consent = None if rows.consent is None else rows.consent[keep] == 1.0
    return _Validated(matrix=matrix, digests=digests[keep], consent=consent,
                      rows_read=n + len(rows.rejected),
                      invalid=invalid_counts, clipped=clipped,
                      transactions={k: v for k, v in rows.transactions.items()
                                    if k != "first_invalid_row"},
                      location=where)


class PrivacyGate:
    """A site's data contract, key and store, applied on every load (module docstring).

    Parameters
    ----------
    contract : DataContract
    key : SiteKey
        The site secret (pseudonyms, store encryption).
    store : SiteStore
        Consent ledger, erasure log, assignments.
    """

    def __init__(self, contract: DataContract, *, key: SiteKey, store: SiteStore) -> None:
        self.contract = contract
        self.key = key
        self.store = store
        self.features = contract.feature_specs()
        self._cache: tuple[Any, _Validated] | None = None
        self._lock = threading.Lock()

    @classmethod
    def open(cls, contract_path: str | Path, *, key_file: str | Path | None = None,
             store_url: str | None = None) -> PrivacyGate:
        """Open a site's gate from its contract (key file and store from the contract).

        Parameters
        ----------
        contract_path : str or Path
            The site's data contract.
        key_file, store_url : optional
            Override the contract's ``site.key_file`` / ``site.store``.
        """
        contract = load_contract(contract_path)
        key = SiteKey.load(Path(key_file) if key_file is not None else contract.key_path)
        store = SiteStore(store_url or contract.store_url, key)
        return cls(contract, key=key, store=store)

    def close(self) -> None:
        """Release the store's connections."""
        self.store.close()

    def _signature(self) -> Any:
        """Change stamp of the source: files and SQLite databases by size and mtime."""
        source = self.contract.source
        if source.path is not None:
            files = [self.contract.resolve(source.path)]
        else:
            url = self.contract.resolve_url(str(source.url))
            if not url.startswith("sqlite:///") or url == "sqlite:///:memory:":
                return None  # a database server: re-read every time (no cheap change stamp)
            db = Path(url[len("sqlite:///"):])
            files = [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-journal")]
        # ctime and inode too: a copy that restores size and mtime (cp -p, rsync -t, touch -r)
        # still changes them, and utime cannot set ctime back.
        stamps: list[tuple[int, ...] | None] = []
        for f in files:
            try:
                st = f.stat()
            except FileNotFoundError:
                stamps.append(None)
                continue
            stamps.append((st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
        return (*stamps, self.key.key_id)

    def validated(self) -> _Validated:
        """Read, validate and pseudonymise the source (cached while the file is unchanged)."""
        with self._lock:
            try:
                signature = self._signature()
            except OSError:
                signature = None
            if signature is not None and self._cache is not None \
                    and self._cache[0] == signature:
                return self._cache[1]
            result = _validate(self.contract, read_source(self.contract), self.key)
            self._cache = None if signature is None else (signature, result)
            return result

    def load(self, *, at: datetime | None = None) -> GatedData:
        """Return the records that may take part at ``at`` (default: now).

        Raises
        ------
        DataError
            The source is unreadable, invalid under ``on_invalid: error``, or no row passes.
        """
        at = datetime.now(UTC) if at is None else at
        v = self.validated()
        active, withdrawn = self.store.consent_state(self.contract.purpose, at)
        erased = self.store.erased()
        is_erased, in_ledger, is_withdrawn = (v.marks(group) for group in
                                              (erased, active, withdrawn))
        if v.consent is None:
            consents = in_ledger
            withdrawn_mask = is_withdrawn & ~is_erased
        else:
            consents = (v.consent | in_ledger) & ~is_withdrawn
            withdrawn_mask = is_withdrawn & ~is_erased
        keep = consents & ~is_erased
        excluded = {
            "invalid": v.rows_read - v.size,
            "erased": int(np.count_nonzero(is_erased)),
            "withdrawn": int(np.count_nonzero(withdrawn_mask)),
            "no_consent": int(np.count_nonzero(~consents & ~is_erased & ~withdrawn_mask)),
        }
        report = GateReport(source=v.location, rows_read=v.rows_read,
                            used=int(np.count_nonzero(keep)), excluded=excluded,
                            invalid_by_reason=dict(v.invalid), clipped=dict(v.clipped),
                            transactions=dict(v.transactions), at=at.isoformat())
        return GatedData(site=SiteData(raw=v.matrix[keep], features=self.features),
                         digests=v.digests[keep], report=report)

    def raw_ids(self) -> list[tuple[str, str]]:
        """Return (raw id, pseudonym) of every valid source row, for the site's own exports.

        Re-reads the source; the raw ids are not cached. Only ``fedseg-site
        export-assignments`` calls it, to give the site's marketing tools their own ids.
        """
        rows = read_source(self.contract)
        ids = [i for i in (normalise_id(v) for v in rows.id_values()) if i is not None]
        return list(zip(ids, self.key.pseudonymise(ids), strict=True))

    def find(self, raw_id: str) -> tuple[str, NDArray[np.float64] | None]:
        """Return a subject's pseudonym and its validated feature row (``None`` if absent)."""
        pseudonym = self.key.pseudonym(normalise_id(raw_id) or "")
        v = self.validated()
        hits = np.flatnonzero(v.marks({pseudonym}))
        return pseudonym, None if hits.size == 0 else v.matrix[int(hits[0])]


_GATES: dict[str, PrivacyGate] = {}
_GATES_LOCK = threading.Lock()


def open_gate(contract: str | Path) -> PrivacyGate:
    """Return this process's gate for a contract, opened once.

    A long-lived process (the deployment's site worker, a simulation worker) serves many
    messages; each one reads through the same gate, whose cache makes a round's read cheap
    while consent, erasures and the source are still checked at every round.
    """
    name = str(contract)
    with _GATES_LOCK:
        gate = _GATES.get(name)
        if gate is None:
            gate = _GATES[name] = PrivacyGate.open(name)
        return gate
