"""Customer-level differential privacy held by the sites: bounds, noise, accounting.

What a run releases under ``privacy=secagg_dp`` is, round by round, a sum over sites of
statistics to which **every site has added its share of discrete Gaussian noise** before the
SecAgg+ encoding. The server sees only the noisy sum; each site keeps its own accountant.

Neighbouring relation and contribution bounding
-----------------------------------------------
Customer-level, add/remove one customer anywhere in the federation. A customer is counted
once per round (one centre set per round: ``n_init = 1`` under DP) and every value it
contributes is bounded by public numbers:

* raw features are clipped to the declared bounds ``[lo_j, hi_j]`` (the data configuration's
  ``clip`` / the feature's declared range; DP is refused without them), so the transformed
  value lies in ``[a_j, b_j] = [T(lo_j), T(hi_j)]`` (``T`` is monotone: ``log1p`` or identity);
* in the cluster rounds a customer's offset ``u = x - c`` from its (public) centre ``c`` is
  clipped to the L2 norm ``C`` (``privacy.clip``, standardised units).

Every statistic is formed on a fixed-point grid (``GAMMA = 2**grid_bits`` per unit, at least
the SecAgg+ resolution ``2**24``, finer when needed to hide limb carries): each
customer's contribution is rounded to integers *before* the site sums them, so the sum is exact
and the difference one customer makes is its own rounded contribution. Rounding adds at most
``1/2`` per coordinate, hence the ``+ sqrt(m)/2`` terms below. L2 sensitivities in grid units
(``m`` = coordinates one customer touches in the array):

* moments round, per customer ``[1, z, z**2 - 1/2]`` with ``z = (x - mid) / h`` in
  ``[-1, 1]``, ``mid = (a + b)/2``, ``h = (b - a)/2`` (normalised per feature and centred):
  count ``GAMMA``; sums ``GAMMA * sqrt(d) + sqrt(d)/2``; squares ``GAMMA * sqrt(d) / 2 +
  sqrt(d)/2``;
* init / Lloyd / profile rounds, per customer on its nearest centre's row ``[clip_C(x - c), 1]``:
  sums ``GAMMA * C + sqrt(d)/2``; counts ``GAMMA``.

(Costs, sums of squares per cluster and raw-unit sums are *not* released under DP: their
sensitivities are large and nothing published needs them.)

Mechanism: distributed discrete Gaussian
----------------------------------------
A round's arrays ``A_1..A_m`` with sensitivities ``D_i`` and budget shares ``f_i`` (summing to
1) get total noise ``N_Z(0, S_i**2)`` with ``S_i = D_i * sigma / sqrt(f_i)``. Whitening array
``i`` by ``S_i`` gives sensitivity ``sqrt(sum f_i) / sigma = 1 / sigma``: the round is a Gaussian
mechanism with noise multiplier ``sigma`` (the discrete Gaussian satisfies the same
``1/(2 sigma**2)``-zCDP and RDP curve as the continuous one for integer-valued queries,
Canonne, Kamath & Steinke, NeurIPS 2020), accounted as ``GaussianDpEvent(sigma)``.

Each site adds ``N_Z(0, S_i**2 / h)``, where ``h`` is the number of sites whose noise it relies
on: the planned sites minus those that may drop out (SecAgg+ tolerance) minus those assumed to
collude with the server (``site.collusion_fraction``). Whatever ``h`` of them remain, the sum
carries at least the calibrated variance. A sum of independent discrete Gaussians is not
exactly a discrete Gaussian; its distance is ``tau = 10 * sum_{k<h} exp(-2 pi**2 s**2 k /
(k+1))`` (Kairouz, Liu & Steinke, ICML 2021, Thm. 1) with the per-site scale ``s`` in grid
units -- here ``s > 10**6``, so ``tau`` underflows to exactly 0 and adds nothing to epsilon.

Why discrete, not continuous Gaussian before encoding: the secure sum is exact on an integer
grid, and a float noise sample rounded to that grid is neither a Gaussian mechanism (the
release is the sum of the rounded values, not a post-processing of the noisy sum) nor safe
from floating-point attacks on the sampler (Mironov, CCS 2012). Discrete Gaussian noise on the
grid keeps the analysis exact. Skellam (Agarwal et al., NeurIPS 2021) is closed under sums but
has no ``dp_accounting`` event and a looser RDP bound at these scales; at ``s > 10**6`` the
discrete Gaussian's sum is indistinguishable from the ideal one, so it is the better choice.

Sampler: Canonne-Kamath-Steinke's rejection sampler from a discrete Laplace, vectorised (as in
TensorFlow Privacy's distributed discrete Gaussian) with float64 arithmetic on uniforms drawn
from ChaCha20 keyed by 32 bytes from the operating system (``os.urandom``). Only tests pass a
seed. Precision: the discrete Laplace proposals use CKS Algorithm 2 (exact integer uniforms,
Bernoulli trials with probabilities in ``[e**-1, 1]``), so every atom is exact to ~``2**-50``
relative near the centre and ~``3e-11`` at six stds (where only the Gaussian acceptance's
53-bit comparison limits it). This residual is not inside the accounted (epsilon, delta); an
all-integer Bernoulli(exp) would remove it at ~100x the cost.

Accounting
----------
Google's ``dp_accounting`` privacy-loss-distribution accountant composes the Gaussian events;
nothing is composed by hand. The server calibrates the noise multipliers of the planned rounds
so that the composition meets the user's ``(epsilon, delta)``; each site recomputes the
composition over everything it has ever answered (its ledger, kept on disk) plus the request,
and refuses when it would exceed its own budget.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from numpy.typing import NDArray

from common.errors import ConfigError
from common.features import FeatureSpec, apply_transforms
from common.protocol import Phase
from common.secure_sum import FRACTION_BITS, quantization_range_for

MECHANISM_ID = "distributed-discrete-gaussian/1"
"""Identifier of the noise mechanism and statistic layout a DP plan announces."""

GAMMA = 1 << FRACTION_BITS
"""Grid units per unit of an exact statistic (the SecAgg+ fixed-point resolution)."""

MAX_GRID_BITS = 40
"""Finest DP grid (``2**40`` per unit): int64 sums of 50,000+ customers stay far from overflow."""

CARRY_FACTOR = 1.2
"""Each site's noise std must be at least this many lowest-limb widths ``2**L`` (grid units).

SecAgg+ reveals every limb's sum, so the carries out of the lowest limb -- a function of each
site's own residue modulo ``2**L`` -- are visible. A discrete Gaussian of std ``s`` reduced modulo
``2**L`` is within total variation ``exp(-2 pi**2 (s / 2**L)**2)`` of uniform; at ``s >= 1.2 *
2**L`` that is below ``5e-13`` (about ``2**-41``) per entry, so the carries are independent of
the data up to that distance (the higher boundaries carry nothing: the public offset). The DP
grid (:attr:`DpPlan.grid_bits`) is chosen fine enough for this, and every site checks it."""

DP_PHASES = (Phase.MOMENTS, Phase.INIT, Phase.LLOYD, Phase.PROFILE)

DEFAULT_SPLIT = {"moments": 0.05, "init": 0.2, "lloyd": 0.25, "profile": 0.5}
"""Default share of the run's budget (zCDP) per phase, spread evenly over its rounds."""


# --------------------------------------------------------------------------- accounting


PLD_DISCRETIZATION = 1e-3
"""``value_discretization_interval`` of the PLD accountant: pessimistic, so coarser only
over-states epsilon (by < 1e-5 relative here) and is 10x faster than the default 1e-4."""


def _event(multipliers: Iterable[float]) -> Any:
    from dp_accounting import dp_event

    counts = Counter(float(m) for m in multipliers)
    return dp_event.ComposedDpEvent([
        dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(m), n)
        for m, n in sorted(counts.items())
    ])


def epsilon_spent(multipliers: Sequence[float], delta: float) -> float:
    """Epsilon of the composition of Gaussian rounds with these noise multipliers, at ``delta``.

    Computed by ``dp_accounting``'s PLD accountant (pessimistic estimate,
    :data:`PLD_DISCRETIZATION`).

    Parameters
    ----------
    multipliers : sequence of float
        One noise multiplier (noise std / L2 sensitivity) per released round.
    delta : float
    """
    if not multipliers:
        return 0.0
    if any(not m > 0 or not math.isfinite(m) for m in multipliers):
        raise ValueError(f"noise multipliers should be positive and finite: {multipliers}.")
    from dp_accounting.pld import pld_privacy_accountant

    accountant = pld_privacy_accountant.PLDAccountant(
        value_discretization_interval=PLD_DISCRETIZATION)
    accountant.compose(_event(multipliers))
    return float(accountant.get_epsilon(delta))


def calibrate(
    epsilon: float, delta: float, rounds: Mapping[str, int], split: Mapping[str, float]
) -> dict[str, float]:
    """Noise multiplier of one round of each phase so that the whole plan spends ``epsilon``.

    Phase ``p`` gets the share ``split[p]`` of the run's privacy loss (zCDP), spread evenly over
    its ``rounds[p]`` rounds: ``sigma_p = c * sqrt(rounds[p] / split[p])``. The common scale
    ``c`` is the smallest (to 0.1 %) whose composition, by :func:`epsilon_spent`, is at most
    ``epsilon``.

    Returns
    -------
    dict
        Phase name -> noise multiplier of each of its rounds (phases with no round omitted).
    """
    if not (epsilon > 0 and math.isfinite(epsilon)) or not 0 < delta < 1:
        raise ConfigError(f"privacy.epsilon={epsilon} should be > 0 and privacy.delta={delta} "
                          "in (0, 1).")
    active = {p: n for p, n in rounds.items() if n > 0}
    if any(split.get(p, 0.0) <= 0 for p in active):
        raise ConfigError(f"privacy.split={dict(split)} gives no budget to a phase with rounds "
                          f"{active}.")
    total = sum(split[p] for p in active)
    ratio = {p: math.sqrt(n / (split[p] / total)) for p, n in active.items()}

    def eps(scale: float) -> float:
        mults = [scale * ratio[p] for p, n in active.items() for _ in range(n)]
        return epsilon_spent(mults, delta)

    low, high = 1e-3, 1.0
    while eps(high) > epsilon:
        low, high = high, high * 4
        if high > 1e7:
            raise ConfigError(f"cannot calibrate noise for epsilon={epsilon}, delta={delta}.")
    while high / low > 1.001:
        mid = math.sqrt(low * high)
        if eps(mid) > epsilon:
            low = mid
        else:
            high = mid
    return {p: high * ratio[p] for p in active}


# --------------------------------------------------------------------------- the public plan


@dataclass(frozen=True)
class DpPlan:
    """The DP part of a run plan: public, announced with every instruction, checked by sites.

    Attributes
    ----------
    epsilon, delta : float
        The run's target; the composition of the planned rounds spends at most this.
    sigma : dict
        Phase name -> noise multiplier of each of its rounds.
    rounds : dict
        Phase name -> planned rounds (moments 1, init, lloyd, profile 1).
    bounds : tuple of (float, float)
        Raw clip bounds per feature (order of the plan's features).
    clip : float
        L2 bound on a customer's offset from its centre, standardised units.
    count_share : float
        Fraction of a cluster round's budget spent on its counts (the rest on its sums).
    moments_shares : tuple of float
        Fractions of the moments round's budget on (count, sums, squares).
    mechanism : str
    grid_bits : int
        The statistics are integers in units of ``2**-grid_bits`` (see :data:`CARRY_FACTOR`).
    """

    epsilon: float
    delta: float
    sigma: dict[str, float]
    rounds: dict[str, int]
    bounds: tuple[tuple[float, float], ...]
    clip: float
    count_share: float = 0.1
    moments_shares: tuple[float, float, float] = (0.2, 0.4, 0.4)
    mechanism: str = MECHANISM_ID
    grid_bits: int = FRACTION_BITS

    def __post_init__(self) -> None:
        if not FRACTION_BITS <= self.grid_bits <= MAX_GRID_BITS:
            raise ValueError(f"grid_bits={self.grid_bits} should be in [{FRACTION_BITS}, "
                             f"{MAX_GRID_BITS}].")
        if not 0 < self.clip <= 1e3 or not 0 < self.count_share < 1:
            raise ValueError(f"clip={self.clip} should be in (0, 1000] and count_share="
                             f"{self.count_share} in (0, 1).")
        if any(not s > 0 for s in self.moments_shares) or \
                abs(sum(self.moments_shares) - 1) > 1e-9:
            raise ValueError(f"moments_shares={self.moments_shares} should be > 0, sum 1.")
        for lo, hi in self.bounds:
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"bounds [{lo}, {hi}] should be finite with low < high.")
        if any(not (s > 0 and math.isfinite(s)) for s in self.sigma.values()):
            raise ValueError(f"noise multipliers {self.sigma} should be positive.")

    def multipliers(self) -> list[float]:
        """Noise multiplier of every planned round, in order."""
        return [self.sigma[p.value] for p in DP_PHASES for _ in range(self.rounds.get(p.value, 0))]

    def planned_epsilon(self) -> float:
        """Epsilon of the whole plan at ``delta`` (dp_accounting)."""
        return epsilon_spent(self.multipliers(), self.delta)

    def to_json(self) -> str:
        """Canonical JSON."""
        doc = asdict(self)
        doc["bounds"] = [list(b) for b in self.bounds]
        doc["moments_shares"] = list(self.moments_shares)
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DpPlan:
        """Parse :meth:`to_json` output (``ValueError`` on anything malformed)."""
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("a DP plan is a JSON object")
        raw["bounds"] = tuple((float(a), float(b)) for a, b in raw["bounds"])
        raw["moments_shares"] = tuple(float(v) for v in raw["moments_shares"])
        raw["sigma"] = {str(k): float(v) for k, v in dict(raw["sigma"]).items()}
        raw["rounds"] = {str(k): int(v) for k, v in dict(raw["rounds"]).items()}
        if not isinstance(raw.get("grid_bits"), int):
            raise ValueError("grid_bits should be an integer")
        return cls(**raw)

    @property
    def gamma(self) -> int:
        """Grid units per unit of a statistic."""
        return 1 << self.grid_bits

    def with_grid_for(self, features: tuple[FeatureSpec, ...], limb_bits: int,
                      num_sites: int) -> DpPlan:
        """Return this plan on the coarsest grid where every site's noise hides its carries.

        The smallest per-site noise std of any released entry (value units, assuming all
        ``num_sites`` are relied on -- the least noise a site can add) must reach
        ``CARRY_FACTOR * 2**limb_bits`` grid units.
        """
        from dataclasses import replace

        smallest = min(min(round_noise_std(p, self, features)) for p in DP_PHASES
                       if self.rounds.get(p.value, 0)) / math.sqrt(num_sites)
        bits = max(FRACTION_BITS,
                   math.ceil(math.log2(CARRY_FACTOR * 2.0**limb_bits / smallest)))
        if bits > MAX_GRID_BITS:
            raise ValueError(f"epsilon={self.epsilon} leaves so little noise that no grid up to "
                             f"2**-{MAX_GRID_BITS} hides the SecAgg+ carries; use a smaller "
                             "epsilon (or privacy=secagg, without DP).")
        return replace(self, grid_bits=bits)


def dp_rounds(init_rounds: int, lloyd_rounds: int) -> dict[str, int]:
    """Return the planned rounds per phase of a DP run."""
    if init_rounds < 1 or lloyd_rounds < 1:
        raise ValueError(f"privacy.init_rounds={init_rounds} and privacy.lloyd_rounds="
                         f"{lloyd_rounds} should both be >= 1.")
    return {"moments": 1, "init": init_rounds, "lloyd": lloyd_rounds, "profile": 1}


@dataclass(frozen=True)
class DpSettings:
    """The DP target and schedule of a run (``privacy=secagg_dp``), before calibration.

    Attributes
    ----------
    epsilon, delta : float
        The run's target; the server calibrates the noise of the planned rounds to it with
        ``dp_accounting`` and refuses a plan that would spend more.
    init_candidates, init_rounds, lloyd_rounds : int
        The fixed DP schedule (each round costs budget; see server/dp_coordinator.py).
    clip : float
        L2 bound on a customer's offset from its centre (standardised units).
    count_share : float
        Share of a cluster round's budget spent on its counts.
    split : dict
        Share of the run's budget per phase (moments, init, lloyd, profile).
    """

    epsilon: float = 1.0
    delta: float = 1e-6
    init_candidates: int = 40
    init_rounds: int = 2
    lloyd_rounds: int = 3
    clip: float = 2.5
    count_share: float = 0.1
    split: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SPLIT))

    def dp_plan(self, features: tuple[FeatureSpec, ...],
                bounds: dict[str, tuple[float, float]], *, num_sites: int) -> DpPlan:
        """Calibrate the run's noise and return the public DP plan; refuse an impossible one.

        The plan's grid is the coarsest on which every site's noise share hides the carries of
        the SecAgg+ encoding's lowest limb for ``num_sites`` sites (``common.dp.CARRY_FACTOR``).
        """
        missing = [f.name for f in features if f.name not in bounds]
        if missing:
            raise ConfigError(
                "differential privacy needs declared bounds for every feature (a customer's "
                f"influence is bounded by them); none for {missing}. Declare them in the data "
                "configuration, e.g. " + " ".join(f"+data.clip.{m}=[low,high]" for m in missing)
                + " (values from domain knowledge, not read off the data), or run "
                "privacy=secagg (exact sums, no DP).")
        if self.init_candidates < 1:
            raise ConfigError(f"privacy.init_candidates={self.init_candidates} should be >= 1.")
        if set(self.split) != set(DEFAULT_SPLIT):
            raise ConfigError(f"privacy.split={dict(self.split)} should name exactly "
                              f"{sorted(DEFAULT_SPLIT)}.")
        try:
            rounds = dp_rounds(self.init_rounds, self.lloyd_rounds)
            sigma = calibrate(self.epsilon, self.delta, rounds, self.split)
            plan = DpPlan(epsilon=self.epsilon, delta=self.delta, sigma=sigma, rounds=rounds,
                          bounds=tuple(bounds[f.name] for f in features), clip=self.clip,
                          count_share=self.count_share)
            limb_bits = quantization_range_for(max(num_sites, 2)).bit_length() - 1
            plan = plan.with_grid_for(features, limb_bits, num_sites)
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"privacy: {exc}") from exc
        planned = plan.planned_epsilon()
        if planned > self.epsilon * (1 + 1e-9):
            raise ConfigError(f"the planned rounds would spend epsilon={planned:.4f} > "
                              f"privacy.epsilon={self.epsilon}; nothing was started.")
        return plan


# --------------------------------------------------------------------------- noise


class NoiseSource:
    """Uniforms and discrete Gaussian samples from ChaCha20 (cryptographically seeded).

    Parameters
    ----------
    seed : bytes or None
        ``None`` (every real site): a fresh 32-byte key from ``os.urandom``. Tests pass bytes
        to reproduce a run; no configuration key reaches this parameter.
    """

    def __init__(self, seed: bytes | None = None) -> None:
        if seed is None:
            key = os.urandom(32)
        else:
            import hashlib

            key = hashlib.sha256(b"fedseg-dp-noise/1" + seed).digest()
        self._stream = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor()

    def uniform(self, n: int) -> NDArray[np.float64]:
        """``n`` uniforms in (0, 1) with 53 random bits each."""
        raw = np.frombuffer(self._stream.update(b"\0" * (8 * n)), dtype="<u8")
        return ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53

    def uniform_below(self, t: int, n: int) -> NDArray[np.int64]:
        """``n`` integers uniform on ``{0, ..., t - 1}``, exactly (rejection from 64 bits)."""
        if not 1 <= t < 2**62:
            raise ValueError(f"t={t} should be in [1, 2**62).")
        limit = (2**64 // t) * t  # accept r < limit: each residue equally often
        out = np.empty(0, dtype=np.int64)
        while out.size < n:
            batch = int(1.1 * (n - out.size)) + 8
            raw = np.frombuffer(self._stream.update(b"\0" * (8 * batch)), dtype="<u8")
            if limit < 2**64:
                raw = raw[raw < np.uint64(limit)]
            out = np.concatenate([out, (raw % np.uint64(t)).astype(np.int64)])
        return out[:n]

    def discrete_laplace(self, t: int, n: int) -> NDArray[np.int64]:
        """``n`` samples with ``P(y) ~ exp(-|y| / t)`` on the integers (integer scale ``t``).

        Canonne, Kamath & Steinke (2020), Algorithm 2, vectorised: ``U`` uniform on
        ``{0..t-1}`` kept with probability ``exp(-U/t)``, ``V`` geometric with ratio ``e**-1``,
        ``X = U + t V``, a random sign, ``-0`` rejected. Every probability it evaluates is in
        ``[e**-1, 1]`` or ``1/2`` and compared with a 53-bit uniform, so each atom is exact to
        about ``2**-50`` relative (sampling ``floor(-t ln U)`` directly would be off by
        ``~ t 2**-53 e**(|y|/t)``, a lot at ``t ~ 2**30``).
        """
        out = np.empty(0, dtype=np.int64)
        while out.size < n:
            batch = int(1.8 * (n - out.size)) + 16
            u = self.uniform_below(t, batch)
            u = u[self.uniform(batch) < np.exp(-u / t)]
            # V: P(V >= v) = e**-v; atoms exact to ~2**-53 e**v relative, and P(V > 36) < 3e-16.
            v = np.floor(-np.log(self.uniform(u.size))).astype(np.int64)
            x = u + t * v
            negative = self.uniform(u.size) < 0.5
            keep = ~(negative & (x == 0))
            out = np.concatenate([out, np.where(negative, -x, x)[keep]])
        return out[:n]

    def discrete_gaussian(self, sigma: float, shape: tuple[int, ...]) -> NDArray[np.int64]:
        """Draw ``N_Z(0, sigma**2)``: ``P(x) ~ exp(-x**2 / (2 sigma**2))`` on the integers.

        Canonne, Kamath & Steinke (2020), Algorithm 3: propose ``Y`` from the discrete Laplace
        of scale ``t = floor(sigma) + 1`` (:meth:`discrete_laplace`), accept with probability
        ``exp(-(|Y| - sigma**2/t)**2 / (2 sigma**2))`` (a 53-bit uniform against a float64 exp:
        exact to ~``2**-52 / p`` relative where the acceptance probability is ``p``, e.g.
        ``3e-11`` at six stds).
        """
        if not (sigma >= 1 and math.isfinite(sigma)) or sigma > 2.0**50:
            raise ValueError(f"sigma={sigma} should be in [1, 2**50] grid units.")
        n = int(np.prod(shape, dtype=np.int64))
        t = math.floor(sigma) + 1
        out = np.empty(0, dtype=np.int64)
        while out.size < n:
            batch = max(16, int(1.6 * (n - out.size)) + 16)
            y = self.discrete_laplace(t, batch)
            dist = np.abs(y).astype(np.float64) - sigma * sigma / t
            accept = self.uniform(batch) < np.exp(-(dist * dist) / (2 * sigma * sigma))
            out = np.concatenate([out, y[accept]])
        return out[:n].reshape(shape)


# --------------------------------------------------------------------------- site statistics


def honest_sites(num_sites: int, *, dropouts: int, collusion_fraction: float) -> int:
    """Sites whose noise shares a site relies on: planned minus droppable minus colluding.

    At least one colluder is assumed whenever ``collusion_fraction > 0`` (with 2 sites, the
    other one).
    """
    colluding = math.floor(collusion_fraction * num_sites)
    if collusion_fraction > 0:
        colluding = max(1, colluding)
    return max(1, num_sites - dropouts - colluding)


def transformed_bounds(
    bounds: Sequence[tuple[float, float]], features: tuple[FeatureSpec, ...]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Bounds in the transformed space (``T(lo)``, ``T(hi)``), per feature."""
    lo = np.array([[b[0] for b in bounds]], dtype=np.float64)
    hi = np.array([[b[1] for b in bounds]], dtype=np.float64)
    for j, spec in enumerate(features):
        if spec.transform == "log1p" and lo[0, j] <= -1:
            raise ValueError(f"feature {spec.name!r}: low bound {lo[0, j]} should be > -1 "
                             "for a log1p feature.")
    low, high = apply_transforms(lo, features)[0], apply_transforms(hi, features)[0]
    # A degenerate range would make the normalised moments divide by ~0 (inf * 0 = NaN).
    if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))
            and np.all(high - low > 1e-9 * (1.0 + np.abs(low) + np.abs(high)))):
        raise ValueError("declared bounds collapse to (almost) a point after the transform.")
    return low, high


@dataclass(frozen=True)
class RoundNoise:
    """What one site adds to one round: per-array sensitivities and noise std (grid units)."""

    sensitivities: tuple[float, ...]
    total_std: tuple[float, ...]
    site_std: tuple[float, ...]
    sigma: float
    extra: dict[str, float] = field(default_factory=dict)


def _noise(sens: Sequence[float], shares: Sequence[float], sigma: float, honest: int
           ) -> RoundNoise:
    total = tuple(d * sigma / math.sqrt(f) for d, f in zip(sens, shares, strict=True))
    return RoundNoise(sensitivities=tuple(sens), total_std=total,
                      site_std=tuple(s / math.sqrt(honest) for s in total), sigma=sigma)


def moments_words(
    transformed: NDArray[np.float64], low: NDArray[np.float64], high: NDArray[np.float64],
    *, gamma: int = GAMMA,
) -> tuple[list[NDArray[Any]], tuple[float, float, float]]:
    """Integer moments of clipped transformed records, normalised to the box; and sensitivities.

    Per customer ``[1, z, z**2 - 1/2]`` with ``z = (x - mid) / h`` in ``[-1, 1]`` per feature, so
    every feature's moments get noise in proportion to its own declared range (one noise scale
    over raw ranges would drown a [0, 1] share under a [0, 20] tenure). Returns ``[count (1,),
    sums (d,), squares (d,)]`` in grid units and their L2 sensitivities ``GAMMA``,
    ``GAMMA sqrt(d) + sqrt(d)/2`` and ``GAMMA sqrt(d)/2 + sqrt(d)/2``.
    """
    x = np.clip(np.asarray(transformed, dtype=np.float64), low, high)
    mid, half = (low + high) / 2, (high - low) / 2
    z = np.clip(np.nan_to_num((x - mid) / half, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
    d = x.shape[1]
    sz = exact_column_sums(np.rint(z * gamma).astype(np.int64))
    sq = exact_column_sums(np.rint((z * z - 0.5) * gamma).astype(np.int64))
    count = np.array([x.shape[0] * gamma], dtype=object)
    root = math.sqrt(d)
    sens = (float(gamma), gamma * root + root / 2, gamma * root / 2 + root / 2)
    return [count, sz, sq], sens


def cluster_words(
    scaled: NDArray[np.float64],
    centres: NDArray[np.float64],
    *,
    box: tuple[NDArray[np.float64], NDArray[np.float64]],
    clip: float,
    gamma: int = GAMMA,
) -> tuple[list[NDArray[Any]], tuple[float, float]]:
    """Per centre: sum of clipped offsets ``clip_C(x - c)`` and count, in grid units.

    Returns ``[sums (k, d), counts (k,)]`` and their L2 sensitivities.
    """
    from common.kmeans import assign

    x = np.clip(np.asarray(scaled, dtype=np.float64), box[0], box[1])
    labels, _ = assign(x, centres)
    # Non-finite offsets (only from degenerate public inputs, refused upstream) count as 0.
    u = np.nan_to_num(x - centres[labels], nan=0.0, posinf=0.0, neginf=0.0)
    norms = np.linalg.norm(u, axis=1)
    u *= np.minimum(1.0, clip / np.maximum(norms, 1e-300))[:, None]
    k, d = centres.shape
    words = np.rint(u * gamma).astype(np.int64)
    sums = exact_group_sums(words, labels, k)
    counts = np.bincount(labels, minlength=k).astype(object) * gamma
    return [sums, counts], (gamma * clip + math.sqrt(d) / 2, float(gamma))


def exact_group_sums(words: NDArray[np.int64], labels: NDArray[np.intp], k: int
                     ) -> NDArray[np.object_]:
    """Row sums per label as exact Python integers (no int64 overflow for any site size).

    Each word (|w| < 2**62) is split into 32-bit halves summed separately in int64: a half-sum
    over fewer than 2**31 rows cannot overflow.
    """
    low = words & np.int64(0xFFFFFFFF)
    high = words >> np.int64(32)
    sums_low = np.zeros((k, words.shape[1]), dtype=np.int64)
    sums_high = np.zeros((k, words.shape[1]), dtype=np.int64)
    np.add.at(sums_low, labels, low)
    np.add.at(sums_high, labels, high)
    return np.asarray(sums_high.astype(object) * (1 << 32) + sums_low.astype(object),
                      dtype=object)


def exact_column_sums(words: NDArray[np.int64]) -> NDArray[np.object_]:
    """Column sums as exact Python integers (see :func:`exact_group_sums`)."""
    labels = np.zeros(words.shape[0], dtype=np.intp)
    return exact_group_sums(words, labels, 1)[0]


def noisy_round(
    phase: Phase,
    plan: DpPlan,
    *,
    transformed: NDArray[np.float64],
    features: tuple[FeatureSpec, ...],
    instruction: Sequence[NDArray[np.float64]],
    honest: int,
    noise: NoiseSource,
    limb_bits: int | None = None,
    max_customers: int | None = None,
) -> tuple[list[NDArray[Any]], RoundNoise]:
    """Compute a site's DP reply for one round: integer statistics plus its noise share.

    Parameters
    ----------
    phase : Phase
    plan : DpPlan
        The announced (and admitted) DP plan.
    transformed : ndarray of shape (n, d)
        The site's records after their transforms (clipped here to the plan's bounds).
    features : tuple of FeatureSpec
    instruction : sequence of ndarray
        ``[]`` for moments, ``[mean, std, centres]`` afterwards.
    honest : int
        Sites whose noise this site relies on (:func:`honest_sites`).
    noise : NoiseSource
    limb_bits : int, optional
        Bits of the SecAgg+ encoding's limbs; when given, the site refuses a round whose noise
        share would not hide the lowest limb's carries (:data:`CARRY_FACTOR`), or whose largest
        possible value (from ``max_customers``, public) could carry into the second limb.
    max_customers : int, optional
        The site policy's public cap on its customers (used with ``limb_bits``).

    Returns
    -------
    words : list of int64 ndarray
        The noisy statistics in grid units (layout of
        :func:`common.protocol.reply_shapes` with ``dp=True``).
    RoundNoise
    """
    low, high = transformed_bounds(plan.bounds, features)
    sigma = plan.sigma[phase.value]
    gamma = plan.gamma
    from common.errors import SiteRefusal

    if phase is Phase.MOMENTS:
        words, sens = moments_words(transformed, low, high, gamma=gamma)
        info = _noise(sens, plan.moments_shares, sigma, honest)
    else:
        mean, std, centres = (np.asarray(a, dtype=np.float64) for a in instruction)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            box = ((low - mean) / std, (high - mean) / std)
        # Public inputs only: a scaling or centres that make the box or offsets non-finite or
        # huge would break the sensitivity bound (inf * 0 = NaN); refuse them.
        if not all(np.all(np.isfinite(a)) and float(np.max(np.abs(a))) <= 2.0**20
                   for a in (*box, centres)):
            raise SiteRefusal("protocol", "the scaling or the centres put the declared bounds "
                              "or a centre beyond 2**20 standardised units.")
        scaled = (np.clip(transformed, low, high) - mean) / std
        words, sens2 = cluster_words(scaled, centres, box=box, clip=plan.clip, gamma=gamma)
        info = _noise(sens2, (1 - plan.count_share, plan.count_share), sigma, honest)
        if phase is Phase.PROFILE:
            words = [words[1], words[0]]
            info = RoundNoise(sensitivities=info.sensitivities[::-1],
                              total_std=info.total_std[::-1], site_std=info.site_std[::-1],
                              sigma=sigma)
    if limb_bits is not None and min(info.site_std) < CARRY_FACTOR * 2.0**limb_bits:
        raise SiteRefusal("secagg", f"this site's noise share (std {min(info.site_std):.3g} "
                          f"grid units) would not hide the carries of a {limb_bits}-bit limb; "
                          f"the plan's grid 2**-{plan.grid_bits} is too coarse.")
    if limb_bits is not None and max_customers is not None:
        # The public offset keeps a value below 2**(2L-1) - 2**(L-1) from carrying into the
        # third limb; bound every entry from public numbers (never from this site's own n).
        largest = max_customers * (gamma * max(1.0, plan.clip) + 1) + 10 * max(info.site_std)
        if largest >= 2.0 ** (2 * limb_bits - 1) - 2.0 ** (limb_bits - 1):
            raise SiteRefusal("secagg", f"with up to {max_customers} customers "
                              f"(site.max_customers) on the plan's grid 2**-{plan.grid_bits}, "
                              f"a value could reach 2**{math.log2(largest):.1f} and carry past "
                              f"the second {limb_bits}-bit limb, revealing it.")
    noisy = [w + noise.discrete_gaussian(s, w.shape) for w, s in
             zip(words, info.site_std, strict=True)]
    return noisy, info


def round_noise_std(phase: Phase, plan: DpPlan, features: tuple[FeatureSpec, ...]
                    ) -> tuple[float, ...]:
    """Least total noise std of each released array (value units), as the server expects it.

    Layout of :func:`common.protocol.reply_shapes` with ``dp=True``.
    """
    d = len(features)
    sigma = plan.sigma[phase.value]
    gamma = plan.gamma
    if phase is Phase.MOMENTS:  # normalised units (see moments_words)
        root = math.sqrt(d)
        sens = (1.0, root + root / 2 / gamma, root / 2 + root / 2 / gamma)
        return tuple(s * sigma / math.sqrt(f) for s, f in zip(sens, plan.moments_shares,
                                                              strict=True))
    sums = (plan.clip + math.sqrt(d) / 2 / gamma) * sigma / math.sqrt(1 - plan.count_share)
    counts = sigma / math.sqrt(plan.count_share)
    return (counts, sums) if phase is Phase.PROFILE else (sums, counts)
