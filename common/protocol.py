"""The federated k-means protocol: phases and the public shape of every site reply.

The server drives the phases; every instruction it sends is public (centroids, global
scaling) and every reply a site sends is a list of float64 statistics whose shapes depend
only on public numbers (``k``, the number of candidate centres, the number of features).
A reply of any other shape is refused, and a test checks every message a site sends against
:func:`reply_shapes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import numpy as np
from numpy.typing import NDArray

from common.errors import ProtocolError


class Phase(StrEnum):
    """Phases of one federated run, in order (``ae_train`` and ``embed``: ``model=ae_kmeans``)."""

    MOMENTS = "moments"
    """Per-feature count, sum and sum of squares -> global standardisation."""
    AE_TRAIN = "ae_train"
    """Local autoencoder training from the global weights -> customer-weighted sum of weights."""
    EMBED = "embed"
    """Count, sum and sum of squares of the embeddings -> standardisation of the embedding."""
    INIT = "init"
    """Over-clustering Lloyd rounds on data-independent candidates -> initial centroids."""
    LLOYD = "lloyd"
    """Lloyd rounds on the k centroids until tolerance or ``max_rounds``."""
    PROFILE = "profile"
    """Per-segment statistics at the final centroids -> the segment model."""


KMEANS_PHASES = (Phase.MOMENTS, Phase.INIT, Phase.LLOYD, Phase.PROFILE)
"""The phases of a ``model=kmeans`` run."""


def reply_shapes(
    phase: Phase, *, n_centres: int, n_features: int, dp: bool = False, n_params: int = 0,
    n_profile: int = 0, control_variates: bool = False, code_statistics: int = 0,
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
    n_params : int, default=0
        ``ae_train``: length of the autoencoder's flat parameter vector.
    n_profile : int, default=0
        ``model=ae_kmeans``: the clusters live in the embedding (``n_features`` = its size),
        the profile sums the ``n_profile`` original features; 0 means ``n_features``.
    control_variates : bool, default=False
        ``ae_train`` with SCAFFOLD: a fourth array, the sum of the site's customers' loss
        gradients at the global weights ``(n_params,)``.
    code_statistics : int, default=0
        ``ae_train`` with the dead-code split (``AESettings.code_statistics``): the number of
        codes; two more arrays of that length, the customers per code and their loss sums.
    """
    k, d = n_centres, n_features
    if phase is Phase.AE_TRAIN:
        # sum of customers * weights, customers, loss sum (+ sum of gradients)
        # (+ customers and loss sums per code)
        shapes: list[tuple[int, ...]] = [(n_params,), (1,), (1,)]
        if control_variates:
            shapes.append((n_params,))
        if code_statistics:
            shapes += [(code_statistics,), (code_statistics,)]
        return shapes
    if phase in (Phase.MOMENTS, Phase.EMBED):
        return [(1,), (d,), (d,)]
    if dp:
        return [(k,), (k, d)] if phase is Phase.PROFILE else [(k, d), (k,)]
    if phase in (Phase.INIT, Phase.LLOYD):
        return [(k, d), (k, d), (k,), (k,)]
    if phase is Phase.PROFILE:
        p = n_profile or d
        return [(k,), (k, p), (k,), (k, p), (k, p)]
    raise ValueError(f"unknown phase {phase!r}")


class Role(StrEnum):
    """What one array of a reply holds, as far as the server can check it."""

    COUNT = "counts"
    """Customers per cell: whole and non-negative at a site (noisy once DP noise is added)."""
    NONNEGATIVE = "costs or sums of squares"
    """Sums of squared values or distances: never negative at a site."""
    SIGNED = "sums"
    """Sums of (standardised or raw) values: any sign."""


def reply_roles(
    phase: Phase, *, dp: bool = False, control_variates: bool = False,
    code_statistics: bool = False,
) -> tuple[Role, ...]:
    """Return what each array of a site's reply in ``phase`` holds (order of :func:`reply_shapes`).

    Parameters
    ----------
    phase : Phase
    dp : bool, default=False
        Differentially private layout: the normalised moments and clipped offset sums of
        :mod:`common.dp` have any sign; only the counts keep their role.
    control_variates : bool, default=False
        ``ae_train`` with SCAFFOLD (:func:`reply_shapes`): the gradient sum, any sign.
    code_statistics : bool, default=False
        ``ae_train`` with the dead-code split: customers per code, then their loss sums.
    """
    c, n, s = Role.COUNT, Role.NONNEGATIVE, Role.SIGNED
    if phase is Phase.AE_TRAIN:
        # customers * weights, customers, reconstruction loss sum (+ gradient sum)
        # (+ customers and loss sums per code)
        return ((s, c, n) + ((s,) if control_variates else ())
                + ((c, n) if code_statistics else ()))
    if phase is Phase.EMBED:
        return (c, s, n)
    if dp:
        if phase is Phase.MOMENTS:
            return (c, s, s)
        return (c, s) if phase is Phase.PROFILE else (s, c)
    if phase is Phase.MOMENTS:
        return (c, s, n)  # count, sums, sums of squares
    if phase in (Phase.INIT, Phase.LLOYD):
        return (s, n, c, n)  # sums, sums of squares, counts, costs
    if phase is Phase.PROFILE:
        return (c, s, n, s, n)  # counts, sums, costs, raw sums, raw sums of squares
    raise ValueError(f"unknown phase {phase!r}")


def check_site_reply(
    arrays: Sequence[NDArray[Any]], *, phase: Phase, shapes: Sequence[tuple[int, ...]]
) -> None:
    """Refuse one site's plain (unencoded, non-DP) reply that no honest site can send.

    An honest site sends exactly the public layout of :func:`reply_shapes` in float64, every
    entry finite, counts whole and non-negative, costs and sums of squares non-negative. The
    message names the array and what was wrong with it, never a value.

    Parameters
    ----------
    arrays : sequence of ndarray
        The arrays of the reply, as received.
    phase : Phase
        The phase the server asked for.
    shapes : sequence of tuple of int
        The public shapes expected in this round (:func:`reply_shapes`).

    Raises
    ------
    ProtocolError
        Naming the first problem found.
    """
    # ae_train layouts differ in length: 3 arrays plain, +1 with SCAFFOLD's gradient sum,
    # +2 with the per-code statistics (so 4: SCAFFOLD, 5: codes, 6: both).
    extra = len(shapes) - 3 if phase is Phase.AE_TRAIN else 0
    roles = reply_roles(phase, control_variates=extra in (1, 3), code_statistics=extra >= 2)
    if len(arrays) != len(shapes):
        raise ProtocolError(f"{len(arrays)} arrays; the {phase.value} phase expects "
                            f"{len(shapes)}.")
    for index, (raw, shape, role) in enumerate(zip(arrays, shapes, roles, strict=True)):
        arr = np.asarray(raw)
        if arr.dtype != np.float64:
            raise ProtocolError(f"array #{index} ({role.value}) has dtype {arr.dtype}; "
                                "expected float64.")
        if arr.shape != tuple(shape):
            raise ProtocolError(f"array #{index} ({role.value}) has shape {arr.shape}; "
                                f"expected {tuple(shape)}.")
        if not np.all(np.isfinite(arr)):
            raise ProtocolError(f"array #{index} ({role.value}) holds non-finite values.")
        if role is not Role.SIGNED and np.any(arr < 0):
            raise ProtocolError(f"array #{index} ({role.value}) holds negative values.")
        if role is Role.COUNT and np.any(arr != np.rint(arr)):
            raise ProtocolError(f"array #{index} ({role.value}) holds values that are not "
                                "whole numbers.")


def instruction_shapes(phase: Phase, *, n_centres: int, n_features: int) -> list[tuple[int, ...]]:
    """Public shapes of the server's instruction arrays: ``[mean, std, centres]`` or none."""
    if phase is Phase.MOMENTS:
        return []
    return [(n_features,), (n_features,), (n_centres, n_features)]


def ae_instruction_shapes(
    phase: Phase, *, n_centres: int, n_features: int, n_params: int, embed_dim: int,
    control_variates: bool = False,
) -> list[tuple[int, ...]]:
    """Public shapes of a ``model=ae_kmeans`` instruction.

    ``[]`` (moments); ``[mean, std, weights]`` (ae_train, embed) -- ``ae_train`` with
    ``control_variates`` (SCAFFOLD) adds ``[anchor weights, mean gradient there]``; afterwards
    ``[mean, std, weights, embedding mean, embedding std, centres in the embedding]``.
    """
    d, m = n_features, embed_dim
    if phase is Phase.MOMENTS:
        return []
    if phase is Phase.AE_TRAIN and control_variates:
        return [(d,), (d,), (n_params,), (n_params,), (n_params,)]
    if phase in (Phase.AE_TRAIN, Phase.EMBED):
        return [(d,), (d,), (n_params,)]
    return [(d,), (d,), (n_params,), (m,), (m,), (n_centres, m)]


PHASE_KEY = "fedseg.phase"
"""Config key of a fit instruction naming its phase."""
ROUND_KEY = "fedseg.round"
"""Config key of a fit instruction carrying the server round."""
PLAN_KEY = "fedseg.plan"
"""Config key: the server's public run plan (:class:`common.site_policy.RunPlan`, JSON)."""
GROUPS_KEY = "fedseg.groups"
"""Config key: the centres form this many independent sets (parallel Lloyd runs)."""
NEXT_SETUP_RECORD = "fedseg.next_setup"
"""Config record of an unmask request: the next round's SecAgg+ set-up parameters."""
NEXT_KEYS_RECORD = "fedseg.next_keys"
"""Config record of an unmask reply: the site's two public keys for the next round."""


def parse_phase(value: object) -> Phase:
    """Parse the phase named in an instruction, refusing anything unknown."""
    try:
        return Phase(str(value))
    except ValueError as exc:
        raise ValueError(
            f"unknown phase {value!r}; expected one of {[p.value for p in Phase]}."
        ) from exc
