"""A site's policy and session: every deviation from the agreed run is refused before computing."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import SiteRefusal
from common.protocol import Phase
from common.site_policy import PROTOCOL_ID, RunPlan, SitePolicy, SiteSession

FEATURES = ("recency", "frequency", "monetary")
PRG = "chacha20-sha256/1"


def _plan(**changes) -> RunPlan:
    base = {"features": FEATURES, "k": 3, "n_init": 2, "init": "summary", "init_candidates": 30,
            "init_rounds": 2, "max_rounds": 4, "num_sites": 5, "prg": PRG}
    base.update(changes)
    return RunPlan(**base)


def _arrays(n_centres: int, *, mean=0.0, std=1.0) -> list[np.ndarray]:
    d = len(FEATURES)
    return [np.full(d, mean), np.full(d, std), np.zeros((n_centres, d))]


def _honest_run(session: SiteSession, plan: RunPlan, *, lloyd: int = 2) -> None:
    session.admit(plan, Phase.MOMENTS, [], groups=1)
    for _ in range(plan.init_rounds):
        session.admit(plan, Phase.INIT, _arrays(plan.init_candidates), groups=1)
    for _ in range(lloyd):
        session.admit(plan, Phase.LLOYD, _arrays(plan.k * plan.n_init), groups=plan.n_init)
    session.admit(plan, Phase.PROFILE, _arrays(plan.k), groups=1)


def test_a_site_that_missed_rounds_rejoins_later_without_gaining_requests():
    plan, session = _plan(), SiteSession()
    session.admit(plan, Phase.LLOYD, _arrays(6), groups=2)  # dropped out of moments and init
    with pytest.raises(SiteRefusal, match="not allowed"):
        session.admit(plan, Phase.MOMENTS, [], groups=1)


def test_an_honest_run_is_admitted_and_survives_serialisation():
    plan, session = _plan(), SiteSession()
    session.admit(plan, Phase.MOMENTS, [], groups=1)
    session = SiteSession.from_json(session.to_json())
    _rest = SiteSession.from_json(session.to_json())
    for _ in range(2):
        _rest.admit(plan, Phase.INIT, _arrays(30), groups=1)
    _rest.admit(plan, Phase.LLOYD, _arrays(6), groups=2)
    _rest.admit(plan, Phase.PROFILE, _arrays(3), groups=1)
    assert _rest.counts == {"moments": 1, "init": 2, "lloyd": 1, "profile": 1}


def test_the_issue_attack_moments_then_many_profile_rounds_is_refused():
    # The recorded attack: one moments round, then profile rounds of up to 3,510 centres.
    plan, session = _plan(), SiteSession()
    session.admit(plan, Phase.MOMENTS, [], groups=1)
    with pytest.raises(SiteRefusal, match="the plan allows") as info:
        session.admit(plan, Phase.PROFILE, _arrays(3510), groups=1)
    assert info.value.code == "protocol"
    assert session.counts == {"moments": 1}  # nothing recorded for the refused request
    session.admit(plan, Phase.PROFILE, _arrays(3), groups=1)  # one profile of k centres ...
    with pytest.raises(SiteRefusal, match="already answered"):  # ... and nothing after it
        session.admit(plan, Phase.PROFILE, _arrays(3), groups=1)


def test_a_second_profile_round_gets_nothing():
    plan, session = _plan(), SiteSession()
    _honest_run(session, plan)
    for phase, n in ((Phase.PROFILE, 3), (Phase.LLOYD, 6), (Phase.MOMENTS, 0)):
        with pytest.raises(SiteRefusal, match="profile round was already answered"):
            session.admit(plan, phase, _arrays(n) if n else [], groups=1)


@pytest.mark.parametrize(("phase", "n_centres", "groups", "match"), [
    (Phase.INIT, 3510, 1, "the plan allows"),
    (Phase.INIT, 30, 2, "centre groups"),
])
def test_more_centres_or_other_groups_than_the_plan_are_refused(phase, n_centres, groups, match):
    plan, session = _plan(), SiteSession()
    session.admit(plan, Phase.MOMENTS, [], groups=1)
    with pytest.raises(SiteRefusal, match=match):
        session.admit(plan, phase, _arrays(n_centres), groups=groups)


def test_lloyd_rounds_beyond_the_plan_and_going_back_are_refused():
    plan, session = _plan(), SiteSession()
    session.admit(plan, Phase.MOMENTS, [], groups=1)
    with pytest.raises(SiteRefusal, match="not allowed after 'moments'"):
        session.admit(plan, Phase.MOMENTS, [], groups=1)  # a second moments round
    for _ in range(2):
        session.admit(plan, Phase.INIT, _arrays(30), groups=1)
    with pytest.raises(SiteRefusal, match="not allowed after 'init'"):
        session.admit(plan, Phase.INIT, _arrays(30), groups=1)  # beyond the planned 2
    session.admit(plan, Phase.LLOYD, _arrays(6), groups=2)
    with pytest.raises(SiteRefusal, match="not allowed after 'lloyd'"):
        session.admit(plan, Phase.INIT, _arrays(30), groups=1)  # back in the order
    for _ in range(plan.max_rounds - 1):
        session.admit(plan, Phase.LLOYD, _arrays(6), groups=2)
    with pytest.raises(SiteRefusal, match="not allowed"):
        session.admit(plan, Phase.LLOYD, _arrays(6), groups=2)
    session.admit(plan, Phase.PROFILE, _arrays(3), groups=1)


def test_scaling_is_pinned_for_the_run_and_must_be_sane():
    plan, session = _plan(), SiteSession()
    session.admit(plan, Phase.MOMENTS, [], groups=1)
    session.admit(plan, Phase.INIT, _arrays(30, mean=1.0), groups=1)
    with pytest.raises(SiteRefusal, match="scaling changed"):
        session.admit(plan, Phase.INIT, _arrays(30, mean=1.5), groups=1)
    fresh = SiteSession()
    fresh.admit(plan, Phase.MOMENTS, [], groups=1)
    with pytest.raises(SiteRefusal, match="std <= 0"):
        fresh.admit(plan, Phase.INIT, _arrays(30, std=1e-300 * 0.0), groups=1)


def test_a_plan_changed_mid_run_is_refused():
    session = SiteSession()
    session.admit(_plan(), Phase.MOMENTS, [], groups=1)
    with pytest.raises(SiteRefusal, match="plan changed"):
        session.admit(_plan(init_candidates=40), Phase.INIT, _arrays(40), groups=1)


@pytest.mark.parametrize(("changes", "code", "match"), [
    ({"init_candidates": 3510}, "policy", "init_candidates=3510 exceeds"),
    ({"k": 50}, "policy", "k=50 exceeds"),
    ({"n_init": 11}, "policy", "n_init=11 exceeds"),
    ({"max_rounds": 500}, "policy", "max_rounds=500 exceeds"),
    ({"features": ("email",)}, "policy", "features"),
    ({"num_sites": 2}, "federation", "at least 3"),
    ({"prg": "flower-randomstate-fold32"}, "secagg", "SecAgg\\+ primitives are"),
    ({"protocol": "fedseg-kmeans/1"}, "protocol", "speaks protocol"),
])
def test_plans_outside_the_policy_are_refused_with_a_code(changes, code, match):
    with pytest.raises(SiteRefusal, match=match) as info:
        _plan(**changes).check_against(SitePolicy(), features=FEATURES, prg=PRG)
    assert info.value.code == code


def test_plan_round_trips_and_malformed_plans_are_protocol_refusals():
    plan = _plan()
    assert RunPlan.from_json(plan.to_json()) == plan
    assert plan.protocol == PROTOCOL_ID
    for bad in (None, "", "[]", '{"k": 3}', plan.to_json().replace('"k": 3', '"k": -3')):
        with pytest.raises(SiteRefusal) as info:
            RunPlan.from_json(bad)
        assert info.value.code == "protocol"


def test_policy_values_are_validated_with_the_key_named():
    with pytest.raises(ValueError, match=r"site\.min_sites=1"):
        SitePolicy(min_sites=1)
    with pytest.raises(ValueError, match=r"unknown site policy key\(s\) \['max_kk'\]"):
        SitePolicy.from_mapping({"max_kk": 3}, source="site.yaml")
    with pytest.raises(ValueError, match="mechanism"):
        SitePolicy(mechanism="plain")


def test_the_policy_derives_secagg_requirements_from_the_site_count():
    assert SitePolicy().required_secagg(5) == (5, 5)
    assert SitePolicy(tolerate_dropouts=True).required_secagg(5) == (5, 4)
    shares, threshold = SitePolicy().required_secagg(1000)
    assert shares < 1000 and threshold == shares


def test_weak_federations_are_refused_or_warned_about_before_a_run():
    from common.errors import ConfigError
    from simulations.run import check_federation

    with pytest.raises(ConfigError, match=r"2 sites.*site\.min_sites=2"):
        check_federation(SitePolicy(), [500, 700])
    assert "only 2 sites" in check_federation(SitePolicy(min_sites=2), [500, 700])[0]
    with pytest.raises(ConfigError, match=r"site\(s\) \[1\] hold fewer than 20"):
        check_federation(SitePolicy(), [500, 1, 700])
    assert check_federation(SitePolicy(), [500, 20, 700]) == []
