"""Local federated simulation: ``python -m simulations.run [overrides]`` (Hydra app).

Builds the population (``data``), splits it into sites (``partition``), runs the ServerApp and
one ClientApp per site on Flower's simulation engine with SecAgg+ (``privacy``), and writes
into the run directory: ``segments.json`` (the segment model), ``metrics.jsonl`` (one line per
round), ``summary.json``, the sites' audit logs and Hydra's resolved config. The centralised
reference (scikit-learn ``KMeans(n_init=10)`` on the pooled, identically standardised data;
for ``model=ae_kmeans`` the same protocol run in-process with one site holding the pooled
data) is computed here, in the simulation, for comparison only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from numpy.typing import NDArray
from omegaconf import DictConfig, OmegaConf
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from client.app import make_client_app
from client.gate import open_gate
from client.site_files import SiteFiles, audit_head_name
from common.autoencoder import AESettings
from common.config import check_run_config, instantiate_config, register_configs
from common.dp import epsilon_spent
from common.errors import ConfigError, FedsegError
from common.features import apply_transforms
from common.kmeans import compute_stats
from common.site_policy import SitePolicy, policy_summary, site_policy_from_config
from server.app import RunResult, make_server_app
from server.coordinator import KMeansSettings
from server.plan import plan_from_config
from server.progress import RoundProgress
from server.report import (
    RunArtifacts,
    audit_bytes_by_site,
    warnings_for,
    write_report_or_warn,
)
from server.tracking import log_run_or_warn, require_mlflow
from simulations.datasets import Population
from simulations.site_sources import GatedSites, write_sites
from simulations.sweep import run_objective

register_configs()

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _say(message: str) -> None:
    print(f"[fedseg] {message}", flush=True)


def _quiet_flower(verbose: bool) -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not verbose:
        # Flower logs every SecAgg+ stage at INFO and run_simulation's deprecation at WARNING.
        logging.getLogger("flwr").setLevel(logging.ERROR)


def build_sites(
    cfg: DictConfig, *, default_num_sites: int | None = None
) -> tuple[Population, list[NDArray[np.intp]]]:
    """Load the population and split it into sites, validating the combination up front.

    Parameters
    ----------
    cfg : DictConfig
        The composed config.
    default_num_sites : int, optional
        Sites when ``federation.num_sites`` is null (default: one per region / site value).

    Returns
    -------
    population : Population
    parts : list of ndarray
        Row indices of each site.
    """
    seed = int(cfg.seed)
    if seed < 0:
        raise ConfigError(f"seed={seed} should be >= 0.")
    population: Population = instantiate_config(cfg.data).load(seed=seed)
    if cfg.federation.num_sites is not None:
        num_sites = int(cfg.federation.num_sites)
    elif default_num_sites is not None:
        num_sites = default_num_sites
    else:
        num_sites = len(np.unique(population.groups))
    if num_sites < 2:
        raise ConfigError(
            f"federation.num_sites={num_sites} should be >= 2 (a federation needs two sites; "
            "with data=csv, data.site_column needs at least two distinct values)."
        )
    k = int(cfg.model.k)
    if k > population.raw.shape[0]:
        raise ConfigError(
            f"model.k={k} is more than the {population.raw.shape[0]} customers in the data."
        )
    partition = instantiate_config(cfg.partition)
    try:
        parts: list[NDArray[np.intp]] = partition.split(population, num_sites=num_sites,
                                                        seed=seed)
    except ValueError as exc:
        raise ConfigError(f"partition ({type(partition).__name__}): {exc}") from exc
    return population, parts


WEAK_FEDERATION_SITES = 3
"""Below this many sites, each site can read the others' aggregates from the published model."""


def check_federation(policy: SitePolicy, sizes: list[int]) -> list[str]:
    """Refuse a federation the sites' policy would refuse; return warnings for weak ones.

    Parameters
    ----------
    policy : SitePolicy
    sizes : list of int
        Consenting customers per site.
    """
    if len(sizes) < policy.min_sites:
        raise ConfigError(
            f"{len(sizes)} sites, but the sites' policy requires at least {policy.min_sites} "
            f"(site.min_sites): with 2 sites each can subtract its own statistics from the "
            "published model and read the other's. Add sites, or accept this explicitly with "
            f"site.min_sites={len(sizes)}.")
    small = [i for i, n in enumerate(sizes) if n < policy.min_customers]
    if small:
        raise ConfigError(
            f"site(s) {small} hold fewer than {policy.min_customers} customers (site."
            "min_customers): a tiny site's statistics, read by the other sites from the "
            "published model, are close to its customers' own records. Use fewer sites "
            "(federation.num_sites), another partition, or lower site.min_customers.")
    warnings = []
    if len(sizes) < WEAK_FEDERATION_SITES:
        warnings.append(f"only {len(sizes)} sites: each site can subtract itself from the "
                        "published model and read the other's aggregates.")
    return warnings


def _site_privacy(state_dir: Path) -> dict[str, Any] | None:
    """Per site, the epsilon its own ledger says it has spent (DP runs)."""
    spent: dict[str, Any] = {}
    for ledger in sorted(state_dir.glob("site-*-privacy.jsonl")):
        lines = ledger.read_text(encoding="utf-8").splitlines()
        if lines:
            last = json.loads(lines[-1])
            spent[ledger.name.removesuffix("-privacy.jsonl")] = {
                "epsilon_spent": last["epsilon_after"], "delta": last["delta"],
                "releases": len(lines)}
    return spent or None


def _audit_compute(audit_dir: Path) -> dict[int, list[float]]:
    """Per round, each site's CPU seconds of local computation (autoencoder phases)."""
    per_round_site: dict[tuple[int, str], float] = defaultdict(float)
    for log_file in sorted(audit_dir.glob("site-*.jsonl")):
        for line in log_file.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            compute = entry.get("compute")
            if compute:
                per_round_site[(int(entry["round"]), entry["site"])] += float(
                    compute["cpu_seconds"])
    by_round: dict[int, list[float]] = defaultdict(list)
    for (rnd, _), seconds in per_round_site.items():
        by_round[rnd].append(seconds)
    return by_round


def _audit_bytes(audit_dir: Path) -> tuple[dict[int, list[int]], int]:
    """Per round, the bytes each site sent (from the sites' audit logs); and message count."""
    by_round: dict[int, list[int]] = defaultdict(list)
    for rounds in audit_bytes_by_site(audit_dir).values():
        for rnd, size in rounds.items():
            by_round[rnd].append(size)
    messages = sum(len(log.read_text(encoding="utf-8").splitlines())
                   for log in sorted(audit_dir.glob("site-*.jsonl")))
    return by_round, messages


def run(
    cfg: DictConfig,
    *,
    output_dir: str | Path,
    client_mods: tuple[Any, ...] = (),
    coordinator_factory: Any = None,
    require_objective: bool = False,
) -> dict[str, Any]:
    """Run one simulation from a composed config and write its outputs.

    Parameters
    ----------
    cfg : DictConfig
        The composed ``conf/config.yaml`` (with overrides).
    output_dir : str or Path
        Where outputs are written (Hydra's run dir for the command line).
    client_mods : tuple of Flower mods
        Extra outermost ClientApp mods (tests use one to record every message).
    coordinator_factory : callable, optional
        Builds the server's coordinator (the attack tests play a deviating server with it).
    require_objective : bool
        The run is a trial of a tuning sweep: refuse up front a config whose ``objective``
        would have no value (``objective=bic`` under differential privacy).

    Returns
    -------
    dict
        The summary also written to ``summary.json``; ``summary["objective"]["value"]`` is the
        run's score for a tuning sweeper (:func:`simulations.sweep.run_objective`).
    """
    from flwr.simulation import run_simulation

    from simulations import engine

    engine.install()  # one pass per dispatch look, not one per site (simulations/engine.py)
    started = time.perf_counter()
    check_run_config(cfg)
    if cfg.tracking.mlflow:
        require_mlflow()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _quiet_flower(bool(cfg.verbose))
    seed = int(cfg.seed)
    population, parts = build_sites(cfg)
    num_sites = len(parts)
    sizes = [len(p) for p in parts]
    _say(population.description)
    partition_name = type(instantiate_config(cfg.partition)).__name__
    _say(f"{num_sites} sites, {min(sizes)}..{max(sizes)} customers each ({partition_name})")

    plan = plan_from_config(cfg, features=population.features, num_sites=num_sites)
    settings, secagg = plan.settings, plan.secagg
    dp = plan.dp
    if require_objective and dp is not None and str(cfg.objective) == "bic":
        raise ConfigError(
            "objective=bic is the federated BIC, but differential privacy does not release the "
            "federated cost it needs: tune with privacy=secagg (exact sums, in simulation), or "
            "with objective=pooled_bic (scored on the pooled data: simulation only).")
    policy = site_policy_from_config(
        cfg.site, secagg=secagg is not None,
        dp=None if dp is None else (dp.epsilon, dp.delta))
    if dp is not None:
        planned = dp.planned_epsilon()
        site_cost = epsilon_spent(dp.multipliers(), policy.dp_delta)
        if site_cost > policy.dp_epsilon * (1 + 1e-9):
            raise ConfigError(
                f"the plan spends epsilon={site_cost:.4f} at the sites' delta="
                f"{policy.dp_delta:g}, beyond their budget site.dp_epsilon={policy.dp_epsilon:g}:"
                " every site would refuse the first round. Lower privacy.epsilon or raise the "
                "sites' budget; nothing was started.")
        _say(f"differential privacy: epsilon={dp.epsilon:g} (plan spends {planned:.4f}), "
             f"delta={dp.delta:g}, {sum(dp.rounds.values())} rounds, noise multipliers "
             + ", ".join(f"{p} {v:.2f}" for p, v in dp.sigma.items()))
    for warning in check_federation(policy, sizes):
        _say(f"warning: {warning}")
    _say(f"site policy: {policy_summary(policy)}")
    if secagg is not None:
        q_bits = plan.quantization_range.bit_length() - 1
        _say(f"k={settings.k}, secure aggregation: SecAgg+ (quantization_range=2**{q_bits})"
             + ("" if dp is not None else "; no differential privacy (exact sums: "
                "privacy=secagg, see docs/SECURITY.md)"))
    else:
        _say(f"k={settings.k}, secure aggregation: OFF (privacy=none, explicit choice)")

    audit_dir = out / "audit"
    shutil.rmtree(audit_dir, ignore_errors=True)  # a rerun into the same directory starts afresh
    results: list[RunResult] = []
    progress = RoundProgress(total_rounds=plan.max_rounds, quiet=bool(cfg.quiet))
    server_app = make_server_app(plan, on_result=results.append, on_round=progress.on_round,
                                 coordinator_factory=coordinator_factory)
    for stale in ("site-logs", "site-state"):
        shutil.rmtree(out / stale, ignore_errors=True)
    sites_dir = Path(cfg.federation.sites_dir) if cfg.federation.sites_dir else out / "sites"
    contracts = write_sites(population, parts, sites_dir=sites_dir, state_dir=out,
                            fmt=str(cfg.federation.site_source))
    gates = [open_gate(str(c)).load().report for c in contracts]
    for i, contract in enumerate(contracts):
        # This run's audit logs start afresh (the directory was cleared above): so do the
        # heads the sites' stores keep for them.
        log = SiteFiles(audit_dir.parent, str(i)).audit_log
        open_gate(str(contract)).store.set_meta(f"audit_head:{audit_head_name(log)}", "")
    _say(f"privacy gate: {len(contracts)} site sources ({cfg.federation.site_source}) under "
         f"{sites_dir}; {sum(g.used for g in gates)} of {sum(g.rows_read for g in gates)} "
         "customers take part (" + ", ".join(
             f"{sum(g.excluded[r] for g in gates)} {r.replace('_', ' ')}"
             for r in gates[0].excluded) + ")")
    gated = GatedSites(contracts=tuple(str(c) for c in contracts))
    client_app = make_client_app(
        gated,
        head_store=gated.store,
        policy=policy,
        site_root=str(out),
        extra_mods=client_mods,
    )
    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": float(cfg.federation.cpus_per_site), "num_gpus": 0.0},
        # address "local": always a new Ray instance for this run. Without it Ray connects to
        # whatever cluster /tmp/ray/ray_current_cluster names (any `ray start` on this machine,
        # even one long stopped) and the run hangs or lands on someone else's cluster.
        "init_args": {"address": "local", "log_to_driver": bool(cfg.verbose),
                      "include_dashboard": False},
    }
    if cfg.federation.ray_address:
        # An existing cluster: its own resources and dashboard; sites need this checkout's
        # code and the run directory at the same paths on every node (docs/SCALING.md).
        backend_config["init_args"] = {"address": str(cfg.federation.ray_address),
                                       "log_to_driver": bool(cfg.verbose)}
        _say(f"starting Flower simulation engine on the Ray cluster at "
             f"{cfg.federation.ray_address} ...")
    else:
        _say("starting Flower simulation engine ...")
    sim_started = time.perf_counter()
    with progress:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_sites,
                       backend_name=str(cfg.federation.backend), backend_config=backend_config,
                       verbose_logging=bool(cfg.verbose))
    sim_seconds = time.perf_counter() - sim_started
    if not results or results[0].model is None:
        raise FedsegError("the simulation ended without a segment model; see the log above.")
    result = results[0]
    model = result.model
    assert model is not None
    coordinator = result.coordinator
    model.to_json(out / "segments.json")

    # Metrics per round: aggregates from the server, upload sizes from the sites' audit logs.
    bytes_by_round, messages = _audit_bytes(audit_dir)
    cpu_by_round = _audit_compute(audit_dir)
    with (out / "metrics.jsonl").open("w", encoding="utf-8") as handle:
        for record in coordinator.history:
            sent = bytes_by_round.get(record.round, [])
            cpu = cpu_by_round.get(record.round, [])
            line = {**record.to_dict(),
                    "bytes_uploaded_per_site": float(np.mean(sent)) if sent else None,
                    "bytes_uploaded_by_site": sent,
                    "cpu_seconds_per_site": float(np.mean(cpu)) if cpu else None,
                    "cpu_seconds_max_site": float(np.max(cpu)) if cpu else None}
            handle.write(json.dumps(line) + "\n")
    all_sent = [b for sizes_ in bytes_by_round.values() for b in sizes_]

    # Evaluation on the pooled data (simulation only: a real server never holds it).
    scaled = model.scaler.transform(apply_transforms(population.raw, population.features))
    fed_labels = model.assign(population.raw)
    if model.encoder is not None:  # assigned in the embedding: cost of those segments here
        fed_cost = float(np.sum((scaled - model.centroids_scaled[fed_labels]) ** 2))
    else:
        fed_cost = compute_stats(scaled, model.centroids_scaled).cost
    summary: dict[str, Any] = {
        "cost": fed_cost,
        "federated_cost": coordinator.history[-1].cost,  # None under DP (not released)
        "centralized_cost": None,
        "cost_ratio": None,
        "ari_vs_truth": None,
        "ari_vs_centralized": None,
        "rounds": len(coordinator.history),
        "lloyd_rounds": coordinator.lloyd_rounds,
        "converged": coordinator.converged,
        "seconds": None,
        "simulation_seconds": sim_seconds,
        "ray_address": cfg.federation.ray_address,
        "num_sites": num_sites,
        "site_sizes": sizes,
        "num_customers": int(population.raw.shape[0]),
        "k": settings.k,
        "segments_published": len(model.segments),
        "secagg": secagg is not None,
        "bytes_uploaded_per_site_round": float(np.mean(all_sent)) if all_sent else None,
        "messages_sent_by_sites": messages,
        "init": "dp-summary" if dp is not None else settings.init,
        "seed": seed,
        "differential_privacy": model.privacy.get("differential_privacy"),
        "site_privacy": _site_privacy(out / "site-state"),
        "site_gates": [g.to_dict() for g in gates],
    }
    if population.labels is not None:
        summary["ari_vs_truth"] = float(adjusted_rand_score(population.labels, fed_labels))
    if plan.ae is not None:
        summary["model"] = "ae_kmeans"
        summary["ae_loss_per_round"] = model.training["autoencoder"]["loss_per_round"]
        ae_cpu = [c for r in coordinator.history if r.phase == "ae_train"
                  for c in cpu_by_round.get(r.round, [])]
        summary["ae_cpu_seconds_per_site_round"] = float(np.mean(ae_cpu)) if ae_cpu else None
    if cfg.centralized_reference and plan.ae is not None:
        _say("centralised reference: the same autoencoder trained on the pooled data ...")
        central = central_ae_kmeans(population, plan.ae, settings=settings,
                                    device=policy.device)
        summary["ari_vs_centralized"] = float(adjusted_rand_score(central.labels, fed_labels))
        summary["central_ae"] = {"loss": central.loss, "seconds": central.seconds}
        if population.labels is not None:
            summary["central_ari_vs_truth"] = float(
                adjusted_rand_score(population.labels, central.labels))
    elif cfg.centralized_reference:
        reference = KMeans(n_clusters=settings.k, n_init=10, random_state=seed).fit(scaled)
        summary["centralized_cost"] = float(reference.inertia_)
        summary["cost_ratio"] = fed_cost / float(reference.inertia_)
        summary["ari_vs_centralized"] = float(adjusted_rand_score(reference.labels_, fed_labels))
    summary["objective"] = run_objective(
        str(cfg.objective), k=settings.k, features=len(model.features),
        published_sizes=[s.size for s in model.segments],
        federated_cost=summary["federated_cost"], pooled_cost=fed_cost, pooled_labels=fed_labels)
    summary["seconds"] = time.perf_counter() - started
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    OmegaConf.save(cfg, out / "config.resolved.yaml", resolve=True)

    _say(f"done in {summary['seconds']:.1f}s: {summary['rounds']} rounds, cost={fed_cost:,.1f}"
         + (f", cost_ratio={summary['cost_ratio']:.4f}" if summary["cost_ratio"] else "")
         + (f", ari_vs_truth={summary['ari_vs_truth']:.3f}" if summary["ari_vs_truth"] is not None
            else "")
         + (f", central model ari_vs_truth={summary['central_ari_vs_truth']:.3f}"
            if summary.get("central_ari_vs_truth") is not None else ""))
    _print_segments(model, population)
    for warning in warnings_for(RunArtifacts(model=model, summary=summary)):
        _say(f"warning: {warning}")
    report = write_report_or_warn(out, say=_say)
    _say(f"segment model: {out / 'segments.json'}")
    _say(f"summary:       {out / 'summary.json'}")
    if report is not None:
        _say(f"report:        {report}")
    log_run_or_warn(out, cfg, say=_say)
    return summary


@dataclass(frozen=True)
class CentralReference:
    """The ``ae_kmeans`` model trained on the pooled data (simulation only)."""

    labels: NDArray[np.int64]
    loss: float
    seconds: float


def central_ae_kmeans(population: Population, ae: AESettings, *, settings: KMeansSettings,
                      device: str = "auto") -> CentralReference:
    """Run the same ``model=ae_kmeans`` protocol with one site holding the pooled data.

    The same code, settings and seed as the federated run (training, dead-code splits,
    merge-and-split moves, k-means in the embedding), in one process on every customer at
    once: what a trusted curator with a central warehouse would get from the same recipe
    (:func:`simulations.inprocess.run_inprocess_ae`). ``loss`` is the released mean
    reconstruction loss of the model it embedded with.
    """
    from simulations.inprocess import run_inprocess_ae

    started = time.perf_counter()
    coordinator = run_inprocess_ae([population.raw], features=population.features,
                                   settings=settings, ae=replace(ae, device=device))
    model = coordinator.build_model(privacy={}, config={})
    labels = model.assign(population.raw)
    loss = float("nan") if coordinator.final_loss is None else coordinator.final_loss
    return CentralReference(labels=np.asarray(labels, dtype=np.int64), loss=loss,
                            seconds=time.perf_counter() - started)


def _print_segments(model: Any, population: Population) -> None:
    names = [f.name for f in population.features][:4]
    header = f"{'segment':<44} {'size':>7} " + " ".join(f"{n[:14]:>14}" for n in names)
    print(header)
    print("-" * len(header))
    for seg in model.segments:
        row = f"{seg.name[:44]:<44} {seg.size:>7} " + " ".join(
            f"{seg.mean[n]:>14,.1f}" for n in names)
        print(row)


def _tuning_sweep() -> bool:
    """Whether this job is a trial of an optimising sweeper (Optuna), which needs its score."""
    target = HydraConfig.get().sweeper.get("_target_", "")
    return "optuna" in str(target).lower()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    """Run one simulation; return its ``objective`` (higher is better) for a tuning sweeper.

    A plain run or a basic ``-m`` sweep ignores the value; ``hydra/sweeper=tune`` (Optuna)
    maximises it. None when the objective is undefined for the run (``objective=bic`` under DP).
    """
    out = Path(HydraConfig.get().runtime.output_dir)
    tuning = _tuning_sweep()
    try:
        summary = run(cfg, output_dir=out, require_objective=tuning)
    except FedsegError as exc:
        print(f"fedseg: error: {exc}", file=sys.stderr)
        if (out / "site-logs").is_dir():
            print(f"fedseg: each site's full reasons are in its own log: {out / 'site-logs'}",
                  file=sys.stderr)
        sys.exit(2)
    objective = summary["objective"]
    if objective["value"] is None:
        if tuning:
            _say(f"warning: objective={objective['name']} has no value: {objective['reason']}")
        return None
    if tuning:
        _say(f"objective {objective['name']}={objective['value']:,.1f} (higher is better)")
    return float(objective["value"])


def main() -> None:
    """Console entry point (``fedseg-simulate``)."""
    _hydra_main()


if __name__ == "__main__":
    main()
