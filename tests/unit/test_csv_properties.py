"""Property tests of the CSV loader: any well-formed table reads back exactly, projected."""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.csv_source import read_customer_csv
from common.errors import DataError
from common.features import FeatureSpec

finite = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_infinity=False)
site = st.sampled_from(["north", "south", "Zürich", "a,b", 'quote"d'])
rows = st.lists(st.tuples(finite, finite, site, st.text(max_size=12)), min_size=1, max_size=40)


def _write(path: Path, table: list[tuple[float, float, str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["spend", "email", "visits", "store"])
        for spend, visits, store, email in table:
            writer.writerow([repr(spend), email, repr(visits), store])


@settings(max_examples=60, deadline=None)
@given(rows)
def test_values_and_sites_round_trip_and_other_columns_are_not_returned(table):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.csv"
        _write(path, table)
        cols = read_customer_csv(path, features=(FeatureSpec("visits"), FeatureSpec("spend")),
                                 site_column="store")
    expected = np.array([[visits, spend] for spend, visits, _, _ in table])
    np.testing.assert_array_equal(cols.raw, expected)
    assert cols.sites is not None
    assert cols.sites.tolist() == [store for _, _, store, _ in table]
    assert cols.labels is None


@settings(max_examples=40, deadline=None)
@given(rows, st.integers(min_value=0, max_value=39),
       st.sampled_from(["abc", "", "1,5x", "nan", "-inf"]))
def test_one_bad_cell_is_reported_with_its_row(table, position, bad):
    position = position % len(table)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.csv"
        _write(path, table)
        with path.open(newline="", encoding="utf-8") as handle:
            reader = list(csv.reader(handle))
        reader[position + 1][2] = bad
        with path.open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows(reader)
        with pytest.raises(DataError) as info:
            read_customer_csv(path, features=(FeatureSpec("visits"),), site_column="store")
    assert info.value.row == position + 1 and info.value.column == "visits"
    assert str(path) in str(info.value)


@settings(max_examples=40, deadline=None)
@given(rows)
def test_the_columnar_fast_path_equals_the_reference_reader(table):
    from client.csv_source import _header, _read_reference, _read_with_duckdb

    features = (FeatureSpec("visits"), FeatureSpec("spend"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.csv"
        _write(path, table)
        header = _header(path, str(path))
        assert header is not None
        fast = _read_with_duckdb(path, header, features, "store", None)
        slow = _read_reference(path, features=features, site_column="store")
    assert fast is not None
    np.testing.assert_array_equal(fast.raw, slow.raw)
    assert fast.sites is not None and slow.sites is not None
    assert fast.sites.tolist() == slow.sites.tolist()
