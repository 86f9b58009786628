"""``report.html``: one self-contained page per run, for the data scientist reading it.

Every run -- simulation (:mod:`simulations.run`) and deployed server (:mod:`server.deploy`) --
writes ``report.html`` beside ``segments.json``. The page needs no network and runs no script:
its CSS is inline and its plots (matplotlib, Agg) are PNGs embedded as ``data:`` URIs.

What it shows is what the run published or measured, never a customer:

* the segment table (name, size, share, the features that set each segment apart, as its mean
  against the overall mean);
* one profile plot per feature (per-segment means; shares for flags and category values);
* a 2-D map of the **centroids only** (PCA of the published standardised centroids, bubbles
  sized by segment size);
* the convergence curve (cost and shift per round; the autoencoder's loss);
* per-site participation per round and the sites that dropped out;
* the privacy section: SecAgg+ parameters, epsilon / delta spent, the minimum segment size,
  and the bytes each site sent per round (from the sites' own audit logs, in simulation).

Regenerate one for an existing run directory with ``python -m server.report RUN_DIR``.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from common.errors import DataError, FedsegError
from common.features import FeatureSpec
from common.segment_model import SegmentModel

REPORT_NAME = "report.html"
"""File name of the report, written beside ``segments.json``."""

MAX_PROFILE_PLOTS = 40
"""Beyond this many features (or category groups) the profile plots stop; the page says so."""

KEY_FEATURES = 3
"""Features listed per segment in the table: those furthest from the overall mean."""

_PALETTE = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3",
            "#8C8C8C", "#CCB974", "#64B5CD")


@dataclass(frozen=True)
class RunArtifacts:
    """What a run directory holds that the report reads.

    Attributes
    ----------
    model : SegmentModel
        ``segments.json``.
    metrics : list of dict
        ``metrics.jsonl``, one dict per round (empty if absent).
    summary : dict
        ``summary.json`` (empty if absent).
    site_bytes : dict of str to dict of int to int
        Per site, bytes sent per round, read from the sites' audit logs under ``audit/``
        (simulation); empty in deployment, where each site keeps its own log.
    source : Path
        The run directory.
    """

    model: SegmentModel
    metrics: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    site_bytes: dict[str, dict[int, int]] = field(default_factory=dict)
    source: Path = Path(".")


def _read_json_lines(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"line {number} is not valid JSON ({exc.msg}).",
                            path=str(path)) from exc
    return rows


def audit_bytes_by_site(audit_dir: Path) -> dict[str, dict[int, int]]:
    """Per site, the bytes it sent per round, from the sites' audit logs (``site-*.jsonl``)."""
    sent: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for log_file in sorted(audit_dir.glob("site-*.jsonl")):
        for entry in _read_json_lines(log_file):
            try:
                rnd = int(entry["round"])
            except (KeyError, TypeError, ValueError):
                continue
            sent[str(entry.get("site", log_file.stem))][rnd] += int(entry.get("bytes", 0))
    return {site: dict(rounds) for site, rounds in sent.items()}


def load_run(run_dir: str | Path) -> RunArtifacts:
    """Read a run directory (``segments.json`` required; the rest when present).

    Raises
    ------
    DataError
        ``segments.json`` is missing or invalid, or another file is not valid JSON.
    """
    root = Path(run_dir)
    model = SegmentModel.load(root / "segments.json")
    metrics = _read_json_lines(root / "metrics.jsonl") if (root / "metrics.jsonl").is_file() \
        else []
    summary: dict[str, Any] = {}
    if (root / "summary.json").is_file():
        try:
            summary = json.loads((root / "summary.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"not valid JSON ({exc.msg} at line {exc.lineno}).",
                            path=str(root / "summary.json")) from exc
    audit = root / "audit"
    site_bytes = audit_bytes_by_site(audit) if audit.is_dir() else {}
    return RunArtifacts(model=model, metrics=metrics, summary=summary, site_bytes=site_bytes,
                        source=root)


# --------------------------------------------------------------------------------------------
# Numbers the page shows


def _label(feature: FeatureSpec) -> str:
    return feature.label or feature.name


def overall_means(model: SegmentModel) -> dict[str, float]:
    """Mean of every feature over all published customers (size-weighted segment means)."""
    sizes = np.asarray([max(s.size, 0) for s in model.segments], dtype=np.float64)
    total = float(sizes.sum()) or 1.0
    return {f.name: float(sum(w * s.mean[f.name] for w, s in zip(sizes, model.segments,
                                                                 strict=True)) / total)
            for f in model.features}


def key_features(model: SegmentModel, segment_index: int,
                 count: int = KEY_FEATURES) -> list[FeatureSpec]:
    """Return the ``count`` features whose centroid is furthest from the overall mean."""
    centroids = model.centroids_scaled
    weights = np.asarray([max(s.size, 0) for s in model.segments], dtype=np.float64)
    centre = (weights @ centroids) / max(float(weights.sum()), 1.0)
    gap = np.abs(centroids[segment_index] - centre)
    order = np.argsort(-gap, kind="stable")[:count]
    return [model.features[int(i)] for i in order]


def centroid_map(model: SegmentModel) -> NDArray[np.float64]:
    """2-D coordinates of the published centroids: their size-weighted PCA (no customer point).

    Returns
    -------
    ndarray of shape (n_segments, 2)
        A second coordinate of 0 when the centroids span one dimension or fewer.
    """
    centroids = model.centroids_scaled
    weights = np.asarray([max(s.size, 0) for s in model.segments], dtype=np.float64)
    weights = weights / max(float(weights.sum()), 1.0)
    centred = centroids - weights @ centroids
    _, _, vt = np.linalg.svd(centred * np.sqrt(weights)[:, None], full_matrices=False)
    coords = centred @ vt[: min(2, vt.shape[0])].T
    if coords.shape[1] < 2:
        coords = np.hstack([coords, np.zeros((coords.shape[0], 2 - coords.shape[1]))])
    return coords


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:,.1f}"
    return f"{value:.{digits}g}" if magnitude else "0"


def warnings_for(artifacts: RunArtifacts) -> list[str]:
    """Plain-language warnings about the run (not converged, most segments merged...)."""
    model, summary = artifacts.model, artifacts.summary
    out = []
    k = int(summary.get("k") or model.training.get("k_requested") or len(model.segments))
    merged = len(model.merged)
    if merged and merged * 2 >= k:
        out.append(f"{merged} of the {k} requested segments were merged into others because "
                   f"they held fewer than {model.privacy.get('min_segment_size', '?')} customers "
                   f"(the minimum segment size); {len(model.segments)} were published. "
                   "Ask for fewer segments (model.k) or use more customers.")
    converged = summary.get("converged", model.training.get("converged"))
    if converged is False and not model.privacy.get("differential_privacy"):
        out.append("The run stopped at its maximum number of rounds "
                   "(strategy.max_rounds) before the centres stopped moving; raise it, or "
                   "loosen strategy.tolerance.")
    if summary.get("dropouts"):
        names = sorted({str(d.get("site")) for d in summary["dropouts"]})
        out.append(f"{len(names)} site(s) dropped out and the run completed without them: "
                   + ", ".join(names) + ".")
    return out


# --------------------------------------------------------------------------------------------
# Plots


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(width, height))
    fig.set_layout_engine("constrained")
    return fig


def _colour(i: int) -> str:
    return _PALETTE[i % len(_PALETTE)]


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def profile_plots(model: SegmentModel) -> list[tuple[str, str]]:
    """One (title, PNG base64) per numeric/boolean feature and per category group."""
    overall = overall_means(model)
    names = [_short(s.name) for s in model.segments]
    plots: list[tuple[str, str]] = []
    groups: dict[str, list[FeatureSpec]] = defaultdict(list)
    for feature in model.features:
        if feature.kind == "category" and feature.group:
            groups[feature.group].append(feature)
    done_groups: set[str] = set()
    for feature in model.features:
        if len(plots) >= MAX_PROFILE_PLOTS:
            break
        if feature.kind == "category" and feature.group:
            if feature.group in done_groups:
                continue
            done_groups.add(feature.group)
            plots.append((feature.group, _category_plot(model, groups[feature.group], names)))
            continue
        values = [s.mean[feature.name] for s in model.segments]
        fig = _figure(5.2, 0.45 * len(names) + 1.1)
        ax = fig.subplots()
        ax.barh(range(len(values)), values, color=[_colour(i) for i in range(len(values))])
        ax.axvline(overall[feature.name], color="black", linestyle="--", linewidth=1,
                   label=f"overall {_fmt(overall[feature.name])}")
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        unit = "share of customers" if feature.kind == "boolean" else feature.unit
        ax.set_xlabel(unit or feature.name, fontsize=8)
        ax.set_title(_label(feature), fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
        plots.append((_label(feature), _png(fig)))
    return plots


def _category_plot(model: SegmentModel, features: list[FeatureSpec], names: list[str]) -> str:
    shares = np.asarray([[s.mean[f.name] for f in features] for s in model.segments])
    fig = _figure(5.2, 0.45 * len(names) + 1.4)
    ax = fig.subplots()
    left = np.zeros(len(names))
    for j, feature in enumerate(features):
        label = feature.label or feature.name
        ax.barh(range(len(names)), shares[:, j], left=left, color=_colour(j), label=label)
        left += shares[:, j]
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(1.0, float(left.max(initial=0.0))))
    ax.set_xlabel("share of the segment's customers", fontsize=8)
    ax.set_title(features[0].group, fontsize=10)
    ax.legend(fontsize=6, ncols=min(4, len(features)), loc="upper center",
              bbox_to_anchor=(0.5, -0.18))
    return _png(fig)


def map_plot(model: SegmentModel) -> str:
    """Draw the centroids' 2-D PCA map; return it as PNG base64."""
    coords = centroid_map(model)
    sizes = np.asarray([max(s.size, 1) for s in model.segments], dtype=np.float64)
    fig = _figure(6.4, 4.6)
    ax = fig.subplots()
    area = 2500.0 * sizes / sizes.max()
    ax.scatter(coords[:, 0], coords[:, 1], s=area, alpha=0.55,
               c=[_colour(i) for i in range(len(sizes))], edgecolors="black", linewidths=0.6)
    for (x, y), segment in zip(coords, model.segments, strict=True):
        ax.annotate(_short(segment.name, 32), (x, y), fontsize=8, ha="center", va="center")
    ax.set_xlabel("first principal direction of the centroids", fontsize=8)
    ax.set_ylabel("second principal direction", fontsize=8)
    ax.set_title("Segment centroids (bubble area: customers)", fontsize=10)
    ax.margins(0.25)
    return _png(fig)


def convergence_plot(metrics: list[dict[str, Any]]) -> str | None:
    """Cost and shift per round (and the autoencoder's loss) as PNG base64; None without any."""
    # Lloyd and profile rounds only: an init round's cost is that of its many candidate
    # centres, on another scale, and would hide the curve.
    cost = [(m["round"], m["cost"]) for m in metrics
            if m.get("cost") is not None and m.get("phase") in ("lloyd", "profile")]
    shift = [(m["round"], m["shift"]) for m in metrics if m.get("shift")]
    loss = [(m["round"], m["cost"]) for m in metrics
            if m.get("cost") is not None and m.get("phase") == "ae_train"]
    panels = [p for p in (cost, shift, loss) if p]
    if not panels:
        return None
    from matplotlib.ticker import MaxNLocator
    fig = _figure(6.4, 2.3 * len(panels))
    axes = np.atleast_1d(fig.subplots(len(panels), 1))
    i = 0
    for points, title, log in ((loss, "autoencoder loss (per customer)", False),
                               (cost, "k-means cost (sum of squared distances)", False),
                               (shift, "largest centre shift", True)):
        if not points:
            continue
        ax = axes[i]
        i += 1
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3,
                color=_colour(i))
        if log and all(p[1] > 0 for p in points):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
    return _png(fig)


def participation_plot(metrics: list[dict[str, Any]]) -> str | None:
    """Sites reporting per round as PNG base64; None without metrics."""
    if not metrics:
        return None
    from matplotlib.ticker import MaxNLocator

    rounds = [m["round"] for m in metrics]
    sites = [m.get("num_sites", 0) for m in metrics]
    fig = _figure(6.4, 2.2)
    ax = fig.subplots()
    ax.bar(rounds, sites, color=[_colour(0) if s == max(sites) else _colour(3) for s in sites])
    ax.set_xlabel("round", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("sites reporting", fontsize=8)
    ax.set_ylim(0, max(sites) + 1)
    ax.tick_params(labelsize=7)
    return _png(fig)


# --------------------------------------------------------------------------------------------
# Page


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:72em;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ccc;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:.3em .6em;
text-align:left;vertical-align:top;font-size:.92em}th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.up{color:#1a7f37}.down{color:#b42318}.warn{background:#fff4e5;border:1px solid #f0b35a;
padding:.6em 1em;margin:.4em 0}.grid{display:flex;flex-wrap:wrap;gap:1em}
.grid figure{margin:0}figcaption{font-size:.85em;color:#555}.muted{color:#666;font-size:.9em}
img{max-width:100%}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(data: str, alt: str) -> str:
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _kv_table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _segment_table(model: SegmentModel) -> str:
    overall = overall_means(model)
    rows = []
    for i, segment in enumerate(model.segments):
        keys = []
        for feature in key_features(model, i):
            mean, base = segment.mean[feature.name], overall[feature.name]
            arrow, cls = ("▲", "up") if mean >= base else ("▼", "down")
            keys.append(f'<span class="{cls}">{arrow}</span> {_e(_label(feature))}: '
                        f"{_e(_fmt(mean))} vs {_e(_fmt(base))}")
        rows.append(
            f"<tr><td>{segment.id}</td><td>{_e(segment.name)}</td>"
            f'<td class="num">{segment.size:,}</td><td class="num">{segment.share:.1%}</td>'
            f"<td>{'<br>'.join(keys)}</td></tr>")
    return ('<table id="segments"><thead><tr><th>id</th><th>segment</th><th>customers</th>'
            "<th>share</th><th>what sets it apart (segment mean vs overall)</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _privacy_section(artifacts: RunArtifacts) -> str:
    model, summary = artifacts.model, artifacts.summary
    privacy = model.privacy
    parts = []
    secagg = privacy.get("secagg")
    mechanism = privacy.get("secure_aggregation", "none")
    if secagg:
        parts.append(f"<p>Secure aggregation: <b>{_e(mechanism)}</b>. The server learned only "
                     "sums over all sites, never one site's statistics.</p>")
        parts.append(_kv_table([(k, v) for k, v in secagg.items()]))
    else:
        parts.append("<p>Secure aggregation: <b>off</b> (privacy=none): the server saw each "
                     "site's aggregates.</p>")
    dp = privacy.get("differential_privacy")
    if dp:
        parts.append("<h3>Differential privacy</h3>")
        parts.append(_kv_table([
            ("protected unit", dp.get("unit", "")),
            ("epsilon spent", _fmt(dp.get("epsilon_spent"), 4)),
            ("epsilon target", _fmt(dp.get("epsilon_target"), 4)),
            ("delta", dp.get("delta")),
            ("mechanism", dp.get("mechanism", "")),
            ("accountant", dp.get("accountant", "")),
            ("releases", dp.get("rounds_released")),
        ]))
        site_privacy = summary.get("site_privacy") or {}
        if site_privacy:
            rows = "".join(
                f"<tr><td>{_e(site)}</td><td class='num'>{_fmt(v.get('epsilon_spent'), 4)}</td>"
                f"<td class='num'>{_e(v.get('releases'))}</td></tr>"
                for site, v in sorted(site_privacy.items()))
            parts.append("<p>Each site's own ledger:</p><table><tr><th>site</th>"
                         f"<th>epsilon spent</th><th>releases</th></tr>{rows}</table>")
    else:
        parts.append("<p>Differential privacy: <b>off</b>. The published sums are exact.</p>")
    parts.append(f"<p>Minimum segment size: <b>{_e(privacy.get('min_segment_size', '–'))}</b> "
                 "customers (smaller segments are merged before anything is published).</p>")
    parts.append(_bytes_table(artifacts))
    return "".join(parts)


def _bytes_table(artifacts: RunArtifacts) -> str:
    if not artifacts.site_bytes:
        return ("<p class='muted'>What each site sent is recorded in the site's own audit "
                "log (<code>fedseg-site report</code> at the site).</p>")
    rounds = sorted({r for v in artifacts.site_bytes.values() for r in v})
    head = "".join(f"<th>round {r}</th>" for r in rounds)
    rows = []
    for site, sent in sorted(artifacts.site_bytes.items()):
        cells = "".join(f"<td class='num'>{sent.get(r, 0):,}</td>" for r in rounds)
        rows.append(f"<tr><td>{_e(site)}</td>{cells}"
                    f"<td class='num'>{sum(sent.values()):,}</td></tr>")
    return ("<p>Bytes each site sent, per round (from the sites' own audit logs):</p>"
            f"<table id='site-bytes'><tr><th>site</th>{head}<th>total</th></tr>"
            f"{''.join(rows)}</table>")


def _participation_section(artifacts: RunArtifacts) -> str:
    parts = []
    plot = participation_plot(artifacts.metrics)
    if plot:
        parts.append(_img(plot, "sites reporting per round"))
    sites = artifacts.summary.get("sites")
    if isinstance(sites, dict) and sites:
        parts.append("<p>Sites: " + ", ".join(_e(v) for v in sorted(sites.values())) + "</p>")
    dropouts = artifacts.summary.get("dropouts") or []
    if dropouts:
        rows = "".join(f"<tr><td>{_e(d.get('round'))}</td><td>{_e(d.get('stage'))}</td>"
                       f"<td>{_e(d.get('site'))}</td><td>{_e(d.get('reason'))}</td></tr>"
                       for d in dropouts)
        parts.append("<table><tr><th>round</th><th>stage</th><th>site</th><th>reason</th></tr>"
                     f"{rows}</table>")
    else:
        parts.append("<p>No site dropped out.</p>")
    return "".join(parts)


def _converged(artifacts: RunArtifacts) -> str:
    dp = artifacts.model.privacy.get("differential_privacy")
    if dp:
        rounds = (dp.get("rounds") or {}).get("lloyd", "?")
        return f"not tested: differential privacy plans a fixed {rounds} Lloyd rounds"
    converged = artifacts.summary.get("converged", artifacts.model.training.get("converged"))
    if converged is None:
        return "–"
    return "yes" if converged else "no: stopped at strategy.max_rounds"


def render_report(artifacts: RunArtifacts) -> str:
    """Render the whole page as one HTML string."""
    model, summary = artifacts.model, artifacts.summary
    k = summary.get("k") or model.training.get("k_requested")
    facts = [
        ("created", model.created_at or "–"),
        ("model", summary.get("model", "ae_kmeans" if model.encoder else "kmeans")),
        ("segments requested / published", f"{k} / {len(model.segments)}"),
        ("customers in published segments", f"{sum(s.size for s in model.segments):,}"),
        ("sites", summary.get("num_sites", "–")),
        ("rounds", summary.get("rounds", len(artifacts.metrics) or "–")),
        ("converged", _converged(artifacts)),
    ]
    for key, label in (("ari_vs_truth", "ARI vs true segments (simulation)"),
                       ("cost_ratio", "cost / centralised k-means cost"),
                       ("seconds", "seconds")):
        if summary.get(key) is not None:
            facts.append((label, _fmt(float(summary[key]), 4)))
    warnings = "".join(f'<div class="warn">⚠ {_e(w)}</div>' for w in warnings_for(artifacts))
    plots = profile_plots(model)
    n_profiles = len({f.group for f in model.features if f.kind == "category" and f.group}) + \
        sum(1 for f in model.features if not (f.kind == "category" and f.group))
    more = "" if len(plots) >= n_profiles else (
        f"<p class='muted'>First {len(plots)} of {n_profiles} features shown.</p>")
    profile_html = "".join(f"<figure>{_img(png, f'profile of {title}')}</figure>"
                           for title, png in plots)
    convergence = convergence_plot(artifacts.metrics)
    convergence_html = _img(convergence, "convergence per round") if convergence else \
        "<p class='muted'>No per-round cost was released (differential privacy keeps it).</p>"
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        "<title>fedseg run report</title>"
        f"<style>{_CSS}</style></head><body>"
        "<h1>fedseg run report</h1>"
        f"<p class='muted'>{_e(artifacts.source.resolve())}</p>{warnings}"
        f"{_kv_table(facts)}"
        f"<h2>Segments</h2>{_segment_table(model)}"
        f"<h2>Segment map</h2><p class='muted'>Centroids only: no customer is plotted.</p>"
        f"{_img(map_plot(model), 'map of segment centroids')}"
        f"<h2>Profiles</h2>{more}<div class='grid'>{profile_html}</div>"
        f"<h2>Convergence</h2>{convergence_html}"
        f"<h2>Participation</h2>{_participation_section(artifacts)}"
        f"<h2>Privacy</h2>{_privacy_section(artifacts)}"
        "</body></html>\n")


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.html`` into ``run_dir`` from the files there; return its path."""
    artifacts = load_run(run_dir)
    path = Path(run_dir) / REPORT_NAME
    path.write_text(render_report(artifacts), encoding="utf-8")
    return path


def write_report_or_warn(run_dir: str | Path, *, say: Callable[[str], None]) -> Path | None:
    """Write the report; on failure say why and return None (the run's outputs stay)."""
    try:
        return write_report(run_dir)
    except (FedsegError, OSError, ValueError) as exc:
        say(f"warning: report.html was not written ({exc}); the run's other outputs are "
            f"complete. Retry with: python -m server.report {run_dir}")
        return None


def main(argv: list[str] | None = None) -> int:
    """``python -m server.report RUN_DIR``: (re)write a run's ``report.html``."""
    parser = argparse.ArgumentParser(
        prog="python -m server.report",
        description="Write report.html for a fedseg run directory (the one holding "
                    "segments.json).")
    parser.add_argument("run_dir", help="run directory, e.g. outputs/2026-11-30/10-00-00")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.run_dir)
    except FedsegError as exc:
        print(f"fedseg: error: {exc}", file=sys.stderr)
        return 2
    print(f"[fedseg] report: {path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
