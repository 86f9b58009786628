"""Deterministic synthetic *mixed-type* retail customers: categories, flags and curved numbers.

Each customer belongs to one of :data:`MIXED_SEGMENTS` (of very unequal size: about 33 %
down to 6 %). A segment is defined jointly, never by one column:

* a **combination of categorical values** -- preferred channel, favourite category, payment
  method and delivery mode -- where each segment leans to *two* usual values per categorical
  (app or web; wallet or card...), every value is shared by several segments and only the
  combination is specific (two segments lean only slightly: see below);
* eight **behaviour flags** (organic, children's products, coupons, returns, reviews,
  weekends, late nights, premium): each segment has its own on/off pattern
  (:data:`_BEHAVIOUR_CODES`, rates 0.7 / 0.2), none alone separates the segments;
* a **curve in the numeric features**: a latent life-cycle position ``t`` in [0, 1] moves
  tenure, order frequency, basket size, spend, recency and discount use together and
  non-linearly (``sin(pi t)`` arcs), along a segment-specific path.

And, as in real customer tables, columns unrelated to the segments: a **long tail** of rare
categorical values (favourite brand: 15 of its 20 brands at 3 % each; a few customers love
books or pay by invoice), a rare gift-card flag and three common settings flags (SMS, paperless
receipts, app notifications).

Segments differ in how *heterogeneous* they are, as real ones do. The two largest
(:attr:`MixedSegment.breadth` 0.7) are occasional shoppers who buy a bit of anything through
any channel: their categorical values and behaviour flags are close to uniform (a slight lean
to their profile is left), and what sets them apart is *how* they shop -- few orders a year,
small baskets for one and big-ticket baskets for the other -- not *what*. The four smaller
segments are peaked: a categorical combination and a behaviour code each. All segments share
the numeric ranges of the life-cycle arcs (tenure, recency, discounts overlap throughout).

What this does to the two models is measured, not assumed (``python -m
simulations.bench.ae_kmeans``, docs/BENCHMARKS.md). k-means on one-hot + standardised columns
assumes equally spread, spherical segments and counts every z-scored one-hot column as one
unit of variance, a value of share ``p`` at ``1 / p`` in squared distance: with the broad
segments spread over all values, no categorical combination anchors a centre for them, and
k-means spends centres on customers who share one *rare* value instead (seed 0: three of six
clusters are the book lovers and two rare brands' fans, 500--800 customers each, drawn from
every segment) and splits the rest roughly by spend. A mixture that keeps a value
distribution per segment and weighs each original feature once (the autoencoder's Gumbel
codes, each with its own decoded distribution) can see a broad segment as one flat
distribution and place it by its numbers (a supervised classifier reaches ARI 0.97, so the
segments are separable). Neither the rare values nor the settings flags carry segment
information.

Customers live in regions of unequal size (largest 15 times the smallest), each dominated by
one segment (70 %) and a second (20 %), so a split by region gives strongly non-IID sites.
About 10 % decline analytics consent.

Everything is driven by ``numpy.random.default_rng(seed)``; no global random state is read or
changed.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from simulations.synthetic import REGION_NAMES, FeatureInfo, _fake_names, _largest_remainder

__all__ = [
    "BOOLEANS",
    "CATEGORICALS",
    "MIXED_SEGMENTS",
    "NUMERIC",
    "NUMERIC_LABELS",
    "MixedCustomerTable",
    "MixedSegment",
    "generate_mixed_customers",
    "mixed_region_mixing",
    "mixed_region_proportions",
]


NUMERIC: tuple[FeatureInfo, ...] = (
    FeatureInfo("recency_days", "days since last order", "log1p", 0.0, 730.0, "lapsing",
                "recent"),
    FeatureInfo("frequency", "orders per year", "log1p", 0.0, 365.0, "frequent", "occasional"),
    FeatureInfo("monetary", "currency per year", "log1p", 0.0, 200_000.0, "high-spend",
                "low-spend"),
    FeatureInfo("avg_basket", "currency per order", "log1p", 0.0, 20_000.0, "big-basket",
                "small-basket"),
    FeatureInfo("tenure_years", "years", "none", 0.0, 25.0, "long-standing", "new"),
    FeatureInfo("discount_share", "fraction of orders", "none", 0.0, 1.0, "bargain-hunting",
                "full-price"),
)
"""Numeric features, in column order (:class:`simulations.synthetic.FeatureInfo`)."""

NUMERIC_LABELS: Final[dict[str, str]] = {
    "recency_days": "Days since last order", "frequency": "Orders per year",
    "monetary": "Annual spend", "avg_basket": "Average basket", "tenure_years": "Customer for",
    "discount_share": "Share of orders discounted",
}
"""What a marketer calls each numeric feature."""

BOOLEANS: tuple[tuple[str, str], ...] = (
    ("newsletter", "Newsletter subscriber"),
    ("loyalty_card", "Loyalty card holder"),
    ("gift_card", "Bought a gift card this year"),
    ("sms_optin", "Accepts text messages"),
    ("paperless", "Paperless receipts"),
    ("app_push", "App notifications on"),
    ("bought_organic", "Bought organic products"),
    ("bought_kids", "Bought children's products"),
    ("used_coupon", "Used a coupon"),
    ("returned_item", "Returned an item"),
    ("wrote_review", "Wrote a review"),
    ("weekend_shopper", "Shops mostly at weekends"),
    ("late_night", "Orders late at night"),
    ("premium_member", "Premium membership"),
)
"""Boolean features (name, label), in column order after the numeric ones."""

CATEGORICALS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("channel", "Preferred channel", ("store", "web", "app")),
    ("favourite_category", "Favourite category",
     ("grocery", "fashion", "electronics", "home", "beauty", "sports", "toys", "garden",
      "books", "pets")),
    ("payment", "Payment method", ("card", "cash", "wallet", "voucher", "invoice")),
    ("delivery", "Delivery", ("in_store", "home", "locker", "click_collect", "pickup_point")),
    ("favourite_brand", "Favourite brand",
     ("house", "acme", "nordic", "verde", "lumen", "orbit", "kite", "maple", "zest", "pinecone",
      "quartz", "harbor", "sable", "tundra", "willow", "ember", "cobalt", "fable", "juniper",
      "ridge")),
)
"""Categorical features (name, label, vocabulary in declared order), after the booleans."""


@dataclass(frozen=True)
class MixedSegment:
    """One ground-truth segment: its categorical profile and its numeric curve.

    Attributes
    ----------
    name : str
    description : str
    categories : dict of str to dict of str to float
        Per categorical feature, the segment's usual values and their probabilities; the
        rest of the probability mass is spread evenly over the other values.
    curve : tuple of float
        Segment-specific path of the numeric features along the life cycle ``t``:
        ``(tenure_start, tenure_span, log_freq_base, log_freq_arc, log_basket_base,
        log_basket_slope, discount_base, discount_slope)``.
    newsletter, loyalty : float
        Base rates of the two flags.
    breadth : float
        How heterogeneous the segment's *tastes* are, from 0 (its customers follow
        ``categories`` and its behaviour code closely) to 1 (no preference at all): categorical
        probabilities are ``(1 - breadth) * profile + breadth * uniform`` over the common
        values, and behaviour-flag rates move towards 0.45 by the same share. Its numbers
        (``curve``) are not widened.
    """

    name: str
    description: str
    categories: dict[str, dict[str, float]]
    curve: tuple[float, float, float, float, float, float, float, float]
    newsletter: float
    loyalty: float
    breadth: float = 0.0


MIXED_SEGMENTS: tuple[MixedSegment, ...] = (
    MixedSegment(
        "occasional small-basket shoppers",
        "a few small orders a year, through any channel and of anything (a slight lean to app "
        "fashion and beauty)",
        {"channel": {"app": 0.65, "web": 0.3},
         "favourite_category": {"fashion": 0.55, "beauty": 0.4},
         "payment": {"wallet": 0.6, "card": 0.35},
         "delivery": {"locker": 0.6, "home": 0.35}},
        (0.0, 1.5, 0.6, 0.2, 3.4, 0.15, 0.35, -0.1), 0.6, 0.2, breadth=0.7),
    MixedSegment(
        "big-ticket occasional buyers",
        "a few large orders a year, through any channel and of anything (a slight lean to web "
        "electronics and sports gear)",
        {"channel": {"web": 0.65, "app": 0.3},
         "favourite_category": {"electronics": 0.55, "sports": 0.4},
         "payment": {"card": 0.6, "wallet": 0.35},
         "delivery": {"home": 0.6, "locker": 0.35}},
        (0.0, 1.5, 1.0, 0.2, 5.2, 0.15, 0.15, 0.05), 0.3, 0.1, breadth=0.7),
    MixedSegment(
        "store family grocers", "weekly store trips for groceries and home, paying cash",
        {"channel": {"store": 0.65, "web": 0.3},
         "favourite_category": {"grocery": 0.55, "home": 0.4},
         "payment": {"cash": 0.6, "card": 0.35},
         "delivery": {"in_store": 0.95}},
        (0.5, 1.5, 2.55, 0.2, 3.8, 0.15, 0.25, 0.1), 0.2, 0.7),
    MixedSegment(
        "click-and-collect planners", "web orders of groceries and home goods collected in store",
        {"channel": {"web": 0.65, "store": 0.3},
         "favourite_category": {"grocery": 0.55, "home": 0.4},
         "payment": {"card": 0.6, "cash": 0.35},
         "delivery": {"click_collect": 0.6, "home": 0.35}},
        (0.0, 1.5, 1.95, 0.2, 4.0, 0.15, 0.3, 0.15), 0.5, 0.5),
    MixedSegment(
        "store fashion loyalists", "in-store fashion and beauty buyers with a loyalty card",
        {"channel": {"store": 0.65, "app": 0.3},
         "favourite_category": {"fashion": 0.55, "beauty": 0.4},
         "payment": {"card": 0.6, "cash": 0.35},
         "delivery": {"in_store": 0.6, "click_collect": 0.35}},
        (0.5, 1.5, 1.55, 0.2, 4.4, 0.15, 0.15, 0.05), 0.4, 0.8),
    MixedSegment(
        "mobile deal hunters", "app users hunting discounts on electronics and sports",
        {"channel": {"app": 0.65, "store": 0.3},
         "favourite_category": {"electronics": 0.55, "sports": 0.4},
         "payment": {"wallet": 0.6, "card": 0.35},
         "delivery": {"home": 0.6, "locker": 0.35}},
        (0.0, 1.5, 2.15, 0.2, 3.6, 0.15, 0.55, 0.1), 0.7, 0.3),
)
"""Ground-truth segments; a customer's ``segment`` indexes this tuple."""

MIN_REGIONS: Final = 2
MAX_REGIONS: Final = len(REGION_NAMES)
MIN_CUSTOMERS_PER_REGION: Final = 10

_SIZE_RATIO: Final = 15.0  # largest region / smallest region
_PRIMARY_SHARE: Final = 0.7
_SECONDARY_SHARE: Final = 0.2
_DECLINE_RATE: Final = 0.10
_GIFT_CARD_RATE: Final = 0.04
_SETTING_RATES: Final = (0.5, 0.45, 0.4)  # sms_optin, paperless, app_push
_BEHAVIOUR_CODES: Final = (  # one row per segment, one column per behaviour flag
    (1, 1, 1, 1, 0, 0, 0, 0), (0, 0, 0, 0, 1, 1, 1, 1), (1, 1, 0, 0, 1, 1, 0, 0),
    (0, 0, 1, 1, 0, 0, 1, 1), (1, 0, 1, 0, 1, 0, 1, 0), (0, 1, 0, 1, 0, 1, 0, 1))
_BEHAVIOUR_HIGH: Final = 0.7
_BEHAVIOUR_LOW: Final = 0.2
_BEHAVIOUR_MID: Final = 0.45  # a fully broad segment's rate of every behaviour flag
# Within-segment noise on the log scale of frequency and basket, and on tenure (years): the
# individual scatter around a segment's curve.
_LOG_FREQ_NOISE: Final = 0.30
_LOG_BASKET_NOISE: Final = 0.30
_TENURE_NOISE: Final = 1.0


@dataclass(frozen=True)
class MixedCustomerTable:
    """A population of mixed-type synthetic customers, one row per customer.

    Attributes
    ----------
    customer_id, name, email, region : ndarray of str, shape (n,)
    consent : ndarray of bool, shape (n,)
    segment : ndarray of int64, shape (n,)
        Index into :data:`MIXED_SEGMENTS`.
    numeric : ndarray of float64, shape (n, len(NUMERIC))
        Raw numeric features in the units of :data:`NUMERIC`.
    flags : ndarray of float64, shape (n, len(BOOLEANS))
        0/1 flags.
    categories : ndarray of int64, shape (n, len(CATEGORICALS))
        Index of each categorical value in its declared vocabulary.
    """

    customer_id: NDArray[np.str_]
    name: NDArray[np.str_]
    email: NDArray[np.str_]
    region: NDArray[np.str_]
    consent: NDArray[np.bool_]
    segment: NDArray[np.int64]
    numeric: NDArray[np.float64]
    flags: NDArray[np.float64]
    categories: NDArray[np.int64]

    def __len__(self) -> int:
        """Return the number of customers."""
        return int(self.customer_id.shape[0])

    def record_matrix(self) -> NDArray[np.float64]:
        """Return the records as fedseg reads them: numbers, 0/1 flags, one-hot categories.

        Returns
        -------
        ndarray of float64, shape (n, n_columns)
            Numeric columns (raw units), then the flags, then for each categorical feature one
            0/1 column per vocabulary value, in declared order.
        """
        blocks = [self.numeric, self.flags]
        for j, (_, _, vocabulary) in enumerate(CATEGORICALS):
            blocks.append(np.eye(len(vocabulary))[self.categories[:, j]])
        return np.asarray(np.hstack(blocks), dtype=np.float64)


def _check_sizes(num_customers: int, num_regions: int) -> None:
    if isinstance(num_regions, bool) or not isinstance(num_regions, numbers.Integral) \
            or not MIN_REGIONS <= num_regions <= MAX_REGIONS:
        raise ValueError(f"num_regions={num_regions!r} should be an integer between "
                         f"{MIN_REGIONS} and {MAX_REGIONS}.")
    minimum = MIN_CUSTOMERS_PER_REGION * num_regions
    if isinstance(num_customers, bool) or not isinstance(num_customers, numbers.Integral) \
            or num_customers < minimum:
        raise ValueError(f"num_customers={num_customers!r} should be an integer >= {minimum} "
                         f"({MIN_CUSTOMERS_PER_REGION} per region for "
                         f"num_regions={num_regions}).")


def mixed_region_proportions(num_regions: int) -> NDArray[np.float64]:
    """Return the expected share of customers per region (largest five times the smallest).

    Parameters
    ----------
    num_regions : int
        From 2 to ``len(REGION_NAMES)``.

    Returns
    -------
    ndarray of float64, shape (num_regions,)
        Positive shares summing to 1, largest first.
    """
    _check_sizes(MIN_CUSTOMERS_PER_REGION * MAX_REGIONS, num_regions)
    ratio = _SIZE_RATIO ** (-1.0 / (num_regions - 1))
    weights = ratio ** np.arange(num_regions, dtype=np.float64)
    return np.asarray(weights / weights.sum(), dtype=np.float64)


def mixed_region_mixing(num_regions: int) -> NDArray[np.float64]:
    """Return the segment mix of each region.

    Region ``r`` is dominated by segment ``r % S`` (60 %) and segment ``(r + 2) % S`` (25 %),
    ``S = len(MIXED_SEGMENTS)``; the other 15 % is spread evenly over the remaining segments.

    Parameters
    ----------
    num_regions : int
        From 2 to ``len(REGION_NAMES)``.

    Returns
    -------
    ndarray of float64, shape (num_regions, len(MIXED_SEGMENTS))
        Row ``r`` is the segment distribution of region ``r``.
    """
    _check_sizes(MIN_CUSTOMERS_PER_REGION * MAX_REGIONS, num_regions)
    n_seg = len(MIXED_SEGMENTS)
    background = (1.0 - _PRIMARY_SHARE - _SECONDARY_SHARE) / (n_seg - 2)
    mix = np.full((num_regions, n_seg), background, dtype=np.float64)
    for r in range(num_regions):
        mix[r, r % n_seg] = _PRIMARY_SHARE
        mix[r, (r + 2) % n_seg] = _SECONDARY_SHARE
    return mix


LONG_TAIL: Final[dict[str, dict[str, float]]] = {
    "favourite_category": {"toys": 0.015, "garden": 0.015, "books": 0.02, "pets": 0.015},
    "payment": {"voucher": 0.02, "invoice": 0.01},
    "delivery": {"pickup_point": 0.015},
    "favourite_brand": {b: 0.03 for b in ("orbit", "kite", "maple", "zest", "pinecone",
                                           "quartz", "harbor", "sable", "tundra", "willow",
                                           "ember", "cobalt", "fable", "juniper", "ridge")},
}
"""Rare values of each categorical (share of all customers), unrelated to the segments: the
long tail real vocabularies have (a few customers pay by invoice, love books...)."""


def _category_probabilities(segment: MixedSegment, vocabulary: tuple[str, ...],
                            feature: str) -> NDArray[np.float64]:
    """Value distribution of one categorical feature within one segment."""
    usual = segment.categories.get(feature, {})
    tail = LONG_TAIL.get(feature, {})
    common = [v for v in vocabulary if v not in tail]
    rest = (1.0 - sum(usual.values())) / (len(common) - len(usual))
    scale = 1.0 - sum(tail.values())
    b = segment.breadth
    return np.asarray([tail[v] if v in tail else
                       scale * ((1.0 - b) * usual.get(v, rest) + b / len(common))
                       for v in vocabulary], dtype=np.float64)


def _draw_categories(rng: np.random.Generator, segment: NDArray[np.int64]) -> NDArray[np.int64]:
    """Draw each customer's categorical values from their segment's profile."""
    n = segment.shape[0]
    out = np.empty((n, len(CATEGORICALS)), dtype=np.int64)
    for j, (feature, _, vocabulary) in enumerate(CATEGORICALS):
        cdf = np.cumsum([_category_probabilities(s, vocabulary, feature)
                         for s in MIXED_SEGMENTS], axis=1)
        cdf[:, -1] = 1.0
        u = rng.random((n,))
        out[:, j] = (u[:, None] >= cdf[segment]).sum(axis=1)
    return out


def _draw_numeric(rng: np.random.Generator, segment: NDArray[np.int64],
                  t: NDArray[np.float64]) -> NDArray[np.float64]:
    """Raw numeric features along each segment's life-cycle curve, with individual scatter."""
    n = segment.shape[0]
    c = np.asarray([s.curve for s in MIXED_SEGMENTS], dtype=np.float64)[segment]
    tenure = c[:, 0] + c[:, 1] * t ** 1.5 + _TENURE_NOISE * rng.standard_normal(n)
    # Orders per year rise then fall over the life cycle (an arc), baskets grow with tenure.
    log_freq = c[:, 2] + c[:, 3] * np.sin(np.pi * t) + _LOG_FREQ_NOISE * rng.standard_normal(n)
    frequency = np.exp(log_freq)
    log_basket = c[:, 4] + c[:, 5] * t ** 2 \
        + _LOG_BASKET_NOISE * rng.standard_normal(n)
    basket = np.exp(log_basket)
    monetary = frequency * basket
    # Days since the last order: about one inter-order gap, exponential scatter; late in the
    # life cycle customers drift away (the gap stretches).
    gap = 365.0 / frequency * (1.0 + 3.0 * np.clip(t - 0.7, 0.0, None) / 0.3)
    recency = gap * rng.exponential(1.0, n)
    logit = np.log(c[:, 6] / (1.0 - c[:, 6])) + 4.0 * c[:, 7] * (t - 0.5)
    discount = rng.beta(8.0 / (1.0 + np.exp(-logit)), 8.0 / (1.0 + np.exp(logit)))
    out = np.column_stack([recency, frequency, monetary, basket, tenure, discount])
    lower = np.asarray([f.lower for f in NUMERIC])
    upper = np.asarray([f.upper for f in NUMERIC])
    return np.asarray(np.clip(out, lower, upper), dtype=np.float64)


def _draw_flags(rng: np.random.Generator, segment: NDArray[np.int64],
                t: NDArray[np.float64]) -> NDArray[np.float64]:
    """Newsletter (fades over the life cycle) and loyalty card (taken up with tenure)."""
    n = segment.shape[0]
    news = np.asarray([s.newsletter for s in MIXED_SEGMENTS])[segment] * (1.2 - 0.4 * t)
    loyal = np.asarray([s.loyalty for s in MIXED_SEGMENTS])[segment] * (0.6 + 0.6 * t)
    # Gift cards are a seasonal, rare purchase: unrelated to the segment.
    gift = rng.random(n) < _GIFT_CARD_RATE
    # Operational settings customers click once: common, and unrelated to how they shop.
    settings = rng.random((n, 3)) < np.asarray(_SETTING_RATES)
    # Behaviour flags: each segment shows its own pattern (_BEHAVIOUR_CODES), none alone
    # tells the segments apart, together they do.
    codes = np.asarray(_BEHAVIOUR_CODES, dtype=np.float64)[segment]
    # A broad segment's rates move towards _BEHAVIOUR_MID (MixedSegment.breadth).
    b = np.asarray([s.breadth for s in MIXED_SEGMENTS])[segment][:, None]
    rate = np.where(codes > 0, _BEHAVIOUR_HIGH, _BEHAVIOUR_LOW)
    behaviour = rng.random(codes.shape) < (1.0 - b) * rate + b * _BEHAVIOUR_MID
    return np.column_stack([rng.random(n) < np.clip(news, 0, 1),
                            rng.random(n) < np.clip(loyal, 0, 1), gift,
                            settings, behaviour]).astype(np.float64)


def generate_mixed_customers(
    *, num_customers: int = 30_000, num_regions: int = 6, seed: int = 0
) -> MixedCustomerTable:
    """Generate a deterministic mixed-type customer population.

    Parameters
    ----------
    num_customers : int, default=30_000
        At least ``10 * num_regions``.
    num_regions : int, default=6
        From 2 to ``len(REGION_NAMES)``; sizes follow :func:`mixed_region_proportions`
        (largest remainder rounding), segment mixes :func:`mixed_region_mixing`.
    seed : int, default=0
        Seed of ``numpy.random.default_rng``; the same seed gives an identical table.

    Returns
    -------
    MixedCustomerTable
        Customers in random order with identifiers ``C0000001``, ``C0000002``...

    Raises
    ------
    ValueError
        If ``num_regions`` is out of range or ``num_customers`` is too small.
    """
    _check_sizes(num_customers, num_regions)
    rng = np.random.default_rng(seed)
    sizes = _largest_remainder(num_customers, mixed_region_proportions(num_regions))
    region_idx = np.repeat(np.arange(num_regions), sizes)
    cdf = np.cumsum(mixed_region_mixing(num_regions), axis=1)
    cdf[:, -1] = 1.0
    segment = (rng.random(num_customers)[:, None] >= cdf[region_idx]).sum(axis=1)
    order = rng.permutation(num_customers)
    region_idx, segment = region_idx[order], segment[order].astype(np.int64)

    t = rng.random(num_customers)
    numeric = _draw_numeric(rng, segment, t)
    flags = _draw_flags(rng, segment, t)
    categories = _draw_categories(rng, segment)
    consent = rng.random(num_customers) >= _DECLINE_RATE

    width = max(7, len(str(num_customers)))
    customer_id = np.asarray([f"C{i:0{width}d}" for i in range(1, num_customers + 1)],
                             dtype=np.str_)
    name, email = _fake_names(rng, customer_id)
    region = np.asarray(REGION_NAMES[:num_regions], dtype=np.str_)[region_idx]
    return MixedCustomerTable(customer_id=customer_id, name=name, email=email, region=region,
                              consent=consent, segment=segment, numeric=numeric, flags=flags,
                              categories=categories)
