"""Run the federated k-means protocol in one process, without Flower's transport.

Every site's reply is computed by the same :func:`client.app.site_statistics` the ClientApp
uses and the replies are summed exactly as the server would receive them with ``privacy=none``.
Because fedseg's SecAgg+ encoding is exact to ``2**-24`` per entry, this reproduces a Flower
run's trajectory; benchmarks use it to measure the algorithm over many seeds quickly, and the
integration tests check a real Flower run against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from client.app import SiteData, ae_site_statistics, site_statistics
from common.autoencoder import AESettings
from common.dp import DpPlan, NoiseSource, noisy_round
from common.features import FeatureSpec, apply_transforms
from common.protocol import Phase, parse_phase
from common.secure_sum import plain_sum
from server.ae_coordinator import AEKMeansCoordinator
from server.coordinator import KMeansCoordinator, KMeansSettings
from server.dp_coordinator import DPKMeansCoordinator


def run_inprocess(
    parts: Sequence[NDArray[np.float64]],
    *,
    features: tuple[FeatureSpec, ...],
    settings: KMeansSettings,
) -> KMeansCoordinator:
    """Run all phases on the sites' raw records and return the finished coordinator.

    Parameters
    ----------
    parts : sequence of ndarray of shape (n_i, n_features)
        Raw records per site.
    features : tuple of FeatureSpec
    settings : KMeansSettings
    """
    sites = [SiteData(raw=np.asarray(p, dtype=np.float64), features=features) for p in parts]
    coordinator = KMeansCoordinator(settings=settings, features=features)
    server_round = 0
    while not coordinator.done:
        server_round += 1
        phase_name, instruction, groups = coordinator.instruction()
        phase = parse_phase(phase_name)
        replies = [site_statistics(site, phase, instruction, groups=groups) for site in sites]
        coordinator.step(plain_sum(replies), server_round=server_round, num_sites=len(sites))
    return coordinator


def run_inprocess_ae(
    parts: Sequence[NDArray[np.float64]],
    *,
    features: tuple[FeatureSpec, ...],
    settings: KMeansSettings,
    ae: AESettings,
) -> AEKMeansCoordinator:
    """Run ``model=ae_kmeans`` in one process: each site answers with :func:`ae_site_statistics`.

    The replies are summed in float64 as the server would receive them with ``privacy=none``;
    SecAgg+'s exact encoding changes each sum by at most ``2**-24`` per site and entry.

    Parameters
    ----------
    parts : sequence of ndarray of shape (n_i, n_features)
        Raw records per site (one part = the pooled data, trained centrally by the same code).
    features : tuple of FeatureSpec
    settings : KMeansSettings
    ae : AESettings
    """
    sites = [SiteData(raw=np.asarray(p, dtype=np.float64), features=features) for p in parts]
    coordinator = AEKMeansCoordinator(settings=settings, features=features, ae=ae)
    server_round = 0
    while not coordinator.done:
        server_round += 1
        phase_name, instruction, groups = coordinator.instruction()
        phase = parse_phase(phase_name)
        if phase is Phase.MOMENTS:
            replies = [site_statistics(site, phase, instruction) for site in sites]
        else:
            replies = [ae_site_statistics(site, phase, instruction, settings=ae,
                                          n_params=coordinator.n_params, groups=groups,
                                          train_round=coordinator.ae_rounds)[0]
                       for site in sites]
        coordinator.step(plain_sum(replies), server_round=server_round, num_sites=len(sites))
    return coordinator


def run_inprocess_dp(
    parts: Sequence[NDArray[np.float64]],
    *,
    features: tuple[FeatureSpec, ...],
    settings: KMeansSettings,
    dp: DpPlan,
    init_candidates: int,
    honest: int | None = None,
    noise_seed: bytes | None = None,
    noiseless: bool = False,
) -> DPKMeansCoordinator:
    """Run the DP protocol in one process: every site adds its noise share, sums are exact.

    Each site computes :func:`common.dp.noisy_round` exactly as the ClientApp does; the integer
    replies are summed exactly, as SecAgg+ would, and handed to the coordinator in value units.

    Parameters
    ----------
    parts : sequence of ndarray
        Raw records per site (one part = the pooled data of a trusted curator).
    features, settings, dp, init_candidates
        As for :class:`server.dp_coordinator.DPKMeansCoordinator`.
    honest : int, optional
        Sites each relies on for noise (default: all of them).
    noise_seed : bytes, optional
        Seeds every site's noise (benchmarks and tests only); ``None`` draws fresh keys.
    noiseless : bool, default=False
        The benchmark's ``epsilon = inf`` baseline: the same schedule and clipping, no noise.
    """
    transformed = [apply_transforms(np.asarray(p, dtype=np.float64), features) for p in parts]
    h = len(parts) if honest is None else honest
    sources = [(_Silent() if noiseless else
                NoiseSource(None if noise_seed is None else noise_seed + bytes([i % 256])))
               for i in range(len(parts))]
    coordinator = DPKMeansCoordinator(settings=settings, features=features, dp=dp,
                                      init_candidates=init_candidates)
    server_round = 0
    while not coordinator.done:
        server_round += 1
        _, instruction, _ = coordinator.instruction()
        phase = coordinator.phase
        replies = [noisy_round(phase, dp, transformed=x, features=features,
                               instruction=instruction, honest=h, noise=src)[0]
                   for x, src in zip(transformed, sources, strict=True)]
        sums = [np.asarray([sum(int(v) for v in column) for column in
                            np.stack([r[i].ravel() for r in replies]).T], dtype=object)
                .reshape(replies[0][i].shape) for i in range(len(replies[0]))]
        values = [np.asarray(s, dtype=np.float64) / dp.gamma for s in sums]
        coordinator.step(values, server_round=server_round, num_sites=len(parts))
    return coordinator


class _Silent(NoiseSource):
    """No noise at all: only for the benchmark's non-private baseline of the DP schedule."""

    def discrete_gaussian(self, sigma: float, shape: tuple[int, ...]) -> NDArray[np.int64]:
        return np.zeros(shape, dtype=np.int64)
