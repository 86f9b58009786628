"""The site's persistent store: consent ledger, erasure log and segment assignments.

One SQLAlchemy database per site (``sqlite:///<file>`` by default, ``postgresql+psycopg://...``
as well; portable Core types and queries only). Every subject is stored under its pseudonym
(:meth:`client.site_key.SiteKey.pseudonym`, computed by the caller: the store never sees a raw
id) and every other field about the subject is encrypted:

=================  =================================  =============================================
table              clear columns                      encrypted payload (JSON)
=================  =================================  =============================================
``consent``        id, pseudonym, purpose             granted_at, withdrawn_at, source
``erasures``       id, pseudonym                      erased_at, reason
``assignments``    id, pseudonym                      segment_id, segment_name, model_sha256,
                                                      assigned_at
``meta``           name, value (not subject data)     --
=================  =================================  =============================================

A payload is ``nonce (12 random bytes) || AES-256-GCM ciphertext`` under the store key
(HKDF-SHA256 from the site key, label ``fedseg store v1``), with associated data
``"<table>|<pseudonym>"`` (``"consent|<pseudonym>|<purpose>"`` for consent), so a payload moved
to another row, subject or purpose fails authentication. The store does not detect a row that
was deleted or an old copy of the whole database put back (no table-level integrity).

Consent semantics (:meth:`SiteStore.consent_state`): each record contributes a grant event at
``granted_at`` and/or a withdrawal event at ``withdrawn_at``; at time ``t`` a subject's consent
to a purpose is in effect when its latest event at or before ``t`` is a grant, and a withdrawal
is in effect when that latest event is a withdrawal (a withdrawal wins a tie). For records that
do not overlap this is "some record with ``granted_at <= t`` and ``withdrawn_at`` null or
``> t``"; unlike that rule it also honours a withdrawal recorded before a grant that is dated
earlier (records arriving out of order).
"""

from __future__ import annotations

import json
import operator
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography.exceptions import InvalidTag
from sqlalchemy import (
    Column,
    Connection,
    Integer,
    LargeBinary,
    MetaData,
    Select,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    make_url,
    select,
    update,
)
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from client.site_key import SiteKey
from common.errors import ConfigError

NONCE_BYTES = 12
CONSENT_VERSION = "consent_version"
"""Meta entry changed (to a fresh random value) by every write to the consent ledger."""
"""AES-GCM nonce length (96 bits, NIST SP 800-38D's recommended length for random nonces)."""

CHUNK_ROWS = 10_000
"""Rows per ``executemany`` in bulk writes: bounds the memory of one batch."""

ENCRYPTION = "AES-256-GCM, key HKDF-SHA256 from the site key"

KEY_ID_META = "key_id"
"""Meta entry holding the fingerprint of the key the store was created with (reserved)."""

_PSEUDONYM = re.compile(r"[0-9a-f]{64}")
_PSEUDONYM_LINES = re.compile(r"[0-9a-f]{64}(?:\n[0-9a-f]{64})*")
_PURPOSE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

_METADATA = MetaData()

CONSENT = Table(
    "consent",
    _METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("pseudonym", String(64), nullable=False, index=True),
    Column("purpose", String(64), nullable=False),
    Column("payload", LargeBinary, nullable=False),
)
ERASURES = Table(
    "erasures",
    _METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("pseudonym", String(64), nullable=False, unique=True),
    Column("payload", LargeBinary, nullable=False),
)
ASSIGNMENTS = Table(
    "assignments",
    _METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("pseudonym", String(64), nullable=False, unique=True),
    Column("payload", LargeBinary, nullable=False),
)
META = Table(
    "meta",
    _METADATA,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)
_TABLES = (CONSENT, ERASURES, ASSIGNMENTS, META)


def _redact(url: str) -> str:
    """Mask the password of a URL SQLAlchemy could not parse."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _iso(at: datetime, name: str) -> str:
    """Fixed-width UTC ISO 8601 (microseconds, ``+00:00``): string order is time order."""
    if not isinstance(at, datetime):
        raise TypeError(f"{name} must be a datetime, got {type(at).__name__}")
    offset = at.utcoffset()
    if offset is None:
        raise ValueError(f"{name} must be timezone-aware (UTC), got naive {at.isoformat()}")
    if offset:
        at = at.astimezone(UTC)
    return at.isoformat(timespec="microseconds")


def _check_pseudonym(pseudonym: str, where: str = "pseudonym") -> None:
    """Refuse anything but a 64-hex pseudonym: a raw id must never reach the store."""
    if not isinstance(pseudonym, str) or _PSEUDONYM.fullmatch(pseudonym) is None:
        shown = f"{len(pseudonym)} characters" if isinstance(pseudonym, str) else "type " + (
            type(pseudonym).__name__)
        raise ValueError(
            f"{where} must be a pseudonym (64 lowercase hex characters, SiteKey.pseudonym), "
            f"got {shown}"
        )


def _check_pseudonyms(pseudonyms: Sequence[str], where: str) -> None:
    """Check many pseudonyms with one regex match; on failure, name the first bad index."""
    if not pseudonyms:
        return
    try:
        joined: str | None = "\n".join(pseudonyms)
    except TypeError:
        joined = None
    # n segments of 64 hex joined by newlines: exactly one pseudonym per element.
    if (
        joined is None
        or len(joined) != 65 * len(pseudonyms) - 1
        or _PSEUDONYM_LINES.fullmatch(joined) is None
    ):
        for index, pseudonym in enumerate(pseudonyms):
            _check_pseudonym(pseudonym, f"{where}[{index}]")


def _check_purpose(purpose: str) -> None:
    """Refuse a purpose that is not a short public name (it is stored in clear)."""
    if not isinstance(purpose, str) or _PURPOSE.fullmatch(purpose) is None:
        raise ValueError(
            f"purpose must be a public name of 1-64 characters [A-Za-z0-9_.:-], got {purpose!r}"
        )


def _check_source(source: str) -> None:
    """Refuse a source that is not a string."""
    if not isinstance(source, str):
        raise ValueError(f"source must be str, got {type(source).__name__}")


def _latest_events(events: Iterable[tuple[str | None, str | None]], at: str) -> tuple[str, str]:
    """Latest grant and withdrawal times at or before ``at`` ('' when none)."""
    last_grant = last_withdrawal = ""
    for granted, withdrawn in events:
        if granted is not None and last_grant < granted <= at:
            last_grant = granted
        if withdrawn is not None and last_withdrawal < withdrawn <= at:
            last_withdrawal = withdrawn
    return last_grant, last_withdrawal


def _bulk_insert(
    conn: Connection, table: Table, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
) -> None:
    """Insert rows on the DBAPI cursor, in chunks, with the INSERT compiled for the dialect.

    Skips SQLAlchemy's per-row parameter processing (about half the time of a 250,000-row
    import); correct here because the columns are str and bytes, which every supported driver
    takes as they are.
    """
    compiled = insert(table).inline().compile(dialect=conn.dialect, column_keys=list(columns))
    names = compiled.positiontup if compiled.positional else None
    if names is not None and list(names) != list(columns):
        raise AssertionError(f"unexpected parameter order {names} for {columns}")
    cursor = conn.connection.cursor()
    try:
        for start in range(0, len(rows), CHUNK_ROWS):
            chunk = rows[start: start + CHUNK_ROWS]
            if names is None:
                dicts = [dict(zip(columns, row, strict=True)) for row in chunk]
                cursor.executemany(compiled.string, dicts)
            else:
                cursor.executemany(compiled.string, chunk)
    finally:
        cursor.close()


def _fetch_all(conn: Connection, stmt: Select[Any]) -> list[tuple[Any, ...]]:
    """Run a Core select on the DBAPI cursor (compiled for the dialect): plain tuples.

    Skips SQLAlchemy's row objects, for the selects of str and bytes columns that decrypt a
    whole table.
    """
    compiled = stmt.compile(dialect=conn.dialect)
    params = compiled.construct_params()
    args: Any = (
        tuple(params[name] for name in compiled.positiontup or ())
        if compiled.positional else params
    )
    cursor = conn.connection.cursor()
    try:
        cursor.execute(compiled.string, args)
        return list(cursor.fetchall())
    finally:
        cursor.close()


def _sqlite_write_ahead_log(dbapi_connection: Any, _record: Any) -> None:
    """Open every SQLite connection in WAL mode with full sync.

    A commit then costs one fsync of the log instead of the rollback journal's create, two
    fsyncs and delete: the site appends an audit line and commits its head hash for every
    message it sends (four per SecAgg+ round), so this is most of a site's disk time in a round.
    ``synchronous=FULL`` keeps each commit durable once it returns, as before. The ``-wal`` and
    ``-shm`` files beside the database get its owner-only permissions; a store on a network
    file system (where WAL is not supported) should be PostgreSQL instead.
    """
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
    finally:
        cursor.close()


class SiteStore:
    """Encrypted, pseudonymous store of one site (consent, erasures, assignments, meta).

    Parameters
    ----------
    url : str
        SQLAlchemy URL: ``sqlite:///<file>`` (the file and its parent directories are created,
        the file owner-only ``0o600``) or ``postgresql+psycopg://user:password@host/db``.
    key : SiteKey
        The site key. A new store records its ``key_id``; an existing store opened with
        another key is refused.

    Raises
    ------
    ConfigError
        The URL cannot be parsed or opened, or the store was created with another key. The
        message names the URL with its password masked.

    Notes
    -----
    Use as a context manager or call :meth:`close`. Subject arguments are pseudonyms (64 hex
    characters); anything else raises ``ValueError``, so a raw id cannot be stored by mistake.
    Timestamps must be timezone-aware; they are stored as UTC ISO 8601 strings.
    """

    def __init__(self, url: str, key: SiteKey) -> None:
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise ConfigError(
                f"store URL {_redact(url)!r} is not a database URL: expected sqlite:///<file> "
                f"or postgresql+psycopg://user@host/db"
            ) from None
        self.url = parsed.render_as_string(hide_password=True)
        self._key = key
        self._aead = key.aead("store")
        self._consent_cache: dict[str, tuple[str, str, str, frozenset[str], frozenset[str]]] = {}
        if parsed.get_backend_name() == "sqlite":
            self._prepare_sqlite_file(parsed)
        try:
            self._engine = create_engine(parsed)
        except (ArgumentError, ImportError) as exc:
            raise ConfigError(f"cannot open store {self.url}: {exc}") from exc
        if parsed.get_backend_name() == "sqlite":
            event.listen(self._engine, "connect", _sqlite_write_ahead_log)
        try:
            _METADATA.create_all(self._engine)
            with self._engine.begin() as conn:
                stored = conn.execute(
                    select(META.c.value).where(META.c.name == KEY_ID_META)
                ).scalar_one_or_none()
                if stored is None:
                    conn.execute(insert(META).values(name=KEY_ID_META, value=key.key_id))
        except SQLAlchemyError as exc:
            self._engine.dispose()
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise ConfigError(f"cannot open store {self.url}: {reason}") from exc
        if stored is not None and stored != key.key_id:
            self._engine.dispose()
            raise ConfigError(
                f"store {self.url} was created with key {stored}, this key is {key.key_id} "
                f"({key.path}): open it with the key it was created with"
            )

    def _prepare_sqlite_file(self, url: URL) -> None:
        """Create the database file owner-only before SQLite does (it would use the umask)."""
        database = url.database
        if not database or database == ":memory:" or database.startswith("file:"):
            return
        path = Path(database)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        except OSError as exc:
            raise ConfigError(f"cannot create store file {path} for {self.url}: {exc}") from exc

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Release the database connections (dispose of the engine)."""
        self._engine.dispose()

    def __enter__(self) -> SiteStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SiteStore(url={self.url!r}, key_id={self._key.key_id!r})"

    # -- encryption -----------------------------------------------------------------------

    def _seal(self, aad: str, doc: dict[str, Any]) -> bytes:
        """Encrypt one JSON document under a fresh random nonce."""
        nonce = os.urandom(NONCE_BYTES)
        plain = json.dumps(doc, separators=(",", ":")).encode("utf-8")
        return nonce + self._aead.encrypt(nonce, plain, aad.encode("utf-8"))

    def _open(self, aad: str, blob: bytes, row: str) -> dict[str, Any]:
        """Decrypt and parse one payload; ``row`` names it in the error."""
        try:
            plain = self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad.encode())
        except (InvalidTag, ValueError, UnicodeDecodeError):  # wrong key, altered or cut row
            raise self._tampered(row) from None
        doc: dict[str, Any] = json.loads(plain)
        return doc

    def _tampered(self, row: str) -> ConfigError:
        """Build the error of a payload that fails authentication."""
        return ConfigError(
            f"store {self.url} row {row} fails authentication: the store was tampered with or "
            f"the key is wrong"
        )

    # -- consent ledger -------------------------------------------------------------------

    def _consent_records(
        self, conn: Connection, pseudonym: str, purpose: str
    ) -> list[tuple[int, dict[str, Any]]]:
        """Read the subject's consent records for a purpose, decrypted, oldest first."""
        rows = conn.execute(
            select(CONSENT.c.id, CONSENT.c.payload)
            .where(CONSENT.c.pseudonym == pseudonym, CONSENT.c.purpose == purpose)
            .order_by(CONSENT.c.id)
        ).all()
        aad = f"consent|{pseudonym}|{purpose}"
        return [(rid, self._open(aad, blob, f"consent id={rid}")) for rid, blob in rows]

    def grant(self, pseudonym: str, *, purpose: str, at: datetime, source: str) -> bool:
        """Record that a subject consented to a purpose.

        Parameters
        ----------
        pseudonym : str
            The subject's pseudonym.
        purpose : str
            Public purpose name, e.g. ``"segmentation"``.
        at : datetime
            When consent was given (timezone-aware).
        source : str
            Where the consent was collected, e.g. ``"crm-export-2024-06"``.

        Returns
        -------
        bool
            False when the subject's consent to this purpose was already in effect at ``at``
            (nothing written), True when a grant record was added.
        """
        _check_pseudonym(pseudonym)
        _check_purpose(purpose)
        _check_source(source)
        at_s = _iso(at, "at")
        with self._engine.begin() as conn:
            records = self._consent_records(conn, pseudonym, purpose)
            grant, withdrawal = _latest_events(
                ((d["granted_at"], d["withdrawn_at"]) for _, d in records), at_s
            )
            if grant > withdrawal:
                return False
            doc = {"granted_at": at_s, "withdrawn_at": None, "source": source}
            conn.execute(
                insert(CONSENT).values(
                    pseudonym=pseudonym,
                    purpose=purpose,
                    payload=self._seal(f"consent|{pseudonym}|{purpose}", doc),
                )
            )
            self._bump_consent(conn)
        return True

    def withdraw(self, pseudonym: str, *, purpose: str, at: datetime, source: str) -> bool:
        """Record that a subject withdrew consent to a purpose.

        Closes the grant in effect at ``at`` (sets its ``withdrawn_at``, re-encrypted under a
        fresh nonce). When no grant is in effect and no withdrawal either, records a
        withdrawal-only record (``granted_at`` null), so a withdrawal received before any grant
        is still honoured.

        Parameters
        ----------
        pseudonym : str
            The subject's pseudonym.
        purpose : str
            Public purpose name.
        at : datetime
            When consent was withdrawn (timezone-aware).
        source : str
            Where the withdrawal was received.

        Returns
        -------
        bool
            Whether anything was written (False: a withdrawal was already in effect at ``at``).
        """
        _check_pseudonym(pseudonym)
        _check_purpose(purpose)
        _check_source(source)
        at_s = _iso(at, "at")
        aad = f"consent|{pseudonym}|{purpose}"
        with self._engine.begin() as conn:
            records = self._consent_records(conn, pseudonym, purpose)
            grant, withdrawal = _latest_events(
                ((d["granted_at"], d["withdrawn_at"]) for _, d in records), at_s
            )
            if withdrawal and withdrawal >= grant:
                return False
            open_grant = [
                (rid, d) for rid, d in records
                if grant and d["granted_at"] == grant and d["withdrawn_at"] is None
            ]
            if open_grant:
                rid, doc = open_grant[-1]
                doc = {**doc, "withdrawn_at": at_s, "withdrawal_source": source}
                conn.execute(
                    update(CONSENT).where(CONSENT.c.id == rid).values(
                        payload=self._seal(aad, doc)
                    )
                )
            else:
                doc = {"granted_at": None, "withdrawn_at": at_s, "source": source}
                conn.execute(
                    insert(CONSENT).values(
                        pseudonym=pseudonym, purpose=purpose, payload=self._seal(aad, doc)
                    )
                )
            self._bump_consent(conn)
        return True

    def import_consents(
        self,
        records: Iterable[tuple[str, datetime | None, datetime | None, str]],
        *,
        purpose: str,
    ) -> int:
        """Bulk-insert consent records in one transaction.

        Parameters
        ----------
        records : iterable of (pseudonym, granted_at, withdrawn_at, source)
            One record per row; ``granted_at`` and ``withdrawn_at`` are timezone-aware or None
            (not both None; when both are set, ``withdrawn_at >= granted_at``).
        purpose : str
            Public purpose name of every record.

        Returns
        -------
        int
            Number of records inserted. Records are appended as given: an import does not
            merge with or deduplicate against the existing ledger.

        Raises
        ------
        ValueError
            A record is malformed (the message gives its 0-based index); nothing is written.
        """
        _check_purpose(purpose)
        items = records if isinstance(records, list) else list(records)
        try:
            pseudonyms = [record[0] for record in items]
        except (TypeError, IndexError, KeyError):
            raise ValueError(
                "import_consents: records must be (pseudonym, granted_at, withdrawn_at, source)"
            ) from None
        _check_pseudonyms(pseudonyms, "import_consents: record")
        seal = self._aead.encrypt
        sources: dict[str, str] = {}
        aad_tail = f"|{purpose}".encode()
        nonces = os.urandom(NONCE_BYTES * len(items))
        rows: list[tuple[str, str, bytes]] = []
        append = rows.append
        for index, record in enumerate(items):
            try:
                pseudonym, granted, withdrawn, source = record
                g = None if granted is None else _iso(granted, "granted_at")
                w = None if withdrawn is None else _iso(withdrawn, "withdrawn_at")
                if g is None:
                    if w is None:
                        raise ValueError("granted_at and withdrawn_at are both None")
                elif w is not None and w < g:
                    raise ValueError(f"withdrawn_at {w} is before granted_at {g}")
                src = sources.get(source)
                if src is None:
                    _check_source(source)
                    src = sources[source] = json.dumps(source)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"import_consents: record {index}: {exc}") from None
            # The document json.dumps would write: ISO timestamps need no escaping.
            g_json = "null" if g is None else f'"{g}"'
            w_json = "null" if w is None else f'"{w}"'
            plain = f'{{"granted_at":{g_json},"withdrawn_at":{w_json},"source":{src}}}'.encode()
            nonce = nonces[NONCE_BYTES * index: NONCE_BYTES * (index + 1)]
            aad = b"consent|" + pseudonym.encode() + aad_tail
            append((pseudonym, purpose, nonce + seal(nonce, plain, aad)))
        # Index order: B-tree appends instead of random inserts, about 2x faster on SQLite. The
        # sort is stable, so each subject's records keep their order (consent_history).
        rows.sort(key=operator.itemgetter(0))
        with self._engine.begin() as conn:
            _bulk_insert(conn, CONSENT, ("pseudonym", "purpose", "payload"), rows)
            self._bump_consent(conn)
        return len(rows)

    def consent_history(self, pseudonym: str) -> list[dict[str, Any]]:
        """Return every consent record of a subject, oldest first.

        Parameters
        ----------
        pseudonym : str
            The subject's pseudonym.

        Returns
        -------
        list of dict
            ``purpose``, ``granted_at``, ``withdrawn_at`` (UTC ISO 8601 strings or None),
            ``source`` (where the record came from) and ``withdrawal_source`` (where the
            withdrawal that closed a grant came from, else None) per record.
        """
        _check_pseudonym(pseudonym)
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(CONSENT.c.id, CONSENT.c.purpose, CONSENT.c.payload)
                .where(CONSENT.c.pseudonym == pseudonym)
                .order_by(CONSENT.c.id)
            ).all()
        history = []
        for rid, purpose, blob in rows:
            doc = self._open(f"consent|{pseudonym}|{purpose}", blob, f"consent id={rid}")
            history.append({
                "purpose": purpose,
                "granted_at": doc["granted_at"],
                "withdrawn_at": doc["withdrawn_at"],
                "source": doc["source"],
                "withdrawal_source": doc.get("withdrawal_source"),
            })
        return history

    def consent_state(self, purpose: str, at: datetime) -> tuple[set[str], set[str]]:
        """Return who consents to a purpose at a time, and who has withdrawn.

        Parameters
        ----------
        purpose : str
            Public purpose name.
        at : datetime
            The time of the question (timezone-aware).

        Returns
        -------
        active : set of str
            Pseudonyms whose latest consent event at or before ``at`` is a grant.
        withdrawn : set of str
            Pseudonyms whose latest consent event at or before ``at`` is a withdrawal
            (disjoint from ``active``; a subject with no event by ``at`` is in neither).
        """
        _check_purpose(purpose)
        at_s = _iso(at, "at")
        with self._engine.connect() as conn:
            version = conn.execute(
                select(META.c.value).where(META.c.name == CONSENT_VERSION)).scalar_one_or_none()
            cached = self._consent_cache.get(purpose)
            # The ledger is unchanged since the last call and both times are after its latest
            # event: the answer cannot differ (every load of a round asks again).
            if version is not None and cached is not None and cached[0] == version \
                    and at_s >= cached[1] and cached[2] >= cached[1]:
                return set(cached[3]), set(cached[4])
            rows = _fetch_all(
                conn,
                select(CONSENT.c.pseudonym, CONSENT.c.payload).where(CONSENT.c.purpose == purpose),
            )
        decrypt = self._aead.decrypt
        # raw_decode on str: json.loads on bytes spends a third of its time detecting encodings.
        raw_decode = json.JSONDecoder().raw_decode
        head, tail = b"consent|", f"|{purpose}".encode()
        nb = NONCE_BYTES
        last_grant: dict[str, str] = {}
        last_withdrawal: dict[str, str] = {}
        pseudonym = ""
        max_event = ""
        try:
            for pseudonym, blob in rows:
                plain = decrypt(blob[:nb], blob[nb:], head + pseudonym.encode() + tail)
                doc = raw_decode(plain.decode())[0]
                g = doc["granted_at"]
                if g is not None:
                    max_event = max(max_event, g)
                    if g <= at_s and g > last_grant.get(pseudonym, ""):
                        last_grant[pseudonym] = g
                w = doc["withdrawn_at"]
                if w is not None:
                    max_event = max(max_event, w)
                    if w <= at_s and w > last_withdrawal.get(pseudonym, ""):
                        last_withdrawal[pseudonym] = w
        except (InvalidTag, ValueError, UnicodeDecodeError):  # wrong key, altered or cut row
            raise self._tampered(f"consent of pseudonym {pseudonym[:12]}...") from None
        active = {p for p, g in last_grant.items() if g > last_withdrawal.get(p, "")}
        withdrawn = {p for p in last_withdrawal if p not in active}
        if version is not None:
            self._consent_cache[purpose] = (version, max_event, at_s, frozenset(active),
                                            frozenset(withdrawn))
        return active, withdrawn

    # -- erasure log ----------------------------------------------------------------------

    def erase(self, pseudonym: str, *, at: datetime, reason: str) -> dict[str, int]:
        """Delete a subject's consent records and assignment, and log the erasure.

        Parameters
        ----------
        pseudonym : str
            The subject's pseudonym.
        at : datetime
            When the erasure was requested or carried out (timezone-aware).
        reason : str
            Why, e.g. ``"GDPR art. 17 request #123"`` (stored encrypted).

        Returns
        -------
        dict
            Rows deleted per table: ``{"consent": n, "assignments": n}``. Erasing a subject
            already erased deletes any rows written since and keeps the first erasure record.
        """
        _check_pseudonym(pseudonym)
        at_s = _iso(at, "at")
        with self._engine.begin() as conn:
            consent = conn.execute(delete(CONSENT).where(CONSENT.c.pseudonym == pseudonym))
            self._bump_consent(conn)
            assigned = conn.execute(
                delete(ASSIGNMENTS).where(ASSIGNMENTS.c.pseudonym == pseudonym)
            )
            logged = conn.execute(
                select(ERASURES.c.id).where(ERASURES.c.pseudonym == pseudonym)
            ).first()
            if logged is None:
                doc = {"erased_at": at_s, "reason": reason}
                conn.execute(
                    insert(ERASURES).values(
                        pseudonym=pseudonym, payload=self._seal(f"erasures|{pseudonym}", doc)
                    )
                )
        return {"consent": consent.rowcount, "assignments": assigned.rowcount}

    def erased(self) -> set[str]:
        """Return the pseudonyms of every erased subject.

        Returns
        -------
        set of str
            Pseudonyms in the erasure log.
        """
        with self._engine.connect() as conn:
            return set(conn.execute(select(ERASURES.c.pseudonym)).scalars())

    def erasure(self, pseudonym: str) -> dict[str, Any] | None:
        """Return a subject's erasure record.

        Parameters
        ----------
        pseudonym : str
            The subject's pseudonym.

        Returns
        -------
        dict or None
            ``erased_at`` (UTC ISO 8601) and ``reason``; None when the subject was not erased.
        """
        _check_pseudonym(pseudonym)
        with self._engine.connect() as conn:
            row = conn.execute(
                select(ERASURES.c.id, ERASURES.c.payload).where(ERASURES.c.pseudonym == pseudonym)
            ).first()
        if row is None:
            return None
        return self._open(f"erasures|{pseudonym}", row[1], f"erasures id={row[0]}")

    # -- assignments ----------------------------------------------------------------------

    def replace_assignments(
        self,
        pseudonyms: Sequence[str],
        segment_ids: Sequence[int],
        segment_names: Sequence[str],
        *,
        model_sha256: str,
        at: datetime,
    ) -> int:
        """Replace every segment assignment in one transaction.

        Parameters
        ----------
        pseudonyms : sequence of str of length n_subjects
            Subjects, each at most once.
        segment_ids : sequence of int of length n_subjects
            Segment of each subject.
        segment_names : sequence of str of length n_subjects
            Name of each subject's segment.
        model_sha256 : str
            SHA-256 (64 hex characters) of the segment model that assigned them.
        at : datetime
            When they were assigned (timezone-aware).

        Returns
        -------
        int
            Number of assignments written (n_subjects).

        Raises
        ------
        ValueError
            Lengths differ, a pseudonym is malformed or repeated, a segment id is not an
            integer, or ``model_sha256`` is not 64 hex characters. Nothing is written.
        """
        n = len(pseudonyms)
        if len(segment_ids) != n or len(segment_names) != n:
            raise ValueError(
                f"replace_assignments: pseudonyms ({n}), segment_ids ({len(segment_ids)}) and "
                f"segment_names ({len(segment_names)}) must have the same length"
            )
        if not isinstance(model_sha256, str) or _SHA256_HEX.fullmatch(model_sha256) is None:
            raise ValueError(
                f"model_sha256 must be 64 lowercase hex characters, got {model_sha256!r}"
            )
        at_s = _iso(at, "at")
        _check_pseudonyms(pseudonyms, "pseudonyms")
        if len(set(pseudonyms)) != n:
            first: dict[str, int] = {}
            for index, pseudonym in enumerate(pseudonyms):
                if pseudonym in first:
                    raise ValueError(
                        f"replace_assignments: pseudonyms[{index}] repeats pseudonyms"
                        f"[{first[pseudonym]}]: each subject has one assignment"
                    )
                first[pseudonym] = index
        plains: dict[tuple[int, str], bytes] = {}
        seal = self._aead.encrypt
        nonces = os.urandom(NONCE_BYTES * n)
        rows: list[tuple[str, bytes]] = []
        for i, (pseudonym, sid, name) in enumerate(
            zip(pseudonyms, segment_ids, segment_names, strict=True)
        ):
            try:
                key = (operator.index(sid), name)
            except TypeError:
                raise ValueError(
                    f"segment_ids[{i}] must be an integer, got {type(sid).__name__}"
                ) from None
            plain = plains.get(key)
            if plain is None:
                if not isinstance(name, str):
                    raise ValueError(f"segment_names[{i}] must be str, got {type(name).__name__}")
                doc = {"segment_id": key[0], "segment_name": name,
                       "model_sha256": model_sha256, "assigned_at": at_s}
                plain = plains[key] = json.dumps(doc, separators=(",", ":")).encode()
            nonce = nonces[NONCE_BYTES * i: NONCE_BYTES * (i + 1)]
            aad = b"assignments|" + pseudonym.encode()
            rows.append((pseudonym, nonce + seal(nonce, plain, aad)))
        rows.sort(key=operator.itemgetter(0))  # index order: see import_consents
        with self._engine.begin() as conn:
            conn.execute(delete(ASSIGNMENTS))
            _bulk_insert(conn, ASSIGNMENTS, ("pseudonym", "payload"), rows)
        return n

    def assignment(self, pseudonym: str) -> dict[str, Any] | None:
        """Return a subject's segment assignment.

        Parameters
        ----------
        pseudonym : str
            The subject's pseudonym.

        Returns
        -------
        dict or None
            ``segment_id``, ``segment_name``, ``model_sha256``, ``assigned_at``; None when the
            subject has no assignment.
        """
        _check_pseudonym(pseudonym)
        with self._engine.connect() as conn:
            row = conn.execute(
                select(ASSIGNMENTS.c.id, ASSIGNMENTS.c.payload)
                .where(ASSIGNMENTS.c.pseudonym == pseudonym)
            ).first()
        if row is None:
            return None
        return self._open(f"assignments|{pseudonym}", row[1], f"assignments id={row[0]}")

    def clear_assignment(self, pseudonym: str) -> bool:
        """Delete one subject's segment assignment (e.g. after its source row was rectified).

        Parameters
        ----------
        pseudonym : str
            The subject's pseudonym.

        Returns
        -------
        bool
            Whether the subject had an assignment.
        """
        _check_pseudonym(pseudonym)
        with self._engine.begin() as conn:
            deleted = conn.execute(
                delete(ASSIGNMENTS).where(ASSIGNMENTS.c.pseudonym == pseudonym)
            ).rowcount
        return bool(deleted)

    def iter_assignments(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield every assignment as ``(pseudonym, assignment)``.

        Yields
        ------
        pseudonym : str
            The subject's pseudonym.
        assignment : dict
            As returned by :meth:`assignment`.

        Notes
        -----
        Order is unspecified. Reads pages of 10,000 rows by id, each in a short read, so no
        lock is held between pages; a :meth:`replace_assignments` during the iteration is not
        isolated from it.
        """
        last = 0
        while True:
            with self._engine.connect() as conn:
                rows = conn.execute(
                    select(ASSIGNMENTS.c.id, ASSIGNMENTS.c.pseudonym, ASSIGNMENTS.c.payload)
                    .where(ASSIGNMENTS.c.id > last)
                    .order_by(ASSIGNMENTS.c.id)
                    .limit(CHUNK_ROWS)
                ).all()
            if not rows:
                return
            for rid, pseudonym, blob in rows:
                yield pseudonym, self._open(
                    f"assignments|{pseudonym}", blob, f"assignments id={rid}"
                )
            last = rows[-1][0]

    def count_assignments(self) -> int:
        """Return the number of assignments.

        Returns
        -------
        int
            Rows in ``assignments``.
        """
        return self.counts()["assignments"]

    # -- meta, description ----------------------------------------------------------------

    def get_meta(self, name: str) -> str | None:
        """Return a meta value (clear text, not subject data).

        Parameters
        ----------
        name : str
            Entry name.

        Returns
        -------
        str or None
            The value, or None when unset.
        """
        with self._engine.connect() as conn:
            value: str | None = conn.execute(
                select(META.c.value).where(META.c.name == name)
            ).scalar_one_or_none()
        return value

    def set_meta(self, name: str, value: str) -> None:
        """Set a meta value (insert or update, in one transaction).

        Parameters
        ----------
        name : str
            Entry name, 1-64 characters; ``key_id`` is reserved to the store.
        value : str
            Clear-text value: never subject data.
        """
        if not isinstance(name, str) or not 1 <= len(name) <= 64:
            raise ValueError(f"meta name must be a string of 1-64 characters, got {name!r}")
        if name == KEY_ID_META:
            raise ValueError(f"meta name {KEY_ID_META!r} is reserved: use rekey to change keys")
        if not isinstance(value, str):
            raise ValueError(f"meta value must be str, got {type(value).__name__}")
        with self._engine.begin() as conn:
            self._upsert_meta(conn, name, value)

    def _bump_consent(self, conn: Connection) -> None:
        """Mark the consent ledger as changed (a fresh random version, inside the write)."""
        self._upsert_meta(conn, CONSENT_VERSION, os.urandom(12).hex())

    @staticmethod
    def _upsert_meta(conn: Connection, name: str, value: str) -> None:
        """Portable upsert: select, then update or insert."""
        exists = conn.execute(select(META.c.name).where(META.c.name == name)).first()
        if exists is None:
            conn.execute(insert(META).values(name=name, value=value))
        else:
            conn.execute(update(META).where(META.c.name == name).values(value=value))

    def counts(self) -> dict[str, int]:
        """Return the number of rows per table.

        Returns
        -------
        dict
            ``{"consent": n, "erasures": n, "assignments": n, "meta": n}``.
        """
        with self._engine.connect() as conn:
            return {
                table.name: int(conn.execute(select(func.count()).select_from(table)).scalar_one())
                for table in _TABLES
            }

    def describe(self) -> dict[str, Any]:
        """Describe the store without any subject data.

        Returns
        -------
        dict
            ``url`` (password masked), ``key_id``, ``key_created_at``, ``key_age_days``,
            ``tables`` (rows per table) and ``encryption``.
        """
        age = datetime.now(UTC) - self._key.created_at
        return {
            "url": self.url,
            "key_id": self._key.key_id,
            "key_created_at": self._key.created_at.isoformat(),
            "key_age_days": round(age.total_seconds() / 86400.0, 2),
            "tables": self.counts(),
            "encryption": ENCRYPTION,
        }

    # -- key rotation ---------------------------------------------------------------------

    def rekey(self, new_key: SiteKey, mapping: Mapping[str, str]) -> dict[str, int]:
        """Re-encrypt the whole store under a new key and rename pseudonyms, in one transaction.

        Parameters
        ----------
        new_key : SiteKey
            The key the store will be under afterwards.
        mapping : mapping of str to str
            Old pseudonym -> new pseudonym (``new_key.pseudonym(raw_id)``), built by the caller
            from the source's raw ids. Injective.

        Returns
        -------
        dict
            Rows re-encrypted per table (``consent``, ``erasures``, ``assignments``),
            ``unmapped`` (rows whose pseudonym is not in ``mapping``: kept under their old
            pseudonym, which ``new_key`` can no longer reproduce) and ``unmapped_subjects``
            (distinct such pseudonyms).

        Raises
        ------
        ValueError
            A mapping entry is not a pseudonym pair, or two old pseudonyms map to one new one.
        ConfigError
            A row fails authentication under the current key, or the new pseudonyms collide
            with unmapped ones; nothing is changed.
        """
        for old, new in mapping.items():
            _check_pseudonym(old, "mapping key")
            _check_pseudonym(new, f"mapping[{old[:12]}...]")
        if len(set(mapping.values())) != len(mapping):
            raise ValueError("rekey: mapping must be injective (two old pseudonyms map to one)")
        new_aead = new_key.aead("store")
        unmapped: set[str] = set()
        unmapped_rows = 0
        done: dict[str, int] = {}

        def reseal(table: str, old: str, tail: str, blob: bytes, rid: int) -> tuple[str, bytes]:
            nonlocal unmapped_rows
            doc = self._open(f"{table}|{old}{tail}", blob, f"{table} id={rid}")
            new = mapping.get(old)
            if new is None:
                new = old
                unmapped.add(old)
                unmapped_rows += 1
            nonce = os.urandom(NONCE_BYTES)
            plain = json.dumps(doc, separators=(",", ":")).encode("utf-8")
            return new, nonce + new_aead.encrypt(nonce, plain, f"{table}|{new}{tail}".encode())

        try:
            with self._engine.begin() as conn:
                consent_rows = conn.execute(
                    select(CONSENT.c.id, CONSENT.c.pseudonym, CONSENT.c.purpose, CONSENT.c.payload)
                ).all()
                params = []
                for rid, old, purpose, blob in consent_rows:
                    new, payload = reseal("consent", old, f"|{purpose}", blob, rid)
                    params.append({"b_id": rid, "b_pseudonym": new, "b_payload": payload})
                stmt = (
                    update(CONSENT)
                    .where(CONSENT.c.id == bindparam("b_id"))
                    .values(pseudonym=bindparam("b_pseudonym"), payload=bindparam("b_payload"))
                )
                for start in range(0, len(params), CHUNK_ROWS):
                    conn.execute(stmt, params[start: start + CHUNK_ROWS])
                done["consent"] = len(params)
                self._bump_consent(conn)
                # Unique pseudonyms: delete and re-insert, so no row collides with an old name.
                for table in (ERASURES, ASSIGNMENTS):
                    rows = conn.execute(
                        select(table.c.id, table.c.pseudonym, table.c.payload)
                        .order_by(table.c.id)
                    ).all()
                    fresh = []
                    for rid, old, blob in rows:
                        new, payload = reseal(table.name, old, "", blob, rid)
                        fresh.append({"pseudonym": new, "payload": payload})
                    conn.execute(delete(table))
                    for start in range(0, len(fresh), CHUNK_ROWS):
                        conn.execute(insert(table), fresh[start: start + CHUNK_ROWS])
                    done[table.name] = len(fresh)
                self._upsert_meta(conn, KEY_ID_META, new_key.key_id)
        except SQLAlchemyError as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise ConfigError(
                f"rekey of store {self.url} failed and was rolled back: {reason}"
            ) from exc
        self._key = new_key
        self._aead = new_aead
        return {**done, "unmapped": unmapped_rows, "unmapped_subjects": len(unmapped)}
