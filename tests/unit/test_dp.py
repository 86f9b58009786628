"""Differential privacy held by the sites: noise, sensitivities, accounting, budget refusals."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from flwr.app import Context, RecordDict
from scipy import stats

from client.app import SiteClient, SiteData
from client.site_files import SiteFiles
from common.dp import (
    GAMMA,
    DpPlan,
    NoiseSource,
    calibrate,
    cluster_words,
    dp_rounds,
    epsilon_spent,
    exact_group_sums,
    honest_sites,
    moments_words,
    noisy_round,
    transformed_bounds,
)
from common.errors import ConfigError, SiteRefusal
from common.features import FeatureSpec, apply_transforms
from common.protocol import GROUPS_KEY, KMEANS_PHASES, PHASE_KEY, PLAN_KEY, ROUND_KEY, Phase
from common.secagg_primitives import SUITE_ID
from common.site_policy import RunPlan, SitePolicy
from server.app import SecAggDpSettings

FEATURES = (FeatureSpec("spend", transform="log1p"), FeatureSpec("visits"))
BOUNDS = {"spend": (0.0, 10_000.0), "visits": (0.0, 50.0)}


def _dp_plan(epsilon=1.0, init_rounds=1, lloyd_rounds=2) -> DpPlan:
    return SecAggDpSettings(epsilon=epsilon, init_rounds=init_rounds,
                            lloyd_rounds=lloyd_rounds, init_candidates=8
                            ).dp_plan(FEATURES, BOUNDS, num_sites=3)


def _run_plan(dp: DpPlan) -> RunPlan:
    return RunPlan(features=("spend", "visits"), k=3, n_init=1, init="summary",
                   init_candidates=8, init_rounds=dp.rounds["init"],
                   max_rounds=dp.rounds["lloyd"], num_sites=3, prg=SUITE_ID,
                   dp=dp.to_json())


def _site(n=400, seed=0) -> SiteData:
    rng = np.random.default_rng(seed)
    raw = np.column_stack([rng.lognormal(5, 1, n), rng.poisson(8, n).astype(float)])
    return SiteData(raw=raw, features=FEATURES)


def _context() -> Context:
    return Context(run_id=3, node_id=5, node_config={"partition-id": 0, "num-partitions": 3},
                   state=RecordDict(), run_config={})


def _moments(plan: RunPlan) -> dict:
    return {PHASE_KEY: "moments", ROUND_KEY: 1, GROUPS_KEY: 1, PLAN_KEY: plan.to_json()}


# --- the sampler ------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [1.0, 3.7, 250.0, 3.3e9])
def test_discrete_gaussian_has_the_calibrated_variance(sigma):
    draws = NoiseSource(b"variance").discrete_gaussian(sigma, (200_000,))
    assert draws.dtype == np.int64
    assert np.all(draws == np.round(draws))
    # Mean within 5 standard errors of 0; variance within 2 % (sampling sd ~0.3 %).
    assert abs(draws.mean()) < 5 * sigma / math.sqrt(draws.size)
    assert draws.astype(np.float64).var() == pytest.approx(sigma**2, rel=0.02)


def _assert_follows(draws: np.ndarray, support: np.ndarray, weights: np.ndarray) -> None:
    """Chi-square goodness of fit of integer draws to weights on a support (cells > 5)."""
    expected = weights / weights.sum() * draws.size
    observed = np.array([(draws == v).sum() for v in support])
    keep = expected > 5
    chi2 = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    assert stats.chi2.sf(chi2, df=int(keep.sum()) - 1) > 1e-3


def test_discrete_gaussian_follows_its_pmf():
    sigma = 2.5
    draws = NoiseSource(b"pmf").discrete_gaussian(sigma, (100_000,))
    support = np.arange(-12, 13)
    _assert_follows(draws, support, np.exp(-support**2 / (2 * sigma**2)))


@pytest.mark.parametrize("t", [1, 3, 7])
def test_discrete_laplace_and_exact_uniforms_follow_their_pmf(t):
    source = NoiseSource(b"laplace")
    draws = source.discrete_laplace(t, 100_000)
    support = np.arange(-8 * t, 8 * t + 1)
    _assert_follows(draws, support, np.exp(-np.abs(support) / t))
    uniform = source.uniform_below(t + 2, 60_000)
    assert uniform.min() == 0 and uniform.max() == t + 1
    counts = np.bincount(uniform, minlength=t + 2)
    assert stats.chisquare(counts).pvalue > 1e-3


def test_noise_sources_are_fresh_unless_a_test_seeds_them():
    a, b = NoiseSource(), NoiseSource()
    assert not np.array_equal(a.discrete_gaussian(1e6, (8,)), b.discrete_gaussian(1e6, (8,)))
    seeded = [NoiseSource(b"s").discrete_gaussian(1e6, (8,)) for _ in range(2)]
    assert np.array_equal(*seeded)


# --- sensitivities ----------------------------------------------------------------------------

def test_the_grid_is_fine_enough_that_every_site_noise_hides_its_limb_carries():
    dp = _dp_plan()
    assert dp.grid_bits > GAMMA.bit_length() - 1  # finer than the exact-sum grid here
    limb_bits = 30  # 3 sites: quantization_range 2**30
    for phase in KMEANS_PHASES:
        info = noisy_round(phase, dp, transformed=_site().transformed, features=FEATURES,
                           instruction=[] if phase is Phase.MOMENTS else [
                               np.array([5.0, 8.0]), np.array([1.0, 3.0]), np.zeros((3, 2))],
                           honest=3, noise=NoiseSource(b"g"), limb_bits=limb_bits)[1]
        assert min(info.site_std) >= 1.2 * 2**limb_bits
    coarse = DpPlan(**{**dp.__dict__, "grid_bits": 24})
    with pytest.raises(SiteRefusal, match="would not hide the carries") as info:
        noisy_round(Phase.MOMENTS, coarse, transformed=_site().transformed, features=FEATURES,
                    instruction=[], honest=3, noise=NoiseSource(b"g"), limb_bits=limb_bits)
    assert info.value.code == "secagg"


def test_one_customer_moves_each_round_by_at_most_its_sensitivity():
    rng = np.random.default_rng(1)
    low, high = transformed_bounds(tuple(BOUNDS.values()), FEATURES)
    x = apply_transforms(np.column_stack([rng.lognormal(5, 2, 300), rng.poisson(9, 300)]),
                         FEATURES)
    extreme = apply_transforms(np.array([[1e9, -5.0]]), FEATURES)  # far outside the bounds
    base, sens = moments_words(x, low, high)
    more, _ = moments_words(np.vstack([x, extreme]), low, high)
    for a, b, s in zip(base, more, sens, strict=True):
        assert np.linalg.norm((b - a).astype(np.float64)) <= s
    centres = rng.normal(size=(5, 2))
    box = (np.full(2, -4.0), np.full(2, 4.0))
    base, sens = cluster_words(x[:, :2] - 5, centres, box=box, clip=1.5)
    more, _ = cluster_words(np.vstack([x[:, :2] - 5, [[90.0, -90.0]]]), centres, box=box,
                            clip=1.5)
    for a, b, s in zip(base, more, sens, strict=True):
        assert 0 < np.linalg.norm((b - a).astype(np.float64)) <= s
    assert sens[0] <= GAMMA * 1.5 + 1 and sens[1] == GAMMA


def test_noise_in_the_aggregate_has_the_calibrated_variance():
    """Five sites, each adding its share for 4 relied-on sites: the sum has >= S**2."""
    dp = _dp_plan()
    site = _site()
    transformed = site.transformed
    low, high = transformed_bounds(dp.bounds, FEATURES)
    mean, std = (low + high) / 2, (high - low) / 4
    centres = np.random.default_rng(2).normal(size=(400, 2))
    instruction = [mean, std, centres]
    honest = honest_sites(5, dropouts=0, collusion_fraction=1 / 3)
    assert honest == 4
    noise = []
    info = None
    for seed in range(6):
        replies = []
        for s in range(5):
            words, info = noisy_round(Phase.INIT, dp, transformed=transformed,
                                      features=FEATURES, instruction=instruction,
                                      honest=honest, noise=NoiseSource(bytes([seed, s])))
            replies.append(words)
        exact, _ = cluster_words((np.clip(transformed, low, high) - mean) / std, centres,
                                 box=((low - mean) / std, (high - mean) / std), clip=dp.clip,
                                 gamma=dp.gamma)
        for i in range(2):
            total = sum(r[i].astype(np.float64) for r in replies)
            noise.append((i, (total - 5 * exact[i]).ravel()))
    assert info is not None
    for i, target in enumerate(info.total_std):
        sample = np.concatenate([n for j, n in noise if j == i])
        # 5 shares of S**2 / 4 each: variance 5/4 S**2, never below S**2.
        assert sample.var() == pytest.approx(5 / 4 * target**2, rel=0.06)
        assert abs(sample.mean()) < 5 * math.sqrt(5 / 4) * target / math.sqrt(sample.size)


# --- accounting -------------------------------------------------------------------------------

def test_epsilon_spent_is_dp_accounting_on_the_same_events():
    mults = [17.3, 8.6, 11.3, 11.3, 11.3, 8.0]
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    for m in mults:
        accountant.compose(dp_event.GaussianDpEvent(m))
    # Equal up to the PLD grid (the site groups equal multipliers into self-compositions).
    assert epsilon_spent(mults, 1e-6) == pytest.approx(accountant.get_epsilon(1e-6), rel=1e-5)
    fine = pld_privacy_accountant.PLDAccountant()  # the default, finer grid: never above ours
    for m in mults:
        fine.compose(dp_event.GaussianDpEvent(m))
    assert fine.get_epsilon(1e-6) * (1 - 1e-5) <= epsilon_spent(mults, 1e-6) \
        <= fine.get_epsilon(1e-6) * 1.001


@pytest.mark.parametrize("epsilon", [0.25, 1.0, 8.0])
def test_calibration_meets_the_target_without_wasting_it(epsilon):
    rounds = dp_rounds(1, 3)
    sigma = calibrate(epsilon, 1e-6, rounds,
                      {"moments": 0.1, "init": 0.2, "lloyd": 0.4, "profile": 0.3})
    mults = [sigma[p] for p, n in rounds.items() for _ in range(n)]
    spent = epsilon_spent(mults, 1e-6)
    assert 0.99 * epsilon <= spent <= epsilon


def test_dp_without_declared_bounds_is_refused_naming_the_feature():
    with pytest.raises(ConfigError, match=r"data\.clip\.visits=\[low,high\]"):
        SecAggDpSettings().dp_plan(FEATURES, {"spend": (0.0, 1.0)}, num_sites=3)


# --- the site holds the budget ------------------------------------------------------------------

def test_a_plan_over_the_site_budget_is_refused_before_the_first_release(tmp_path):
    plan = _run_plan(_dp_plan(epsilon=2.0))
    client = SiteClient(_site(), _context(), policy=SitePolicy(dp_epsilon=1.0),
                        site_root=tmp_path)
    with pytest.raises(SiteRefusal, match="budget is epsilon=1") as info:
        client.admit(_moments(plan), [])
    assert info.value.code == "budget"
    assert SiteFiles(tmp_path, "0").privacy_events() == []  # nothing released or recorded


def test_a_server_asking_past_the_budget_gets_refusals_and_the_ledger_survives(tmp_path):
    dp = _dp_plan(epsilon=1.0)
    plan = _run_plan(dp)
    policy = SitePolicy(dp_epsilon=1.3)  # one run of epsilon=1 fits, two compose to ~1.45
    # Run 1: a request is admitted (budget checked), then recorded before it is sent.
    client = SiteClient(_site(), _context(), policy=policy, site_root=tmp_path)
    files = SiteFiles(tmp_path, "0")
    client.admit(_moments(plan), [])
    assert files.privacy_events() == []  # refused or not, nothing is charged before the release
    client.charge_release(plan, Phase.MOMENTS)
    assert files.privacy_events() == [dp.sigma["moments"]]
    # The rest of run 1 as the site records it; then a restarted site (new context, new client)
    # reads the same ledger: a second run would take the composition past 1.3 -> refused.
    for sigma in dp.multipliers()[1:]:
        files.record_release({"at": time.time(), "noise_multiplier": sigma})
    again = SiteClient(_site(), _context(), policy=policy, site_root=tmp_path)
    with pytest.raises(SiteRefusal, match="already spent") as info:
        again.admit(_moments(plan), [])
    assert info.value.code == "budget"
    assert len(files.privacy_events()) == sum(dp.rounds.values())


def test_a_damaged_ledger_stops_releases_instead_of_undercounting(tmp_path):
    files = SiteFiles(tmp_path, "0")
    files.record_release({"noise_multiplier": 9.0})
    with files.privacy_ledger.open("a") as handle:
        handle.write('{"noise_multi')  # torn write
    client = SiteClient(_site(), _context(), policy=SitePolicy(), site_root=tmp_path)
    with pytest.raises(SiteRefusal, match="line 2 is unreadable"):
        client.admit(_moments(_run_plan(_dp_plan())), [])


def test_sites_refuse_plans_without_dp_and_dp_plans_that_do_not_match(tmp_path):
    dp = _dp_plan()
    exact = RunPlan(features=("spend", "visits"), k=3, n_init=1, init="summary",
                    init_candidates=8, init_rounds=1, max_rounds=2, num_sites=3,
                    prg=SUITE_ID)
    with pytest.raises(SiteRefusal, match="no differential privacy") as info:
        exact.check_against(SitePolicy(), features=("spend", "visits"), prg=SUITE_ID)
    assert info.value.code == "policy"
    exact.check_against(SitePolicy(require_dp=False), features=("spend", "visits"),
                        prg=SUITE_ID)
    sneaky = RunPlan(**{**_run_plan(dp).__dict__, "max_rounds": 20})  # more Lloyd rounds
    with pytest.raises(SiteRefusal, match="do not match") as info:
        sneaky.check_against(SitePolicy(), features=("spend", "visits"), prg=SUITE_ID)
    assert info.value.code == "protocol"


def test_a_node_without_a_stable_name_answers_no_dp_run(tmp_path):
    context = Context(run_id=3, node_id=5, node_config={}, state=RecordDict(), run_config={})
    client = SiteClient(_site(), context, policy=SitePolicy(), site_root=tmp_path)
    with pytest.raises(SiteRefusal, match="no stable name") as info:
        client.admit(_moments(_run_plan(_dp_plan())), [])
    assert info.value.code == "policy"
    named = Context(run_id=3, node_id=5, node_config={"fedseg-site-name": "lisbon"},
                    state=RecordDict(), run_config={})
    SiteClient(_site(), named, policy=SitePolicy(), site_root=tmp_path).admit(
        _moments(_run_plan(_dp_plan())), [])
    assert SiteFiles(tmp_path, "lisbon").privacy_ledger.parent.is_dir()


def test_degenerate_scaling_or_centres_are_refused_before_anything_is_summed():
    dp = _dp_plan()
    for std, centres in ((np.array([5e-324, 1.0]), np.zeros((3, 2))),
                         (np.array([1.0, 1.0]), np.array([[np.inf, 0.0]] * 3))):
        with pytest.raises(SiteRefusal, match="beyond 2\\*\\*20") as info:
            noisy_round(Phase.LLOYD, dp, transformed=_site().transformed, features=FEATURES,
                        instruction=[np.array([5.0, 8.0]), std, centres], honest=3,
                        noise=NoiseSource(b"d"))
        assert info.value.code == "protocol"
    with pytest.raises(ValueError, match="collapse"):
        transformed_bounds(((0.0, 5e-324), (0.0, 1.0)), FEATURES)


def test_sums_are_exact_for_any_site_size_and_the_second_limb_check_uses_the_public_cap():
    words = np.full((3, 1), 2**61, dtype=np.int64)
    assert exact_group_sums(words, np.zeros(3, dtype=np.intp), 1)[0, 0] == 3 * 2**61
    dp = DpPlan(**{**_dp_plan().__dict__, "grid_bits": 34})
    args = dict(transformed=_site().transformed, features=FEATURES, instruction=[], honest=3,
                noise=NoiseSource(b"c"), limb_bits=25)
    with pytest.raises(SiteRefusal, match=r"site\.max_customers") as info:
        noisy_round(Phase.MOMENTS, dp, max_customers=10_000_000, **args)
    assert info.value.code == "secagg"
    noisy_round(Phase.MOMENTS, dp, max_customers=1_000, **args)  # same data, smaller cap: fine


def test_a_site_can_cap_the_sites_it_relies_on_against_invented_ones():
    assert SitePolicy().relied_sites(5) == 4
    assert SitePolicy().relied_sites(2) == 1  # with 2 sites the other one may collude
    assert SitePolicy(tolerate_dropouts=True).relied_sites(10) == 10 - 3 - 3
    # A server announcing 100 sites (97 of them its own) gets no thinner share from a site
    # that knows its federation has 3.
    assert SitePolicy().relied_sites(100) == 67
    assert SitePolicy(dp_max_relied_sites=2).relied_sites(100) == 2
