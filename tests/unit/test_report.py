"""``report.html``: built from the run's published files only, escaped, honest about the run."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from server.coordinator import KMeansSettings
from server.report import (
    REPORT_NAME,
    RunArtifacts,
    centroid_map,
    load_run,
    main,
    overall_means,
    render_report,
    warnings_for,
    write_report,
)
from simulations.datasets import ByGroupPartition, MixedCustomers, SyntheticCustomers
from simulations.inprocess import run_inprocess


def _write_run(root: Path, dataset: object, *, k: int = 4, max_rounds: int = 20,
               customers_dir: bool = True) -> Path:
    population = dataset.load(seed=0)  # type: ignore[attr-defined]
    parts = ByGroupPartition().split(population, num_sites=3, seed=0)
    settings = KMeansSettings(k=k, n_init=1, init_rounds=1, init_candidates=0,
                              max_rounds=max_rounds)
    coordinator = run_inprocess([population.raw[p] for p in parts],
                                features=population.features, settings=settings)
    model = coordinator.build_model(privacy={"secure_aggregation": "none",
                                             "min_segment_size": 10}, config={})
    root.mkdir(parents=True, exist_ok=True)
    model.to_json(root / "segments.json")
    (root / "metrics.jsonl").write_text(
        "".join(json.dumps(r.to_dict()) + "\n" for r in coordinator.history), encoding="utf-8")
    (root / "summary.json").write_text(json.dumps(
        {"k": k, "num_sites": 3, "rounds": len(coordinator.history),
         "converged": coordinator.converged}), encoding="utf-8")
    if customers_dir:  # what a simulation also leaves in its run directory: the sites' data
        (root / "sites").mkdir(exist_ok=True)
        np.savetxt(root / "sites" / "customers.csv", population.raw, delimiter=",")
    return root


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_run(tmp_path_factory.mktemp("synthetic"),
                      SyntheticCustomers(num_customers=3000, num_regions=3))


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_run(tmp_path_factory.mktemp("mixed"),
                      MixedCustomers(num_customers=3000, num_regions=3), k=6)


def _images(page: str) -> list[str]:
    return re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+" alt="([^"]*)">', page)


def test_the_report_has_the_table_the_plots_and_no_external_resource(synthetic_run: Path):
    path = write_report(synthetic_run)
    assert path == synthetic_run / REPORT_NAME
    page = path.read_text(encoding="utf-8")
    model = json.loads((synthetic_run / "segments.json").read_text())
    for segment in model["segments"]:
        assert f"<td>{segment['name']}</td>" in page
    alts = _images(page)
    assert alts[0] == "map of segment centroids"
    assert [a for a in alts if a.startswith("profile of ")] == [
        f"profile of {f['label'] or f['name']}" for f in model["features"]]
    assert "convergence per round" in alts and "sites reporting per round" in alts
    # self-contained: no script, no link, no URL other than the embedded images
    assert "<script" not in page and "<link" not in page
    assert re.findall(r'(?:src|href)="(?!data:image/png;base64,)', page) == []


def test_category_values_share_one_plot_per_group(mixed_run: Path):
    artifacts = load_run(mixed_run)
    groups = {f.group for f in artifacts.model.features if f.kind == "category" and f.group}
    assert groups, "the mixed data has categorical features"
    alts = _images(render_report(artifacts))
    for group in groups:
        assert alts.count(f"profile of {group}") == 1
    single = [f for f in artifacts.model.features if not (f.kind == "category" and f.group)]
    assert len([a for a in alts if a.startswith("profile of ")]) == len(groups) + len(single)


def test_the_report_reads_only_the_published_files(synthetic_run: Path, tmp_path: Path):
    """Removing every customer file from the run directory changes nothing in the page."""
    copy = tmp_path / "run"
    shutil.copytree(synthetic_run, copy)
    with_customers = render_report(replace(load_run(copy), source=Path("run")))
    shutil.rmtree(copy / "sites")
    without = render_report(replace(load_run(copy), source=Path("run")))
    assert with_customers == without


def test_the_map_holds_one_point_per_published_centroid(synthetic_run: Path):
    model = load_run(synthetic_run).model
    coords = centroid_map(model)
    assert coords.shape == (len(model.segments), 2)
    # PCA of the centroids keeps their pairwise distances as far as two directions can
    centroids = model.centroids_scaled
    first = np.linalg.norm(coords[0] - coords[1])
    assert first <= np.linalg.norm(centroids[0] - centroids[1]) + 1e-9


def test_overall_means_weigh_segments_by_size(synthetic_run: Path):
    model = load_run(synthetic_run).model
    name = model.features[0].name
    sizes = np.asarray([s.size for s in model.segments], dtype=float)
    means = np.asarray([s.mean[name] for s in model.segments])
    assert overall_means(model)[name] == pytest.approx(float(sizes @ means / sizes.sum()))


def test_names_and_labels_are_escaped(synthetic_run: Path):
    artifacts = load_run(synthetic_run)
    hostile = replace(artifacts.model.segments[0], name="<img src=x onerror=alert(1)>")
    model = replace(artifacts.model, segments=(hostile, *artifacts.model.segments[1:]))
    page = render_report(replace(artifacts, model=model))
    assert "<img src=x" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


def test_a_run_that_merged_most_segments_or_did_not_converge_says_so(tmp_path: Path):
    run = _write_run(tmp_path / "r", SyntheticCustomers(num_customers=600, num_regions=3),
                     k=80, max_rounds=2)
    artifacts = load_run(run)
    warnings = warnings_for(artifacts)
    merged = len(artifacts.model.merged)
    assert merged * 2 >= 80, merged
    assert any(f"{merged} of the 80 requested segments were merged" in w for w in warnings)
    assert any("maximum number of rounds" in w for w in warnings)
    page = render_report(artifacts)
    assert page.count('class="warn"') == len(warnings)


def test_a_run_directory_without_a_model_is_a_clear_error(tmp_path: Path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "segments.json" in err and "not found" in err and "Traceback" not in err


def test_a_broken_metrics_file_names_its_line(synthetic_run: Path, tmp_path: Path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(synthetic_run, copy)
    with (copy / "metrics.jsonl").open("a", encoding="utf-8") as handle:
        handle.write("{not json\n")
    assert main([str(copy)]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl" in err and "line" in err
    assert not (copy / REPORT_NAME).exists() or \
        (copy / REPORT_NAME).stat().st_mtime <= (copy / "metrics.jsonl").stat().st_mtime


def test_run_artifacts_default_to_a_model_only_report(synthetic_run: Path):
    model = load_run(synthetic_run).model
    page = render_report(RunArtifacts(model=model))
    assert "No per-round cost was released" in page and "<td>" in page
