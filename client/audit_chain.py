"""A tamper-evident audit log: JSON lines chained by SHA-256 hashes.

Each line is the audited entry plus three keys: ``seq`` (1-based line number), ``prev`` (the
previous line's ``hash``, 64 zeros on the first line) and ``hash``, the SHA-256 hex digest of
the line's canonical JSON without its ``hash`` key
(``json.dumps(obj, sort_keys=True, separators=(",", ":"))``). Changing, deleting or reordering
a line breaks the chain at that line. Removing lines from the end leaves a valid shorter chain,
so the head hash is also recorded outside the file (a :class:`HeadStore`, the site store) and
:func:`verify_chain` compares the two.

The chain is evidence of tampering, not a defence against it: whoever can write the file and the
store can rebuild both. It stays at the site with the rest of the audit log.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

from common.errors import ConfigError

GENESIS = "0" * 64
"""``prev`` of the first line: no line comes before it."""

CHAIN_KEYS = ("seq", "prev", "hash")
"""Keys the chain adds to every entry; an entry may not carry them itself."""

_TAIL_BLOCK = 4096


class HeadStore(Protocol):
    """Where the hash of the log's last line is kept, outside the log (the site store)."""

    def get_meta(self, name: str) -> str | None:
        """Return the value stored under ``name``, or None."""
        ...

    def set_meta(self, name: str, value: str) -> None:
        """Store ``value`` under ``name``, replacing any previous value."""
        ...


@dataclass(frozen=True)
class ChainVerification:
    """Outcome of :func:`verify_chain`.

    Attributes
    ----------
    ok : bool
        True when every line chains to the one before and the head matches the expected one.
    lines : int
        Number of lines in the file (0 when it is missing or empty).
    head : str or None
        ``hash`` of the last line of the verified prefix (the last line when ``ok``); None when
        no line verified.
    problem : str or None
        The first problem found, naming its 1-based line; None when ``ok``.
    """

    ok: bool
    lines: int
    head: str | None
    problem: str | None


def line_hash(obj: dict[str, Any]) -> str:
    """Return the SHA-256 hex digest of a line's canonical JSON without its ``hash`` key.

    Parameters
    ----------
    obj : dict
        A decoded line (``hash`` is ignored when present).

    Returns
    -------
    str
        64 lowercase hex characters.
    """
    body = {key: value for key, value in obj.items() if key != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class AuditChain:
    """Append entries to a hash-chained JSON-lines file, safely across processes.

    Parameters
    ----------
    path : Path
        The log file (created with its directory on first append).
    head_store : HeadStore or None
        Where to record the head hash after each append; None records it nowhere.
    name : str or None
        Name of the log in the store's meta key ``audit_head:<name>``; defaults to the file
        name.
    """

    def __init__(self, path: Path, *, head_store: HeadStore | None = None,
                 name: str | None = None) -> None:
        self.path = Path(path)
        self.head_store = head_store
        self.meta_name = f"audit_head:{name or self.path.name}"

    @property
    def lock_path(self) -> Path:
        """Sibling lock file held (``flock``) for the whole of each append."""
        return self.path.with_name(self.path.name + ".lock")

    def append(self, entry: dict[str, Any]) -> str:
        """Append one entry as a chained line, on disk (fsync) before returning.

        Parameters
        ----------
        entry : dict
            JSON-serialisable, without the keys ``seq``, ``prev`` or ``hash``.

        Returns
        -------
        str
            The new line's hash (the new head).

        Raises
        ------
        ValueError
            If ``entry`` carries a chain key or is not JSON-serialisable.
        ConfigError
            If the log's last line is torn or unchained: the log is never extended past a line
            the chain cannot vouch for.
        """
        reserved = sorted(set(CHAIN_KEYS) & set(entry))
        if reserved:
            raise ValueError(f"audit entry carries the chain key(s) {reserved}; they are "
                             "written by the chain itself")
        try:
            # A JSON round trip first: what is hashed is exactly what a reader decodes
            # (tuples become lists, non-string keys strings).
            body: dict[str, Any] = json.loads(json.dumps(entry))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"audit entry is not JSON-serialisable: {exc}") from exc
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
            try:
                seq, prev = self._tail(fd)
                recorded = None if self.head_store is None else \
                    self.head_store.get_meta(self.meta_name)
                if recorded and recorded != prev:
                    # Lines were cut from the end (or the log replaced): appending would
                    # overwrite the evidence, so the log is never extended past it.
                    raise ConfigError(
                        f"audit log {self.path}: it ends at line {seq} with hash {prev[:12]}..., "
                        f"but the site store records head {recorded[:12]}...: lines were "
                        "removed from the end or the file was replaced. Nothing is sent until "
                        "an operator checks it (fedseg-site audit verify).")
                line = {**body, "seq": seq + 1, "prev": prev}
                line["hash"] = line_hash(line)
                _write_all(fd, (json.dumps(line, sort_keys=True) + "\n").encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                _fsync_dir(self.path.parent)
            if self.head_store is not None:
                self.head_store.set_meta(self.meta_name, line["hash"])
        return str(line["hash"])

    def verify(self) -> ChainVerification:
        """Verify the log against the head recorded in the store, if any (:func:`verify_chain`)."""
        expected = None if self.head_store is None else self.head_store.get_meta(self.meta_name)
        return verify_chain(self.path, expected_head=expected)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the exclusive lock on the sibling lock file."""
        with self.lock_path.open("a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _tail(self, fd: int) -> tuple[int, str]:
        """Return ``(seq, hash)`` of the last line, read from the end; ``(0, GENESIS)`` if empty."""
        size = os.fstat(fd).st_size
        if size == 0:
            return 0, GENESIS
        if os.pread(fd, 1, size - 1) != b"\n":
            self._refuse(fd, "does not end with a newline (a write was cut off)", torn=True)
        end = size - 1  # the last line's newline
        start = end
        while start > 0:
            block = min(_TAIL_BLOCK, start)
            chunk = os.pread(fd, block, start - block)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                start = start - block + cut + 1
                break
            start -= block
        raw = os.pread(fd, end - start, start)
        try:
            last = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            self._refuse(fd, "is not valid JSON")
        if not isinstance(last, dict):
            self._refuse(fd, "is not a JSON object")
        if "hash" not in last:
            self._refuse(fd, "has no hash (written before the audit log was chained; move "
                             "the old log aside to start a new chain)")
        seq, head = last.get("seq"), last["hash"]
        if type(seq) is not int or seq < 1 or not isinstance(head, str) \
                or line_hash(last) != head:
            self._refuse(fd, "does not match its own hash or has no valid seq")
        return seq, head

    def _refuse(self, fd: int, what: str, *, torn: bool = False) -> NoReturn:
        """Raise the ConfigError for an unextendable last line (counting lines only now)."""
        newlines, offset, size = 0, 0, os.fstat(fd).st_size
        while offset < size:
            chunk = os.pread(fd, 1 << 20, offset)
            newlines += chunk.count(b"\n")
            offset += len(chunk)
        number = newlines + 1 if torn else newlines
        raise ConfigError(f"audit log {self.path} line {number} {what}; it is not extended "
                          "past a line the chain cannot vouch for. Run `fedseg-site audit "
                          "verify` to see the state of the chain before repairing it.")


def verify_chain(path: Path, *, expected_head: str | None = None) -> ChainVerification:
    """Check every line of a chained audit log, stopping at the first problem.

    Parameters
    ----------
    path : Path
        The log file.
    expected_head : str or None
        The head hash recorded outside the file (the site store). When given, the log must end
        with it: a valid chain that ends elsewhere was truncated, replaced or extended by a
        writer that did not update the store.

    Returns
    -------
    ChainVerification
        ``ok`` with the head, or the first problem naming its 1-based line.
    """
    path = Path(path)
    short = None if expected_head is None else expected_head[:16] + "..."
    if not path.is_file():
        if expected_head is None:
            return ChainVerification(ok=True, lines=0, head=None, problem=None)
        return ChainVerification(ok=False, lines=0, head=None, problem=(
            f"the log {path} does not exist, but the site store records head {short}: the "
            "file was deleted or moved"))
    problem: str | None = None
    head: str | None = None
    prev = GENESIS
    expected_at: int | None = None
    number = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if problem is not None:
                continue  # count the remaining lines only
            problem = _check_line(raw, number, prev)
            if problem is None:
                head = prev = json.loads(raw)["hash"]
                if head == expected_head:
                    expected_at = number
    lines = number
    if problem is None and expected_head is not None and head != expected_head:
        ends = ("the log is empty" if head is None
                else f"the log ends at line {lines} with hash {head[:16]}...")
        if expected_at is not None:
            problem = (f"{ends}, but the site store records head {short} (line "
                       f"{expected_at}): lines {expected_at + 1}-{lines} were appended without "
                       "updating the site store")
        else:
            problem = (f"{ends}, but the site store records head {short}: lines were removed "
                       "from the end or the file was replaced")
    return ChainVerification(ok=problem is None, lines=lines, head=head, problem=problem)


def _check_line(raw: bytes, number: int, prev: str) -> str | None:
    """Return what is wrong with line ``number`` given the previous hash, or None."""
    if not raw.endswith(b"\n"):
        return f"line {number}: no trailing newline (a write was cut off)"
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return f"line {number}: not valid JSON"
    if not isinstance(obj, dict):
        return f"line {number}: not a JSON object"
    if "hash" not in obj:
        return f"line {number}: no hash (written before the audit log was chained)"
    if obj["hash"] != line_hash(obj):
        return f"line {number}: hash mismatch (the line was changed)"
    if obj.get("prev") != prev:
        if number == 1:
            return (f"line 1: prev is not {GENESIS[:16]}... (lines were removed from the "
                    "start or the file was replaced)")
        return (f"line {number}: prev does not match line {number - 1}'s hash (a line was "
                "deleted or reordered)")
    if type(obj.get("seq")) is not int or obj["seq"] != number:
        return f"line {number}: seq {obj.get('seq')}, expected {number}"
    return None


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte (os.write may write fewer)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(directory: Path) -> None:
    """Fsync a directory so a newly created file's entry survives a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
