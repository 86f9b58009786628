"""Where a site keeps what it writes: audit log, site log, round ledger, privacy ledger.

Everything here stays at the site. The audit log records what left (never a value); the site
log holds the full reason of every refusal or error (it may name local values, so it never
leaves); the round ledger counts the rounds answered in the last 24 hours, over all runs; the
privacy ledger holds every differentially private release the site ever made (its noise
multiplier), so its budget survives restarts and spans runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context

from client.audit_chain import AuditChain, HeadStore
from common.errors import SiteRefusal

DAY_SECONDS = 24 * 3600.0


def audit_head_name(log: Path) -> str:
    """Return the log's key in the site store's head records (from its absolute path)."""
    return hashlib.sha256(str(log.resolve()).encode()).hexdigest()[:40]


SITE_NAME_NODE = "fedseg-site-name"
"""Node config key: the site's stable name (its files, above all its privacy ledger)."""


def site_id(context: Context) -> str:
    """Return the site's name in file names.

    ``fedseg-site-name`` from the node config when set, else the simulation partition id, else
    the node id (which changes whenever the node re-registers: no DP run is answered then).
    """
    if SITE_NAME_NODE in context.node_config:
        return str(context.node_config[SITE_NAME_NODE])
    return str(context.node_config.get("partition-id", context.node_id))


def has_stable_identity(context: Context) -> bool:
    """Whether :func:`site_id` survives a restart (a name or a partition id, not a node id)."""
    return SITE_NAME_NODE in context.node_config or "partition-id" in context.node_config


@dataclass(frozen=True)
class SiteFiles:
    """Paths of one site's local files under ``root``.

    Attributes
    ----------
    root : Path
        The site's directory (the run directory in simulation).
    site : str
        The site's name (:func:`site_id`).
    head_store : HeadStore or None
        Where the audit chain's head hash is recorded (the site store); None records it nowhere.
    """

    root: Path
    site: str
    stable_identity: bool = True
    head_store: HeadStore | None = field(default=None, compare=False)

    @property
    def audit_log(self) -> Path:
        """JSON lines: one per message the site sent."""
        return self.root / "audit" / f"site-{self.site}.jsonl"

    @property
    def site_log(self) -> Path:
        """Plain text: every refusal and error with its full reason (stays at the site)."""
        return self.root / "site-logs" / f"site-{self.site}.log"

    @property
    def ledger(self) -> Path:
        """One timestamp per round answered (rounds-per-day limit)."""
        return self.root / "site-state" / f"site-{self.site}-rounds.log"

    @property
    def privacy_ledger(self) -> Path:
        """JSON lines: one per DP release (noise multiplier, run, round, phase, time)."""
        return self.root / "site-state" / f"site-{self.site}-privacy.jsonl"

    def privacy_events(self) -> list[float]:
        """Noise multipliers of every release recorded so far.

        An unreadable line is not skipped: under-counting would overspend the budget, so the
        site refuses until its operator repairs the file (the site log names the line).
        """
        if not self.privacy_ledger.is_file():
            return []
        events = []
        lines = self.privacy_ledger.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            try:
                value = float(json.loads(line)["noise_multiplier"])
                if not value > 0:
                    raise ValueError(value)
            except (ValueError, KeyError, TypeError) as exc:
                raise SiteRefusal("budget", f"privacy ledger {self.privacy_ledger} line "
                                  f"{number} is unreadable ({exc!r}); no release until it is "
                                  "repaired (never delete it: it is the site's budget).") \
                    from exc
            events.append(value)
        return events

    def privacy_delta(self) -> float | None:
        """Return the delta of the site's budget as its latest ledger entry records it."""
        if not self.privacy_ledger.is_file():
            return None
        for line in reversed(self.privacy_ledger.read_text(encoding="utf-8").splitlines()):
            try:
                value = float(json.loads(line)["delta"])
            except (ValueError, KeyError, TypeError):
                continue
            if 0 < value < 1:
                return value
        return None

    @contextlib.contextmanager
    def privacy_lock(self) -> Iterator[None]:
        """Hold an exclusive lock on the privacy ledger (read-check-append is one step)."""
        self.privacy_ledger.parent.mkdir(parents=True, exist_ok=True)
        lock = self.privacy_ledger.with_suffix(".lock")
        with lock.open("a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def record_release(self, entry: dict[str, object]) -> None:
        """Append one release to the privacy ledger, on disk before anything is sent."""
        self.privacy_ledger.parent.mkdir(parents=True, exist_ok=True)
        with self.privacy_ledger.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def log(self, event: str, detail: str, *, exc: BaseException | None = None) -> None:
        """Append one entry to the site log (with the traceback of ``exc`` if given)."""
        self.site_log.parent.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        text = f"{stamp} site={self.site} {event}: {detail}\n"
        if exc is not None and not isinstance(exc, SiteRefusal):
            text += "".join(traceback.format_exception(exc))
        with self.site_log.open("a", encoding="utf-8") as handle:
            handle.write(text)

    def append_audit(self, entry: dict[str, object]) -> str:
        """Append one entry to the hash-chained audit log, on disk before returning.

        See :class:`client.audit_chain.AuditChain`: the line gets ``seq``, ``prev`` and
        ``hash``, and the head is recorded in ``head_store`` when one is set. Raises
        :class:`common.errors.ConfigError` when the log's last line is torn or unchained.

        Returns
        -------
        str
            The new line's hash.
        """
        return AuditChain(self.audit_log, head_store=self.head_store,
                          name=audit_head_name(self.audit_log)).append(entry)

    def rounds_in_last_day(self, *, now: float | None = None) -> int:
        """Count the rounds this site answered in the 24 hours before ``now`` (its ledger)."""
        now = time.time() if now is None else now
        recent = 0
        if self.ledger.is_file():
            for line in self.ledger.read_text(encoding="utf-8").split():
                try:
                    if now - float(line) < DAY_SECONDS:
                        recent += 1
                except ValueError:
                    continue  # a torn line from a crash counts as nothing, never as a crash
        return recent

    def admit_round(self, *, max_per_day: int, now: float | None = None) -> int:
        """Count one more answered round, refusing when ``max_per_day`` are already spent.

        Returns
        -------
        int
            Rounds answered in the last 24 hours, this one included.
        """
        now = time.time() if now is None else now
        recent = self.rounds_in_last_day(now=now)
        if recent >= max_per_day:
            raise SiteRefusal("budget", f"{recent} rounds answered in the last 24 hours; the "
                              f"site policy allows {max_per_day} (site.max_rounds_per_day).")
        self.ledger.parent.mkdir(parents=True, exist_ok=True)
        with self.ledger.open("a", encoding="utf-8") as handle:
            handle.write(f"{now:.3f}\n")
        return recent + 1
