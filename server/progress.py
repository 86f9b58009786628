"""Progress of a run, round by round: a live ``rich`` bar on a terminal, plain lines elsewhere.

On a terminal (and without ``quiet=true``) :class:`RoundProgress` shows one bar over the run's
rounds -- phase, cost, shift, sites reporting, elapsed time -- and prints each finished round
above it. Anywhere else (a pipe, a log file, ``flwr run``'s captured output, ``quiet=true``)
it prints one plain line per round, always in the same format::

    [fedseg] round  7 lloyd    sites=5  cost=4,444.3  shift=8.34e-02  0.10s

The bar's total is the plan's maximum number of rounds: a run that converges early finishes
the bar at its last round.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from server.coordinator import RoundRecord

PREFIX = "[fedseg] "


def format_round(record: RoundRecord) -> str:
    """One round as a plain line (without the ``[fedseg]`` prefix).

    The cost and shift of a Lloyd round are those of one restart -- the best so far, named
    when there are several (``strategy.n_init``).
    """
    parts = [f"round {record.round:>2} {record.phase:<8} sites={record.num_sites}"]
    if record.cost is not None and record.phase == "ae_train":
        parts.append(f"loss={record.cost:.4f}")
    elif record.cost is not None:
        parts.append(f"cost={record.cost:,.1f}")
    if record.shift is not None:
        parts.append(f"shift={record.shift:.2e}")
    if record.restart is not None:
        parts.append(f"(restart {record.restart + 1})")
    if record.reseeded:
        parts.append(f"reseeded={record.reseeded}")
    parts.append(f"{record.seconds:.2f}s")
    return "  ".join(parts)


class RoundProgress:
    """Round-by-round progress for one run; use as a context manager, pass :meth:`on_round`.

    Parameters
    ----------
    total_rounds : int
        The plan's maximum number of rounds (the bar's length).
    quiet : bool
        Plain lines even on a terminal (``quiet=true``).
    stream : file-like, optional
        Where to write (default: ``sys.stdout``). A live bar only when it is a terminal.
    """

    def __init__(self, *, total_rounds: int, quiet: bool = False,
                 stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.total = max(int(total_rounds), 1)
        self.live = not quiet and bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.perf_counter()
        self._progress: Progress | None = None
        self._task: Any = None
        self.rounds = 0

    def __enter__(self) -> RoundProgress:
        if self.live:
            console = Console(file=self.stream, force_terminal=True)
            self._progress = Progress(
                TextColumn("[bold]fedseg[/] round {task.completed:>3.0f}/{task.total:.0f}"),
                BarColumn(),
                TextColumn("{task.fields[phase]:<8} sites={task.fields[sites]}"
                           "  {task.fields[cost]}  {task.fields[shift]}"),
                TimeElapsedColumn(),
                console=console, transient=False, redirect_stdout=False,
                redirect_stderr=False)
            self._task = self._progress.add_task("rounds", total=self.total, phase="starting",
                                                 sites="-", cost="", shift="")
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            if exc[0] is None:  # finished: a converged run ends the bar at its last round
                self._progress.update(self._task, total=max(self.rounds, 1),
                                      completed=max(self.rounds, 1))
            self._progress.stop()

    def say(self, message: str) -> None:
        """Print a line above the bar (or plainly)."""
        if self._progress is not None:
            self._progress.console.print(PREFIX + message, markup=False, highlight=False,
                                         soft_wrap=True)
        else:
            print(PREFIX + message, file=self.stream, flush=True)

    def on_round(self, record: RoundRecord) -> None:
        """Record a finished round: print its line and move the bar."""
        self.rounds = max(self.rounds, record.round)
        self.say(format_round(record))
        if self._progress is not None:
            cost = "" if record.cost is None else (
                f"loss={record.cost:.4f}" if record.phase == "ae_train"
                else f"cost={record.cost:,.1f}")
            shift = "" if record.shift is None else f"shift={record.shift:.2e}"
            self._progress.update(self._task, completed=min(record.round, self.total),
                                  phase=record.phase, sites=record.num_sites, cost=cost,
                                  shift=shift)
            self._progress.refresh()  # show this round now, not at the next timed refresh
