"""What a site agrees to compute, from the site's own configuration -- never from the server.

The server is not trusted with what a site can enforce itself. Every fit instruction carries the
server's public :class:`RunPlan` (protocol, mask generator, features, k, restarts, candidates,
rounds); a site checks the plan against its :class:`SitePolicy` and every request of the run
against the plan with a :class:`SiteSession` **before** it computes anything. A request outside
the policy raises :class:`~common.errors.SiteRefusal`: its code is all the server learns, the
full reason goes to the site's own log.

Why each limit exists (attacks in docs/SECURITY.md): a server free to choose phases, repeat the
profile round and send thousands of centres can isolate customers cell by cell; with a bounded
number of centres and rounds, a fixed phase order and scaling pinned for the whole run, what a
run can reveal is bounded by the plan every site agreed to.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from numpy.typing import NDArray
from omegaconf import DictConfig, OmegaConf

from common.errors import ConfigError, SiteRefusal
from common.protocol import Phase
from common.secagg_params import (
    DEFAULT_COLLUSION_FRACTION,
    DEFAULT_FAILURE_LOG2,
    neighbourhood_size,
    threshold_for,
)

PROTOCOL_ID = "fedseg/4"
"""Version of the round protocol (phases, layouts incl. the DP and autoencoder layouts,
encoding with offset)."""

MODELS = ("kmeans", "ae_kmeans")
"""``kmeans``: k-means on the standardised features; ``ae_kmeans``: a federated autoencoder,
then k-means in its embedding (:mod:`common.autoencoder`)."""

MECHANISMS = ("secagg+", "none")


@dataclass(frozen=True)
class SitePolicy:
    """A site's own limits (``site`` config group in simulation; node config in deployment).

    Attributes
    ----------
    mechanism : str
        ``"secagg+"`` (default): statistics leave only inside SecAgg+. ``"none"``: plain replies,
        an explicit debugging choice.
    min_sites : int
        Fewest sites this site takes part with. With 2 sites each can subtract itself from the
        published model and read the other's aggregates.
    min_customers : int
        Fewest consenting customers this site needs before it sends anything: the sum over
        the other sites minus the published model is this site's contribution.
    max_k, max_restarts, max_init_candidates, max_init_rounds, max_lloyd_rounds : int
        Largest plan the site agrees to: centres per request are ``k * restarts`` (Lloyd),
        ``init_candidates`` (initialisation) and ``k`` (profile).
    max_rounds_per_day : int
        Rounds this site answers in any 24 hours, over all runs (limits reruns and differencing).
    tolerate_dropouts : bool
        False (default): the SecAgg+ threshold must equal the neighbourhood (no secret can be
        rebuilt without every neighbour) and an unmask request may list no dropped site.
        True: up to ``floor((s - 1) / 3)`` dropped neighbours with ``t = s - that``.
    collusion_fraction : float
        Fraction of sites assumed to collude with the server, for neighbourhoods above 30 sites.
    failure_log2 : int
        Accepted probability ``2**-failure_log2`` that a run's neighbourhoods expose a site.
    require_dp : bool
        True (default): answer only runs whose every release is differentially private
        (:mod:`common.dp`); a plan without DP is refused. Ignored with ``mechanism="none"``,
        the explicit debugging choice that protects nothing.
    dp_epsilon, dp_delta : float
        This site's privacy budget over **everything it ever answers** (all runs, kept in its
        ledger on disk): a request whose release would take the composition past
        ``(dp_epsilon, dp_delta)`` is refused.
    max_customers : int
        Public cap on this site's customers under DP: the site checks from it, never from its
        own count, that no encoded value can carry past its second SecAgg+ limb.
    dp_max_relied_sites : int
        At most this many sites' noise shares are relied on (0: no cap). A site that knows how
        many real sites its federation has sets it, so that a server announcing invented sites
        (Sybils) cannot thin its noise share.
    max_ae_rounds, max_ae_epochs, max_ae_local_steps, max_ae_params, max_embed_dim : int
        Largest autoencoder plan (``model=ae_kmeans``) the site trains: federated rounds,
        local epochs per round (``local_steps=0``), mini-batch steps per round (otherwise),
        parameters, embedding size. Every round releases a
        customer-weighted sum of trained weights (inside SecAgg+, never with DP yet), so a site
        bounds how many such releases and how large a model a run may ask for.
    device : str
        Where this site trains the autoencoder: ``auto`` (a GPU when present), ``cpu``,
        ``cuda``. The site's choice, never the server's.
    """

    mechanism: str = "secagg+"
    min_sites: int = 3
    min_customers: int = 20
    max_k: int = 20
    max_restarts: int = 10
    max_init_candidates: int = 200
    max_init_rounds: int = 10
    max_lloyd_rounds: int = 100
    max_rounds_per_day: int = 1000
    tolerate_dropouts: bool = False
    collusion_fraction: float = DEFAULT_COLLUSION_FRACTION
    failure_log2: int = DEFAULT_FAILURE_LOG2
    require_dp: bool = True
    dp_epsilon: float = 4.0
    dp_delta: float = 1e-6
    max_customers: int = 10_000_000
    dp_max_relied_sites: int = 0
    max_ae_rounds: int = 600
    max_ae_epochs: int = 10
    max_ae_local_steps: int = 500
    max_ae_params: int = 200_000
    max_embed_dim: int = 16
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"site.mechanism={self.mechanism!r} should be one of {MECHANISMS}.")
        for name in ("min_sites", "min_customers", "max_k", "max_restarts",
                     "max_init_candidates", "max_init_rounds", "max_lloyd_rounds",
                     "max_rounds_per_day", "failure_log2", "max_customers", "max_ae_rounds",
                     "max_ae_epochs", "max_ae_local_steps", "max_ae_params",
                     "max_embed_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"site.{name}={getattr(self, name)} should be >= 1.")
        if self.min_sites < 2:
            raise ValueError(f"site.min_sites={self.min_sites} should be >= 2.")
        if not 0.0 <= self.collusion_fraction < 1.0:
            raise ValueError(
                f"site.collusion_fraction={self.collusion_fraction} should be in [0, 1).")
        if self.dp_max_relied_sites < 0:
            raise ValueError(f"site.dp_max_relied_sites={self.dp_max_relied_sites} should be "
                             ">= 0 (0: no cap).")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"site.device={self.device!r} should be auto, cpu or cuda.")
        if not self.dp_epsilon > 0 or not 0 < self.dp_delta < 1:
            raise ValueError(f"site.dp_epsilon={self.dp_epsilon} should be > 0 and "
                             f"site.dp_delta={self.dp_delta} in (0, 1).")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, source: str) -> SitePolicy:
        """Build a policy from a mapping (YAML file, Hydra node), naming unknown keys.

        Parameters
        ----------
        values : mapping
        source : str
            Where the values came from, for error messages.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown site policy key(s) {unknown}; expected some of "
                             f"{sorted(known)}.")
        try:
            return cls(**dict(values))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from exc

    @property
    def max_rounds_per_run(self) -> int:
        """Moments + autoencoder + embedding + initialisation + Lloyd + profile rounds at most."""
        return 3 + self.max_ae_rounds + self.max_init_rounds + self.max_lloyd_rounds

    def required_secagg(self, num_sites: int) -> tuple[int, int]:
        """Smallest neighbourhood and threshold this site accepts for ``num_sites`` sites."""
        shares = neighbourhood_size(
            num_sites, tolerate_dropouts=self.tolerate_dropouts,
            collusion_fraction=self.collusion_fraction, failure_log2=self.failure_log2)
        return shares, threshold_for(shares, tolerate_dropouts=self.tolerate_dropouts)

    def dropouts_tolerated(self, num_sites: int) -> int:
        """Sites that may drop out of a round that still completes (SecAgg+ tolerance).

        With neighbourhoods of ``s`` and threshold ``t``, every site needs ``t`` of its ``s``
        neighbours alive; conservatively, a completed round has ``ceil(n * t / s)`` sites.
        """
        if not self.tolerate_dropouts:
            return 0
        shares, threshold = self.required_secagg(num_sites)
        return num_sites - -(-num_sites * threshold // shares)

    def relied_sites(self, num_sites: int) -> int:
        """Sites whose noise shares this site relies on when ``num_sites`` are announced.

        Announced minus tolerated dropouts minus assumed colluders
        (:func:`common.dp.honest_sites`), capped by ``dp_max_relied_sites``.
        """
        from common.dp import honest_sites

        relied = honest_sites(num_sites, dropouts=self.dropouts_tolerated(num_sites),
                              collusion_fraction=self.collusion_fraction)
        return min(relied, self.dp_max_relied_sites) if self.dp_max_relied_sites else relied

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (recorded in the site's log)."""
        return asdict(self)


@dataclass(frozen=True)
class RunPlan:
    """The server's public plan of a run, announced with every instruction.

    Attributes
    ----------
    features : tuple of str
        Feature names in order; must equal the site's own features.
    k, n_init, init_candidates, init_rounds, max_rounds : int
        Segments, parallel restarts, candidate centres (0 with ``init="random"``),
        initialisation rounds, Lloyd rounds at most.
    init : str
        ``"summary"`` or ``"random"``.
    num_sites : int
        Sites the server plans for.
    protocol, prg : str
        Round protocol and SecAgg+ primitives (mask generator + secret sharing,
        :func:`common.secagg_primitives.suite_id`) identifiers.
    dp : str
        The differential-privacy plan (:class:`common.dp.DpPlan`, canonical JSON), or ``""``
        for a run with exact sums.
    model : str
        ``kmeans`` or ``ae_kmeans`` (:data:`MODELS`).
    ae : str
        ``model=ae_kmeans``: the autoencoder plan (:meth:`common.autoencoder.AESettings.plan_json`)
        with ``n_params`` -- the clusters then live in its ``embed_dim``-dimensional embedding.
    """

    features: tuple[str, ...]
    k: int
    n_init: int
    init: str
    init_candidates: int
    init_rounds: int
    max_rounds: int
    num_sites: int
    protocol: str = PROTOCOL_ID
    prg: str = ""
    dp: str = ""
    model: str = "kmeans"
    ae: str = ""

    def to_json(self) -> str:
        """Canonical JSON (what travels in the instruction's config)."""
        return json.dumps({**asdict(self), "features": list(self.features)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: object) -> RunPlan:
        """Parse an announced plan; any malformation is a protocol refusal."""
        try:
            raw = json.loads(str(text))
            known = {f.name for f in fields(cls)}
            if not isinstance(raw, dict) or set(raw) != known:
                raise ValueError("unexpected keys")
            plan = cls(**{**raw, "features": tuple(str(f) for f in raw["features"])})
            if not isinstance(plan.dp, str) or not isinstance(plan.ae, str):
                raise ValueError("dp and ae should be strings")
            for name in ("k", "n_init", "init_candidates", "init_rounds", "max_rounds",
                         "num_sites"):
                value = getattr(plan, name)
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"{name}={value!r}")
        except (TypeError, ValueError, KeyError) as exc:
            raise SiteRefusal("protocol", f"malformed run plan in the instruction ({exc}).") \
                from exc
        return plan

    def check_against(self, policy: SitePolicy, *, features: tuple[str, ...], prg: str) -> None:
        """Refuse a plan outside ``policy`` or inconsistent with the site itself."""
        if self.protocol != PROTOCOL_ID:
            raise SiteRefusal("protocol", f"server speaks protocol {self.protocol!r}; this "
                              f"site speaks {PROTOCOL_ID!r}.")
        if policy.mechanism == "secagg+" and self.prg != prg:
            raise SiteRefusal("secagg", f"server's SecAgg+ primitives are {self.prg!r}; this "
                              f"site's are {prg!r}: the sum could not be unmasked.")
        if tuple(self.features) != tuple(features):
            raise SiteRefusal("policy", f"server asks for features {list(self.features)}; this "
                              f"site's data configuration declares {list(features)}.")
        if self.init not in ("summary", "random"):
            raise SiteRefusal("protocol", f"unknown initialisation {self.init!r}.")
        if self.model not in MODELS:
            raise SiteRefusal("protocol", f"unknown model {self.model!r}; this site trains "
                              f"{list(MODELS)}.")
        if (self.model == "ae_kmeans") != bool(self.ae):
            raise SiteRefusal("protocol", "an autoencoder plan comes with model=ae_kmeans, and "
                              "only with it.")
        if self.ae:
            self._check_ae(policy)
        limits = [
            ("k", self.k, policy.max_k), ("n_init", self.n_init, policy.max_restarts),
            ("init_candidates", self.init_candidates, policy.max_init_candidates),
            ("init_rounds", self.init_rounds, policy.max_init_rounds),
            ("max_rounds", self.max_rounds, policy.max_lloyd_rounds),
        ]
        for name, value, limit in limits:
            if value > limit:
                raise SiteRefusal("policy", f"plan {name}={value} exceeds this site's limit "
                                  f"{limit}.")
        if self.k < 2 or self.n_init < 1 or self.max_rounds < 1:
            raise SiteRefusal("protocol", f"plan k={self.k}, n_init={self.n_init}, "
                              f"max_rounds={self.max_rounds} is not a k-means run.")
        if self.init == "summary" and (self.init_candidates < self.k or self.init_rounds < 1):
            raise SiteRefusal("protocol", "summary initialisation needs >= k candidates and "
                              ">= 1 round.")
        if self.init == "random" and (self.init_candidates or self.init_rounds):
            raise SiteRefusal("protocol", "random initialisation has no candidate rounds.")
        if self.num_sites < policy.min_sites:
            raise SiteRefusal("federation", f"the server plans {self.num_sites} sites; this "
                              f"site takes part with at least {policy.min_sites}.")
        if not self.dp:
            if policy.require_dp and policy.mechanism == "secagg+":
                raise SiteRefusal("policy", "the plan has no differential privacy; this site "
                                  "answers only DP runs (site.require_dp).")
            return
        dp = self.dp_plan()
        if policy.mechanism != "secagg+":
            raise SiteRefusal("policy", "a DP run needs SecAgg+: this site's noise share "
                              "protects its customers only inside the secure sum.")
        if len(dp.bounds) != len(self.features):
            raise SiteRefusal("protocol", f"the DP plan declares {len(dp.bounds)} bounds for "
                              f"{len(self.features)} features.")
        expected = {"moments": 1, "init": self.init_rounds, "lloyd": self.max_rounds,
                    "profile": 1}
        if self.n_init != 1 or self.init != "summary" or dp.rounds != expected \
                or set(dp.sigma) != set(expected):
            raise SiteRefusal("protocol", f"the DP plan's rounds {dp.rounds} / noise "
                              f"{sorted(dp.sigma)} do not match the run plan {expected} with "
                              "one centre set per round.")

    def ae_settings(self, *, device: str = "auto") -> Any:
        """Parse the autoencoder plan: ``(AESettings, n_params)`` (refusing a malformed one)."""
        from common.autoencoder import ARCHITECTURE_ID, AESettings

        try:
            raw = json.loads(self.ae)
            if not isinstance(raw, dict) or raw.get("architecture") != ARCHITECTURE_ID:
                got = raw.get("architecture") if isinstance(raw, dict) else raw
                raise ValueError(f"architecture {got!r}; this site builds {ARCHITECTURE_ID!r}")
            n_params = raw.get("n_params")
            if not isinstance(n_params, int) or isinstance(n_params, bool) or n_params < 1:
                raise ValueError(f"n_params={n_params!r}")
            settings = AESettings.from_plan_json(json.dumps(raw["settings"]), device=device)
        except (TypeError, ValueError, KeyError) as exc:
            raise SiteRefusal("protocol", f"malformed autoencoder plan ({exc}).") from exc
        return settings, n_params

    def phase_caps(self) -> dict[Phase, int]:
        """Most requests of each phase this plan allows a site to answer."""
        ae_rounds = self.ae_settings()[0].training_rounds if self.ae else 0
        return {Phase.MOMENTS: 1, Phase.AE_TRAIN: ae_rounds, Phase.EMBED: 1 if self.ae else 0,
                Phase.INIT: self.init_rounds, Phase.LLOYD: self.max_rounds, Phase.PROFILE: 1}

    @property
    def max_total_rounds(self) -> int:
        """Most rounds a site answers in this run (every phase at its cap)."""
        return sum(self.phase_caps().values())

    @property
    def embed_dim(self) -> int:
        """Dimension the clusters live in: the embedding (``ae_kmeans``) or 0 (features)."""
        return int(self.ae_settings()[0].embed_dim) if self.ae else 0

    def _check_ae(self, policy: SitePolicy) -> None:
        """Refuse an autoencoder plan outside the site's limits (the size is checked on use)."""
        settings, n_params = self.ae_settings()
        if self.dp:
            raise SiteRefusal("policy", "the autoencoder's training is not differentially "
                              "private yet; this site trains it only in runs without DP.")
        limits = [("autoencoder training rounds (candidates and moves)",
                   settings.training_rounds, policy.max_ae_rounds),
                  ("local epochs", settings.local_epochs, policy.max_ae_epochs),
                  ("local steps per round", settings.local_steps, policy.max_ae_local_steps),
                  ("autoencoder parameters", n_params, policy.max_ae_params),
                  ("embedding size", settings.embed_dim, policy.max_embed_dim)]
        for name, value, limit in limits:
            if value > limit:
                raise SiteRefusal("policy", f"plan {name}={value} exceeds this site's limit "
                                  f"{limit}.")

    def dp_plan(self) -> Any:
        """Parse the :class:`common.dp.DpPlan` (refusing a malformed or unknown one)."""
        from common.dp import MECHANISM_ID, DpPlan

        try:
            dp = DpPlan.from_json(self.dp)
        except (TypeError, ValueError, KeyError) as exc:
            raise SiteRefusal("protocol", f"malformed DP plan ({exc}).") from exc
        if dp.mechanism != MECHANISM_ID:
            raise SiteRefusal("protocol", f"DP mechanism {dp.mechanism!r}; this site adds "
                              f"{MECHANISM_ID!r}.")
        return dp


def _digest(*arrays: NDArray[np.float64]) -> str:
    h = hashlib.sha256()
    for arr in arrays:
        a = np.ascontiguousarray(arr, dtype="<f8")
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass
class SiteSession:
    """One run as this site has answered it so far; refuses any deviation from the plan.

    The state is a small JSON document (:meth:`to_json`) kept in the node's Flower context.

    Attributes
    ----------
    plan : str
        The plan pinned at the first request (canonical JSON), or ``""`` before it.
    counts : dict
        Requests admitted per phase.
    last : str
        Phase of the last admitted request.
    scaling : str
        Digest of the mean/std pinned at the first request that carries them.
    encoder : str
        ``ae_kmeans``: digest of the autoencoder weights pinned at the ``embed`` request; every
        later request must embed with exactly these.
    embedding_scaling : str
        ``ae_kmeans``: digest of the embedding's mean/std pinned at the first cluster request.
    ae_weights : str
        ``ae_kmeans``: digest of the weights of the last ``ae_train`` request; a SCAFFOLD
        anchor with a non-zero control must equal them.
    """

    plan: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    last: str = ""
    scaling: str = ""
    encoder: str = ""
    embedding_scaling: str = ""
    ae_weights: str = ""

    def to_json(self) -> str:
        """Serialise for the node's context."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> SiteSession:
        """Restore from :meth:`to_json` (an empty session when ``text`` is empty)."""
        if not text:
            return cls()
        return cls(**json.loads(text))

    def admit(
        self,
        plan: RunPlan,
        phase: Phase,
        instruction: list[NDArray[np.float64]],
        *,
        groups: int,
    ) -> None:
        """Admit one request or raise :class:`SiteRefusal`; on success, record it.

        Parameters
        ----------
        plan : RunPlan
            The plan announced with this request (already checked against the policy).
        phase : Phase
        instruction : list of ndarray
            ``[]`` for moments, ``[mean, std, centres]`` afterwards.
        groups : int
            Independent centre sets announced for the request.
        """
        announced = plan.to_json()
        if self.plan and announced != self.plan:
            raise SiteRefusal("protocol", "the run plan changed in the middle of the run.")
        done = {p: self.counts.get(p.value, 0) for p in Phase}
        if done[Phase.PROFILE]:
            raise SiteRefusal("protocol", "the run's profile round was already answered; "
                              "nothing more is computed in this run.")
        allowed = self._allowed_next(plan, done)
        if phase not in allowed:
            raise SiteRefusal("protocol", f"phase {phase.value!r} is not allowed after "
                              f"{self.last or 'the start of the run'!r} (allowed: "
                              f"{[p.value for p in allowed]}).")
        if phase is Phase.MOMENTS:
            if instruction or groups != 1:
                raise SiteRefusal("protocol", "the moments phase carries no arrays.")
        elif plan.ae:
            self._check_ae_arrays(plan, phase, instruction, groups=groups)
        else:
            self._check_arrays(plan, phase, instruction, groups=groups)
        self.plan = announced
        self.counts[phase.value] = done[phase] + 1
        self.last = phase.value

    @staticmethod
    def _allowed_next(plan: RunPlan, done: dict[Phase, int]) -> list[Phase]:
        """Phases that may come next: never back in the phase order, each within its cap.

        A site that dropped out of some rounds may rejoin at a later phase of the same run
        (it then answers fewer requests, never more): what bounds the server is the count of
        each phase, the order, and one profile round.
        """
        caps = plan.phase_caps()
        if plan.ae and not done[Phase.EMBED]:
            # The clusters live in the embedding: no cluster round before it is pinned.
            caps.update({Phase.INIT: 0, Phase.LLOYD: 0, Phase.PROFILE: 0})
        order = list(Phase)
        reached = max((i for i, p in enumerate(order) if done[p]), default=0)
        return [p for i, p in enumerate(order) if i >= reached and done[p] < caps[p]]

    def _check_ae_arrays(
        self, plan: RunPlan, phase: Phase, instruction: list[NDArray[np.float64]], *,
        groups: int,
    ) -> None:
        """``ae_kmeans``: [mean, std, weights] (+ [embedding mean, std, centres] later).

        ``ae_train`` with SCAFFOLD also carries [anchor weights, mean gradient there], each of
        the weights' length.
        """
        settings, n_params = plan.ae_settings()
        d, m = len(plan.features), settings.embed_dim
        arrays = [np.asarray(a, dtype=np.float64) for a in instruction]
        training = phase in (Phase.AE_TRAIN, Phase.EMBED)
        scaffold = phase is Phase.AE_TRAIN and settings.control_variates
        wanted = 5 if scaffold else 3 if training else 6
        if len(arrays) != wanted:
            raise SiteRefusal("protocol", f"phase {phase.value} of an autoencoder run needs "
                              f"{wanted} arrays; got {len(arrays)}.")
        if scaffold and any(a.shape != (n_params,) for a in arrays[3:]):
            raise SiteRefusal("protocol", f"phase {phase.value}: SCAFFOLD arrays of shapes "
                              f"{[a.shape for a in arrays[3:]]}; the plan allows "
                              f"[({n_params},), ({n_params},)].")
        mean, std, weights = arrays[:3]
        if mean.shape != (d,) or std.shape != (d,) or weights.shape != (n_params,):
            raise SiteRefusal("protocol", f"phase {phase.value}: arrays of shapes "
                              f"{[a.shape for a in arrays[:3]]}; the plan allows "
                              f"[({d},), ({d},), ({n_params},)].")
        if not all(np.all(np.isfinite(a)) for a in arrays) or not np.all(std > 0):
            raise SiteRefusal("protocol", "non-finite weights, centres or scaling, or a std <= 0.")
        self.scaling = _pinned(self.scaling, mean, std, "the global scaling changed within "
                               "the run; it is fixed by the moments round.")
        if phase is Phase.AE_TRAIN:
            if groups != 1:
                raise SiteRefusal("protocol", "autoencoder rounds have one group.")
            if scaffold and np.any(arrays[4] != 0) and _digest(arrays[3]) != self.ae_weights:
                # The site measures its gradient a second time at the anchor: only at the
                # weights it trained from last round, never at a point the server picks.
                raise SiteRefusal("protocol", "the SCAFFOLD anchor is not the weights of this "
                                  "site's previous training round; a gradient is computed "
                                  "only there.")
            self.ae_weights = _digest(weights)
            return
        encoder = _digest(weights)
        if phase is Phase.EMBED:
            if groups != 1:
                raise SiteRefusal("protocol", "the embed phase has one group.")
            self.encoder = encoder
            return
        if encoder != self.encoder:
            raise SiteRefusal("protocol", "the autoencoder weights differ from those the "
                              "embedding was measured with; they are fixed by the embed round.")
        emb_mean, emb_std, centres = arrays[3:]
        expected_centres, expected_groups = _planned_centres(plan, phase)
        if emb_mean.shape != (m,) or emb_std.shape != (m,) or \
                centres.shape != (expected_centres, m):
            raise SiteRefusal("protocol", f"phase {phase.value}: embedding arrays of shapes "
                              f"{[a.shape for a in arrays[3:]]}; the plan allows "
                              f"[({m},), ({m},), ({expected_centres}, {m})].")
        if groups != expected_groups:
            raise SiteRefusal("protocol", f"phase {phase.value}: {groups} centre groups; the "
                              f"plan has {expected_groups}.")
        if not np.all(emb_std > 0):
            raise SiteRefusal("protocol", "an embedding std <= 0.")
        self.embedding_scaling = _pinned(
            self.embedding_scaling, emb_mean, emb_std, "the embedding's scaling changed within "
            "the run; it is fixed by the first cluster round.")

    def _check_arrays(
        self, plan: RunPlan, phase: Phase, instruction: list[NDArray[np.float64]], *,
        groups: int,
    ) -> None:
        d = len(plan.features)
        if len(instruction) != 3:
            raise SiteRefusal("protocol", f"phase {phase.value} needs [mean, std, centres]; "
                              f"got {len(instruction)} arrays.")
        mean, std, centres = (np.asarray(a, dtype=np.float64) for a in instruction)
        expected_centres, expected_groups = _planned_centres(plan, phase)
        if mean.shape != (d,) or std.shape != (d,) or centres.shape != (expected_centres, d):
            raise SiteRefusal("protocol", f"phase {phase.value}: arrays of shapes "
                              f"{[mean.shape, std.shape, centres.shape]}; the plan allows "
                              f"[({d},), ({d},), ({expected_centres}, {d})].")
        if groups != expected_groups:
            raise SiteRefusal("protocol", f"phase {phase.value}: {groups} centre groups; the "
                              f"plan has {expected_groups}.")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))
                and np.all(np.isfinite(centres)) and np.all(std > 0)):
            raise SiteRefusal("protocol", "non-finite centres or scaling, or a std <= 0.")
        self.scaling = _pinned(self.scaling, mean, std, "the global scaling changed within the "
                               "run; it is fixed by the moments round.")


def _planned_centres(plan: RunPlan, phase: Phase) -> tuple[int, int]:
    """Centres and centre groups the plan allows in a cluster phase."""
    return {
        Phase.INIT: (plan.init_candidates, 1),
        Phase.LLOYD: (plan.k * plan.n_init, plan.n_init),
        Phase.PROFILE: (plan.k, 1),
    }[phase]


def _pinned(pinned: str, mean: NDArray[np.float64], std: NDArray[np.float64],
            changed: str) -> str:
    """Return the digest of a scaling, refusing one that differs from the pinned digest."""
    digest = _digest(mean, std)
    if pinned and digest != pinned:
        raise SiteRefusal("protocol", changed)
    return digest


def policy_summary(policy: SitePolicy) -> str:
    """One line describing the policy (for progress output and the site log)."""
    dp = (f"DP required, budget eps={policy.dp_epsilon:g} delta={policy.dp_delta:g}"
          if policy.require_dp else "DP optional")
    return (f"mechanism={policy.mechanism}, {dp}, min_sites={policy.min_sites}, "
            f"min_customers={policy.min_customers}, k<={policy.max_k}, "
            f"restarts<={policy.max_restarts}, candidates<={policy.max_init_candidates}, "
            f"autoencoder rounds<={policy.max_ae_rounds}, "
            f"rounds/run<={policy.max_rounds_per_run}, rounds/day<={policy.max_rounds_per_day}, "
            f"dropouts {'tolerated' if policy.tolerate_dropouts else 'stop the run'}")


def site_policy_from_config(node: Any, *, secagg: bool | None,
                            dp: tuple[float, float] | None = None) -> SitePolicy:
    """Build the sites' :class:`SitePolicy` from a ``site`` config node.

    Parameters
    ----------
    node : DictConfig or mapping
        The ``site`` group.
    secagg : bool or None
        The simulation's ``privacy`` choice, used when ``site.mechanism`` is null (in a local
        simulation one operator configures both sides). ``None``: a site on its own, which
        requires SecAgg+ unless its configuration says otherwise.
    dp : (epsilon, delta) or None
        The run's DP target (``privacy=secagg_dp``) or None (no DP), used when
        ``site.require_dp`` / ``site.dp_epsilon`` / ``site.dp_delta`` are null. Only meaningful
        with ``secagg`` not None.
    """
    container: Any = OmegaConf.to_container(node, resolve=True) \
        if isinstance(node, DictConfig) else node
    values = {str(k): v for k, v in dict(container).items()}
    if values.get("mechanism") is None:
        values["mechanism"] = "none" if secagg is False else "secagg+"
    standalone = secagg is None
    if values.get("require_dp") is None:
        values["require_dp"] = True if standalone else dp is not None
    for key, index in (("dp_epsilon", 0), ("dp_delta", 1)):
        if values.get(key) is None:
            if dp is not None:
                values[key] = dp[index]
            else:
                values.pop(key, None)
    try:
        return SitePolicy.from_mapping(values, source="site policy (site.*)")
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
