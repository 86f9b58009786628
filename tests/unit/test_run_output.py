"""``flwr run`` outputs: each run its own directory unless the run config names one."""

from __future__ import annotations

from pathlib import Path

from simulations.flower_app import run_output_dir


def test_each_run_gets_its_own_directory_by_default() -> None:
    first, second = run_output_dir("", 11), run_output_dir("", 12)
    assert first != second
    assert first.parts[:2] == ("outputs", "flwr") and first.name.endswith("-run11")


def test_a_configured_directory_is_used_as_given(tmp_path: Path) -> None:
    assert run_output_dir(str(tmp_path / "mine"), 11) == tmp_path / "mine"
