"""Segment model: profile statistics, small-segment merging, naming and the JSON document."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from common.errors import ConfigError, DataError, ProtocolError
from common.features import FeatureSpec, apply_transforms, invert_transforms
from common.scaling import GlobalScaler, compute_moments
from common.segment_model import SCHEMA_NAME, SCHEMA_VERSION, ProfileStats, SegmentModel

FEATURES = (
    FeatureSpec(name="visits", unit="per month", high_label="frequent", low_label="rare"),
    FeatureSpec(name="spend", unit="EUR", transform="log1p", high_label="big spender",
                low_label="small spender"),
)


def _wss(points: np.ndarray) -> float:
    return float(np.sum((points - points.mean(axis=0)) ** 2))


def _stats_at_means(raw: np.ndarray, scaled: np.ndarray, groups: list[np.ndarray]) -> ProfileStats:
    """Profile statistics with every centroid at its group's mean (a converged model)."""
    centroids = np.vstack([scaled[g].mean(axis=0) for g in groups])
    return ProfileStats.compute(raw, scaled, centroids)


# Three well separated groups in standardised space: A (5 points), B (4) and C (2, near B).
SCALED = np.array([
    [-1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [0.0, 0.0],      # A, mean (0, 0)
    [9.0, 0.0], [11.0, 0.0], [10.0, 1.0], [10.0, -1.0],                 # B, mean (10, 0)
    [14.0, 5.0], [16.0, 5.0],                                           # C, mean (15, 5)
])
RAW = np.arange(22, dtype=np.float64).reshape(11, 2) * 1.5 + 2.0
GROUPS = [np.arange(0, 5), np.arange(5, 9), np.arange(9, 11)]


# --- ProfileStats.compute -----------------------------------------------------------------


def test_compute_matches_hand_computed_statistics():
    scaled = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0], [12.0, 10.0], [11.0, 13.0]])
    raw = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 10.0]])
    centroids = np.array([[1.0, 0.0], [11.0, 11.0]])

    stats = ProfileStats.compute(raw, scaled, centroids)

    np.testing.assert_array_equal(stats.counts, [2.0, 3.0])
    np.testing.assert_array_equal(stats.sums, [[2.0, 0.0], [33.0, 33.0]])
    # segment 0: 1 + 1; segment 1: (1 + 1) + (1 + 1) + (0 + 4)
    np.testing.assert_array_equal(stats.costs, [2.0, 8.0])
    np.testing.assert_array_equal(stats.raw_sums, [[4.0, 6.0], [21.0, 24.0]])
    np.testing.assert_array_equal(stats.raw_sumsq, [[1 + 9, 4 + 16], [25 + 49 + 81, 36 + 64 + 100]])
    assert all(a.dtype == np.float64 for a in stats.to_arrays())


def test_compute_keeps_an_empty_segment_with_zero_statistics():
    scaled = np.array([[0.0], [1.0]])
    centroids = np.array([[0.5], [100.0]])

    stats = ProfileStats.compute(scaled * 2, scaled, centroids)

    np.testing.assert_array_equal(stats.counts, [2.0, 0.0])
    np.testing.assert_array_equal(stats.sums, [[1.0], [0.0]])
    np.testing.assert_array_equal(stats.costs, [0.5, 0.0])


# --- ProfileStats.merge_small -------------------------------------------------------------


def test_merge_small_merges_into_nearest_neighbour_exactly():
    stats = _stats_at_means(RAW, SCALED, GROUPS)
    np.testing.assert_array_equal(stats.counts, [5.0, 4.0, 2.0])

    merged, log = stats.merge_small(3)

    assert log == [{"segment": 2, "into": 1}]
    union = np.concatenate([GROUPS[1], GROUPS[2]])
    np.testing.assert_array_equal(merged.counts, [5.0, 6.0])
    np.testing.assert_allclose(merged.sums, [SCALED[GROUPS[0]].sum(0), SCALED[union].sum(0)])
    np.testing.assert_allclose(merged.raw_sums, [RAW[GROUPS[0]].sum(0), RAW[union].sum(0)])
    np.testing.assert_allclose(merged.raw_sumsq,
                               [(RAW[GROUPS[0]] ** 2).sum(0), (RAW[union] ** 2).sum(0)])
    np.testing.assert_allclose(merged.costs, [_wss(SCALED[GROUPS[0]]), _wss(SCALED[union])],
                               rtol=1e-12)


def test_merge_small_leaves_large_enough_segments_alone():
    stats = _stats_at_means(RAW, SCALED, GROUPS)

    merged, log = stats.merge_small(2)

    assert log == []
    for before, after in zip(stats.to_arrays(), merged.to_arrays(), strict=True):
        np.testing.assert_array_equal(before, after)


def test_merge_small_merges_the_smallest_segment_first():
    # D (1 point) sits between A and C; C (2 points) is nearest to B.
    scaled = np.vstack([SCALED, [[12.0, 6.0]]])
    raw = np.vstack([RAW, [[100.0, 200.0]]])
    groups = [*GROUPS, np.array([11])]
    stats = _stats_at_means(raw, scaled, groups)
    np.testing.assert_array_equal(stats.counts, [5.0, 4.0, 2.0, 1.0])

    merged, log = stats.merge_small(3)

    # D (size 1) goes first, into C (its nearest); C+D then has 3 members and stays.
    assert log == [{"segment": 3, "into": 2}]
    np.testing.assert_array_equal(merged.counts, [5.0, 4.0, 3.0])
    cd = np.array([9, 10, 11])
    np.testing.assert_allclose(merged.sums[2], scaled[cd].sum(0))
    np.testing.assert_allclose(merged.raw_sums[2], raw[cd].sum(0))
    np.testing.assert_allclose(merged.costs[2], _wss(scaled[cd]), rtol=1e-12)


def test_merge_small_drops_empty_segments():
    stats = _stats_at_means(RAW, SCALED, GROUPS)
    with_empty = ProfileStats.from_arrays(
        [np.insert(stats.counts, 1, 0.0), np.insert(stats.sums, 1, 0.0, axis=0),
         np.insert(stats.costs, 1, 0.0), np.insert(stats.raw_sums, 1, 0.0, axis=0),
         np.insert(stats.raw_sumsq, 1, 0.0, axis=0)],
        n_segments=4, n_features=2,
    )

    merged, log = with_empty.merge_small(1)

    assert log == [{"segment": 1, "into": None}]
    for before, after in zip(stats.to_arrays(), merged.to_arrays(), strict=True):
        np.testing.assert_array_equal(before, after)


def test_merge_small_stops_at_one_segment_with_totals():
    stats = _stats_at_means(RAW, SCALED, GROUPS)

    merged, log = stats.merge_small(1_000)

    assert len(log) == 2
    assert merged.counts.shape == (1,)
    assert merged.sums.shape == (1, 2)
    np.testing.assert_array_equal(merged.counts, [11.0])
    np.testing.assert_allclose(merged.sums[0], SCALED.sum(0))
    np.testing.assert_allclose(merged.raw_sums[0], RAW.sum(0))
    np.testing.assert_allclose(merged.raw_sumsq[0], (RAW**2).sum(0))
    np.testing.assert_allclose(merged.costs[0], _wss(SCALED), rtol=1e-12)


@settings(max_examples=50, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=6), min_size=2, max_size=5),
    min_size=st.integers(min_value=1, max_value=12),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_merge_small_preserves_totals_and_respects_the_floor(sizes, min_size, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=20.0, size=(len(sizes), 3))
    scaled = np.vstack([c + rng.normal(scale=0.1, size=(n, 3)) for c, n in
                        zip(centres, sizes, strict=True)])
    raw = rng.normal(size=scaled.shape)
    starts = np.cumsum([0, *sizes])
    groups = [np.arange(a, b) for a, b in itertools.pairwise(starts)]
    stats = _stats_at_means(raw, scaled, groups)

    merged, log = stats.merge_small(min_size)

    assert merged.counts.sum() == len(scaled)
    np.testing.assert_allclose(merged.sums.sum(0), scaled.sum(0), atol=1e-9)
    np.testing.assert_allclose(merged.raw_sums.sum(0), raw.sum(0), atol=1e-9)
    assert len(merged.counts) == len(stats.counts) - len(log)
    assert len(merged.counts) == 1 or merged.counts.min() >= min_size
    assert merged.costs.sum() >= stats.costs.sum() - 1e-9


# --- SegmentModel.build -------------------------------------------------------------------


def _three_groups(seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    frequent = np.column_stack([rng.normal(20, 1, 20), rng.normal(100, 5, 20)])
    thrifty = np.column_stack([rng.normal(2, 0.5, 20), rng.normal(10, 1, 20)])
    big = np.column_stack([rng.normal(8, 1, 20), rng.normal(1000, 50, 20)])
    raw = np.vstack([frequent, thrifty, big])
    return raw, [np.arange(0, 20), np.arange(20, 40), np.arange(40, 60)]


def _build(raw: np.ndarray, groups: list[np.ndarray], *, min_size: int = 5) -> SegmentModel:
    transformed = apply_transforms(raw, FEATURES)
    scaler = GlobalScaler.from_moments(compute_moments(transformed), n_features=len(FEATURES))
    stats = _stats_at_means(raw, scaler.transform(transformed), groups)
    return SegmentModel.build(
        stats=stats, features=FEATURES, scaler=scaler, min_segment_size=min_size,
        privacy={"secure_aggregation": "secagg+"}, training={"rounds": 3},
        config={"model": {"k": len(groups)}},
    )


def test_build_names_segments_after_their_most_distinctive_features():
    raw, groups = _three_groups()

    model = _build(raw, groups)

    names = [s.name.lower() for s in model.segments]
    assert len(names) == 3
    assert "frequent" in names[0]
    assert "rare" in names[1] and "small spender" in names[1]
    assert "big spender" in names[2]
    assert "frequent" not in names[1] and "frequent" not in names[2]
    assert all(s.name and s.name[0].isupper() for s in model.segments)
    assert len({s.name for s in model.segments}) == 3


def test_build_sizes_shares_profiles_and_privacy_record():
    raw, groups = _three_groups()

    model = _build(raw, groups, min_size=7)

    assert [s.size for s in model.segments] == [20, 20, 20]
    assert sum(s.size for s in model.segments) == len(raw)
    assert sum(s.share for s in model.segments) == pytest.approx(1.0)
    assert [s.id for s in model.segments] == [0, 1, 2]
    for seg, g in zip(model.segments, groups, strict=True):
        assert seg.mean["visits"] == pytest.approx(raw[g, 0].mean())
        assert seg.mean["spend"] == pytest.approx(raw[g, 1].mean())
        assert seg.std["spend"] == pytest.approx(raw[g, 1].std())
        # The published centroid is the mean in transformed space, mapped back to file units.
        assert seg.centroid["spend"] == pytest.approx(np.expm1(np.log1p(raw[g, 1]).mean()))
        assert str(seg.size) in seg.description
    assert model.privacy == {"secure_aggregation": "secagg+", "min_segment_size": 7}
    assert model.training == {"rounds": 3}
    assert model.merged == []


def test_build_merges_small_segments_before_publication():
    raw, groups = _three_groups()
    # Three extra low-frequency customers who spend a little more than the thrifty group.
    extra = np.array([[2.0, 40.0], [2.5, 42.0], [1.5, 38.0]])
    raw = np.vstack([raw, extra])
    groups = [*groups, np.arange(60, 63)]

    model = _build(raw, groups, min_size=5)

    assert model.merged == [{"segment": 3, "into": 1}]
    assert [s.size for s in model.segments] == [20, 23, 20]
    thrifty = np.concatenate([groups[1], groups[3]])
    assert model.segments[1].mean["spend"] == pytest.approx(raw[thrifty, 1].mean())
    assert model.privacy["min_segment_size"] == 5


def test_build_gives_unique_names_to_look_alike_segments():
    features = (FeatureSpec("a", high_label="A+"), FeatureSpec("b", high_label="B+"),
                FeatureSpec("c"))
    z = np.array([[1.0, 2.0, 0.9], [1.0, 2.0, -0.9], [0.1, 0.0, 0.0], [0.0, -0.1, 0.0],
                  [0.9, 1.9, 0.0]])
    counts = np.full(5, 10.0)
    stats = ProfileStats(counts=counts, sums=z * 10, costs=np.zeros(5),
                         raw_sums=z * 10, raw_sumsq=np.ones((5, 3)) * 100)
    scaler = GlobalScaler(mean=np.zeros(3), std=np.ones(3), count=50.0)

    model = SegmentModel.build(stats=stats, features=features, scaler=scaler,
                               min_segment_size=1, privacy={}, training={}, config={})

    names = [s.name for s in model.segments]
    assert len(set(names)) == 5, names
    assert all(names)
    assert all(n.startswith("B+, A+") for n in (names[0], names[1], names[4]))
    assert all(n.lower().startswith("average customers") for n in names[2:4])


# --- JSON document ------------------------------------------------------------------------


def test_json_round_trip_preserves_model_and_assignments(tmp_path):
    raw, groups = _three_groups()
    model = _build(raw, groups)
    path = tmp_path / "model.json"
    probe = np.abs(np.random.default_rng(1).normal(300, 400, size=(200, 2)))

    model.to_json(path)
    loaded = SegmentModel.load(path)

    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["schema"] == SCHEMA_NAME
    assert doc["schema_version"] == SCHEMA_VERSION
    np.testing.assert_array_equal(loaded.centroids_scaled, model.centroids_scaled)
    np.testing.assert_array_equal(loaded.scaler.mean, model.scaler.mean)
    np.testing.assert_array_equal(loaded.scaler.std, model.scaler.std)
    assert loaded.scaler.count == model.scaler.count
    assert loaded.features == model.features
    assert loaded.segments == model.segments
    assert loaded.privacy == model.privacy
    assert loaded.created_at == model.created_at
    labels = model.assign(probe)
    assert len(np.unique(labels)) > 1
    np.testing.assert_array_equal(loaded.assign(probe), labels)
    np.testing.assert_array_equal(model.assign(raw), np.repeat([0, 1, 2], 20))


def _written(tmp_path: Path, doc: object) -> Path:
    path = tmp_path / "model.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def _model_doc() -> dict:
    raw, groups = _three_groups()
    return _build(raw, groups).to_dict()


def test_load_missing_file_names_the_file(tmp_path):
    path = tmp_path / "absent.json"

    with pytest.raises(DataError, match="not found") as info:
        SegmentModel.load(path)

    assert str(path) in str(info.value)


def test_load_invalid_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "model.json"
    path.write_text('{\n  "schema": "fedseg.segment-model",\n  oops\n}\n', encoding="utf-8")

    with pytest.raises(DataError, match="not valid JSON") as info:
        SegmentModel.load(path)

    assert str(path) in str(info.value)
    assert "line 3" in str(info.value)


@pytest.mark.parametrize(("key", "value"), [("schema", "something-else"),
                                            ("schema_version", SCHEMA_VERSION + 2)])
def test_load_wrong_schema_names_the_key(tmp_path, key, value):
    doc = _model_doc()
    doc[key] = value
    path = _written(tmp_path, doc)

    with pytest.raises(DataError) as info:
        SegmentModel.load(path)

    assert str(path) in str(info.value)
    assert f"'{key}'" in str(info.value)
    assert repr(value) in str(info.value)


def test_load_wrong_number_of_centroid_values_names_the_key(tmp_path):
    doc = _model_doc()
    doc["segments"][1]["centroid_scaled"] = [0.0, 1.0, 2.0]
    path = _written(tmp_path, doc)

    with pytest.raises(DataError, match="centroid_scaled") as info:
        SegmentModel.load(path)

    assert str(path) in str(info.value)
    assert "segment 1" in str(info.value)


def test_load_wrong_number_of_scaling_values_names_the_key(tmp_path):
    doc = _model_doc()
    doc["scaling"]["std"] = [1.0]
    path = _written(tmp_path, doc)

    with pytest.raises(DataError, match="'scaling'") as info:
        SegmentModel.load(path)

    assert str(path) in str(info.value)


def test_load_missing_key_is_a_data_error(tmp_path):
    doc = _model_doc()
    del doc["scaling"]
    path = _written(tmp_path, doc)

    with pytest.raises(DataError, match="scaling") as info:
        SegmentModel.load(path)

    assert str(path) in str(info.value)


def test_load_json_that_is_not_an_object_is_a_data_error(tmp_path):
    path = _written(tmp_path, [1, 2, 3])

    with pytest.raises(DataError) as info:
        SegmentModel.load(path)

    assert str(path) in str(info.value)


@pytest.mark.parametrize("shape", [(4, 3), (4, 1), (2,)])
def test_assign_rejects_records_with_the_wrong_columns(shape):
    raw, groups = _three_groups()
    model = _build(raw, groups)

    with pytest.raises(DataError, match="should have 2 columns") as info:
        model.assign(np.ones(shape))

    assert "visits, spend" in str(info.value)


# --- features -----------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, (6, 3), elements=st.floats(min_value=-0.99, max_value=1e6)))
def test_invert_transforms_undoes_apply_transforms(raw):
    features = (FeatureSpec("a", transform="log1p"), FeatureSpec("b"),
                FeatureSpec("c", transform="log1p"))

    transformed = apply_transforms(raw, features)

    np.testing.assert_array_equal(transformed[:, 1], raw[:, 1])
    np.testing.assert_allclose(transformed[:, [0, 2]], np.log1p(raw[:, [0, 2]]))
    np.testing.assert_allclose(invert_transforms(transformed, features), raw,
                               rtol=1e-12, atol=1e-12)


def test_apply_transforms_does_not_modify_its_input():
    raw = np.array([[0.0, 1.0], [3.0, 7.0]])
    before = raw.copy()

    out = apply_transforms(raw, FEATURES)

    np.testing.assert_array_equal(raw, before)
    np.testing.assert_allclose(out, [[0.0, np.log(2.0)], [3.0, np.log(8.0)]])


def test_invert_transforms_works_on_single_centroid_vectors():
    out = invert_transforms(np.array([1.0, np.log(5.0)]), FEATURES)

    np.testing.assert_allclose(out, [1.0, 4.0])


def test_feature_spec_rejects_unknown_transform():
    with pytest.raises(ConfigError) as info:
        FeatureSpec(name="spend", transform="log")

    message = str(info.value)
    assert "'spend'" in message
    assert "transform='log'" in message
    assert "log1p" in message


def test_feature_spec_labels_default_to_the_column_name():
    spec = FeatureSpec(name="tenure")

    assert spec.high == "high tenure"
    assert spec.low == "low tenure"
    assert FEATURES[0].high == "frequent"
    assert FEATURES[0].low == "rare"


def test_merge_log_does_not_publish_sizes_below_the_floor():
    points = np.array([[0.0], [0.1], [0.2], [5.0], [5.1]])
    stats = ProfileStats.compute(points, points, np.array([[0.1], [5.05]]))
    model = SegmentModel.build(stats=stats, features=(FeatureSpec(name="x"),),
                               scaler=GlobalScaler(mean=np.zeros(1), std=np.ones(1), count=5.0),
                               min_segment_size=3, privacy={}, training={}, config={})
    assert [s.size for s in model.segments] == [5]
    assert all("size" not in entry for entry in model.merged)


def test_a_federation_smaller_than_the_floor_publishes_nothing():
    stats = ProfileStats.compute(np.ones((4, 1)), np.zeros((4, 1)), np.zeros((1, 1)))
    with pytest.raises(ProtocolError, match="min_segment_size=10"):
        SegmentModel.build(stats=stats, features=(FeatureSpec(name="x"),),
                           scaler=GlobalScaler(mean=np.zeros(1), std=np.ones(1), count=4.0),
                           min_segment_size=10, privacy={}, training={}, config={})


@pytest.mark.parametrize(("value", "transform"), [(np.nan, "none"), (np.inf, "none"),
                                                  (-5.0, "log1p")])
def test_assign_rejects_values_outside_the_feature_domain(value, transform):
    features = (FeatureSpec(name="a", transform=transform),)
    stats = ProfileStats.compute(np.arange(12.0).reshape(-1, 1), np.arange(12.0).reshape(-1, 1),
                                 np.array([[3.0], [9.0]]))
    model = SegmentModel.build(stats=stats, features=features,
                               scaler=GlobalScaler(mean=np.zeros(1), std=np.ones(1), count=12.0),
                               min_segment_size=2, privacy={}, training={}, config={})
    with pytest.raises(DataError, match=r"row 2.*column 'a'"):
        model.assign(np.array([[1.0], [value]]))
