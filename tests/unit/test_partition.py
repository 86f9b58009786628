"""Tests of the federated site splitters."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from simulations.partition import partition_by_group, partition_dirichlet, partition_iid
from simulations.synthetic import generate_customers


def _assert_disjoint_cover(sites: list[NDArray[np.intp]], num_rows: int) -> None:
    """Check that the sites are sorted, non-empty, disjoint and cover every row."""
    for site in sites:
        assert site.dtype.kind == "i"
        assert site.shape[0] > 0
        assert np.all(np.diff(site) > 0)
    merged = np.concatenate(sites)
    assert merged.shape[0] == num_rows
    np.testing.assert_array_equal(np.sort(merged), np.arange(num_rows))


@pytest.fixture(scope="module")
def regions() -> NDArray[np.str_]:
    """Return the region column of a 5-region population."""
    return generate_customers(num_customers=5_000, num_regions=5, seed=0).region


# --- partition_by_group -------------------------------------------------------------------


def test_by_group_one_site_per_group(regions: NDArray[np.str_]) -> None:
    """With one site per group, every site holds exactly one whole group."""
    # Execute
    sites = partition_by_group(regions, num_sites=5, seed=0)

    # Assert
    _assert_disjoint_cover(sites, regions.shape[0])
    assert [len(set(regions[s].tolist())) for s in sites] == [1] * 5
    assert sorted(regions[s[0]] for s in sites) == sorted(set(regions.tolist()))


def test_by_group_extra_sites_largest_remainder() -> None:
    """Extra sites follow group size by largest remainder; splits are even."""
    # Prepare: sizes 60/30/10, 3 extra sites -> quotas 1.8/0.9/0.3 -> 1+1/1+1/1+0 + remainder.
    groups = np.array(["a"] * 60 + ["b"] * 30 + ["c"] * 10)

    # Execute
    sites = partition_by_group(groups, num_sites=6, seed=0)

    # Assert
    _assert_disjoint_cover(sites, groups.shape[0])
    per_group = [str(groups[s[0]]) for s in sites]
    assert per_group == ["a", "a", "a", "b", "b", "c"]
    assert [len(s) for s in sites] == [20, 20, 20, 15, 15, 10]
    assert all(len(set(groups[s].tolist())) == 1 for s in sites)


def test_by_group_never_gives_a_group_more_sites_than_rows() -> None:
    """A small group keeps one site; the extra sites go elsewhere."""
    # Prepare
    groups = np.array([0] * 10 + [1] * 2)

    # Execute
    sites = partition_by_group(groups, num_sites=5, seed=0)

    # Assert
    _assert_disjoint_cover(sites, groups.shape[0])
    assert [int(groups[s[0]]) for s in sites] == [0, 0, 0, 0, 1]


def test_by_group_is_deterministic_and_seeded(regions: NDArray[np.str_]) -> None:
    """The same seed gives the same split; another seed differs."""
    # Execute
    a = partition_by_group(regions, num_sites=9, seed=1)
    b = partition_by_group(regions, num_sites=9, seed=1)
    c = partition_by_group(regions, num_sites=9, seed=2)

    # Assert
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_by_group_too_few_sites_names_both_numbers(regions: NDArray[np.str_]) -> None:
    """Fewer sites than groups is refused with both numbers."""
    # Execute / Assert
    with pytest.raises(ValueError, match=r"num_sites=3 .*distinct groups \(5\)"):
        partition_by_group(regions, num_sites=3, seed=0)


@pytest.mark.parametrize(
    ("groups", "num_sites", "match"),
    [
        (np.array([0, 0, 1]), 1, r"num_sites=1 should be >= 2\."),
        (np.array([0, 0, 1]), 4, r"num_sites=4 should be <= the number of rows \(3\)"),
        (np.array([], dtype=int), 2, "empty"),
        (np.zeros((2, 2), dtype=int), 2, "1-dimensional"),
    ],
)
def test_by_group_bad_arguments(groups: NDArray[np.int64], num_sites: int, match: str) -> None:
    """Invalid groups or site counts raise ValueError."""
    # Execute / Assert
    with pytest.raises(ValueError, match=match):
        partition_by_group(groups, num_sites=num_sites, seed=0)


# --- partition_dirichlet ------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.1, 0.5, 100.0])
def test_dirichlet_disjoint_cover_and_min_size(alpha: float) -> None:
    """Dirichlet sites are disjoint, cover all rows and respect min_size."""
    # Prepare
    labels = np.random.default_rng(0).integers(0, 6, size=5_000)

    # Execute
    sites = partition_dirichlet(labels, num_sites=10, alpha=alpha, seed=0, min_size=50)

    # Assert
    _assert_disjoint_cover(sites, labels.shape[0])
    assert len(sites) == 10
    assert min(len(s) for s in sites) >= 50


def test_dirichlet_small_alpha_is_more_skewed_than_large() -> None:
    """Small alpha skews label mixes; large alpha is close to IID."""
    # Prepare
    labels = np.random.default_rng(0).integers(0, 6, size=6_000)
    overall = np.bincount(labels, minlength=6) / labels.shape[0]

    def mean_tv(alpha: float) -> float:
        sites = partition_dirichlet(labels, num_sites=8, alpha=alpha, seed=3)
        dists = [np.bincount(labels[s], minlength=6) / len(s) for s in sites]
        return float(np.mean([0.5 * np.abs(d - overall).sum() for d in dists]))

    # Execute
    skewed, near_iid = mean_tv(0.1), mean_tv(100.0)

    # Assert
    assert skewed > 0.4
    assert near_iid < 0.1


def test_dirichlet_is_deterministic() -> None:
    """The same seed gives the same Dirichlet split."""
    # Prepare
    labels = np.repeat(np.arange(4), 250)

    # Execute
    a = partition_dirichlet(labels, num_sites=5, alpha=0.3, seed=11)
    b = partition_dirichlet(labels, num_sites=5, alpha=0.3, seed=11)

    # Assert
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_sites": 1, "alpha": 1.0}, r"num_sites=1 should be >= 2\."),
        ({"num_sites": 3, "alpha": 0.0}, r"alpha=0.0 should be a finite number > 0\."),
        ({"num_sites": 3, "alpha": -1.0}, r"alpha=-1.0 should be"),
        ({"num_sites": 3, "alpha": float("nan")}, r"alpha=nan should be"),
        ({"num_sites": 3, "alpha": 1.0, "min_size": 0}, r"min_size=0 should be >= 1\."),
        ({"num_sites": 11, "alpha": 1.0}, r"100 rows, should have >= .* = 110"),
    ],
)
def test_dirichlet_bad_arguments(kwargs: dict[str, float], match: str) -> None:
    """Invalid Dirichlet arguments raise ValueError naming the value."""
    # Prepare
    labels = np.arange(100) % 4

    # Execute / Assert
    with pytest.raises(ValueError, match=match):
        partition_dirichlet(labels, seed=0, **kwargs)  # type: ignore[arg-type]


def test_dirichlet_impossible_min_size_raises() -> None:
    """An unreachable min_size raises after bounded attempts."""
    # Prepare: every site must get exactly 10 rows, which a skewed draw never gives.
    labels = np.arange(30) % 2

    # Execute / Assert
    with pytest.raises(ValueError, match="could not give every one of num_sites=3 sites"):
        partition_dirichlet(labels, num_sites=3, alpha=0.01, seed=0, min_size=10)


# --- partition_iid ------------------------------------------------------------------------


def test_iid_balanced_cover() -> None:
    """IID sites cover all rows with sizes differing by at most one."""
    # Execute
    sites = partition_iid(1_003, num_sites=4, seed=0)

    # Assert
    _assert_disjoint_cover(sites, 1_003)
    sizes = [len(s) for s in sites]
    assert max(sizes) - min(sizes) <= 1


def test_iid_is_deterministic_and_shuffled() -> None:
    """The IID split is seeded and not simply contiguous."""
    # Execute
    a = partition_iid(100, num_sites=2, seed=4)
    b = partition_iid(100, num_sites=2, seed=4)

    # Assert
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], np.arange(50))


@pytest.mark.parametrize(
    ("num_rows", "num_sites", "match"),
    [
        (10, 1, r"num_sites=1 should be >= 2\."),
        (3, 4, r"num_rows=3 should be >= 4 \(num_sites\)\."),
        (10, 2.5, r"num_sites=2\.5 should be an integer >= 2\."),
    ],
)
def test_iid_bad_arguments(num_rows: int, num_sites: int, match: str) -> None:
    """Invalid IID arguments raise ValueError naming the value."""
    # Execute / Assert
    with pytest.raises(ValueError, match=match):
        partition_iid(num_rows, num_sites=num_sites, seed=0)
