"""The site's Flower ClientApp: answers every round with statistics only.

Each fit instruction names a phase (:mod:`common.protocol`) and carries public arrays (global
scaling, centres). The site computes the phase's statistics on its own records, checks their
public shapes, and (with SecAgg+) encodes them for an exact secure sum. The reply always has
``num_examples=1`` and empty metrics: those travel in clear beside SecAgg+'s masked vector.
Evaluate and query messages bypass SecAgg+, so the site answers none of them with data.

Every message the site sends is recorded in its audit log (:mod:`client.audit`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from flwr.app import Message, MessageType
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import Context, NDArrays, Scalar
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
)
from numpy.typing import NDArray

from client.audit import make_audit_mod
from common import mask_prg
from common.errors import ConfigError, DataError, ProtocolError
from common.features import FeatureSpec, apply_transforms
from common.kmeans import compute_stats
from common.protocol import GROUPS_KEY, PHASE_KEY, Phase, parse_phase, reply_shapes
from common.scaling import GlobalScaler, compute_moments
from common.secure_sum import (
    CLIPPING_RANGE,
    MAX_WEIGHT,
    MODULUS_RANGE,
    SecAggPlusSumCodec,
    check_no_wrap,
)
from common.segment_model import ProfileStats

SECAGG_MODULES = (
    importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod"),
    importlib.import_module("flwr.common.secure_aggregation.secaggplus_utils"),
)
"""Flower modules whose SecAgg+ mask generator this site replaces (see common.mask_prg)."""
mask_prg.install(*SECAGG_MODULES)


@dataclass(frozen=True)
class SiteData:
    """The records a site computes on: consenting customers, declared features only.

    Attributes
    ----------
    raw : ndarray of shape (n_samples, n_features)
        Raw feature values.
    features : tuple of FeatureSpec
        The public feature list (order of ``raw``'s columns).
    """

    raw: NDArray[np.float64]
    features: tuple[FeatureSpec, ...]

    def __post_init__(self) -> None:
        if self.raw.ndim != 2 or self.raw.shape[1] != len(self.features):
            raise DataError(
                f"site data of shape {self.raw.shape} should have {len(self.features)} columns."
            )

    @cached_property
    def transformed(self) -> NDArray[np.float64]:
        """Features after their declared transforms (before global standardisation)."""
        return apply_transforms(self.raw, self.features)


SiteLoader = Callable[[Context], SiteData]
"""Returns the calling node's data; in simulation it picks the partition by ``partition-id``."""


def site_statistics(
    site: SiteData, phase: Phase, instruction: Sequence[NDArray[np.float64]], *, groups: int = 1
) -> list[NDArray[np.float64]]:
    """Compute a site's reply for one phase (unencoded), with its public shapes checked.

    Parameters
    ----------
    site : SiteData
    phase : Phase
    instruction : sequence of ndarray
        ``[]`` for ``moments``; ``[mean, std, centres]`` afterwards.
    groups : int, default=1
        The centres are this many independent, equally sized sets (parallel Lloyd runs);
        each point is assigned within every set.

    Returns
    -------
    list of ndarray
        float64 statistics in the layout of :func:`common.protocol.reply_shapes`.
    """
    d = len(site.features)
    if phase is Phase.MOMENTS:
        if instruction:
            raise ProtocolError("the moments phase carries no instruction arrays.")
        reply = compute_moments(site.transformed)
        n_centres = 0
    else:
        if len(instruction) != 3:
            raise ProtocolError(
                f"phase {phase.value} needs [mean, std, centres]; got {len(instruction)} arrays."
            )
        mean, std, centres = (np.asarray(a, dtype=np.float64) for a in instruction)
        if mean.shape != (d,) or std.shape != (d,) or centres.ndim != 2 or \
                centres.shape[1] != d:
            raise ProtocolError(
                f"instruction shapes {[mean.shape, std.shape, centres.shape]} do not fit "
                f"{d} features."
            )
        scaled = GlobalScaler(mean=mean, std=std, count=0.0).transform(site.transformed)
        n_centres = centres.shape[0]
        if groups < 1 or n_centres % groups:
            raise ProtocolError(f"{n_centres} centres cannot form {groups} equal groups.")
        if phase is Phase.PROFILE:
            reply = ProfileStats.compute(site.raw, scaled, centres).to_arrays()
        else:
            blocks = [compute_stats(scaled, block).to_arrays()
                      for block in np.split(centres, groups)]
            reply = [np.concatenate(parts) for parts in zip(*blocks, strict=True)]
    expected = reply_shapes(phase, n_centres=n_centres, n_features=d)
    got = [a.shape for a in reply]
    if got != expected:  # a programming error: never send a non-public shape
        raise ProtocolError(f"reply shapes {got} differ from the public layout {expected}.")
    return [np.asarray(a, dtype=np.float64) for a in reply]


def codec_from_secagg_state(context: Context) -> SecAggPlusSumCodec:
    """Check the SecAgg+ parameters the server set up for this round; return the codec.

    The site, not the server, decides whether its statistics may be sent: it refuses a round
    whose parameters would break the exact encoding or let the masked sum wrap the modulus.

    Parameters
    ----------
    context : flwr.app.Context
        The node's context; ``secaggplus_mod`` stores the round's set-up in its state.
    """
    if RECORD_KEY_STATE not in context.state.config_records:
        raise ProtocolError("no SecAgg+ set-up found for this round; refusing to send.")
    state = context.state.config_records[RECORD_KEY_STATE]
    sites = int(state.get("sample_num", 0))  # type: ignore[arg-type]
    q = int(state.get("target_range", 0))  # type: ignore[arg-type]
    checks = {
        "clipping_range": (float(state.get("clipping_range", 0.0)), CLIPPING_RANGE),  # type: ignore[arg-type]
        "max_weight": (float(state.get("max_weight", 0.0)), MAX_WEIGHT),  # type: ignore[arg-type]
        "modulus_range": (int(state.get("mod_range", 0)), MODULUS_RANGE),  # type: ignore[arg-type]
    }
    for name, (got, want) in checks.items():
        if got != want:
            raise ProtocolError(f"SecAgg+ {name}={got} from the server; this site requires {want}.")
    try:
        check_no_wrap(num_sites=sites, quantization_range=q)
        return SecAggPlusSumCodec(q)
    except ConfigError as exc:
        raise ProtocolError(f"refusing SecAgg+ round with {sites} sites: {exc}") from exc


class SiteClient(NumPyClient):
    """NumPyClient answering fit instructions with (encoded) statistics.

    Parameters
    ----------
    site : SiteData
    context : flwr.app.Context
        The node's context (holds the SecAgg+ set-up of the round).
    secagg : bool
        Whether this site requires SecAgg+ for everything it sends.
    """

    def __init__(self, site: SiteData, context: Context, *, secagg: bool) -> None:
        self.site = site
        self.context = context
        self.secagg = secagg

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict]:
        """Return the statistics of the requested phase, ``num_examples=1``, no metrics."""
        phase = parse_phase(config.get(PHASE_KEY))
        groups = int(config.get(GROUPS_KEY, 1))
        codec = codec_from_secagg_state(self.context) if self.secagg else None
        reply = site_statistics(self.site, phase, parameters, groups=groups)
        if codec is not None:
            reply = codec.encode(reply)
        return reply, 1, {}

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict]:
        """Refuse: evaluate replies bypass SecAgg+, so no data-dependent value is sent."""
        raise ProtocolError("fedseg sites do not answer evaluate messages.")

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        """Refuse: query replies bypass SecAgg+."""
        raise ProtocolError("fedseg sites do not answer property queries.")

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        """Refuse: the server never needs a site's parameters outside SecAgg+."""
        raise ProtocolError("fedseg sites do not send parameters outside a fit round.")


def require_secagg_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Refuse any training message that is not part of a SecAgg+ exchange.

    A site configured for SecAgg+ must not be talked into sending plain statistics by a server
    that skips the protocol; without this mod that would only fail deep inside Flower.
    """
    if message.metadata.message_type == MessageType.TRAIN and (
        not message.has_content() or RECORD_KEY_CONFIGS not in message.content.config_records
    ):
        raise ProtocolError("this site sends statistics only through SecAgg+; the server asked "
                            "for a plain training reply (check privacy= on the server).")
    return call_next(message, context)


def make_client_app(
    site_loader: SiteLoader,
    *,
    secagg: bool,
    audit_dir: str | None = None,
    extra_mods: Sequence[Mod] = (),
) -> ClientApp:
    """Build the site ClientApp.

    Parameters
    ----------
    site_loader : callable
        ``context -> SiteData`` for the node running the app.
    secagg : bool
        Whether the site requires SecAgg+ (adds ``secaggplus_mod`` and refuses plain rounds).
    audit_dir : str, optional
        Directory of the site's audit log (``site-<partition>.jsonl``); ``None`` disables it.
    extra_mods : sequence of Mod
        Outermost mods (tests record every outgoing message with one).
    """

    def client_fn(context: Context) -> Client:
        return SiteClient(site_loader(context), context, secagg=secagg).to_client()

    mods: list[Mod] = list(extra_mods)
    if audit_dir is not None:
        mods.append(make_audit_mod(audit_dir, mechanism="secagg+" if secagg else "none"))
    if secagg:
        mods.extend([require_secagg_mod, secaggplus_mod])
    return ClientApp(client_fn=client_fn, mods=mods)
