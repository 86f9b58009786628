"""Round progress: a live bar on a terminal, plain lines elsewhere; honest round lines."""

from __future__ import annotations

import io
import re

import numpy as np

from server.coordinator import KMeansSettings, RoundRecord
from server.progress import RoundProgress, format_round
from simulations.datasets import ByGroupPartition, SyntheticCustomers
from simulations.inprocess import run_inprocess

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class _Terminal(io.StringIO):
    """A text stream that says it is a terminal (as a real TTY's stdout does)."""

    def isatty(self) -> bool:
        return True


def _records() -> list[RoundRecord]:
    return [RoundRecord(round=1, phase="moments", num_sites=5, seconds=1.5),
            RoundRecord(round=2, phase="lloyd", num_sites=5, seconds=0.2, cost=1234.5,
                        shift=0.01, restart=1),
            RoundRecord(round=3, phase="profile", num_sites=4, seconds=0.1, cost=1200.0)]


def test_off_a_terminal_each_round_is_one_plain_line() -> None:
    stream = io.StringIO()
    with RoundProgress(total_rounds=10, stream=stream) as progress:
        for record in _records():
            progress.on_round(record)
    lines = stream.getvalue().splitlines()
    assert lines == ["[fedseg] " + format_round(r) for r in _records()]
    assert not ANSI.search(stream.getvalue())
    assert "cost=1,234.5  shift=1.00e-02  (restart 2)" in lines[1]


def test_on_a_terminal_a_live_bar_shows_phase_cost_shift_and_sites() -> None:
    stream = _Terminal()
    with RoundProgress(total_rounds=10, stream=stream) as progress:
        assert progress.live
        for record in _records():
            progress.on_round(record)
    text = ANSI.sub("", stream.getvalue())
    # every round's line is printed above the bar ...
    for record in _records():
        assert format_round(record) in text
    # ... and the bar itself moved with the rounds, ending at the last round (converged early)
    assert "round   2/ 10" in text or "round   2/10" in text
    assert "lloyd" in text and "sites=5" in text and "cost=1,234.5" in text
    assert "round   3/  3" in text or "round   3/3" in text


def test_quiet_gives_plain_lines_even_on_a_terminal() -> None:
    stream = _Terminal()
    with RoundProgress(total_rounds=10, quiet=True, stream=stream) as progress:
        assert not progress.live
        for record in _records():
            progress.on_round(record)
    assert not ANSI.search(stream.getvalue())
    assert len(stream.getvalue().splitlines()) == len(_records())


def test_a_lloyd_round_shows_the_cost_and_shift_of_one_restart() -> None:
    population = SyntheticCustomers(num_customers=3000, num_regions=3).load(seed=4)
    parts = ByGroupPartition().split(population, num_sites=3, seed=0)
    settings = KMeansSettings(k=6, n_init=4, init_rounds=1, init_candidates=0, max_rounds=30,
                              init="random")
    coordinator = run_inprocess([population.raw[p] for p in parts],
                                features=population.features, settings=settings)
    lloyd = [r for r in coordinator.history if r.phase == "lloyd"]
    assert lloyd and all(r.restart is not None and 0 <= r.restart < 4 for r in lloyd)
    # the last line's restart is the one published, and its cost is the lowest of that round
    assert lloyd[-1].restart == coordinator.best_run
    profile = coordinator.history[-1]
    assert profile.phase == "profile" and profile.cost is not None
    # the published centres' cost (profile round) is no worse than the last line's cost
    assert profile.cost <= lloyd[-1].cost * (1 + 1e-9)
    # a restart that has stopped moving shows shift 0, never another restart's shift
    assert all(np.isfinite(r.shift) and r.shift >= 0 for r in lloyd)
