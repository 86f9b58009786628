"""SecAgg+ neighbourhood size and reconstruction threshold, derived from what an attacker needs.

SecAgg+ (Bell, Bonawitz, Gascon, Lepoint, Raykova, "Secure single-server aggregation with
(poly)logarithmic overhead", CCS 2020) secret-shares each site's two mask secrets -- the seed of
its self mask and the key of its pairwise masks -- among its ``s`` neighbours (itself included);
any ``t`` shares rebuild a secret. A site ``X``'s statistics are exposed when the server holds
*both* of ``X``'s secrets, or all of ``X``'s pairwise keys (every neighbour colludes).

What the server can collect, per honest site ``X`` with ``c`` colluding neighbours (besides
itself, ``X`` has ``s - 1``), once every site runs :mod:`client.secagg_guard`:

* ``X`` gives its own seed share (it is active) and never its own key share;
* a colluding neighbour gives both shares; an honest neighbour gives *one* share of ``X``: the
  seed share if the server lists ``X`` as active, the key share if it lists ``X`` as dead -- the
  guard refuses a request that lists a site as both (the Flower 1.42 gap, docs/SECURITY.md);
* a lying server may still tell different honest neighbours different stories. Counting shares,
  it rebuilds both secrets when ``1 + 2c + (s - 1 - c) >= 2t``, i.e. ``c >= 2t - s``.

fedseg therefore chooses:

* **no dropout tolerance** (the default; a dropout stops the run anyway): ``t = s``. Nobody's key
  share set is complete without the site's own, so only ``c = s - 1`` (every other neighbour
  colludes) exposes ``X``.
* **dropout tolerance** (``accept_partial_rounds``): ``f = floor((s - 1) / 3)`` dropped neighbours
  are tolerated with ``t = s - f``, so exposure needs ``c >= s - 2f > s / 3`` colluders.
* **neighbourhood size**: the complete graph up to :data:`COMPLETE_GRAPH_MAX_SITES` sites. Above,
  Flower places sites on a randomly shuffled ring, so ``X``'s ``s - 1`` other neighbours are a
  uniformly random subset of the other ``n - 1`` sites and the number of colluders among them is
  hypergeometric. ``s`` is the smallest odd size for which the union bound over every site and
  every round of a run, ``n * rounds * P[colluders >= c*]``, stays below ``2**-failure_log2``
  when a fraction ``collusion_fraction`` of all sites colludes with the server (the exact tail,
  which is tighter than the paper's Chernoff-style bounds for the same condition).
"""

from __future__ import annotations

import math
from functools import lru_cache

from common.errors import ConfigError

COMPLETE_GRAPH_MAX_SITES = 30
"""Up to this many sites every site shares its secrets with every other."""

DEFAULT_COLLUSION_FRACTION = 1.0 / 3.0
"""Fraction of all sites assumed to collude with the server when sizing neighbourhoods."""

SEARCH_MAX_SHARES = 201
"""Largest neighbourhood searched below the complete graph."""

ROUNDS_COVERED = 200
"""Rounds per run the union bound covers (server and sites must derive the same size)."""

DEFAULT_FAILURE_LOG2 = 40
"""A run exposes some honest site with probability at most ``2**-40`` (union bound)."""


def threshold_for(shares: int, *, tolerate_dropouts: bool) -> int:
    """Reconstruction threshold for a neighbourhood of ``shares`` sites (itself included).

    Parameters
    ----------
    shares : int
        Neighbourhood size ``s`` (>= 2).
    tolerate_dropouts : bool
        False: ``t = s`` (no secret can be rebuilt without every neighbour). True: tolerate
        ``floor((s - 1) / 3)`` dropped neighbours.
    """
    if shares < 2:
        raise ConfigError(f"num_shares={shares} should be >= 2.")
    if not tolerate_dropouts:
        return shares
    return max(2, shares - (shares - 1) // 3)


def colluders_to_expose(shares: int, threshold: int) -> int:
    """Colluding neighbours (besides the site) a lying server needs to expose one site.

    ``2t - s`` when ``t < s`` (see the module docstring); ``s - 1`` (everyone else) when
    ``t = s``.
    """
    if threshold >= shares:
        return shares - 1
    return max(0, 2 * threshold - shares)


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _hypergeom_tail(population: int, marked: int, draws: int, at_least: int) -> float:
    """``P[X >= at_least]`` for ``X ~ Hypergeometric(population, marked, draws)``.

    Summed term by term in log space (``lgamma``): relative error ~1e-12, ample for bounds of
    ``2**-40``, and fast for thousands of sites.
    """
    lo = max(at_least, 0, draws - (population - marked))
    hi = min(marked, draws)
    if lo > hi:
        return 0.0
    log_total = _log_comb(population, draws)
    return min(1.0, math.fsum(
        math.exp(_log_comb(marked, i) + _log_comb(population - marked, draws - i) - log_total)
        for i in range(lo, hi + 1)))


def exposure_probability(
    num_sites: int, shares: int, *, tolerate_dropouts: bool, collusion_fraction: float,
    rounds: int,
) -> float:
    """Union bound on exposing any honest site in any round of a run.

    Parameters
    ----------
    num_sites : int
    shares : int
        Neighbourhood size (itself included), ``<= num_sites``.
    tolerate_dropouts : bool
    collusion_fraction : float
        Fraction of all sites that collude with the server.
    rounds : int
        Rounds in a run (each draws a fresh ring).
    """
    colluders = math.floor(collusion_fraction * num_sites)
    need = colluders_to_expose(shares, threshold_for(shares, tolerate_dropouts=tolerate_dropouts))
    per_site = _hypergeom_tail(num_sites - 1, colluders, shares - 1, need)
    return min(1.0, num_sites * rounds * per_site)


@lru_cache(maxsize=256)
def neighbourhood_size(
    num_sites: int,
    *,
    tolerate_dropouts: bool = False,
    collusion_fraction: float = DEFAULT_COLLUSION_FRACTION,
    failure_log2: int = DEFAULT_FAILURE_LOG2,
    rounds: int = ROUNDS_COVERED,
) -> int:
    """Smallest safe SecAgg+ neighbourhood for ``num_sites`` sites (see the module docstring).

    Parameters
    ----------
    num_sites : int
        Sites sampled in the round (>= 2).
    tolerate_dropouts : bool, default=False
    collusion_fraction : float, default=1/3
    failure_log2 : int, default=40
    rounds : int, default=ROUNDS_COVERED
        Rounds of a run covered by the bound (the same on both sides, so that the server's
        choice meets every site's default requirement).

    Returns
    -------
    int
        ``num_sites`` up to :data:`COMPLETE_GRAPH_MAX_SITES`, else an odd size ``<= num_sites``.
    """
    if num_sites < 2:
        raise ConfigError(f"num_sites={num_sites} should be >= 2 for SecAgg+.")
    if not 0.0 <= collusion_fraction < 1.0:
        raise ConfigError(f"collusion_fraction={collusion_fraction} should be in [0, 1).")
    if num_sites <= COMPLETE_GRAPH_MAX_SITES:
        return num_sites
    target = 2.0 ** -failure_log2
    # Sizes beyond SEARCH_MAX_SHARES cost O(s^2) key agreements per round; when none below it
    # meets the bound (dropout tolerance with many colluders), use the complete graph.
    for shares in range(3, min(num_sites, SEARCH_MAX_SHARES + 1), 2):
        if exposure_probability(num_sites, shares, tolerate_dropouts=tolerate_dropouts,
                                collusion_fraction=collusion_fraction,
                                rounds=rounds) <= target:
            return shares
    return num_sites
