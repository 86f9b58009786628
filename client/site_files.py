"""Where a site keeps what it writes: audit log, full-detail site log, round ledger.

Everything here stays at the site. The audit log records what left (never a value); the site
log holds the full reason of every refusal or error (it may name local values, so it never
leaves); the round ledger counts the rounds answered in the last 24 hours, over all runs.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context

from common.errors import SiteRefusal

DAY_SECONDS = 24 * 3600.0


def site_id(context: Context) -> str:
    """Return the site's name in file names: the simulation partition id, else the node id."""
    return str(context.node_config.get("partition-id", context.node_id))


@dataclass(frozen=True)
class SiteFiles:
    """Paths of one site's local files under ``root``.

    Attributes
    ----------
    root : Path
        The site's directory (the run directory in simulation).
    site : str
        The site's name (:func:`site_id`).
    """

    root: Path
    site: str

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

    def log(self, event: str, detail: str, *, exc: BaseException | None = None) -> None:
        """Append one entry to the site log (with the traceback of ``exc`` if given)."""
        self.site_log.parent.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        text = f"{stamp} site={self.site} {event}: {detail}\n"
        if exc is not None and not isinstance(exc, SiteRefusal):
            text += "".join(traceback.format_exception(exc))
        with self.site_log.open("a", encoding="utf-8") as handle:
            handle.write(text)

    def append_audit(self, entry: dict[str, object]) -> None:
        """Append one JSON line to the audit log."""
        self.audit_log.parent.mkdir(parents=True, exist_ok=True)
        with self.audit_log.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")

    def admit_round(self, *, max_per_day: int, now: float | None = None) -> int:
        """Count one more answered round, refusing when ``max_per_day`` are already spent.

        Returns
        -------
        int
            Rounds answered in the last 24 hours, this one included.
        """
        now = time.time() if now is None else now
        recent = 0
        if self.ledger.is_file():
            for line in self.ledger.read_text(encoding="utf-8").split():
                try:
                    if now - float(line) < DAY_SECONDS:
                        recent += 1
                except ValueError:
                    continue  # a torn line from a crash counts as nothing, never as a crash
        if recent >= max_per_day:
            raise SiteRefusal("budget", f"{recent} rounds answered in the last 24 hours; the "
                              f"site policy allows {max_per_day} (site.max_rounds_per_day).")
        self.ledger.parent.mkdir(parents=True, exist_ok=True)
        with self.ledger.open("a", encoding="utf-8") as handle:
            handle.write(f"{now:.3f}\n")
        return recent + 1
