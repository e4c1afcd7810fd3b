"""Parquet/JSON I/O: atomic writes, explicit schemas, URL joins."""
import pyarrow as pa
import pytest

from pipeline.results.tables import exists, join, read_json, read_table, write_json, write_table


def test_join_keeps_schemes():
    assert join("s3://b/x/", "y", "/z.parquet") == "s3://b/x/y/z.parquet"
    assert join("/tmp/a", "b") == "/tmp/a/b"


def test_write_table_casts_to_the_schema_and_leaves_no_temporaries(tmp_path):
    schema = pa.schema([("channel", pa.int32()), ("value", pa.float32())])
    t = pa.table({"value": [1.5, 2.5], "channel": [0, 1], "extra": ["a", "b"]})
    url = join(str(tmp_path), "sub", "t.parquet")
    write_table(t, url, schema)
    back = read_table(url)
    assert back.schema == schema and back.column("channel").to_pylist() == [0, 1]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["t.parquet"]
    write_json(join(str(tmp_path), "run.json"), {"a": 1})
    assert read_json(join(str(tmp_path), "run.json")) == {"a": 1}
    assert exists(url) and not exists(url + ".x")


def test_a_failed_write_leaves_no_final_file(tmp_path):
    schema = pa.schema([("channel", pa.int32())])
    url = join(str(tmp_path), "t.parquet")
    with pytest.raises(Exception):
        write_table(pa.table({"other": [1]}), url, schema)
    assert not exists(url)
