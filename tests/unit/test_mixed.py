"""Tests of the mixed-type synthetic customers and of their simulated sites' sources."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from numpy.typing import NDArray

from client.gate import open_gate
from common.autoencoder import TabularLayout
from common.errors import ConfigError, DataError
from common.features import FeatureSpec
from simulations.datasets import (
    ByGroupPartition,
    MixedCustomers,
    Population,
    SyntheticCustomers,
    mixed_features,
)
from simulations.mixed import (
    BOOLEANS,
    CATEGORICALS,
    MIXED_SEGMENTS,
    NUMERIC,
    generate_mixed_customers,
    mixed_region_mixing,
)
from simulations.site_sources import SOURCE_FORMATS, write_sites


@pytest.fixture(scope="module")
def population() -> Population:
    """Return a small mixed population shared by the read-only tests."""
    return MixedCustomers(num_customers=600, num_regions=6).load(seed=3)


def _sorted_rows(matrix: NDArray[np.float64]) -> NDArray[np.float64]:
    """Rows in lexicographic order (a gate's output order depends on the source)."""
    return matrix[np.lexsort(matrix.T[::-1])]


def test_generator_is_deterministic_and_shaped() -> None:
    # Prepare / Execute
    a = generate_mixed_customers(num_customers=300, num_regions=5, seed=7)
    b = generate_mixed_customers(num_customers=300, num_regions=5, seed=7)
    c = generate_mixed_customers(num_customers=300, num_regions=5, seed=8)
    # Assert
    records = a.record_matrix()
    np.testing.assert_array_equal(records, b.record_matrix())
    np.testing.assert_array_equal(a.customer_id, b.customer_id)
    np.testing.assert_array_equal(a.email, b.email)
    assert not np.array_equal(records, c.record_matrix())
    n_cols = len(NUMERIC) + len(BOOLEANS) + sum(len(v) for _, _, v in CATEGORICALS)
    assert records.shape == (300, n_cols) == (300, len(mixed_features()))
    one_hot = records[:, len(NUMERIC) + len(BOOLEANS):]
    assert set(np.unique(one_hot)) == {0.0, 1.0}
    start = 0
    for _, _, vocabulary in CATEGORICALS:  # exactly one value per categorical feature
        np.testing.assert_array_equal(one_hot[:, start:start + len(vocabulary)].sum(axis=1), 1)
        start += len(vocabulary)
    assert len(np.unique(a.customer_id)) == 300
    assert set(np.unique(a.segment)) <= set(range(len(MIXED_SEGMENTS)))


def test_numeric_values_lie_within_declared_bounds() -> None:
    # Prepare / Execute
    table = generate_mixed_customers(num_customers=2_000, num_regions=6, seed=0)
    bounds = MixedCustomers().declared_bounds()
    # Assert
    for j, info in enumerate(NUMERIC):
        low, high = bounds[info.name]
        assert low <= table.numeric[:, j].min() and table.numeric[:, j].max() <= high
    assert all(bounds[f.name] == (0.0, 1.0) for f in mixed_features() if f.kind != "numeric")


def test_broad_segments_spread_their_tastes_and_differ_by_numbers() -> None:
    # Prepare / Execute
    table = generate_mixed_customers(num_customers=20_000, num_regions=6, seed=2)
    broad = [i for i, s in enumerate(MIXED_SEGMENTS) if s.breadth > 0]
    peaked = [i for i, s in enumerate(MIXED_SEGMENTS) if s.breadth == 0]

    def top_share(seg: int, j: int) -> float:  # share of the segment's most common value
        return float(np.bincount(table.categories[table.segment == seg, j]).max()
                     / np.sum(table.segment == seg))

    # Assert: >= 2 broad segments; on the segment categoricals (channel .. delivery) each is
    # flatter than every peaked one, and its behaviour-flag rates stay near the middle
    assert len(broad) >= 2 and len(peaked) >= 3
    for j in range(4):
        assert max(top_share(b, j) for b in broad) < min(top_share(p, j) for p in peaked)
    behaviour = table.flags[:, -8:]
    for b in broad:
        rates = behaviour[table.segment == b].mean(axis=0)
        assert np.all((rates > 0.3) & (rates < 0.65))
    # ... and the broad segments differ by numbers: their median baskets lie apart
    basket = [np.median(table.numeric[table.segment == b, 3]) for b in broad]
    assert max(basket) > 2.5 * min(basket)


def test_regions_are_non_iid_and_unequal() -> None:
    # Prepare / Execute
    table = generate_mixed_customers(num_customers=6_000, num_regions=6, seed=1)
    regions, sizes = np.unique(table.region, return_counts=True)
    # Assert: >= 5 regions of unequal size, each dominated by its two leading segments
    assert len(regions) == 6 and sizes.max() > 3 * sizes.min()
    for region in regions:
        shares = np.bincount(table.segment[table.region == region],
                             minlength=len(MIXED_SEGMENTS)) / np.sum(table.region == region)
        assert np.sort(shares)[-2:].sum() > 0.75
    mix = mixed_region_mixing(6)
    np.testing.assert_allclose(mix.sum(axis=1), 1.0)
    assert len({int(np.argmax(row)) for row in mix}) == 6  # a different leader per region


def test_about_ten_percent_decline_and_are_kept_apart() -> None:
    # Prepare / Execute
    population = MixedCustomers(num_customers=3_000, num_regions=6).load(seed=0)
    # Assert
    assert population.declined is not None and population.declined.ids is not None
    n_declined = population.declined.raw.shape[0]
    assert 0.07 < n_declined / 3_000 < 0.13
    assert population.raw.shape[0] + n_declined == 3_000
    assert population.ids is not None
    assert not set(population.ids.tolist()) & set(population.declined.ids.tolist())


def test_bad_sizes_are_config_errors_naming_the_value() -> None:
    with pytest.raises(ConfigError, match="num_regions=11"):
        MixedCustomers(num_customers=1_000, num_regions=11).load(seed=0)
    with pytest.raises(ConfigError, match="num_customers=20 should be an integer >= 60"):
        MixedCustomers(num_customers=20, num_regions=6).load(seed=0)


def test_layout_groups_the_one_hot_columns_of_each_categorical() -> None:
    # Prepare / Execute
    layout = TabularLayout.from_features(mixed_features())
    # Assert
    n_num, n_bool = len(NUMERIC), len(BOOLEANS)
    assert layout.numeric == tuple(range(n_num))
    assert layout.boolean == tuple(range(n_num, n_num + n_bool))
    start, expected = n_num + n_bool, []
    for _, _, vocabulary in CATEGORICALS:
        expected.append(tuple(range(start, start + len(vocabulary))))
        start += len(vocabulary)
    assert layout.categorical == tuple(expected)
    assert layout.names[-len(CATEGORICALS):] == tuple(name for name, _, _ in CATEGORICALS)
    assert layout.n_original == n_num + n_bool + len(CATEGORICALS)


@pytest.mark.parametrize("fmt", SOURCE_FORMATS)
def test_mixed_sites_roundtrip_through_the_gate(population: Population, fmt: str,
                                                tmp_path: Path) -> None:
    # Prepare
    parts = ByGroupPartition().split(population, num_sites=6, seed=0)
    # Execute
    contracts = write_sites(population, parts, sites_dir=tmp_path / "sites",
                            state_dir=tmp_path / "state", fmt=fmt)
    # Assert: the contract declares categorical and boolean columns, the gate gives back the
    # population's features and (consenting) rows exactly
    document = yaml.safe_load(contracts[0].read_text(encoding="utf-8"))
    types = {f["name"]: f.get("type", "numeric") for f in document["features"]}
    assert types["channel"] == "categorical" and types["loyalty_card"] == "boolean"
    channel = next(f for f in document["features"] if f["name"] == "channel")
    assert channel["vocabulary"] == list(CATEGORICALS[0][2])
    for contract, rows in zip(contracts, parts, strict=True):
        gated = open_gate(contract).load()
        assert gated.site.features == population.features
        np.testing.assert_array_equal(_sorted_rows(gated.site.raw),
                                      _sorted_rows(population.raw[rows]))
        assert gated.report.excluded["no_consent"] > 0


def test_synthetic_sites_keep_numeric_columns(tmp_path: Path) -> None:
    # Prepare
    population = SyntheticCustomers(num_customers=200, num_regions=2).load(seed=0)
    parts = ByGroupPartition().split(population, num_sites=2, seed=0)
    # Execute
    contracts = write_sites(population, parts, sites_dir=tmp_path / "sites",
                            state_dir=tmp_path / "state", fmt="csv")
    # Assert
    document = yaml.safe_load(contracts[1].read_text(encoding="utf-8"))
    assert all("type" not in f and "clip" in f for f in document["features"])
    gated = open_gate(contracts[1]).load()
    assert gated.site.features == population.features
    np.testing.assert_array_equal(_sorted_rows(gated.site.raw),
                                  _sorted_rows(population.raw[parts[1]]))


def test_a_broken_one_hot_record_is_refused_naming_the_feature(population: Population,
                                                               tmp_path: Path) -> None:
    # Prepare: customer 2 has both "store" and "web" set
    raw = population.raw.copy()
    store = [f.name for f in population.features].index("channel=store")
    raw[2, store:store + 2] = 1.0
    broken = Population(raw=raw, features=population.features, groups=population.groups,
                        labels=population.labels, label_names=population.label_names,
                        description="broken", ids=population.ids,
                        identifiers=population.identifiers)
    # Execute / Assert
    with pytest.raises(DataError, match=r"record 2: the one-hot columns of categorical "
                                        r"feature 'channel'.*expected exactly one 1"):
        write_sites(broken, [np.arange(raw.shape[0])], sites_dir=tmp_path / "sites",
                    state_dir=tmp_path / "state")


def test_a_misnamed_category_column_is_a_config_error(tmp_path: Path) -> None:
    # Prepare: a category column not named <group>=<value>
    features = (FeatureSpec("size"), FeatureSpec("colour_red", kind="category", group="colour"),
                FeatureSpec("colour=blue", kind="category", group="colour"))
    population = Population(raw=np.array([[1.0, 1.0, 0.0], [2.0, 0.0, 1.0]]), features=features,
                            groups=np.array(["a", "a"]), labels=None, label_names=(),
                            description="tiny", ids=np.array(["X1", "X2"]))
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"'colour_red'.*colour=<value>"):
        write_sites(population, [np.arange(2)], sites_dir=tmp_path / "sites",
                    state_dir=tmp_path / "state")


def test_sites_are_reused_only_for_the_population_they_hold(tmp_path: Path) -> None:
    # Prepare: sites written for 200 customers; a consent change kept in one source
    small = SyntheticCustomers(num_customers=200, num_regions=2).load(seed=0)
    parts = ByGroupPartition().split(small, num_sites=2, seed=0)
    first = write_sites(small, parts, sites_dir=tmp_path / "sites", state_dir=tmp_path / "s")
    written = first[0].stat().st_mtime_ns
    # Execute: the same population again is a reuse (contracts untouched)...
    again = write_sites(small, parts, sites_dir=tmp_path / "sites", state_dir=tmp_path / "s")
    assert again == first and first[0].stat().st_mtime_ns == written
    # ... another population into the same directory is refused, naming it
    bigger = SyntheticCustomers(num_customers=300, num_regions=2).load(seed=0)
    with pytest.raises(ConfigError, match=r"hold another population.*federation\.sites_dir"):
        write_sites(bigger, ByGroupPartition().split(bigger, num_sites=2, seed=0),
                    sites_dir=tmp_path / "sites", state_dir=tmp_path / "s")
    other_seed = SyntheticCustomers(num_customers=200, num_regions=2).load(seed=1)
    with pytest.raises(ConfigError, match=str(tmp_path / "sites")):
        write_sites(other_seed, ByGroupPartition().split(other_seed, num_sites=2, seed=1),
                    sites_dir=tmp_path / "sites", state_dir=tmp_path / "s")
    # Assert: nothing was rewritten by the refused runs
    assert first[0].stat().st_mtime_ns == written
