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

from client.app import SiteData, site_statistics
from common.features import FeatureSpec
from common.protocol import parse_phase
from common.secure_sum import plain_sum
from server.coordinator import KMeansCoordinator, KMeansSettings


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
