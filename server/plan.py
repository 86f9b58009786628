"""The server's public federation plan, built from a composed Hydra config.

Shared by the local simulation (``simulations.run``) and the deployment ServerApp
(``server.deploy``), so both run exactly the same plan for the same configuration.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from common.config import instantiate_config
from common.errors import ConfigError
from common.features import FeatureSpec
from server.app import AE_DP_REFUSAL, FederationPlan, SecAggDpSettings
from server.coordinator import KMeansSettings


def plan_from_config(
    cfg: DictConfig, *, features: tuple[FeatureSpec, ...], num_sites: int
) -> FederationPlan:
    """Build the server's public plan from a composed config (shared with ``flwr run``).

    With ``privacy=secagg_dp`` the noise is calibrated here, before anything starts, from the
    data source's declared bounds (``data.clip`` or the synthetic generator's ranges).
    """
    settings: KMeansSettings = instantiate_config(
        cfg.strategy, k=int(cfg.model.k), min_segment_size=int(cfg.model.min_segment_size),
        seed=int(cfg.seed),
    )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    secagg = instantiate_config(cfg.privacy)
    ae = None
    if cfg.model.get("autoencoder") is not None:
        ae = instantiate_config(cfg.model.autoencoder, seed=int(cfg.seed))
        if isinstance(secagg, SecAggDpSettings):
            raise ConfigError(AE_DP_REFUSAL)
    dp = None
    if isinstance(secagg, SecAggDpSettings):
        source = instantiate_config(cfg.data)
        dp = secagg.dp_plan(features, source.declared_bounds(), num_sites=num_sites)
    return FederationPlan(settings=settings, features=features, num_sites=num_sites,
                          secagg=secagg, config={str(k): v for k, v in resolved.items()}, dp=dp,
                          ae=ae)
