"""The site's check of every SecAgg+ request, before Flower's ``secaggplus_mod`` answers it.

Flower 1.42's ``secaggplus_mod`` trusts the server: it answers the unmask stage for any
``active`` and ``dead`` lists, even overlapping ones, so a server that lists a site in both
receives that site's mask-seed share *and* its key share from every other neighbour and unmasks
the site's statistics alone (reproduction in docs/SECURITY.md). This mod keeps what the site saw
at each stage of the round and refuses, with a code, any request that

* sets up the round with other parameters than the site's policy requires (fewer sites than
  ``min_sites``, a neighbourhood smaller than :meth:`SitePolicy.required_secagg`, a threshold
  below the policy's rule, another clipping range, weight, modulus, or a quantisation range
  that can wrap);
* forwards a neighbourhood of another size than announced, without the site's own keys, with
  repeated keys, or ciphertexts from sites outside it;
* asks to unmask with overlapping lists, the site itself listed dead, sites it never exchanged
  shares with, more dead neighbours than the policy tolerates (none by default), or fewer active
  ones than the threshold.
"""

from __future__ import annotations

import json
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from common.errors import SiteRefusal
from common.secure_sum import CLIPPING_RANGE, MAX_WEIGHT, MODULUS_RANGE, SITE_BITS
from common.site_policy import SitePolicy

GUARD_RECORD = "fedseg.secagg_guard"
"""Key of the guard's per-run state in the node's context."""


def _refuse(detail: str) -> SiteRefusal:
    return SiteRefusal("secagg", detail)


def _int(configs: ConfigRecord, key: str) -> int:
    value = configs.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _refuse(f"setup value {key!r}={value!r} is not an integer.")
    return value


def _int_list(configs: ConfigRecord, key: str) -> list[int]:
    value = configs.get(key)
    if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise _refuse(f"{key} is not a list of node ids.")
    return [int(v) for v in value]


def check_setup(policy: SitePolicy, configs: ConfigRecord) -> dict[str, Any]:
    """Check the set-up stage against the policy; return what the guard remembers."""
    sites = _int(configs, Key.SAMPLE_NUMBER)
    shares = _int(configs, Key.SHARE_NUMBER)
    threshold = _int(configs, Key.THRESHOLD)
    target = _int(configs, Key.TARGET_RANGE)
    modulus = _int(configs, Key.MOD_RANGE)
    clipping = configs.get(Key.CLIPPING_RANGE)
    weight = configs.get(Key.MAX_WEIGHT)
    if sites < policy.min_sites:
        raise SiteRefusal("federation", f"SecAgg+ round with {sites} sites; this site takes part "
                          f"with at least {policy.min_sites} (site.min_sites).")
    if sites > 2**SITE_BITS:
        raise _refuse(f"{sites} sites exceed the encoding's limit {2**SITE_BITS}.")
    if clipping != CLIPPING_RANGE or weight != MAX_WEIGHT or modulus != MODULUS_RANGE:
        raise _refuse(f"clipping_range={clipping!r}, max_weight={weight!r}, "
                      f"mod_range={modulus}; this site requires {CLIPPING_RANGE}, "
                      f"{MAX_WEIGHT}, {MODULUS_RANGE}.")
    if target < 2 or target & (target - 1) or (sites + 1) * target > MODULUS_RANGE:
        raise _refuse(f"quantization_range={target} with {sites} sites can wrap the modulus.")
    need_shares, _ = policy.required_secagg(sites)
    if not min(need_shares, sites) <= shares <= sites:
        raise _refuse(f"neighbourhood of {shares} for {sites} sites; this site's policy needs at "
                      f"least {min(need_shares, sites)} (collusion {policy.collusion_fraction:.2f}"
                      f", failure 2**-{policy.failure_log2}).")
    if policy.tolerate_dropouts:
        least = shares - (shares - 1) // 3
        if threshold < least or threshold > shares:
            raise _refuse(f"threshold {threshold} of {shares}; this site needs {least}..{shares} "
                          "so that a lying server cannot collect both shares of a site.")
    elif threshold != shares:
        raise _refuse(f"threshold {threshold} of {shares}; this site does not tolerate "
                      "dropouts and requires every neighbour's share (threshold = shares).")
    return {"stage": Stage.SETUP, "sites": sites, "shares": shares, "threshold": threshold}


def check_share_keys(
    policy: SitePolicy, seen: dict[str, Any], configs: ConfigRecord, own: int
) -> dict[str, Any]:
    """Check the neighbourhood the server forwards (public keys of every neighbour)."""
    try:
        neighbours = sorted(int(k) for k in configs.keys() if k != Key.STAGE)
    except ValueError as exc:
        raise _refuse("neighbour ids are not node ids.") from exc
    keys = [configs[str(n)] for n in neighbours]
    flat = [k for pair in keys if isinstance(pair, list) for k in pair]
    if own not in neighbours:
        raise _refuse("the forwarded neighbourhood does not contain this site.")
    size, shares, threshold = len(neighbours), seen["shares"], seen["threshold"]
    least = shares if not policy.tolerate_dropouts else threshold
    if not least <= size <= shares:
        raise _refuse(f"neighbourhood of {size} sites forwarded; the set-up announced {shares} "
                      f"(at least {least} required).")
    if len(flat) != 2 * size or len(set(flat)) != len(flat):
        raise _refuse("forwarded public keys are missing or repeated.")
    return {**seen, "stage": Stage.SHARE_KEYS, "neighbours": neighbours}


def check_collect(
    policy: SitePolicy, seen: dict[str, Any], configs: ConfigRecord, own: int
) -> dict[str, Any]:
    """Check whose encrypted shares the server forwards."""
    sources = _int_list(configs, Key.SOURCE_LIST)
    neighbours = set(seen["neighbours"])
    if len(set(sources)) != len(sources) or own in sources or not set(sources) <= neighbours:
        raise _refuse("forwarded shares come from repeated sites, from this site itself, or "
                      "from sites outside its neighbourhood.")
    if not policy.tolerate_dropouts and len(sources) != len(neighbours) - 1:
        raise _refuse(f"shares from {len(sources)} of {len(neighbours) - 1} neighbours; this "
                      "site does not tolerate dropouts.")
    return {**seen, "stage": Stage.COLLECT_MASKED_VECTORS, "sources": sorted(sources)}


def check_unmask(
    policy: SitePolicy, seen: dict[str, Any], configs: ConfigRecord, own: int
) -> dict[str, Any]:
    """Check the active/dead lists before any key share is revealed."""
    active = _int_list(configs, Key.ACTIVE_NODE_ID_LIST)
    dead = _int_list(configs, Key.DEAD_NODE_ID_LIST)
    if len(set(active)) != len(active) or len(set(dead)) != len(dead):
        raise _refuse("the unmask request repeats a site.")
    if set(active) & set(dead):
        raise _refuse(f"the unmask request lists {len(set(active) & set(dead))} site(s) as both "
                      "active and dead: answering would reveal both of their mask secrets.")
    if own in dead or own not in active:
        raise _refuse("the unmask request lists this site as dead or not active.")
    known = set(seen["sources"]) | {own}
    if not (set(active) | set(dead)) <= known:
        raise _refuse("the unmask request names sites this site exchanged no shares with.")
    tolerated = seen["shares"] - seen["threshold"] if policy.tolerate_dropouts else 0
    if len(dead) > tolerated:
        raise _refuse(f"{len(dead)} dead neighbours listed; this site tolerates {tolerated}.")
    if len(active) < seen["threshold"]:
        raise _refuse(f"{len(active)} active neighbours; the threshold is {seen['threshold']}.")
    return {**seen, "stage": Stage.UNMASK}


_EXPECTED_BEFORE = {
    Stage.SHARE_KEYS: Stage.SETUP,
    Stage.COLLECT_MASKED_VECTORS: Stage.SHARE_KEYS,
    Stage.UNMASK: Stage.COLLECT_MASKED_VECTORS,
}


def _remember(context: Context, seen: dict[str, Any]) -> None:
    context.state.config_records[GUARD_RECORD] = ConfigRecord({"seen": json.dumps(seen)})


def make_secagg_guard_mod(policy: SitePolicy) -> Mod:
    """Return the mod that checks each SecAgg+ stage; place it right before ``secaggplus_mod``.

    Parameters
    ----------
    policy : SitePolicy
        The site's own policy.
    """

    def secagg_guard_mod(message: Message, context: Context,
                         call_next: ClientAppCallable) -> Message:
        if message.metadata.message_type != MessageType.TRAIN or not message.has_content() or \
                RECORD_KEY_CONFIGS not in message.content.config_records:
            return call_next(message, context)
        configs = message.content.config_records[RECORD_KEY_CONFIGS]
        stage = configs.get(Key.STAGE)
        record = context.state.config_records.get(GUARD_RECORD)
        seen: dict[str, Any] = json.loads(str(record["seen"])) if record else {}
        try:
            if stage == Stage.SETUP:
                seen = check_setup(policy, configs)
            else:
                if stage not in _EXPECTED_BEFORE or seen.get("stage") != _EXPECTED_BEFORE[stage]:
                    raise _refuse(f"stage {stage!r} after {seen.get('stage')!r}.")
                own = message.metadata.dst_node_id
                check = {Stage.SHARE_KEYS: check_share_keys,
                         Stage.COLLECT_MASKED_VECTORS: check_collect,
                         Stage.UNMASK: check_unmask}[stage]
                seen = check(policy, seen, configs, own)
            _remember(context, seen)
            return call_next(message, context)
        except Exception:
            # A refused or failed stage ends this round for the site: only a new set-up is
            # answered next, never a second attempt at the same or a later stage.
            _remember(context, {"stage": "refused"})
            raise

    return secagg_guard_mod
