"""The federated k-means protocol: phases and the public shape of every site reply.

The server drives the phases; every instruction it sends is public (centroids, global
scaling) and every reply a site sends is a list of float64 statistics whose shapes depend
only on public numbers (``k``, the number of candidate centres, the number of features).
A reply of any other shape is refused, and a test checks every message a site sends against
:func:`reply_shapes`.
"""

from __future__ import annotations

from enum import StrEnum


class Phase(StrEnum):
    """Phases of one federated k-means run, in order."""

    MOMENTS = "moments"
    """Per-feature count, sum and sum of squares -> global standardisation."""
    INIT = "init"
    """Over-clustering Lloyd rounds on data-independent candidates -> initial centroids."""
    LLOYD = "lloyd"
    """Lloyd rounds on the k centroids until tolerance or ``max_rounds``."""
    PROFILE = "profile"
    """Per-segment statistics at the final centroids -> the segment model."""


def reply_shapes(
    phase: Phase, *, n_centres: int, n_features: int, dp: bool = False
) -> list[tuple[int, ...]]:
    """Public shapes of a site's (unencoded) reply in ``phase``.

    Parameters
    ----------
    phase : Phase
    n_centres : int
        Centres the site was sent (candidates in ``init``, ``k`` afterwards); unused for
        ``moments``.
    n_features : int
    dp : bool, default=False
        Differentially private layout (:mod:`common.dp`): cluster rounds release only clipped
        offset sums and counts ``[(k, d), (k,)]``, the profile ``[(k,), (k, d)]``.
    """
    k, d = n_centres, n_features
    if phase is Phase.MOMENTS:
        return [(1,), (d,), (d,)]
    if dp:
        return [(k,), (k, d)] if phase is Phase.PROFILE else [(k, d), (k,)]
    if phase in (Phase.INIT, Phase.LLOYD):
        return [(k, d), (k, d), (k,), (k,)]
    if phase is Phase.PROFILE:
        return [(k,), (k, d), (k,), (k, d), (k, d)]
    raise ValueError(f"unknown phase {phase!r}")


def instruction_shapes(phase: Phase, *, n_centres: int, n_features: int) -> list[tuple[int, ...]]:
    """Public shapes of the server's instruction arrays: ``[mean, std, centres]`` or none."""
    if phase is Phase.MOMENTS:
        return []
    return [(n_features,), (n_features,), (n_centres, n_features)]


PHASE_KEY = "fedseg.phase"
"""Config key of a fit instruction naming its phase."""
ROUND_KEY = "fedseg.round"
"""Config key of a fit instruction carrying the server round."""
PLAN_KEY = "fedseg.plan"
"""Config key: the server's public run plan (:class:`common.site_policy.RunPlan`, JSON)."""
GROUPS_KEY = "fedseg.groups"
"""Config key: the centres form this many independent sets (parallel Lloyd runs)."""


def parse_phase(value: object) -> Phase:
    """Parse the phase named in an instruction, refusing anything unknown."""
    try:
        return Phase(str(value))
    except ValueError as exc:
        raise ValueError(
            f"unknown phase {value!r}; expected one of {[p.value for p in Phase]}."
        ) from exc
