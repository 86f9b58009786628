r"""A site's local Lloyd step at scale against a plain numpy Lloyd step on the same data.

Usage::

    .venv/bin/python -m simulations.bench.local_step                    # 5,000,000 customers
    .venv/bin/python -m simulations.bench.local_step --customers 200000 --reps 3

One site holds ``--customers`` synthetic customers (the 7 features of ``data=synthetic``; 200,000
generated, repeated to the size). Both
sides get the same standardisation and the same ``k`` centres:

* **site step**: :func:`client.app.site_statistics` for a ``lloyd`` instruction -- what a
  site computes per round, from its transformed records: standardise with the global moments,
  assign, per-centre sums, sums of squares, counts and costs, with its public shapes checked;
* **plain numpy step**: the textbook Lloyd step on the already standardised array: squared
  distances by the same ``|x|^2 - 2 x.c + |c|^2`` expansion, ``argmin``, per-centre sums and
  counts with ``np.bincount`` -- no scaling, no sums of squares, no costs.

Reported: median seconds of ``--reps`` repetitions each, run alternately, the ratio
(site / plain) and the process's peak memory. The bar (issue 11): ratio <= 1.5 at 5,000,000
customers.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from client.app import SiteData, site_statistics
from common.features import apply_transforms
from common.protocol import Phase
from simulations.datasets import SyntheticCustomers

GENERATED = 200_000


def plain_lloyd_step(x: NDArray[np.float64], centres: NDArray[np.float64]
                     ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Compute the textbook Lloyd step: nearest centre, then per-centre sums and counts."""
    d2 = (np.einsum("ij,ij->i", x, x)[:, None] - 2.0 * x @ centres.T
          + np.einsum("ij,ij->i", centres, centres)[None, :])
    labels = np.argmin(d2, axis=1)
    k = centres.shape[0]
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    sums = np.stack([np.bincount(labels, weights=x[:, j], minlength=k)
                     for j in range(x.shape[1])], axis=1).astype(np.float64)
    return sums, counts


def _interleaved_medians(first: Callable[[], object], second: Callable[[], object],
                         reps: int) -> tuple[float, float]:
    """Median seconds of each, run alternately (a shared machine's load hits both alike)."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(reps):
        for fn, out in ((first, times[0]), (second, times[1])):
            started = time.perf_counter()
            fn()
            out.append(time.perf_counter() - started)
    return statistics.median(times[0]), statistics.median(times[1])


def main(argv: list[str] | None = None) -> None:
    """Time both steps and print one markdown table row."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=5_000_000)
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    # 200,000 generated customers, repeated to the requested size (timing does not depend on
    # which customers they are; generating 5 million names and e-mails would)
    population = SyntheticCustomers(num_customers=min(args.customers, GENERATED),
                                    num_regions=5).load(seed=0)
    raw = np.resize(population.raw, (args.customers, population.raw.shape[1]))
    site = SiteData(raw=raw, features=population.features)
    transformed = apply_transforms(site.raw, site.features)
    mean, std = transformed.mean(axis=0), transformed.std(axis=0)
    x = (transformed - mean) / std
    rng = np.random.default_rng(0)
    centres = x[rng.choice(x.shape[0], size=args.k, replace=False)]
    instruction = [mean, std, centres]
    site.transformed  # noqa: B018 - computed once, as a site's gate does at load
    site_s, plain_s = _interleaved_medians(
        lambda: site_statistics(site, Phase.LLOYD, instruction),
        lambda: plain_lloyd_step(x, centres), args.reps)
    # the two agree on what they both compute
    reply = site_statistics(site, Phase.LLOYD, instruction)
    sums, counts = plain_lloyd_step(x, centres)
    np.testing.assert_allclose(reply[0], sums, rtol=1e-9, atol=1e-6)
    np.testing.assert_array_equal(reply[2], counts)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("| customers | k | site step s | plain numpy step s | site / plain | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.customers:,} | {args.k} | {site_s:.3f} | {plain_s:.3f} | "
          f"{site_s / plain_s:.2f} | {peak:,.0f} |")


if __name__ == "__main__":
    main()
