"""Customer CSV loading: column projection and errors that name file, row and column."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from client.csv_source import CustomerColumns, read_customer_csv
from common.errors import DataError
from common.features import FeatureSpec

FEATURES = (
    FeatureSpec(name="visits"),
    FeatureSpec(name="spend", transform="log1p"),
)
HEADER = "id,email,visits,name,spend,store,segment"


def _write(tmp_path: Path, text: str, *, name: str = "customers.csv",
           encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding=encoding)
    return path


def _read(path: Path, *, site_column: str = "store") -> CustomerColumns:
    return read_customer_csv(path, features=FEATURES, site_column=site_column)


def _assert_names(exc: DataError, path: Path, *, row: int | None = None,
                  column: str | None = None) -> None:
    message = str(exc)
    assert str(path) in message
    assert exc.path == str(path)
    if row is not None:
        assert exc.row == row
        assert f"row {row}" in message
    if column is not None:
        assert exc.column == column
        assert f"column {column!r}" in message


# --- happy path ---------------------------------------------------------------------------


def test_reads_declared_columns_with_values_and_dtypes(tmp_path):
    path = _write(tmp_path, "\n".join([
        HEADER,
        "1,alice@example.com,4,Alice Smith,120.5,north,loyal",
        "2,bob@example.com,0,Bob Jones,0,south,new",
        "3,carol@example.com,12, Carol King ,-0.5, north ,loyal",
    ]) + "\n")

    cols = read_customer_csv(path, features=FEATURES, site_column="store",
                             label_column="segment")

    assert cols.raw.dtype == np.float64
    np.testing.assert_array_equal(cols.raw, [[4.0, 120.5], [0.0, 0.0], [12.0, -0.5]])
    assert cols.sites is not None and cols.labels is not None
    assert cols.sites.dtype.kind == "U"
    assert cols.sites.tolist() == ["north", "south", "north"]
    assert cols.labels.tolist() == ["loyal", "new", "loyal"]


def test_feature_order_follows_the_specs_not_the_file(tmp_path):
    path = _write(tmp_path, "spend,visits\n10,1\n20,2\n")
    specs = (FeatureSpec(name="visits"), FeatureSpec(name="spend"))

    cols = read_customer_csv(path, features=specs)

    np.testing.assert_array_equal(cols.raw, [[1.0, 10.0], [2.0, 20.0]])
    assert cols.sites is None
    assert cols.labels is None


def test_undeclared_columns_are_not_returned_anywhere(tmp_path):
    emails = ["alice@example.com", "bob@example.com"]
    people = ["Alice Smith", "Bob Jones"]
    path = _write(tmp_path, "\n".join([
        HEADER,
        f"1,{emails[0]},4,{people[0]},120.5,north,loyal",
        f"2,{emails[1]},0,{people[1]},0,south,new",
    ]) + "\n")

    cols = _read(path)

    assert [f.name for f in dataclasses.fields(cols)] == ["raw", "sites", "labels", "invalid"]
    assert cols.invalid == {}  # counts only, and none here
    assert cols.raw.shape == (2, len(FEATURES))
    assert cols.labels is None
    assert cols.sites is not None
    returned = {str(v) for v in cols.sites.tolist()} | {str(v) for v in cols.raw.ravel()}
    for secret in emails + people + ["1", "2", "loyal", "new"]:
        assert secret not in returned
    assert set(cols.sites.tolist()) == {"north", "south"}


def test_blank_lines_are_skipped(tmp_path):
    path = _write(tmp_path, "visits,spend,store\n\n1,2,a\n   \n,,\n3,4,b\n\n")

    cols = _read(path)

    np.testing.assert_array_equal(cols.raw, [[1.0, 2.0], [3.0, 4.0]])
    assert cols.sites is not None
    assert cols.sites.tolist() == ["a", "b"]


def test_utf8_bom_before_the_header_is_ignored(tmp_path):
    path = _write(tmp_path, "visits,spend,store\n5,6,été\n", encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")

    cols = _read(path)

    np.testing.assert_array_equal(cols.raw, [[5.0, 6.0]])
    assert cols.sites is not None
    assert cols.sites.tolist() == ["été"]


def test_log1p_feature_accepts_values_just_above_minus_one(tmp_path):
    path = _write(tmp_path, "visits,spend,store\n-3,-0.999,a\n")

    cols = _read(path)

    np.testing.assert_array_equal(cols.raw, [[-3.0, -0.999]])


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "match"),
    [(None, "not found"), ("", "empty"), ("visits,spend,store\n\n", "no data rows")],
    ids=["missing file", "empty file", "header without data rows"],
)
def test_unusable_file_is_rejected_naming_the_path(tmp_path, content, match):
    path = tmp_path / "nope.csv" if content is None else _write(tmp_path, content)

    with pytest.raises(DataError, match=match) as info:
        _read(path)

    _assert_names(info.value, path)


def test_missing_column_is_named_and_the_header_listed(tmp_path):
    path = _write(tmp_path, "visits,email,store\n1,a@b.c,x\n")

    with pytest.raises(DataError, match="missing column") as info:
        _read(path)

    _assert_names(info.value, path, column="spend")
    message = str(info.value)
    assert "'spend'" in message
    for name in ("visits", "email", "store"):
        assert f"'{name}'" in message


def test_missing_site_column_is_named(tmp_path):
    path = _write(tmp_path, "visits,spend\n1,2\n")

    with pytest.raises(DataError, match="missing column") as info:
        _read(path, site_column="region")

    _assert_names(info.value, path, column="region")


def test_column_requested_twice_is_rejected(tmp_path):
    path = _write(tmp_path, "visits,spend,store\n1,2,a\n")

    with pytest.raises(DataError, match="twice") as info:
        _read(path, site_column="visits")

    assert "visits" in str(info.value)
    _assert_names(info.value, path)


def test_non_numeric_value_names_row_and_column(tmp_path):
    path = _write(tmp_path, "visits,spend,store\n1,2,a\n3,lots,b\n")

    with pytest.raises(DataError, match="not a number") as info:
        _read(path)

    _assert_names(info.value, path, row=2, column="spend")
    assert "'lots'" in str(info.value)


def test_empty_feature_value_is_not_a_number(tmp_path):
    path = _write(tmp_path, "visits,spend,store\n,2,a\n")

    with pytest.raises(DataError, match="not a number") as info:
        _read(path)

    _assert_names(info.value, path, row=1, column="visits")


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "NaN", "Infinity"])
def test_non_finite_values_are_rejected(tmp_path, value):
    path = _write(tmp_path, f"visits,spend,store\n1,2,a\n4,5,a\n{value},6,b\n")

    with pytest.raises(DataError, match="not finite") as info:
        _read(path)

    _assert_names(info.value, path, row=3, column="visits")


@pytest.mark.parametrize("value", ["-1", "-1.0", "-7.5"])
def test_log1p_value_at_or_below_minus_one_is_rejected(tmp_path, value):
    path = _write(tmp_path, f"visits,spend,store\n1,{value},a\n")

    with pytest.raises(DataError, match="log1p") as info:
        _read(path)

    _assert_names(info.value, path, row=1, column="spend")


def test_untransformed_feature_may_be_below_minus_one(tmp_path):
    path = _write(tmp_path, "visits,spend,store\n-5,1,a\n")

    cols = _read(path)

    assert cols.raw[0, 0] == -5.0


@pytest.mark.parametrize("line", ["1,2", "1,2,a,extra"])
def test_wrong_field_count_names_the_row(tmp_path, line):
    path = _write(tmp_path, f"visits,spend,store\n1,2,a\n{line}\n")

    with pytest.raises(DataError, match="fields") as info:
        _read(path)

    _assert_names(info.value, path, row=2)
    assert f"has {len(line.split(','))} fields" in str(info.value)
    assert "header has 3" in str(info.value)


@pytest.mark.parametrize("site", ["", "   "])
def test_empty_site_value_names_row_and_column(tmp_path, site):
    path = _write(tmp_path, f"visits,spend,store\n1,2,a\n3,4,{site}\n")

    with pytest.raises(DataError, match="empty site") as info:
        _read(path)

    _assert_names(info.value, path, row=2, column="store")


def test_file_that_is_not_utf8_raises_data_error_naming_the_file(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("visits,spend,store\n1,2,Café\n".encode("latin-1"))

    with pytest.raises(DataError) as info:
        _read(path)

    _assert_names(info.value, path)


# --- the columnar fast path -------------------------------------------------------------------

def test_a_regular_file_is_read_by_duckdb_with_the_reference_result(tmp_path):
    from client.csv_source import _header, _read_reference, _read_with_duckdb

    rows = "\n".join(f"{i},x{i}@example.com,{i % 7},N {i},{i * 1.25},s{i % 3},g"
                     for i in range(1, 501))
    path = _write(tmp_path, f"{HEADER}\n{rows}\n")
    header = _header(path, str(path))
    assert header is not None
    fast = _read_with_duckdb(path, header, FEATURES, "store", "segment")
    assert fast is not None  # the fast path really reads it
    slow = _read_reference(path, features=FEATURES, site_column="store", label_column="segment")
    np.testing.assert_array_equal(fast.raw, slow.raw)
    assert fast.sites is not None and slow.sites is not None and fast.labels is not None
    assert fast.sites.tolist() == slow.sites.tolist()
    assert fast.labels.tolist() == ["g"] * 500


def test_gzip_files_are_read_directly_and_their_errors_keep_row_and_column(tmp_path):
    import gzip

    text = f"{HEADER}\n1,a@x.org,3,Ann,10.5,north,g\n2,b@x.org,4,Bob,7,south,g\n"
    plain = _write(tmp_path, text)
    packed = tmp_path / "customers.csv.gz"
    packed.write_bytes(gzip.compress(text.encode()))
    np.testing.assert_array_equal(_read(packed).raw, _read(plain).raw)
    broken = tmp_path / "broken.csv.gz"
    broken.write_bytes(gzip.compress(text.replace(",7,", ",seven,").encode()))
    with pytest.raises(DataError, match="not a number") as info:
        _read(broken)
    _assert_names(info.value, broken, row=2, column="spend")


def test_a_header_naming_a_requested_column_twice_is_refused(tmp_path):
    path = _write(tmp_path, "visits,spend,store,spend\n1,2,a,3\n")
    with pytest.raises(DataError, match="more than once") as info:
        _read(path)
    _assert_names(info.value, path, column="spend")
    # A duplicated column nobody asked for is harmless.
    ok = _write(tmp_path, "visits,spend,store,note,note\n1,2,a,x,y\n", name="ok.csv")
    np.testing.assert_array_equal(_read(ok).raw, [[1.0, 2.0]])


def test_quarantine_excludes_and_counts_bad_rows_instead_of_stopping(tmp_path: Path) -> None:
    path = _write(tmp_path, "store,spend,visits\nA,1.5,2\nA,oops,3\nB,2.5,4\nB,1,2,9\n,3,3\n")
    with pytest.raises(DataError, match="row 2"):
        read_customer_csv(path, features=FEATURES[:2], site_column="store")
    cols = read_customer_csv(path, features=FEATURES[:2], site_column="store",
                             on_invalid="quarantine")
    np.testing.assert_array_equal(cols.raw, [[2.0, 1.5], [4.0, 2.5]])  # (visits, spend)
    assert cols.invalid == {"spend: invalid value": 1, "malformed row": 1,
                            "store: invalid value": 1}
