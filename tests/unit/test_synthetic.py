"""Tests of the synthetic customer generator."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from simulations.synthetic import (
    FEATURE_INFO,
    FEATURES,
    REGION_NAMES,
    SEGMENTS,
    CustomerTable,
    generate_customers,
    region_mixing,
    region_proportions,
)


@pytest.fixture(scope="module")
def table() -> CustomerTable:
    """Return a mid-sized population shared by the read-only tests."""
    return generate_customers(num_customers=20_000, num_regions=5, seed=0)


def _model_space(features: NDArray[np.float64]) -> NDArray[np.float64]:
    """Apply each feature's transform, then z-score every column."""
    x = features.copy()
    for j, name in enumerate(FEATURES):
        if FEATURE_INFO[name].transform == "log1p":
            x[:, j] = np.log1p(x[:, j])
    z: NDArray[np.float64] = (x - x.mean(axis=0)) / x.std(axis=0)
    return z


def _segment_mix(table: CustomerTable, region: str) -> NDArray[np.float64]:
    seg = table.segment[table.region == region]
    mix: NDArray[np.float64] = np.bincount(seg, minlength=len(SEGMENTS)) / seg.shape[0]
    return mix


def test_metadata_is_consistent() -> None:
    """Feature metadata, segments and region names are complete and coherent."""
    # Prepare / Execute
    names = tuple(FEATURE_INFO)

    # Assert
    assert names == FEATURES
    for name, info in FEATURE_INFO.items():
        assert info.name == name
        assert info.transform in ("log1p", "none")
        assert info.lower < info.upper
        assert info.high_label and info.low_label and info.high_label != info.low_label
    assert FEATURE_INFO["recency_days"].high_label == "lapsing"
    assert FEATURE_INFO["frequency"].low_label == "occasional"
    assert 5 <= len(SEGMENTS) <= 6
    assert len({s.name for s in SEGMENTS}) == len(SEGMENTS)
    assert len(set(REGION_NAMES)) == len(REGION_NAMES) == 10


def test_shapes_and_dtypes(table: CustomerTable) -> None:
    """Every column has one entry per customer and the documented dtype."""
    # Prepare
    n = 20_000

    # Execute / Assert
    assert len(table) == n
    for column in (table.customer_id, table.name, table.email, table.region):
        assert column.shape == (n,)
        assert column.dtype.kind == "U"
    assert table.consent.shape == (n,) and table.consent.dtype == np.bool_
    assert table.segment.shape == (n,) and table.segment.dtype.kind == "i"
    assert table.features.shape == (n, len(FEATURES))
    assert table.features.dtype == np.float64


def test_identifiers_are_unique(table: CustomerTable) -> None:
    """Customer ids and e-mails are unique and well formed."""
    # Execute
    ids = set(table.customer_id.tolist())
    emails = set(table.email.tolist())

    # Assert
    assert len(ids) == len(table)
    assert len(emails) == len(table)
    assert table.customer_id[0] == "C0000001"
    assert all("@" in e and " " not in e for e in table.email[:100].tolist())
    assert all(len(n.split(" ")) == 2 for n in table.name[:100].tolist())


def test_same_seed_gives_identical_table() -> None:
    """The same seed reproduces the table exactly."""
    # Execute
    a = generate_customers(num_customers=2_000, num_regions=4, seed=7)
    b = generate_customers(num_customers=2_000, num_regions=4, seed=7)

    # Assert
    for field in ("customer_id", "name", "email", "region", "consent", "segment", "features"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_different_seeds_differ() -> None:
    """Different seeds give different customers."""
    # Execute
    a = generate_customers(num_customers=2_000, seed=1)
    b = generate_customers(num_customers=2_000, seed=2)

    # Assert
    assert not np.array_equal(a.features, b.features)
    assert not np.array_equal(a.segment, b.segment)


def test_features_within_bounds(table: CustomerTable) -> None:
    """Raw features stay within the FEATURE_INFO bounds."""
    # Prepare
    lower = np.array([FEATURE_INFO[f].lower for f in FEATURES])
    upper = np.array([FEATURE_INFO[f].upper for f in FEATURES])

    # Execute
    x = table.features

    # Assert
    assert np.all(np.isfinite(x))
    assert np.all(x >= lower) and np.all(x <= upper)
    assert np.all(x[:, FEATURES.index("frequency")] > 0)


def test_features_are_realistic(table: CustomerTable) -> None:
    """Basket size matches spend / frequency and spend is heavy-tailed."""
    # Prepare
    col = {name: table.features[:, j] for j, name in enumerate(FEATURES)}

    # Execute
    implied_basket = col["monetary"] / col["frequency"]
    log_ratio = np.log(col["avg_basket"] / implied_basket)
    spend = col["monetary"]

    # Assert: basket is monetary / frequency up to modest noise.
    assert abs(float(np.median(log_ratio))) < 0.05
    assert float(np.quantile(np.abs(log_ratio), 0.99)) < 1.0
    # Spend is heavy-tailed: mean well above median, long upper tail.
    assert spend.mean() > 1.2 * np.median(spend)
    assert np.quantile(spend, 0.99) > 10 * np.median(spend)


def test_consent_refusal_rate_about_ten_percent(table: CustomerTable) -> None:
    """About 10 % of customers refuse consent."""
    # Execute
    refusal = 1.0 - table.consent.mean()

    # Assert
    assert 0.08 <= refusal <= 0.12


def test_consent_independent_of_segment(table: CustomerTable) -> None:
    """The refusal rate does not depend on the segment."""
    # Execute
    rates = [1.0 - table.consent[table.segment == k].mean() for k in range(len(SEGMENTS))]

    # Assert
    assert max(rates) - min(rates) < 0.05


def test_region_sizes_unequal(table: CustomerTable) -> None:
    """The largest region is at least five times the smallest."""
    # Execute
    _, counts = np.unique(table.region, return_counts=True)

    # Assert
    assert counts.shape == (5,)
    assert counts.max() >= 5 * counts.min()


@pytest.mark.parametrize("num_regions", range(2, 11))
def test_region_layout_for_any_count(num_regions: int) -> None:
    """Sizes and mixes are valid for every supported region count."""
    # Execute
    props = region_proportions(num_regions)
    mix = region_mixing(num_regions)
    small = generate_customers(num_customers=10 * num_regions, num_regions=num_regions, seed=3)

    # Assert
    np.testing.assert_allclose(props.sum(), 1.0)
    assert props.max() >= 5 * props.min()
    np.testing.assert_allclose(mix.sum(axis=1), 1.0)
    assert np.all(np.sort(mix, axis=1)[:, -2:].sum(axis=1) >= 0.6)
    assert np.all(mix.sum(axis=0) > 0)
    assert set(small.region.tolist()) == set(REGION_NAMES[:num_regions])


def test_regions_are_non_iid(table: CustomerTable) -> None:
    """Each region is dominated by two segments and regions differ strongly."""
    # Prepare
    regions = sorted(set(table.region.tolist()))

    # Execute
    mixes = {r: _segment_mix(table, r) for r in regions}
    top2 = [np.sort(m)[-2:].sum() for m in mixes.values()]
    tv = max(0.5 * np.abs(mixes[a] - mixes[b]).sum() for a in regions for b in regions)

    # Assert
    assert min(top2) >= 0.6
    assert tv >= 0.5
    assert set(np.unique(table.segment).tolist()) == set(range(len(SEGMENTS)))


def test_kmeans_recovers_segments(table: CustomerTable) -> None:
    """K-means on transformed, standardised features finds the segments."""
    # Prepare
    x = _model_space(table.features)

    # Execute
    labels = KMeans(n_clusters=len(SEGMENTS), n_init=10, random_state=0).fit_predict(x)
    ari = adjusted_rand_score(table.segment, labels)

    # Assert: recoverable, but segments still overlap a little.
    assert 0.95 <= ari < 0.999


def test_generation_is_fast() -> None:
    """Fifty thousand customers are generated quickly."""
    # Prepare
    generate_customers(num_customers=1_000, seed=0)

    # Execute
    start = time.perf_counter()
    generate_customers(num_customers=50_000, seed=0)
    elapsed = time.perf_counter() - start

    # Assert: generous bound; typical time is ~0.15 s.
    assert elapsed < 2.0


def test_subset_selects_rows(table: CustomerTable) -> None:
    """CustomerTable.subset accepts index arrays and boolean masks."""
    # Prepare
    idx = np.array([5, 0, 42])

    # Execute
    sub = table.subset(idx)
    masked = table.subset(table.region == "north")

    # Assert
    assert len(sub) == 3
    np.testing.assert_array_equal(sub.customer_id, table.customer_id[idx])
    np.testing.assert_array_equal(sub.features, table.features[idx])
    assert set(masked.region.tolist()) == {"north"}


def test_to_csv_round_trip(tmp_path: Path) -> None:
    """to_csv writes the documented header and exact values."""
    # Prepare
    small = generate_customers(num_customers=50, num_regions=2, seed=5)
    path = tmp_path / "customers.csv"

    # Execute
    small.to_csv(path)
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))

    # Assert
    assert rows[0] == ["customer_id", "name", "email", "region", "consent", "segment", *FEATURES]
    assert len(rows) == 51
    assert [r[0] for r in rows[1:]] == small.customer_id.tolist()
    assert [r[4] == "true" for r in rows[1:]] == small.consent.tolist()
    assert [int(r[5]) for r in rows[1:]] == small.segment.tolist()
    np.testing.assert_array_equal(
        np.array([[float(v) for v in r[6:]] for r in rows[1:]]), small.features
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_regions": 1}, "num_regions=1 should be between 2 and 10"),
        ({"num_regions": 11}, "num_regions=11 should be between 2 and 10"),
        ({"num_customers": 49, "num_regions": 5}, "num_customers=49 should be an integer >= 50"),
        ({"num_customers": 0}, "num_customers=0"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, int], match: str) -> None:
    """Out-of-range arguments raise ValueError with the actual value."""
    # Execute / Assert
    with pytest.raises(ValueError, match=match):
        generate_customers(**kwargs)
