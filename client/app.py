"""The site's Flower ClientApp: answers every round with statistics only.

Each fit instruction names a phase (:mod:`common.protocol`) and carries public arrays (global
scaling, centres). The site computes the phase's statistics on its own records, checks their
public shapes, and (with SecAgg+) encodes them for an exact secure sum. The reply always has
``num_examples=1`` and empty metrics: those travel in clear beside SecAgg+'s masked vector.
Evaluate and query messages bypass SecAgg+, so the site answers none of them with data.

Every message the site sends is recorded in its audit log (:mod:`client.audit`).
"""

from __future__ import annotations

import hashlib
import importlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType
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

from client.audit import COMPUTE_RECORD, PRIVACY_RECORD, make_boundary_mod
from client.audit_chain import HeadStore
from client.gate import SiteData
from client.secagg_guard import make_secagg_guard_mod
from client.secagg_prekeys import next_setup_mod
from client.site_files import SiteFiles, has_stable_identity, site_id
from common import mask_prg, secagg_primitives
from common.autoencoder import AESettings, TabularLayout, embed, local_train, standardise
from common.autoencoder import n_params as ae_param_count
from common.dp import NoiseSource, epsilon_spent, noisy_round
from common.errors import ConfigError, ProtocolError, SiteRefusal
from common.features import FeatureSpec
from common.kmeans import assign, compute_stats
from common.protocol import GROUPS_KEY, PHASE_KEY, PLAN_KEY, Phase, parse_phase, reply_shapes
from common.scaling import GlobalScaler, compute_moments
from common.secure_sum import (
    CLIPPING_RANGE,
    MAX_ABS_VALUE,
    MAX_WEIGHT,
    MODULUS_RANGE,
    SecAggPlusSumCodec,
    check_no_wrap,
)
from common.segment_model import ProfileStats
from common.site_policy import RunPlan, SitePolicy, SiteSession

_SECAGG_MOD = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
SECAGG_MODULES = (_SECAGG_MOD,
                  importlib.import_module("flwr.common.secure_aggregation.secaggplus_utils"))
"""Flower modules whose SecAgg+ mask generator this site replaces (see common.mask_prg)."""
PRIMITIVE_MODULES = (_SECAGG_MOD,
                     importlib.import_module("flwr.common.secure_aggregation.crypto.shamir"))
"""... and whose key agreement and secret sharing it replaces (common.secagg_primitives)."""
mask_prg.install(*SECAGG_MODULES)
secagg_primitives.install(*PRIMITIVE_MODULES)


def secagg_suite() -> str:
    """Return the SecAgg+ suite in force here (masks, secret sharing, key agreement)."""
    return secagg_primitives.suite_of(SECAGG_MODULES, PRIMITIVE_MODULES)


SESSION_RECORD = "fedseg.site"
"""Key of the site's per-run session (what it has answered) in the node's context."""




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


def ae_site_statistics(
    site: SiteData,
    phase: Phase,
    instruction: Sequence[NDArray[np.float64]],
    *,
    settings: AESettings,
    n_params: int,
    groups: int = 1,
    train_round: int = 0,
) -> tuple[list[NDArray[np.float64]], dict[str, float]]:
    """Compute a site's reply in a ``model=ae_kmeans`` phase (unencoded), shapes checked.

    Parameters
    ----------
    site : SiteData
    phase : Phase
        Any phase but ``moments`` (the same as :func:`site_statistics`).
    instruction : sequence of ndarray
        ``[mean, std, weights]`` (ae_train, embed; ``ae_train`` with SCAFFOLD adds ``[anchor
        weights, all sites' mean gradient there]``) or ``[mean, std, weights, embedding mean,
        embedding std, centres]`` (init, lloyd, profile): already admitted by the session.
    settings : AESettings
        From the run plan, with the site's own ``device``.
    n_params : int
        Length of the weight vector announced in the plan.
    groups : int, default=1
        Independent centre sets (parallel Lloyd runs).
    train_round : int, default=0
        Index of this ``ae_train`` request in the run: seeds the mini-batch order and sets the
        bottleneck's temperature.

    Returns
    -------
    reply : list of ndarray
        float64 arrays in the layout of :func:`common.protocol.reply_shapes`.
    compute : dict
        Wall and CPU seconds of the computation (kept in the site's audit log, never sent).
    """
    wall, cpu = time.perf_counter(), time.process_time()
    layout = TabularLayout.from_features(site.features)
    arrays = [np.asarray(a, dtype=np.float64) for a in instruction]
    mean, std, weights = arrays[:3]
    x = standardise(site.transformed, layout, mean, std)
    m, d = settings.embed_dim, len(site.features)
    if phase is Phase.AE_TRAIN:
        anchor, control = arrays[3:5] if settings.control_variates else (None, None)
        trained = local_train(weights, x, layout=layout, settings=settings,
                              rng=np.random.default_rng([settings.seed, train_round]),
                              train_round=train_round, anchor=anchor, control=control)
        n = float(trained.n_records)
        reply = [n * trained.params, np.array([n]), np.array([trained.loss_sum])]
        if trained.gradient_sum is not None:  # SCAFFOLD: sum over customers of gradients
            reply.append(trained.gradient_sum)
        if trained.code_counts is not None and trained.code_loss_sums is not None:
            # Per-code counts and loss sums only in the rounds whose statistics the server's
            # rules read (this site's own count decides); zeros of the same shapes otherwise.
            if settings.code_statistics_released(train_round + 1):
                reply += [trained.code_counts, trained.code_loss_sums]
            else:
                reply += [np.zeros(m), np.zeros(m)]
        n_centres = 0
    else:
        z = embed(weights, x, layout=layout, settings=settings)
        if phase is Phase.EMBED:
            reply = compute_moments(z)
            n_centres = 0
        else:
            emb_mean, emb_std, centres = arrays[3:]
            scaled_z = GlobalScaler(mean=emb_mean, std=emb_std, count=0.0).transform(z)
            n_centres = centres.shape[0]
            if groups < 1 or n_centres % groups:
                raise ProtocolError(f"{n_centres} centres cannot form {groups} equal groups.")
            if phase is Phase.PROFILE:
                labels, d2 = assign(scaled_z, centres)
                scaled = GlobalScaler(mean=mean, std=std, count=0.0).transform(site.transformed)
                reply = ProfileStats.compute_labelled(site.raw, scaled, labels, d2,
                                                      n_segments=n_centres).to_arrays()
            else:
                blocks = [compute_stats(scaled_z, block).to_arrays()
                          for block in np.split(centres, groups)]
                reply = [np.concatenate(parts) for parts in zip(*blocks, strict=True)]
    expected = reply_shapes(phase, n_centres=n_centres, n_features=m, n_params=n_params,
                            n_profile=d, control_variates=settings.control_variates,
                            code_statistics=m if settings.code_statistics else 0)
    got = [a.shape for a in reply]
    if got != expected:  # a programming error: never send a non-public shape
        raise ProtocolError(f"reply shapes {got} differ from the public layout {expected}.")
    compute = {"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu}
    return [np.asarray(a, dtype=np.float64) for a in reply], compute


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


def check_encodable(
    arrays: Sequence[NDArray[np.float64]], features: tuple[FeatureSpec, ...], *, what: str
) -> None:
    """Refuse statistics the secure-sum encoding cannot carry, naming the feature and the fix.

    Parameters
    ----------
    arrays : sequence of ndarray
        Statistics about to be encoded; a 2-D array's columns are the features.
    features : tuple of FeatureSpec
    what : str
        What the arrays are, for the message (e.g. ``"lloyd statistics"``).
    """
    d = len(features)
    for arr in arrays:
        values = np.abs(np.asarray(arr, dtype=np.float64))
        bad = ~np.isfinite(values) | (values >= MAX_ABS_VALUE)
        if not bad.any():
            continue
        if values.ndim == 2 and values.shape[1] == d:  # (centres or 1, features)
            column = int(np.argwhere(bad)[0][1])
            name = features[column].name
            raise SiteRefusal(
                "range",
                f"feature {name!r}: this site's {what} reach {float(values.max()):.3g} (limit of "
                f"the secure-sum encoding: {MAX_ABS_VALUE:.3g}). Declare clip bounds for "
                f"{name!r} in the site's data configuration (data.clip, e.g. "
                f"+data.clip.{name}=[low,high] on the command line) or transform it (log1p).",
            )
        raise SiteRefusal("range", f"this site's {what} hold a count or cost of "
                          f"{float(values.max()):.3g}, beyond the encoding's limit "
                          f"{MAX_ABS_VALUE:.3g}; the scaling sent by the server is degenerate.")


def check_site_range(site: SiteData) -> None:
    """Before the first answer: every raw or transformed sum of squares this site will send fits.

    The profile round sends raw sums of squares per segment; one customer with a huge (valid)
    value would overflow them at the last round. Checked at the moments round instead, when the
    run can still be fixed.
    """
    raw_sq = np.einsum("ij,ij->j", site.raw, site.raw)
    t_sq = np.einsum("ij,ij->j", site.transformed, site.transformed)
    check_encodable([raw_sq[None, :], t_sq[None, :]], site.features,
                    what="sums of squares")


class SiteClient(NumPyClient):
    """NumPyClient answering fit instructions with (encoded) statistics, within its policy.

    Parameters
    ----------
    site : SiteData or callable
        The site's records, or a function returning them, called at the first message that
        computes (so SecAgg+ key-exchange stages never read the data, and consent is checked
        when the round's statistics are computed).
    context : flwr.app.Context
        The node's context (holds the SecAgg+ set-up of the round and the site's session).
    policy : SitePolicy
        The site's own policy (never taken from the server or the run config).
    site_root : str or Path, optional
        The site's directory (round and privacy ledgers); ``None`` keeps no ledger (unit
        tests) and answers no DP run.
    noise_seed : bytes, optional
        Tests only: seeds the site's DP noise. ``None`` (always, outside tests) draws a fresh
        key from the operating system for every reply.
    """

    def __init__(
        self,
        site: SiteData | Callable[[], SiteData],
        context: Context,
        *,
        policy: SitePolicy,
        site_root: str | Path | None = None,
        noise_seed: bytes | None = None,
    ) -> None:
        self._site = site
        self.context = context
        self.policy = policy
        self.secagg = policy.mechanism == "secagg+"
        self.files = None if site_root is None else SiteFiles(
            Path(site_root), site_id(context), stable_identity=has_stable_identity(context))
        self.noise_seed = noise_seed
        self._done_before: dict[str, int] = {}

    @property
    def site(self) -> SiteData:
        """The site's records (loaded through the site's loader on first use)."""
        if not isinstance(self._site, SiteData):
            self._site = self._site()
        return self._site

    def _session(self) -> SiteSession:
        record = self.context.state.config_records.get(SESSION_RECORD)
        return SiteSession.from_json(None if record is None else str(record["session"]))

    def admit(self, config: dict[str, Scalar], parameters: NDArrays) -> tuple[Phase, int]:
        """Check one request against the policy and the run so far; record it if admitted."""
        plan = RunPlan.from_json(config.get(PLAN_KEY))
        try:
            phase = parse_phase(config.get(PHASE_KEY))
            groups = int(config.get(GROUPS_KEY, 1))
        except (TypeError, ValueError) as exc:
            raise SiteRefusal("protocol", str(exc)) from exc
        plan.check_against(self.policy, features=tuple(f.name for f in self.site.features),
                           prg=secagg_suite())
        if plan.ae:
            settings, announced = plan.ae_settings()
            try:
                own = ae_param_count(TabularLayout.from_features(self.site.features), settings)
            except ConfigError as exc:
                raise SiteRefusal("policy", f"this site's features cannot feed the "
                                  f"autoencoder: {exc}") from exc
            if own != announced:
                raise SiteRefusal("protocol", f"the plan announces {announced} autoencoder "
                                  f"parameters; this site's features give {own}.")
        customers = self.site.raw.shape[0]
        if customers < self.policy.min_customers:
            raise SiteRefusal("policy", f"this site holds {customers} consenting customers; its "
                              f"policy requires {self.policy.min_customers} (site.min_customers) "
                              "before it contributes to any sum.")
        if plan.dp and customers > self.policy.max_customers:
            raise SiteRefusal("policy", f"this site holds more than site.max_customers="
                              f"{self.policy.max_customers} customers, the public cap its DP "
                              "encoding checks are based on; raise it in the site's policy.")
        session = self._session()
        done = dict(session.counts)
        if not done and self.files is not None:
            self._check_rounds_left_today(plan)
        session.admit(plan, phase, [np.asarray(a) for a in parameters], groups=groups)
        if plan.dp:
            self._check_budget(plan, done)
        if self.files is not None:
            self.files.admit_round(max_per_day=self.policy.max_rounds_per_day)
        self.context.state.config_records[SESSION_RECORD] = ConfigRecord(
            {"session": session.to_json()})
        self._done_before = done
        return phase, groups

    def _check_rounds_left_today(self, plan: RunPlan) -> None:
        """At a run's first request: refuse a run that cannot finish within today's rounds.

        ``site.max_rounds_per_day`` counts every round answered in the last 24 hours; a run
        whose plan allows more rounds than are left would be refused part-way, after work the
        federation then throws away, so it is refused before anything is computed.
        """
        assert self.files is not None
        limit = self.policy.max_rounds_per_day
        left = limit - self.files.rounds_in_last_day()
        if plan.max_total_rounds > left:
            raise SiteRefusal("budget", f"this run plans up to {plan.max_total_rounds} rounds; "
                              f"{max(0, left)} of this site's {limit} a day "
                              "(site.max_rounds_per_day) are left in the last 24 hours. Run "
                              "it later, with fewer rounds, or raise the site's limit.")

    def _check_budget(self, plan: RunPlan, done: dict[str, int]) -> list[float]:
        """Refuse unless the ledger plus every round this run still plans fits the budget.

        The site's own accountant (``dp_accounting``, :func:`common.dp.epsilon_spent`) composes
        every release in its ledger with every round this run still plans, this one included.
        If that exceeds ``(site.dp_epsilon, site.dp_delta)`` the request is refused before
        anything is computed -- at the run's first request when the plan itself is too
        expensive. Returns the ledger's noise multipliers.
        """
        if self.files is None:
            raise SiteRefusal("policy", "this site keeps no privacy ledger; it answers no DP "
                              "run.")
        if not self.files.stable_identity:
            raise SiteRefusal("policy", "this site has no stable name for its privacy ledger "
                              "(node config fedseg-site-name); a node id changes when the node "
                              "re-registers and would start a fresh budget.")
        dp = plan.dp_plan()
        spent = self.files.privacy_events()
        remaining = [dp.sigma[p] for p, n in dp.rounds.items()
                     for _ in range(max(0, n - done.get(p, 0)))]
        budget_eps, budget_delta = self.policy.dp_epsilon, self.policy.dp_delta
        needed = epsilon_spent(spent + remaining, budget_delta)
        if needed > budget_eps * (1 + 1e-9):
            already = epsilon_spent(spent, budget_delta)
            raise SiteRefusal(
                "budget", f"answering the rest of this run would bring this site's privacy "
                f"loss to epsilon={needed:.4f} at delta={budget_delta:g}; its budget is "
                f"epsilon={budget_eps:g} (site.dp_epsilon) and {already:.4f} is already spent "
                f"over {len(spent)} release(s) (ledger {self.files.privacy_ledger}).")
        return spent

    def charge_release(self, plan: RunPlan, phase: Phase) -> None:
        """Record a computed release in the ledger (on disk) just before it is sent.

        Under an exclusive lock the budget is checked again (another run of this site may have
        spent in between) and the release appended, so concurrent runs cannot overspend; a
        request refused for any reason before this point has cost nothing.
        """
        assert self.files is not None
        dp = plan.dp_plan()
        sigma = dp.sigma[phase.value]
        budget_eps, budget_delta = self.policy.dp_epsilon, self.policy.dp_delta
        with self.files.privacy_lock():
            spent = self._check_budget(plan, self._done_before)
            after = epsilon_spent([*spent, sigma], budget_delta)
            self.files.record_release({
                "at": time.time(),
                "run": hashlib.sha256(plan.to_json().encode()).hexdigest()[:16],
                "phase": phase.value, "noise_multiplier": sigma, "epsilon_after": after,
                "delta": budget_delta})
        self.context.state.config_records[PRIVACY_RECORD] = ConfigRecord({
            "epsilon_spent": after, "delta": budget_delta, "epsilon_budget": budget_eps,
            "noise_multiplier": sigma})

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict]:
        """Return the statistics of the requested phase, ``num_examples=1``, no metrics."""
        phase, groups = self.admit(config, parameters)
        codec = codec_from_secagg_state(self.context) if self.secagg else None
        plan = RunPlan.from_json(config.get(PLAN_KEY))
        if plan.dp:
            if codec is None:
                raise SiteRefusal("policy", "a DP run needs SecAgg+ (site.mechanism).")
            # Rely on no more sites than both the plan and this SecAgg+ round announce: a
            # server that inflates either would otherwise thin every site's noise share.
            state = self.context.state.config_records[RECORD_KEY_STATE]
            sites = min(plan.num_sites, int(state.get("sample_num", 0)))  # type: ignore[arg-type]
            honest = self.policy.relied_sites(sites)
            words, _ = noisy_round(phase, plan.dp_plan(), transformed=self.site.transformed,
                                   features=self.site.features,
                                   instruction=[np.asarray(a) for a in parameters],
                                   honest=honest, noise=NoiseSource(self.noise_seed),
                                   limb_bits=codec.limb_bits,
                                   max_customers=self.policy.max_customers)
            encoded = codec.encode_words(words)
            self.charge_release(plan, phase)
            return encoded, 1, {}
        if phase is Phase.MOMENTS:
            check_site_range(self.site)
        if plan.ae and phase is not Phase.MOMENTS:
            settings, n_params = plan.ae_settings(device=self.policy.device)
            reply, compute = ae_site_statistics(
                self.site, phase, [np.asarray(a) for a in parameters], settings=settings,
                n_params=n_params, groups=groups,
                train_round=self._done_before.get(Phase.AE_TRAIN.value, 0))
            self.context.state.config_records[COMPUTE_RECORD] = ConfigRecord(
                {"seconds": compute["seconds"], "cpu_seconds": compute["cpu_seconds"]})
            check_encodable(reply, (), what=f"{phase.value} statistics")
            if codec is not None:
                reply = codec.encode(reply)
            return reply, 1, {}
        reply = site_statistics(self.site, phase, parameters, groups=groups)
        # Moments are 1-D per feature: shown as one row so a refusal names the feature.
        check_encodable([a[None, :] if phase is Phase.MOMENTS and a.shape == (d,) else a
                         for a in reply for d in [len(self.site.features)]],
                        self.site.features, what=f"{phase.value} statistics")
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
    policy: SitePolicy,
    site_root: str | Path,
    extra_mods: Sequence[Mod] = (),
    noise_seed: bytes | None = None,
    head_store: Callable[[Context], HeadStore | None] | None = None,
) -> ClientApp:
    """Build the site ClientApp.

    Parameters
    ----------
    site_loader : callable
        ``context -> SiteData`` for the node running the app.
    policy : SitePolicy
        The site's own policy: with ``mechanism="secagg+"`` the app refuses plain rounds and
        checks every SecAgg+ stage (:mod:`client.secagg_guard`) before Flower's mod answers it.
    site_root : str or Path
        The site's directory: audit log, site log, round ledger (:class:`SiteFiles`).
    extra_mods : sequence of Mod
        Outermost mods (tests record every outgoing message with one).
    noise_seed : bytes, optional
        Tests only: seeds the sites' DP noise (no configuration key reaches it).
    head_store : callable, optional
        ``context -> site store`` keeping the head hash of the site's audit log.
    """

    def client_fn(context: Context) -> Client:
        return SiteClient(lambda: site_loader(context), context, policy=policy,
                          site_root=site_root, noise_seed=noise_seed).to_client()

    mods: list[Mod] = [*extra_mods, make_boundary_mod(site_root, mechanism=policy.mechanism,
                                                  head_store=head_store)]
    if policy.mechanism == "secagg+":
        mods.extend([require_secagg_mod, next_setup_mod, make_secagg_guard_mod(policy),
                     secaggplus_mod])
    return ClientApp(client_fn=client_fn, mods=mods)
