"""Hydra config composition: defaults, public overrides, schema checks and instantiation."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import hydra
import pytest
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from common.config import register_configs
from common.errors import ConfigError
from server.app import SECAGG_STAGES
from server.coordinator import KMeansSettings
from simulations.datasets import (
    ByGroupPartition,
    CsvCustomers,
    DirichletPartition,
    IidPartition,
    SyntheticCustomers,
)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
CSV_OVERRIDES = ["data=csv", "data.path=x.csv", "data.site_column=s", "data.features=[a,b]"]

Compose = Callable[..., DictConfig]


@pytest.fixture
def compose() -> Iterator[Compose]:
    register_configs()
    with hydra.initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        def _compose(*overrides: str) -> DictConfig:
            return hydra.compose("config", overrides=list(overrides))

        yield _compose


def _settings(cfg: DictConfig) -> KMeansSettings:
    return instantiate(cfg.strategy, k=int(cfg.model.k),
                       min_segment_size=int(cfg.model.min_segment_size), seed=int(cfg.seed))


def test_conf_dir_holds_one_folder_per_group():
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()} - {"contracts", "hydra"}

    # conf/contracts holds example data contracts (read by fedseg-site), not a Hydra group;
    # conf/hydra adds options to Hydra's own groups (hydra/sweeper=tune)
    assert groups == {"data", "partition", "model", "strategy", "privacy", "federation", "site"}


# --- composition --------------------------------------------------------------------------


def test_defaults(compose):
    cfg = compose()

    assert cfg.data._target_ == "simulations.datasets.SyntheticCustomers"
    assert cfg.data.num_customers == 50_000
    assert cfg.partition._target_ == "simulations.datasets.ByGroupPartition"
    assert cfg.model.k == 6
    assert cfg.model.min_segment_size == 10
    assert cfg.strategy._target_ == "server.coordinator.KMeansSettings"
    assert cfg.strategy.init == "summary"
    assert cfg.privacy._target_ == "server.app.SecAggDpSettings"
    assert cfg.privacy.epsilon == 1.0 and cfg.privacy.delta == 1e-6
    assert cfg.federation.num_sites is None
    assert cfg.seed == 0


def test_public_overrides_compose_with_their_values(compose):
    cfg = compose(
        "model.k=6", "federation.num_sites=10", "privacy=none", "partition=dirichlet",
        "partition.alpha=0.5", *CSV_OVERRIDES, "data.transform=log1p", "seed=3",
    )

    assert cfg.model.k == 6
    assert cfg.federation.num_sites == 10
    assert instantiate(cfg.privacy) is None
    assert cfg.partition._target_ == "simulations.datasets.DirichletPartition"
    assert cfg.partition.alpha == 0.5
    assert cfg.data._target_ == "simulations.datasets.CsvCustomers"
    assert cfg.data.path == "x.csv"
    assert cfg.data.site_column == "s"
    assert list(cfg.data.features) == ["a", "b"]
    assert cfg.data.transform == "log1p"
    assert cfg.seed == 3


def test_override_changes_the_value(compose):
    cfg = compose("model.k=9", "strategy.max_rounds=4", "privacy.num_shares=3")

    assert cfg.model.k == 9
    assert cfg.strategy.max_rounds == 4
    assert cfg.privacy.num_shares == 3


@pytest.mark.parametrize(
    ("override", "key"),
    [("model.kk=3", "model.kk"), ("data.foo=1", "data.foo"),
     ("strategy.rounds=3", "strategy.rounds"), ("federation.sites=3", "federation.sites")],
)
def test_unknown_key_fails_at_compose_naming_the_key(compose, override, key):
    with pytest.raises(ConfigCompositionException) as info:
        compose(override)

    assert key in str(info.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [("model.k=abc", "model.k"), ("federation.num_sites=x", "federation.num_sites"),
     ("strategy.tol=small", "strategy.tol"), ("seed=one", "seed")],
)
def test_wrong_type_fails_at_compose_with_a_clear_message(compose, override, key):
    with pytest.raises(ConfigCompositionException) as info:
        compose(override)

    assert override in str(info.value)
    cause = str(info.value.__cause__)
    assert f"full_key: {key}" in cause
    assert "could not be converted" in cause


def test_unknown_group_option_fails_at_compose(compose):
    with pytest.raises(ConfigCompositionException) as info:
        compose("privacy=dp")

    assert "privacy" in str(info.value)


# --- instantiation of every option --------------------------------------------------------


def test_data_synthetic_instantiates(compose):
    data = instantiate(compose("data=synthetic", "data.num_customers=500").data)

    assert isinstance(data, SyntheticCustomers)
    assert data.num_customers == 500
    assert data.num_regions == 5


def test_data_csv_instantiates(compose):
    cfg = compose(*CSV_OVERRIDES, "data.transform=log1p", "data.label_column=truth")

    data = instantiate(cfg.data)

    assert isinstance(data, CsvCustomers)
    assert data.path == "x.csv"
    assert data.site_column == "s"
    assert list(data.features) == ["a", "b"]
    assert data.transform == "log1p"
    assert data.label_column == "truth"


def test_data_wholesale_instantiates_with_default_path(compose, monkeypatch):
    monkeypatch.delenv("FEDSEG_WHOLESALE_CSV", raising=False)

    data = instantiate(compose("data=wholesale").data)

    assert isinstance(data, CsvCustomers)
    assert data.path == "../shared/data/wholesale_customers.csv"
    assert data.site_column == "Region"
    assert list(data.features) == ["Fresh", "Milk", "Grocery", "Frozen", "Detergents_Paper",
                                   "Delicassen"]
    assert data.transform == "log1p"
    assert data.label_column is None


def test_data_wholesale_path_follows_the_environment(compose, monkeypatch):
    monkeypatch.setenv("FEDSEG_WHOLESALE_CSV", "/data/w.csv")

    data = instantiate(compose("data=wholesale").data)

    assert data.path == "/data/w.csv"


@pytest.mark.parametrize(
    ("option", "cls"),
    [("by_region", ByGroupPartition), ("dirichlet", DirichletPartition), ("iid", IidPartition)],
)
def test_partition_options_instantiate(compose, option, cls):
    partition = instantiate(compose(f"partition={option}").partition)

    assert type(partition) is cls


def test_dirichlet_partition_carries_its_parameters(compose):
    partition = instantiate(
        compose("partition=dirichlet", "partition.alpha=0.5", "partition.min_size=3").partition
    )

    assert partition == DirichletPartition(alpha=0.5, min_size=3)


def test_privacy_secagg_instantiates(compose):
    privacy = instantiate(compose("privacy=secagg", "privacy.timeout=30",
                                  "privacy.stage_timeouts.unmask=5").privacy)

    assert (privacy.num_shares, privacy.reconstruction_threshold) == (None, None)
    assert [privacy.stage_timeout(s) for s in SECAGG_STAGES] == [300.0, 30.0, 30.0, 5.0]
    assert privacy.resolve(5) == (5, 5)
    assert privacy.resolve(5, tolerate_dropouts=True) == (5, 4)


def test_privacy_none_instantiates_to_none(compose):
    cfg = compose("privacy=none")

    assert instantiate(cfg.privacy) is None


def test_strategy_and_model_instantiate_kmeans_settings(compose):
    cfg = compose("strategy=kmeans", "model=kmeans", "model.k=4", "model.min_segment_size=7",
                  "strategy.init=random", "strategy.n_init=2", "seed=5")

    settings = _settings(cfg)

    assert settings == KMeansSettings(k=4, max_rounds=30, tol=1e-4, init="random",
                                      init_candidates=0, init_rounds=5, n_init=2,
                                      min_segment_size=7, seed=5)
    assert settings.n_candidates == 40


def test_federation_simulation_composes(compose):
    federation = instantiate(compose("federation=simulation", "federation.num_sites=4").federation)

    assert federation.num_sites == 4
    assert federation.backend == "ray"
    assert federation.cpus_per_site == 1.0


@pytest.mark.parametrize(
    ("overrides", "key"),
    [(("strategy.init=foo",), "strategy.init"), (("model.k=1",), "model.k"),
     (("strategy.max_rounds=0",), "strategy.max_rounds"), (("strategy.tol=0",), "strategy.tol"),
     (("model.k=5", "strategy.init_candidates=3"), "strategy.init_candidates"),
     (("model.min_segment_size=0",), "model.min_segment_size")],
)
def test_bad_strategy_values_raise_config_error_naming_the_key(compose, overrides, key):
    cfg = compose(*overrides)

    # Hydra wraps whatever the target raises; the project error is the cause.
    with pytest.raises(InstantiationException) as info:
        _settings(cfg)

    cause = info.value.__cause__
    assert isinstance(cause, ConfigError)
    assert f"{key}=" in str(cause)


def test_kmeans_settings_validate_without_hydra():
    with pytest.raises(ConfigError, match=r"strategy\.init='foo'"):
        KMeansSettings(init="foo")
    with pytest.raises(ConfigError, match=r"model\.k=1"):
        KMeansSettings(k=1)


@pytest.mark.parametrize(("override", "key"), [
    ("privacy.timeout=0", "privacy.timeout=0"),
    ("privacy.stage_timeouts.share_keys=-2", "privacy.stage_timeouts.share_keys=-2"),
])
def test_a_stage_timeout_must_be_positive(compose, override, key):
    privacy = instantiate(compose("privacy=secagg", override).privacy)
    with pytest.raises(ConfigError, match=re.escape(key)):
        privacy.check_timeouts()


def test_an_unknown_stage_timeout_is_refused_when_composing():
    from common.config import compose_config

    with pytest.raises(ConfigError, match=r"stage_timeouts\.shares"):
        compose_config("privacy.stage_timeouts.shares=3")


def test_objective_defaults_to_the_federated_bic_and_an_unknown_one_is_refused(compose):
    from common.config import check_run_config

    assert compose().objective == "bic"
    check_run_config(compose("objective=pooled_bic"))
    with pytest.raises(ConfigError, match=r"objective='cost'.*bic, pooled_bic"):
        check_run_config(compose("objective=cost"))


def test_the_tune_sweeper_searches_k_rounds_and_restarts_with_a_seeded_sampler():
    register_configs()
    with hydra.initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra.compose("config", overrides=["hydra/sweeper=tune"],
                            return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.sampler.seed == 0 and 0 < sweeper.n_trials <= 20
    assert set(sweeper.params) == {"model.k", "strategy.max_rounds", "strategy.n_init"}
    # every searched key exists in the composed run config
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key) is not None
