"""Data sources and partitions of a local simulation (built from Hydra's ``data``/``partition``).

A simulation holds the whole population in one process to partition it into sites and to
compute the centralised reference; the sites themselves only ever see their own partition
(:class:`PartitionedSites`), and the server only sums.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Context
from hydra.utils import to_absolute_path
from numpy.typing import NDArray

from client.app import SiteData
from client.contract import DataContract, load_contract
from client.csv_source import read_customer_csv
from common.errors import ConfigError, DataError
from common.features import TRANSFORMS, FeatureSpec
from simulations.mixed import (
    BOOLEANS,
    CATEGORICALS,
    MIXED_SEGMENTS,
    NUMERIC,
    NUMERIC_LABELS,
    generate_mixed_customers,
)
from simulations.partition import partition_by_group, partition_dirichlet, partition_iid
from simulations.synthetic import FEATURE_INFO, FEATURES, SEGMENTS, generate_customers

PROJECT_DIR = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Population:
    """All consenting customers of a simulation.

    Attributes
    ----------
    raw : ndarray of shape (n_customers, n_features)
    features : tuple of FeatureSpec
    groups : ndarray of shape (n_customers,)
        Region (synthetic) or site-column value (CSV) per customer.
    labels : ndarray of shape (n_customers,) or None
        Ground-truth segment per customer, when known.
    label_names : tuple of str
        Names of the ground-truth segments (empty when unknown).
    description : str
        One line for progress output.
    ids : ndarray of str or None
        Customer ids (None: the site files number the rows).
    identifiers : dict of str to ndarray
        Direct identifiers per customer (name, email): written into the simulated sites'
        sources so that the privacy gate is seen never to load them.
    declined : Population or None
        Customers who refused consent: written into the sites' sources with consent false,
        excluded by the gate.
    bounds : dict of str to (float, float)
        Declared raw bounds per feature (data contract ``clip``).
    """

    raw: NDArray[np.float64]
    features: tuple[FeatureSpec, ...]
    groups: NDArray[np.str_]
    labels: NDArray[np.int64] | None
    label_names: tuple[str, ...]
    description: str
    ids: NDArray[np.str_] | None = None
    identifiers: dict[str, NDArray[np.str_]] = field(default_factory=dict)
    declined: Population | None = None
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)


SYNTHETIC_LABELS = {
    "recency_days": "Days since last order", "frequency": "Orders per year",
    "monetary": "Annual spend", "avg_basket": "Average basket", "tenure_years": "Customer for",
    "online_share": "Share of orders online", "discount_share": "Share of orders discounted",
}
"""What a marketer calls each synthetic feature (written into the simulated sites' contracts)."""


def synthetic_features() -> tuple[FeatureSpec, ...]:
    """Return the public feature list of the synthetic retail data."""
    return tuple(
        FeatureSpec(name=name, unit=FEATURE_INFO[name].unit, transform=FEATURE_INFO[name].transform,
                    high_label=FEATURE_INFO[name].high_label,
                    low_label=FEATURE_INFO[name].low_label, label=SYNTHETIC_LABELS[name])
        for name in FEATURES
    )


@dataclass(frozen=True)
class SyntheticCustomers:
    """Built-in synthetic customers; only those who consented take part."""

    num_customers: int = 50_000
    num_regions: int = 5

    def feature_specs(self) -> tuple[FeatureSpec, ...]:
        """Return the public feature list (known without reading any data)."""
        return synthetic_features()

    def declared_bounds(self) -> dict[str, tuple[float, float]]:
        """Public raw bounds per feature: the generator's documented ranges."""
        return {name: (FEATURE_INFO[name].lower, FEATURE_INFO[name].upper) for name in FEATURES}

    def load(self, *, seed: int) -> Population:
        """Generate the table and keep consenting customers' declared features."""
        try:
            table = generate_customers(
                num_customers=self.num_customers, num_regions=self.num_regions, seed=seed
            )
        except ValueError as exc:
            raise ConfigError(f"data=synthetic: {exc}") from exc
        keep = table.consent

        def part(mask: NDArray[np.bool_], description: str,
                 declined: Population | None) -> Population:
            return Population(
                raw=table.features[mask], features=synthetic_features(),
                groups=table.region[mask], labels=table.segment[mask].astype(np.int64),
                label_names=tuple(s.name for s in SEGMENTS), description=description,
                ids=table.customer_id[mask],
                identifiers={"name": table.name[mask], "email": table.email[mask]},
                declined=declined, bounds=self.declared_bounds())

        return part(keep, (f"synthetic retail customers: {int(keep.sum())} of {len(table)} "
                           f"consented, {self.num_regions} regions, {len(SEGMENTS)} true "
                           "segments"), part(~keep, "declined consent", None))


def mixed_features() -> tuple[FeatureSpec, ...]:
    """Return the public feature list of the mixed-type synthetic data.

    Numeric features first, then the boolean flags, then each categorical feature as one 0/1
    column per declared value, named ``<feature>=<value>`` (as a data contract's categorical
    feature gives them).
    """
    specs = [FeatureSpec(name=f.name, unit=f.unit, transform=f.transform,
                         label=NUMERIC_LABELS[f.name],
                         high_label=f.high_label, low_label=f.low_label) for f in NUMERIC]
    specs += [FeatureSpec(name=name, unit="share", label=label, kind="boolean",
                          high_label=label, low_label=f"not {label}") for name, label in BOOLEANS]
    for group, label, vocabulary in CATEGORICALS:
        specs += [FeatureSpec(name=f"{group}={value}", unit="share", label=f"{label}: {value}",
                              kind="category", group=group, high_label=f"mostly {value}",
                              low_label=f"rarely {value}") for value in vocabulary]
    return tuple(specs)


@dataclass(frozen=True)
class MixedCustomers:
    """Built-in mixed-type synthetic customers (``data=mixed``); only consenting ones take part.

    Segments are carried jointly by categorical values and curved numeric structure (see
    :mod:`simulations.mixed`); regions are strongly non-IID.
    """

    num_customers: int = 30_000
    num_regions: int = 6

    def feature_specs(self) -> tuple[FeatureSpec, ...]:
        """Return the public feature list (known without reading any data)."""
        return mixed_features()

    def declared_bounds(self) -> dict[str, tuple[float, float]]:
        """Public raw bounds per feature: the generator's ranges; [0, 1] for flags/categories."""
        bounds = {f.name: (f.lower, f.upper) for f in NUMERIC}
        bounds.update({f.name: (0.0, 1.0) for f in mixed_features() if f.kind != "numeric"})
        return bounds

    def load(self, *, seed: int) -> Population:
        """Generate the table and keep consenting customers' records."""
        try:
            table = generate_mixed_customers(
                num_customers=self.num_customers, num_regions=self.num_regions, seed=seed)
        except ValueError as exc:
            raise ConfigError(f"data=mixed: {exc}") from exc
        records = table.record_matrix()
        keep = table.consent

        def part(mask: NDArray[np.bool_], description: str,
                 declined: Population | None) -> Population:
            return Population(
                raw=records[mask], features=mixed_features(), groups=table.region[mask],
                labels=table.segment[mask], label_names=tuple(s.name for s in MIXED_SEGMENTS),
                description=description, ids=table.customer_id[mask],
                identifiers={"name": table.name[mask], "email": table.email[mask]},
                declined=declined, bounds=self.declared_bounds())

        return part(keep, (f"mixed-type synthetic customers: {int(keep.sum())} of {len(table)} "
                           f"consented, {self.num_regions} regions, {len(MIXED_SEGMENTS)} true "
                           "segments"), part(~keep, "declined consent", None))


@dataclass(frozen=True)
class CsvCustomers:
    """A customer-level CSV; one site per distinct value of ``site_column``."""

    path: str
    site_column: str
    features: tuple[str, ...] | list[str]
    transform: str = "none"
    label_column: str | None = None
    clip: dict[str, list[float]] | None = None
    on_invalid: str = "error"

    def clip_bounds(self) -> dict[str, tuple[float, float]]:
        """Return the validated ``data.clip``: feature -> (low, high)."""
        bounds: dict[str, tuple[float, float]] = {}
        for name, pair in dict(self.clip or {}).items():
            if name not in [str(f) for f in self.features]:
                raise ConfigError(f"data.clip names {name!r}, which is not in data.features "
                                  f"{[str(f) for f in self.features]}.")
            values = list(pair)
            if len(values) != 2 or not float(values[0]) < float(values[1]):
                raise ConfigError(f"data.clip.{name}={values} should be [low, high] with "
                                  "low < high.")
            bounds[str(name)] = (float(values[0]), float(values[1]))
        return bounds

    def declared_bounds(self) -> dict[str, tuple[float, float]]:
        """Public raw bounds per feature: ``data.clip`` (differential privacy needs them all)."""
        return self.clip_bounds()

    def feature_specs(self) -> tuple[FeatureSpec, ...]:
        """Return the public feature list (known without reading any data)."""
        if not self.features:
            raise ConfigError("data.features is empty; list the numeric columns to cluster on.")
        if self.transform not in TRANSFORMS:
            raise ConfigError(
                f"data.transform={self.transform!r} should be one of {', '.join(TRANSFORMS)}."
            )
        return tuple(FeatureSpec(name=str(f), transform=self.transform) for f in self.features)

    def load(self, *, seed: int) -> Population:
        """Read the declared columns with :func:`client.csv_source.read_customer_csv`."""
        specs = self.feature_specs()
        path = Path(to_absolute_path(self.path)) if _in_hydra() else Path(self.path)
        bounds = self.clip_bounds()
        cols = read_customer_csv(path, features=specs, site_column=self.site_column,
                                 label_column=self.label_column, on_invalid=self.on_invalid)
        assert cols.sites is not None
        clipped = []
        for j, spec in enumerate(specs):
            if spec.name in bounds:
                low, high = bounds[spec.name]
                outside = int(np.count_nonzero((cols.raw[:, j] < low) | (cols.raw[:, j] > high)))
                np.clip(cols.raw[:, j], low, high, out=cols.raw[:, j])
                clipped.append(f"{outside} value(s) of {spec.name!r} clipped to "
                               f"[{low:g}, {high:g}]")
        labels = None
        names: tuple[str, ...] = ()
        if cols.labels is not None:
            uniques, labels = np.unique(cols.labels, return_inverse=True)
            names = tuple(str(u) for u in uniques)
        return Population(
            raw=cols.raw,
            features=specs,
            groups=cols.sites,
            labels=None if labels is None else labels.astype(np.int64),
            label_names=names,
            bounds=bounds,
            description=(
                f"{path.name}: {cols.raw.shape[0]} customers, {len(specs)} features "
                f"({self.transform}), {len(np.unique(cols.sites))} values of "
                f"{self.site_column!r}" + ("; " + "; ".join(clipped) if clipped else "")
                + ("; excluded as invalid: " + ", ".join(
                    f"{n} ({reason})" for reason, n in cols.invalid.items())
                   if cols.invalid else "")
            ),
        )


def _in_hydra() -> bool:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized()


@dataclass(frozen=True)
class ByGroupPartition:
    """Sites follow the population's groups (regions or CSV site values)."""

    def split(self, population: Population, *, num_sites: int, seed: int) -> list[NDArray[np.intp]]:
        """Return one index array per site."""
        return partition_by_group(population.groups, num_sites=num_sites, seed=seed)


@dataclass(frozen=True)
class DirichletPartition:
    """Label-Dirichlet(alpha) split; labels are ground truth when known, else groups."""

    alpha: float = 0.3
    min_size: int = 10

    def split(self, population: Population, *, num_sites: int, seed: int) -> list[NDArray[np.intp]]:
        """Return one index array per site."""
        labels = population.labels if population.labels is not None else population.groups
        return partition_dirichlet(labels, num_sites=num_sites, alpha=self.alpha, seed=seed,
                                   min_size=self.min_size)


@dataclass(frozen=True)
class IidPartition:
    """Uniformly random split."""

    def split(self, population: Population, *, num_sites: int, seed: int) -> list[NDArray[np.intp]]:
        """Return one index array per site."""
        return partition_iid(population.raw.shape[0], num_sites=num_sites, seed=seed)


@dataclass(frozen=True)
class PartitionedSites:
    """Site loader for the simulation: node ``partition-id`` gets its own rows only.

    Picklable, so Flower's simulation engine can ship it to its worker processes.
    """

    parts: tuple[NDArray[np.float64], ...]
    features: tuple[FeatureSpec, ...]

    def __call__(self, context: Context) -> SiteData:
        """Return the data of the node running ``context``."""
        pid = int(context.node_config["partition-id"])
        if not 0 <= pid < len(self.parts):
            raise DataError(f"no partition {pid}: the simulation has {len(self.parts)} sites.")
        return SiteData(raw=self.parts[pid], features=self.features)


@dataclass(frozen=True)
class ContractSchema:
    """The federation's public feature schema, read from a data contract (``data=contract``).

    A deployment's server holds no data: it only needs the features every site computes, in
    order, with their labels and declared bounds (for DP). Reading them from the contract the
    sites agreed on (its ``features`` section; its source and site settings are not used here)
    gives exactly the features each site's privacy gate produces, categorical and boolean
    features included. A relative ``path`` is looked up from the working directory, then from
    the project directory (so ``conf/contracts/...`` works inside the submitted app bundle).
    """

    path: str

    def contract(self) -> DataContract:
        """Load and validate the contract (project errors name the file and key)."""
        path = Path(self.path)
        if not path.is_absolute() and not path.exists():
            path = PROJECT_DIR / path
        return load_contract(path)

    def feature_specs(self) -> tuple[FeatureSpec, ...]:
        """Return the public features, as every site's gate produces them."""
        return self.contract().feature_specs()

    def declared_bounds(self) -> dict[str, tuple[float, float]]:
        """Return the contract's declared bounds (``clip``; [0, 1] for categorical / boolean)."""
        return self.contract().declared_bounds()

    def load(self, seed: int = 0) -> Population:
        """Refuse: this schema has no records (a simulation needs synthetic or csv data)."""
        raise ConfigError(
            "data=contract describes a deployment's features for its server and holds no "
            "records; a local simulation needs data=synthetic or data=csv.")
