"""Structured config schemas (Hydra ConfigStore) for every swappable part of a run.

Registered schemas make a typo or a wrong type fail when the config is composed, with Hydra's
message naming the key, instead of deep inside a run.
"""

from __future__ import annotations

import functools
import shlex
from dataclasses import MISSING as MISSING_FIELD
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any, get_type_hints

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, InstantiationException
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.autoencoder import AESettings
from common.dp import DpSettings
from common.errors import ConfigError, FedsegError
from common.site_policy import SitePolicy

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
"""The project's Hydra config tree (shipped inside the Flower app bundle too)."""


@dataclass
class SyntheticDataConfig:
    """Built-in synthetic retail customers (``data=synthetic``)."""

    _target_: str = "simulations.datasets.SyntheticCustomers"
    num_customers: int = 50_000
    num_regions: int = 5


@dataclass
class MixedDataConfig:
    """Built-in synthetic mixed-type customers (``data=mixed``): categorical, boolean, curved."""

    _target_: str = "simulations.datasets.MixedCustomers"
    num_customers: int = 30_000
    num_regions: int = 6


@dataclass
class ContractDataConfig:
    """A deployment's feature schema from the sites' data contract (``data=contract``)."""

    _target_: str = "simulations.datasets.ContractSchema"
    path: str = MISSING


@dataclass
class CsvDataConfig:
    """Any customer-level CSV (``data=csv``; ``data=wholesale`` is a preset)."""

    _target_: str = "simulations.datasets.CsvCustomers"
    path: str = MISSING
    site_column: str = MISSING
    features: list[str] = field(default_factory=list)
    transform: str = "none"
    label_column: str | None = None
    clip: dict[str, list[float]] = field(default_factory=dict)
    on_invalid: str = "error"


@dataclass
class ByRegionPartitionConfig:
    """One or more sites per region/site value (``partition=by_region``)."""

    _target_: str = "simulations.datasets.ByGroupPartition"


@dataclass
class DirichletPartitionConfig:
    """Label-Dirichlet non-IID split (``partition=dirichlet``, ``partition.alpha``)."""

    _target_: str = "simulations.datasets.DirichletPartition"
    alpha: float = 0.3
    min_size: int = 10


@dataclass
class IidPartitionConfig:
    """Uniformly random split (``partition=iid``)."""

    _target_: str = "simulations.datasets.IidPartition"


@dataclass
class ModelConfig:
    """The product: how many segments, and the publication floor."""

    k: int = 6
    min_segment_size: int = 10


def _autoencoder_schema() -> type:
    """Build ``model.autoencoder``'s schema from :class:`AESettings` (one source of truth).

    ``seed`` comes from the run's ``seed``; where a site trains is the site's choice
    (``site.device``), so neither is a model key.
    """
    hints = get_type_hints(AESettings)
    specs: list[Any] = [("_target_", str, field(default="common.autoencoder.AESettings"))]
    for f in fields(AESettings):
        if f.name in ("seed", "device"):
            continue
        if f.name == "hidden":
            specs.append(("hidden", list[int],
                          field(default_factory=lambda: list(AESettings().hidden))))
        else:
            specs.append((f.name, hints[f.name], field(default=f.default)))
    schema = make_dataclass("AutoencoderConfig", specs)
    schema.__doc__ = _autoencoder_schema.__doc__
    return schema


AutoencoderConfig = _autoencoder_schema()
"""The federated autoencoder of ``model=ae_kmeans`` (``common.autoencoder.AESettings``)."""


@dataclass
class AEModelConfig(ModelConfig):
    """Segments found by k-means in a federated autoencoder's embedding (``model=ae_kmeans``)."""

    autoencoder: Any = field(default_factory=AutoencoderConfig)


@dataclass
class StrategyConfig:
    """How federated training proceeds (built into ``server.coordinator.KMeansSettings``)."""

    _target_: str = "server.coordinator.KMeansSettings"
    max_rounds: int = 30
    tol: float = 1e-4
    init: str = "summary"
    init_candidates: int = 0
    init_rounds: int = 5
    n_init: int = 6
    accept_partial_rounds: bool = False


@dataclass
class StageTimeoutsConfig:
    """Per-stage overrides of ``privacy.timeout`` (null: ``privacy.timeout``)."""

    setup: float | None = 300.0
    share_keys: float | None = None
    collect_masked_vectors: float | None = None
    unmask: float | None = None


@dataclass
class SecAggPrivacyConfig:
    """SecAgg+ secure aggregation (``privacy=secagg``, the default)."""

    _target_: str = "server.app.SecAggSettings"
    num_shares: float | None = None
    reconstruction_threshold: float | None = None
    timeout: float | None = 120.0
    stage_timeouts: StageTimeoutsConfig = field(default_factory=StageTimeoutsConfig)


@dataclass
class NoPrivacyConfig:
    """No secure aggregation: sites send plain statistics (``privacy=none``, explicit)."""

    _target_: str = "server.app.no_secure_aggregation"


def _site_policy_schema() -> type:
    """Build the ``site`` schema from :class:`SitePolicy`'s fields (one source of truth).

    In a local simulation one operator configures the server and every site, so this group
    sits beside the others; a deployed site reads it from its own node configuration, never
    from the run config. ``mechanism``, ``require_dp``, ``dp_epsilon`` and ``dp_delta`` set to
    null follow ``privacy`` (simulation only).
    """
    hints = get_type_hints(SitePolicy)
    follows = {"mechanism": str | None, "require_dp": bool | None, "dp_epsilon": float | None,
               "dp_delta": float | None}
    specs = [
        (f.name, follows[f.name], field(default=None)) if f.name in follows
        else (f.name, hints[f.name], field(default=f.default))
        for f in fields(SitePolicy)
    ]
    schema = make_dataclass("SitePolicyConfig", specs)
    schema.__doc__ = _site_policy_schema.__doc__
    return schema


SitePolicyConfig = _site_policy_schema()


def _dp_privacy_schema() -> type:
    """Build the ``privacy=secagg_dp`` schema: the SecAgg+ keys plus :class:`DpSettings`'s fields.

    The DP fields and defaults are defined once, in ``common.dp.DpSettings``; the instantiated
    target ``server.app.SecAggDpSettings`` combines both.
    """
    hints = get_type_hints(DpSettings)
    secagg_hints = get_type_hints(SecAggPrivacyConfig)
    specs: list[Any] = [
        ("_target_", str, field(default="server.app.SecAggDpSettings")),
        *[(f.name, secagg_hints[f.name], field(default_factory=f.default_factory)
           if f.default is MISSING_FIELD else field(default=f.default))
          for f in fields(SecAggPrivacyConfig) if f.name != "_target_"],
        *[(f.name, hints[f.name], field(default_factory=f.default_factory)
           if f.default is MISSING_FIELD else field(default=f.default))
          for f in fields(DpSettings)],
    ]
    schema = make_dataclass("SecAggDpPrivacyConfig", specs)
    schema.__doc__ = "SecAgg+ plus customer-level DP held by the sites (``privacy=secagg_dp``)."
    return schema


SecAggDpPrivacyConfig = _dp_privacy_schema()
"""The default privacy config (``privacy=secagg_dp``), as a Hydra schema."""
"""Each site's own policy (``common.site_policy.SitePolicy``), as a Hydra schema."""


@dataclass
class FederationConfig:
    """Sites and the local simulation engine."""

    num_sites: int | None = None
    backend: str = "ray"
    cpus_per_site: float = 1.0
    ray_address: str | None = None
    site_source: str = "sqlite"
    sites_dir: str | None = None
    poll_interval: float = 0.1


@dataclass
class TrackingConfig:
    """Optional experiment tracking (``server/tracking.py``)."""

    mlflow: bool = False
    uri: str | None = None
    experiment: str = "fedseg"


@dataclass
class RunConfig:
    """Top level of ``conf/config.yaml``."""

    data: Any = MISSING
    partition: Any = MISSING
    model: Any = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: Any = MISSING
    federation: FederationConfig = field(default_factory=FederationConfig)
    site: Any = field(default_factory=SitePolicyConfig)
    seed: int = 0
    verbose: bool = False
    quiet: bool = False
    centralized_reference: bool = True
    objective: str = "bic"
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def register_configs() -> None:
    """Register every schema with Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(name="data_synthetic_schema", node=SyntheticDataConfig)
    cs.store(name="data_csv_schema", node=CsvDataConfig)
    cs.store(name="data_mixed_schema", node=MixedDataConfig)
    cs.store(name="data_contract_schema", node=ContractDataConfig)
    cs.store(name="partition_by_region_schema", node=ByRegionPartitionConfig)
    cs.store(name="partition_dirichlet_schema", node=DirichletPartitionConfig)
    cs.store(name="partition_iid_schema", node=IidPartitionConfig)
    cs.store(name="model_kmeans_schema", node=ModelConfig)
    cs.store(name="model_ae_kmeans_schema", node=AEModelConfig)
    cs.store(name="strategy_kmeans_schema", node=StrategyConfig)
    cs.store(name="privacy_secagg_schema", node=SecAggPrivacyConfig)
    cs.store(name="privacy_none_schema", node=NoPrivacyConfig)
    cs.store(name="privacy_secagg_dp_schema", node=SecAggDpPrivacyConfig)
    cs.store(name="federation_simulation_schema", node=FederationConfig)
    cs.store(name="site_policy_schema", node=SitePolicyConfig)


@functools.lru_cache(maxsize=8)
def compose_config(overrides: str = "") -> DictConfig:
    """Compose ``conf/config.yaml`` with space-separated Hydra overrides (cached per string).

    The same tree the simulation composes: a deployment's ServerApp and every site compose it
    too, each with only its own overrides.
    """
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=shlex.split(overrides))
    except (ValueError, HydraException, OmegaConfBaseException) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"could not compose the configuration with overrides "
                          f"{overrides!r}: {first}") from exc


SIMULATION_BACKENDS = ("ray",)
"""``federation.backend`` values: Flower 1.42's simulation engine has one backend, Ray."""

OBJECTIVES = ("bic", "pooled_bic")
"""``objective`` values: the score a run returns to a tuning sweeper (higher is better).

``bic``: the federated BIC of :mod:`server.model_selection` (the final round's secure-sum cost
and the published sizes; none under differential privacy, which does not release the cost).
``pooled_bic``: the same BIC from the simulation's evaluation on the pooled data (simulation
only; defined under differential privacy too).
"""

_MISSING_HINTS = {
    "data": "e.g. data=csv data.path=customers.csv data.site_column=store "
            "data.features=[spend,visits] (see conf/data/csv.yaml)",
}


def check_run_config(cfg: DictConfig) -> None:
    """Refuse a composed run config with required keys unset or values no engine accepts.

    Raises
    ------
    ConfigError
        One line naming every unset required key (``???`` in ``conf/``), with an example; or
        an unknown ``federation.backend`` or ``objective``.
    """
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        groups = sorted({key.split(".")[0] for key in missing})
        hints = "; ".join(_MISSING_HINTS[g] for g in groups if g in _MISSING_HINTS)
        chosen = ", ".join(
            f"{g}={HydraConfig.get().runtime.choices.get(g, '?')}" if HydraConfig.initialized()
            else g for g in groups)
        raise ConfigError(f"{chosen} needs {', '.join(missing)} on the command line"
                          + (f": {hints}" if hints else "") + ".")
    backend = str(cfg.federation.backend)
    if backend not in SIMULATION_BACKENDS:
        raise ConfigError(f"federation.backend={backend!r} is not a simulation backend; "
                          f"Flower's simulation engine has {', '.join(SIMULATION_BACKENDS)}.")
    objective = str(cfg.get("objective", "bic"))
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective={objective!r} is not a run objective; choose one of "
                          f"{', '.join(OBJECTIVES)}.")


def instantiate_config(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that surfaces fedseg's own error instead of Hydra's wrapper."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, FedsegError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise ConfigError(str(exc).splitlines()[0]) from exc
