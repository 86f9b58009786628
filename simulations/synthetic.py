"""Deterministic synthetic retail customers for simulations and tests.

The generator draws a population of customers whose behaviour follows one of a
small number of ground-truth segments (see :data:`SEGMENTS`). Customers live in
regions of deliberately unequal size, and each region is dominated by one or two
segments, so that splitting the population by region gives realistic non-IID
federated sites.

Raw features are in physical units (days, orders per year, currency per year,
currency per order, years and fractions). After the per-feature transform of
:data:`FEATURE_INFO` (``log1p`` for the heavy-tailed features) and a z-score per
column, k-means with ``len(SEGMENTS)`` clusters recovers the ground truth with an
adjusted Rand index of about 0.97, while the segments still overlap a little.

Everything is driven by ``numpy.random.default_rng(seed)``; no global random
state is read or changed.
"""

from __future__ import annotations

import csv
import numbers
import os
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "FEATURES",
    "FEATURE_INFO",
    "REGION_NAMES",
    "SEGMENTS",
    "CustomerTable",
    "FeatureInfo",
    "SegmentProfile",
    "generate_customers",
    "region_mixing",
    "region_proportions",
]

FEATURES: tuple[str, ...] = (
    "recency_days",
    "frequency",
    "monetary",
    "avg_basket",
    "tenure_years",
    "online_share",
    "discount_share",
)
"""Names of the behavioural feature columns, in column order."""


@dataclass(frozen=True)
class FeatureInfo:
    """Public metadata of one behavioural feature.

    Parameters
    ----------
    name : str
        Column name, one of :data:`FEATURES`.
    unit : str
        Physical unit of the raw value.
    transform : {"log1p", "none"}
        Transform to apply before standardising the column.
    lower : float
        Smallest value the generator produces (raw units).
    upper : float
        Largest value the generator produces (raw units).
    high_label : str
        Short word describing a high value, e.g. ``"frequent"``.
    low_label : str
        Short word describing a low value, e.g. ``"occasional"``.
    """

    name: str
    unit: str
    transform: Literal["log1p", "none"]
    lower: float
    upper: float
    high_label: str
    low_label: str


FEATURE_INFO: dict[str, FeatureInfo] = {
    "recency_days": FeatureInfo(
        "recency_days", "days since last order", "log1p", 1.0, 730.0, "lapsing", "recent"
    ),
    "frequency": FeatureInfo(
        "frequency", "orders per year", "log1p", 0.25, 365.0, "frequent", "occasional"
    ),
    "monetary": FeatureInfo(
        "monetary", "currency per year", "log1p", 1.0, 1_000_000.0, "high-spend", "low-spend"
    ),
    "avg_basket": FeatureInfo(
        "avg_basket",
        "currency per order",
        "log1p",
        1.0,
        100_000.0,
        "big-basket",
        "small-basket",
    ),
    "tenure_years": FeatureInfo("tenure_years", "years", "none", 0.0, 20.0, "long-standing", "new"),
    "online_share": FeatureInfo(
        "online_share", "fraction of orders", "none", 0.0, 1.0, "online", "in-store"
    ),
    "discount_share": FeatureInfo(
        "discount_share",
        "fraction of orders",
        "none",
        0.0,
        1.0,
        "bargain-hunting",
        "full-price",
    ),
}
"""Metadata of every feature in :data:`FEATURES`, keyed by feature name."""


@dataclass(frozen=True)
class SegmentProfile:
    """Distribution parameters of one ground-truth customer segment.

    Parameters
    ----------
    name : str
        Short segment name, e.g. ``"champions"``.
    description : str
        One-line human description.
    recency_median : float
        Median days since the last order (lognormal).
    recency_sigma : float
        Standard deviation of ``log(recency_days)``.
    frequency_median : float
        Median orders per year (lognormal).
    frequency_sigma : float
        Standard deviation of ``log(frequency)``.
    monetary_median : float
        Median spend per year (lognormal, heavy-tailed).
    monetary_sigma : float
        Standard deviation of ``log(monetary)``.
    tenure_mean : float
        Mean customer tenure in years (normal, clipped to the bounds).
    tenure_sd : float
        Standard deviation of the tenure in years.
    online_mean : float
        Mean share of orders placed online (beta).
    online_concentration : float
        Beta concentration ``a + b`` of the online share; larger is tighter.
    discount_mean : float
        Mean share of orders using a discount (beta).
    discount_concentration : float
        Beta concentration ``a + b`` of the discount share.
    """

    name: str
    description: str
    recency_median: float
    recency_sigma: float
    frequency_median: float
    frequency_sigma: float
    monetary_median: float
    monetary_sigma: float
    tenure_mean: float
    tenure_sd: float
    online_mean: float
    online_concentration: float
    discount_mean: float
    discount_concentration: float


SEGMENTS: tuple[SegmentProfile, ...] = (
    SegmentProfile(
        name="champions",
        description="recent, frequent, high-spend customers",
        recency_median=6.0,
        recency_sigma=0.62,
        frequency_median=45.0,
        frequency_sigma=0.38,
        monetary_median=5000.0,
        monetary_sigma=0.44,
        tenure_mean=7.0,
        tenure_sd=3.1,
        online_mean=0.5,
        online_concentration=7.7,
        discount_mean=0.1,
        discount_concentration=12.8,
    ),
    SegmentProfile(
        name="loyal regulars",
        description="long-standing, steady in-store shoppers",
        recency_median=15.0,
        recency_sigma=0.62,
        frequency_median=18.0,
        frequency_sigma=0.38,
        monetary_median=1100.0,
        monetary_sigma=0.44,
        tenure_mean=13.0,
        tenure_sd=3.1,
        online_mean=0.15,
        online_concentration=9.6,
        discount_mean=0.2,
        discount_concentration=12.8,
    ),
    SegmentProfile(
        name="bargain hunters",
        description="frequent small baskets, mostly on discount",
        recency_median=12.0,
        recency_sigma=0.62,
        frequency_median=20.0,
        frequency_sigma=0.38,
        monetary_median=500.0,
        monetary_sigma=0.44,
        tenure_mean=5.0,
        tenure_sd=3.1,
        online_mean=0.45,
        online_concentration=7.7,
        discount_mean=0.75,
        discount_concentration=9.6,
    ),
    SegmentProfile(
        name="online newcomers",
        description="new customers buying almost only online",
        recency_median=14.0,
        recency_sigma=0.62,
        frequency_median=7.0,
        frequency_sigma=0.38,
        monetary_median=350.0,
        monetary_sigma=0.44,
        tenure_mean=0.8,
        tenure_sd=0.75,
        online_mean=0.9,
        online_concentration=12.8,
        discount_mean=0.3,
        discount_concentration=9.6,
    ),
    SegmentProfile(
        name="at risk",
        description="lapsing customers who used to buy occasionally",
        recency_median=300.0,
        recency_sigma=0.5,
        frequency_median=2.0,
        frequency_sigma=0.44,
        monetary_median=150.0,
        monetary_sigma=0.5,
        tenure_mean=6.0,
        tenure_sd=3.1,
        online_mean=0.3,
        online_concentration=6.4,
        discount_mean=0.3,
        discount_concentration=6.4,
    ),
    SegmentProfile(
        name="big-basket occasionals",
        description="rare visits with large, full-price baskets",
        recency_median=70.0,
        recency_sigma=0.62,
        frequency_median=4.0,
        frequency_sigma=0.38,
        monetary_median=1800.0,
        monetary_sigma=0.44,
        tenure_mean=6.0,
        tenure_sd=3.1,
        online_mean=0.25,
        online_concentration=7.7,
        discount_mean=0.08,
        discount_concentration=12.8,
    ),
)
"""Ground-truth segments; a customer's ``segment`` indexes this tuple."""

REGION_NAMES: tuple[str, ...] = (
    "north",
    "south",
    "east",
    "west",
    "central",
    "northeast",
    "northwest",
    "southeast",
    "southwest",
    "islands",
)
"""Region names; a table with ``k`` regions uses the first ``k``."""

MIN_REGIONS: Final = 2
MAX_REGIONS: Final = len(REGION_NAMES)
MIN_CUSTOMERS_PER_REGION: Final = 10

_SIZE_RATIO: Final = 6.0  # largest region / smallest region
_PRIMARY_SHARE: Final = 0.55
_SECONDARY_SHARE: Final = 0.25
_BASKET_NOISE_SIGMA: Final = 0.15  # log-scale noise of avg_basket around monetary/frequency

_FIRST_NAMES: Final = (
    "Anna", "Ben", "Clara", "David", "Elena", "Felix", "Grace", "Hugo", "Iris", "Jonas",
    "Kira", "Liam", "Maya", "Noah", "Olga", "Paul", "Quinn", "Rosa", "Sam", "Tara",
    "Umar", "Vera", "Will", "Xenia", "Yusuf", "Zoe", "Aisha", "Marco", "Priya", "Chen",
)  # fmt: skip
_LAST_NAMES: Final = (
    "Smith", "Garcia", "Müller", "Rossi", "Dubois", "Novak", "Kowalski", "Jensen", "Silva",
    "Khan", "Nguyen", "Kim", "Tanaka", "Okafor", "Haddad", "Larsen", "Costa", "Weber",
    "Ivanova", "Murphy", "Schmidt", "Moreau", "Horvat", "Andersson", "Patel", "Lopez",
    "Fischer", "Romano", "Bakker", "Cohen",
)  # fmt: skip
_ASCII_FOLD: Final = str.maketrans({"ü": "ue", "ö": "oe", "ä": "ae", "é": "e"})


@dataclass(frozen=True)
class CustomerTable:
    """A population of synthetic customers, one row per customer.

    Parameters
    ----------
    customer_id : ndarray of str, shape (n,)
        Unique customer identifiers such as ``"C0000001"``.
    name : ndarray of str, shape (n,)
        Fake full names.
    email : ndarray of str, shape (n,)
        Unique fake e-mail addresses derived from the name and the identifier.
    region : ndarray of str, shape (n,)
        Region of each customer, one of :data:`REGION_NAMES`.
    consent : ndarray of bool, shape (n,)
        Whether the customer agreed to analytics use of their data.
    segment : ndarray of int, shape (n,)
        Ground-truth segment, an index into :data:`SEGMENTS`.
    features : ndarray of float64, shape (n, len(FEATURES))
        Raw behavioural features in the units of :data:`FEATURE_INFO`.
    """

    customer_id: NDArray[np.str_]
    name: NDArray[np.str_]
    email: NDArray[np.str_]
    region: NDArray[np.str_]
    consent: NDArray[np.bool_]
    segment: NDArray[np.int64]
    features: NDArray[np.float64]

    def __len__(self) -> int:
        """Return the number of customers."""
        return int(self.customer_id.shape[0])

    def subset(self, idx: NDArray[np.integer] | NDArray[np.bool_]) -> CustomerTable:
        """Return the customers selected by ``idx``.

        Parameters
        ----------
        idx : ndarray of int or bool
            Row positions, or a boolean mask of length ``len(self)``.

        Returns
        -------
        CustomerTable
            A new table holding copies of the selected rows, in ``idx`` order.
        """
        sel = np.asarray(idx)
        return CustomerTable(
            customer_id=self.customer_id[sel],
            name=self.name[sel],
            email=self.email[sel],
            region=self.region[sel],
            consent=self.consent[sel],
            segment=self.segment[sel],
            features=self.features[sel],
        )

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write the table as UTF-8 CSV.

        Parameters
        ----------
        path : str or path-like
            Destination file; it is overwritten.

        Notes
        -----
        The header is ``customer_id,name,email,region,consent,segment`` followed
        by :data:`FEATURES`. ``consent`` is written as ``true``/``false`` and the
        features with ``repr`` precision, so reading the file back gives the
        same float64 values.
        """
        header = ["customer_id", "name", "email", "region", "consent", "segment", *FEATURES]
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            rows = zip(
                self.customer_id.tolist(),
                self.name.tolist(),
                self.email.tolist(),
                self.region.tolist(),
                self.consent.tolist(),
                self.segment.tolist(),
                self.features.tolist(),
                strict=True,
            )
            for cid, name, email, region, consent, segment, feats in rows:
                writer.writerow(
                    [
                        cid,
                        name,
                        email,
                        region,
                        "true" if consent else "false",
                        segment,
                        *(repr(v) for v in feats),
                    ]
                )


def _check_num_regions(num_regions: int) -> None:
    if isinstance(num_regions, bool) or not isinstance(num_regions, numbers.Integral):
        raise ValueError(
            f"num_regions={num_regions!r} should be an integer between {MIN_REGIONS} "
            f"and {MAX_REGIONS}."
        )
    if not MIN_REGIONS <= num_regions <= MAX_REGIONS:
        raise ValueError(
            f"num_regions={num_regions} should be between {MIN_REGIONS} and {MAX_REGIONS}."
        )


def region_proportions(num_regions: int) -> NDArray[np.float64]:
    """Return the expected share of customers in each region.

    Shares decrease geometrically so that the largest region is six times the
    smallest one, whatever the number of regions.

    Parameters
    ----------
    num_regions : int
        Number of regions, from 2 to ``len(REGION_NAMES)``.

    Returns
    -------
    ndarray of float64, shape (num_regions,)
        Positive shares summing to 1, largest first.

    Raises
    ------
    ValueError
        If ``num_regions`` is out of range.
    """
    _check_num_regions(num_regions)
    ratio = _SIZE_RATIO ** (-1.0 / (num_regions - 1))
    weights = ratio ** np.arange(num_regions, dtype=np.float64)
    return np.asarray(weights / weights.sum(), dtype=np.float64)


def region_mixing(num_regions: int) -> NDArray[np.float64]:
    """Return the segment mix of each region.

    Region ``r`` is dominated by segment ``r % S`` (55 %) and segment
    ``(r + S // 2) % S`` (25 %), where ``S = len(SEGMENTS)``; the remaining 20 %
    is spread evenly over the other segments, so every segment exists in every
    region but neighbouring regions look very different.

    Parameters
    ----------
    num_regions : int
        Number of regions, from 2 to ``len(REGION_NAMES)``.

    Returns
    -------
    ndarray of float64, shape (num_regions, len(SEGMENTS))
        Row ``r`` is the segment distribution of region ``r``.

    Raises
    ------
    ValueError
        If ``num_regions`` is out of range.
    """
    _check_num_regions(num_regions)
    n_seg = len(SEGMENTS)
    background = (1.0 - _PRIMARY_SHARE - _SECONDARY_SHARE) / (n_seg - 2)
    mix = np.full((num_regions, n_seg), background, dtype=np.float64)
    for r in range(num_regions):
        mix[r, r % n_seg] = _PRIMARY_SHARE
        mix[r, (r + n_seg // 2) % n_seg] = _SECONDARY_SHARE
    return mix


def _largest_remainder(total: int, shares: NDArray[np.float64]) -> NDArray[np.int64]:
    """Split ``total`` into integer counts proportional to ``shares``."""
    quotas = total * shares
    counts = np.floor(quotas).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:
        order = np.argsort(-(quotas - counts), kind="stable")
        counts[order[:short]] += 1
    return counts


def _segment_params(name: str) -> NDArray[np.float64]:
    return np.array([getattr(s, name) for s in SEGMENTS], dtype=np.float64)


def _beta(
    rng: np.random.Generator,
    mean: NDArray[np.float64],
    concentration: NDArray[np.float64],
) -> NDArray[np.float64]:
    return rng.beta(mean * concentration, (1.0 - mean) * concentration)


def _draw_features(rng: np.random.Generator, segment: NDArray[np.int64]) -> NDArray[np.float64]:
    """Draw raw features for customers of the given segments."""
    n = segment.shape[0]

    def lognormal(median: str, sigma: str) -> NDArray[np.float64]:
        mu = np.log(_segment_params(median))[segment]
        return np.exp(mu + _segment_params(sigma)[segment] * rng.standard_normal(n))

    recency = lognormal("recency_median", "recency_sigma")
    frequency = lognormal("frequency_median", "frequency_sigma")
    monetary = lognormal("monetary_median", "monetary_sigma")
    frequency = np.clip(frequency, FEATURE_INFO["frequency"].lower, FEATURE_INFO["frequency"].upper)
    basket = monetary / frequency * np.exp(_BASKET_NOISE_SIGMA * rng.standard_normal(n))
    tenure = _segment_params("tenure_mean")[segment] + _segment_params("tenure_sd")[
        segment
    ] * rng.standard_normal(n)
    online = _beta(
        rng,
        _segment_params("online_mean")[segment],
        _segment_params("online_concentration")[segment],
    )
    discount = _beta(
        rng,
        _segment_params("discount_mean")[segment],
        _segment_params("discount_concentration")[segment],
    )
    features = np.column_stack([recency, frequency, monetary, basket, tenure, online, discount])
    lower = np.array([FEATURE_INFO[f].lower for f in FEATURES])
    upper = np.array([FEATURE_INFO[f].upper for f in FEATURES])
    return np.asarray(np.clip(features, lower, upper), dtype=np.float64)


def _fake_names(
    rng: np.random.Generator, customer_id: NDArray[np.str_]
) -> tuple[NDArray[np.str_], NDArray[np.str_]]:
    """Draw full names and derive unique e-mail addresses from them."""
    n = customer_id.shape[0]
    first = np.asarray(_FIRST_NAMES)[rng.integers(0, len(_FIRST_NAMES), size=n)]
    last = np.asarray(_LAST_NAMES)[rng.integers(0, len(_LAST_NAMES), size=n)]
    names = [f"{f} {s}" for f, s in zip(first.tolist(), last.tolist(), strict=True)]
    emails = [
        f"{f.lower()}.{s.lower().translate(_ASCII_FOLD)}.{c[1:]}@example.com"
        for f, s, c in zip(first.tolist(), last.tolist(), customer_id.tolist(), strict=True)
    ]
    return np.asarray(names, dtype=np.str_), np.asarray(emails, dtype=np.str_)


def generate_customers(
    *, num_customers: int = 50_000, num_regions: int = 5, seed: int = 0
) -> CustomerTable:
    """Generate a deterministic synthetic customer population.

    Parameters
    ----------
    num_customers : int, default=50_000
        Number of customers; at least ``10 * num_regions``.
    num_regions : int, default=5
        Number of regions, from 2 to ``len(REGION_NAMES)``. Region sizes follow
        :func:`region_proportions` exactly (largest remainder rounding) and
        their segment mix follows :func:`region_mixing`.
    seed : int, default=0
        Seed of ``numpy.random.default_rng``; the same seed gives an identical
        table.

    Returns
    -------
    CustomerTable
        Customers in random order with identifiers ``C0000001``, ``C0000002``...

    Raises
    ------
    ValueError
        If ``num_regions`` is out of range or ``num_customers`` is too small.

    Examples
    --------
    >>> table = generate_customers(num_customers=100, num_regions=2, seed=1)
    >>> len(table), table.features.shape
    (100, (100, 7))
    """
    _check_num_regions(num_regions)
    minimum = MIN_CUSTOMERS_PER_REGION * num_regions
    if (
        isinstance(num_customers, bool)
        or not isinstance(num_customers, numbers.Integral)
        or num_customers < minimum
    ):
        raise ValueError(
            f"num_customers={num_customers!r} should be an integer >= {minimum} "
            f"({MIN_CUSTOMERS_PER_REGION} per region for num_regions={num_regions})."
        )
    rng = np.random.default_rng(seed)

    sizes = _largest_remainder(num_customers, region_proportions(num_regions))
    region_idx = np.repeat(np.arange(num_regions), sizes)
    mix = region_mixing(num_regions)
    # Inverse-CDF sampling of each customer's segment from its region's mix.
    cdf = np.cumsum(mix, axis=1)
    cdf[:, -1] = 1.0
    u = rng.random(num_customers)
    segment = (u[:, None] >= cdf[region_idx]).sum(axis=1).astype(np.int64)

    order = rng.permutation(num_customers)
    region_idx = region_idx[order]
    segment = segment[order]

    features = _draw_features(rng, segment)
    consent = rng.random(num_customers) >= 0.10

    width = max(7, len(str(num_customers)))
    customer_id = np.asarray(
        [f"C{i:0{width}d}" for i in range(1, num_customers + 1)], dtype=np.str_
    )
    name, email = _fake_names(rng, customer_id)
    region = np.asarray(REGION_NAMES[:num_regions], dtype=np.str_)[region_idx]

    return CustomerTable(
        customer_id=customer_id,
        name=name,
        email=email,
        region=region,
        consent=consent,
        segment=segment,
        features=features,
    )
