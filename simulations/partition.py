"""Split a population into federated sites.

Three splitters are provided:

* :func:`partition_by_group` -- one or more sites per natural group such as a
  region (the realistic non-IID case);
* :func:`partition_dirichlet` -- the classic label-Dirichlet non-IID split used
  in the federated-learning literature;
* :func:`partition_iid` -- a uniform random split, the IID baseline.

Every function returns a list of sorted ``int`` index arrays, one per site; the
arrays are disjoint and together cover every row exactly once. All randomness
comes from ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import math
import numbers
from typing import Final

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["partition_by_group", "partition_dirichlet", "partition_iid"]

MAX_DIRICHLET_ATTEMPTS: Final = 1000
"""How many Dirichlet draws :func:`partition_dirichlet` tries before giving up."""


def _check_int(value: object, name: str, minimum: int, what: str = "") -> int:
    bound = f"{minimum}{what}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={value!r} should be an integer >= {bound}.")
    if value < minimum:
        raise ValueError(f"{name}={value} should be >= {bound}.")
    return int(value)


def _check_1d(values: ArrayLike, name: str) -> NDArray[np.generic]:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} should be 1-dimensional, got an array of shape {arr.shape}.")
    return arr


def _sorted_sites(parts: list[NDArray[np.intp]]) -> list[NDArray[np.intp]]:
    return [np.sort(p).astype(np.intp, copy=False) for p in parts]


def _sites_per_group(counts: NDArray[np.intp], num_sites: int) -> NDArray[np.intp]:
    """Give each group one site plus a largest-remainder share of the rest.

    A group never gets more sites than it has rows; sites it cannot take go to
    the group with the most rows per site that can still take one.
    """
    n_groups = counts.shape[0]
    extra = num_sites - n_groups
    quotas = extra * counts / counts.sum()
    sites = np.ones(n_groups, dtype=np.intp) + np.floor(quotas).astype(np.intp)
    short = num_sites - int(sites.sum())
    if short > 0:
        # Largest remainder first; ties go to the larger group, then the first group.
        order = np.lexsort((np.arange(n_groups), -counts, -(quotas - np.floor(quotas))))
        sites[order[:short]] += 1
    surplus = int(np.maximum(sites - counts, 0).sum())
    sites = np.minimum(sites, counts)
    for _ in range(surplus):
        load = np.where(sites < counts, counts / sites, -np.inf)
        sites[int(np.argmax(load))] += 1
    return np.asarray(sites, dtype=np.intp)


def partition_by_group(groups: ArrayLike, *, num_sites: int, seed: int) -> list[NDArray[np.intp]]:
    """Split rows into sites that never mix groups.

    Each distinct group (e.g. a region) gets at least one site. The remaining
    ``num_sites - n_groups`` sites are handed out in proportion to group size
    with the largest-remainder method, and a group's rows are shuffled and
    split as evenly as possible over its sites.

    Parameters
    ----------
    groups : array-like, shape (n,)
        Group label of each row.
    num_sites : int
        Number of sites; at least 2, at least the number of distinct groups and
        at most ``n``.
    seed : int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    list of ndarray of int, length num_sites
        Sorted row indices of each site. Sites are ordered by group (in sorted
        label order), then by position within the group.

    Raises
    ------
    ValueError
        If ``groups`` is not 1-dimensional or is empty, or ``num_sites`` is out
        of range.

    Examples
    --------
    >>> sites = partition_by_group(["a", "a", "b", "b", "b", "b"], num_sites=3, seed=0)
    >>> [len(s) for s in sites]
    [2, 2, 2]
    """
    labels = _check_1d(groups, "groups")
    num_sites = _check_int(num_sites, "num_sites", 2)
    if labels.shape[0] == 0:
        raise ValueError("groups should hold at least one row, got an empty array.")
    uniques, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    n_groups = uniques.shape[0]
    if num_sites < n_groups:
        raise ValueError(
            f"num_sites={num_sites} should be >= the number of distinct groups ({n_groups})."
        )
    if num_sites > labels.shape[0]:
        raise ValueError(
            f"num_sites={num_sites} should be <= the number of rows ({labels.shape[0]})."
        )
    sites_per_group = _sites_per_group(counts.astype(np.intp), num_sites)
    rng = np.random.default_rng(seed)
    parts: list[NDArray[np.intp]] = []
    for g in range(n_groups):
        members = np.flatnonzero(inverse.ravel() == g)
        parts.extend(np.array_split(rng.permutation(members), int(sites_per_group[g])))
    return _sorted_sites(parts)


def partition_dirichlet(
    labels: ArrayLike,
    *,
    num_sites: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
) -> list[NDArray[np.intp]]:
    """Split rows into sites with label-Dirichlet skew.

    For every label, the shares of its rows sent to each site are drawn from
    ``Dirichlet(alpha, ..., alpha)``. As in the reference implementation of
    Yurochkin et al. (2019), a site that already holds ``n / num_sites`` rows
    gets no more rows in that draw. The whole draw is repeated, with the same
    random generator, until every site holds at least ``min_size`` rows.

    Parameters
    ----------
    labels : array-like, shape (n,)
        Label of each row (e.g. a ground-truth segment).
    num_sites : int
        Number of sites, at least 2.
    alpha : float
        Dirichlet concentration, > 0; small values give very skewed sites and
        large values approach an IID split.
    seed : int
        Seed of ``numpy.random.default_rng``.
    min_size : int, default=10
        Fewest rows a site may hold, >= 1.

    Returns
    -------
    list of ndarray of int, length num_sites
        Sorted row indices of each site.

    Raises
    ------
    ValueError
        If an argument is out of range, if ``n < num_sites * min_size``, or if
        no draw out of :data:`MAX_DIRICHLET_ATTEMPTS` satisfies ``min_size``.
    """
    values = _check_1d(labels, "labels")
    num_sites = _check_int(num_sites, "num_sites", 2)
    min_size = _check_int(min_size, "min_size", 1)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise ValueError(f"alpha={alpha!r} should be a finite number > 0.")
    if not (math.isfinite(float(alpha)) and alpha > 0):
        raise ValueError(f"alpha={alpha} should be a finite number > 0.")
    n = values.shape[0]
    if n < num_sites * min_size:
        raise ValueError(
            f"labels has {n} rows, should have >= num_sites * min_size = "
            f"{num_sites} * {min_size} = {num_sites * min_size}."
        )
    _, inverse = np.unique(values, return_inverse=True)
    inverse = inverse.ravel()
    members = [np.flatnonzero(inverse == k) for k in range(int(inverse.max()) + 1)]
    rng = np.random.default_rng(seed)
    cap = n / num_sites
    for _ in range(MAX_DIRICHLET_ATTEMPTS):
        parts: list[list[NDArray[np.intp]]] = [[] for _ in range(num_sites)]
        sizes = np.zeros(num_sites, dtype=np.intp)
        for rows in members:
            shuffled = rng.permutation(rows)
            shares = rng.dirichlet(np.full(num_sites, float(alpha)))
            shares = np.where(sizes < cap, shares, 0.0)
            total = shares.sum()
            shares = shares / total if total > 0 else np.full(num_sites, 1.0 / num_sites)
            cuts = (np.cumsum(shares) * shuffled.shape[0]).astype(np.intp)[:-1]
            for site, chunk in enumerate(np.split(shuffled, cuts)):
                parts[site].append(chunk)
                sizes[site] += chunk.shape[0]
        if int(sizes.min()) >= min_size:
            return _sorted_sites([np.concatenate(p) for p in parts])
    raise ValueError(
        f"could not give every one of num_sites={num_sites} sites >= min_size={min_size} rows "
        f"with alpha={alpha} in {MAX_DIRICHLET_ATTEMPTS} attempts; "
        "use a larger alpha, fewer sites or a smaller min_size."
    )


def partition_iid(num_rows: int, *, num_sites: int, seed: int) -> list[NDArray[np.intp]]:
    """Split rows uniformly at random into sites of near-equal size.

    Parameters
    ----------
    num_rows : int
        Number of rows, at least ``num_sites``.
    num_sites : int
        Number of sites, at least 2.
    seed : int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    list of ndarray of int, length num_sites
        Sorted row indices of each site; sizes differ by at most one.

    Raises
    ------
    ValueError
        If ``num_sites < 2`` or ``num_rows < num_sites``.
    """
    num_sites = _check_int(num_sites, "num_sites", 2)
    num_rows = _check_int(num_rows, "num_rows", num_sites, " (num_sites)")
    rng = np.random.default_rng(seed)
    return _sorted_sites(np.array_split(rng.permutation(num_rows), num_sites))
