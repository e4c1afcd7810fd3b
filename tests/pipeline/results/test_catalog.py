"""The table catalog: one declaration per table, used by the writer, the layout and the docs."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.results import catalog, layout
from pipeline.results.tables import read, write

ROOT = Path(__file__).resolve().parents[3]


def test_docs_tables_md_is_the_catalog():
    assert (ROOT / "docs" / "tables.md").read_text() == catalog.markdown(), \
        "regenerate: python -m pipeline.results.catalog > docs/tables.md"


def test_the_readme_lists_every_table_and_its_contract_columns():
    """README's table of output tables names each catalog table (by its file under --out) and
    every column the row spells out in its first cell group exists in the schema."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Output tables", 1)[1].split("\n## ", 1)[0]
    for t in catalog.TABLES.values():
        assert f"`{t.path}`" in section or f"`{t.file}`" in section, t.path
    rows = re.findall(r"^\| `([a-z_/]+\.parquet)` \| (.*) \|$", section, re.M)
    assert rows
    for path, cols in rows:
        table = next(t for t in catalog.TABLES.values() if t.path == path or t.file == path)
        while re.search(r"\([^()]*\)", cols):                # drop (explanations), nested too
            cols = re.sub(r"\([^()]*\)", "", cols)
        first = cols.split(";")[0]                            # before "added:" / a second table
        named = [w.split()[0] for w in first.split(",") if w.strip()]   # "label int64" -> label
        named = [w for w in named if re.fullmatch(r"[a-z_0-9]+", w)]
        assert len(named) >= 3, (path, first)
        missing = [c for c in named if c not in table.schema.names]
        assert not missing, f"README names {missing} for {path}, not in the catalog's schema"


def test_order_is_stable_and_groups_strings_as_first_written():
    rows = pa.table({"model": ["r", "r", "p", "r", "p"], "layer": ["c3", "c1", "c3", "c3", "c1"],
                     "neuron": ["center"] * 5, "images": [1, 2, 3, 4, 5]})
    base = catalog.BASELINE
    got = base.order(rows.append_column("size", pa.array([0] * 5, pa.int32())))
    # model r first (written first), within r: c3 (first seen) before c1; ties keep their order
    assert got["images"].to_pylist() == [1, 4, 2, 3, 5]
    assert base.order(got).equals(got)                          # already ordered: unchanged
    chans = pa.table({"model": ["m"] * 4, "layer": ["l"] * 4,
                      "channel": pa.array([2, 0, 1, 0], pa.int32()), "x": [0, 1, 2, 3]})
    assert catalog.CHANNELS.order(chans)["x"].to_pylist() == [1, 3, 2, 0]   # numbers ascend


def test_write_conforms_rows_to_the_declaration(tmp_path):
    rows = pa.table({"extra": [1, 2], "epoch": [1, 0], "train_loss": [0.5, 0.7]})
    full = {f.name: pa.nulls(2, f.type) for f in catalog.METRICS.schema}
    full.update({"epoch": pa.array([1, 0]), "train_loss": pa.array([0.5, 0.7])})
    url = write(catalog.METRICS, pa.table(full), str(tmp_path))
    assert url == str(tmp_path / "metrics.parquet")
    back = read(catalog.METRICS, str(tmp_path))
    assert back.schema == catalog.METRICS.schema and back["epoch"].to_pylist() == [0, 1]
    assert pq.read_schema(url) == catalog.METRICS.schema
    with pytest.raises(KeyError, match="lack column"):
        write(catalog.METRICS, rows, str(tmp_path))


def test_layout_takes_file_names_from_the_catalog():
    out = "s3://b/run"
    assert layout.stimuli(out, "resnet34", "baseline") == \
        catalog.BASELINE.at("s3://b/run/analysis/resnet34")
    assert layout.combined(out, "ablation", "table1") == "s3://b/run/ablation/table1.parquet"
    assert layout.metrics(out, "vgg16", 2) == "s3://b/run/seeds/2/train/vgg16/metrics.parquet"
    with pytest.raises(ValueError, match="unknown table 'nope'; allowed: manifest"):
        layout.combined(out, "ablation", "nope")


def test_a_declaration_checks_itself():
    with pytest.raises(ValueError, match="not in the schema"):
        catalog.Table("x", pa.schema([("a", pa.int64())]), sort=("b",), job="j", about="a")
    assert catalog.TOPK.without("patch").names == catalog.TOPK.schema.names[:-1]
    with pytest.raises(ValueError, match="no column"):
        catalog.TOPK.without("nope")
    assert len({t.path for t in catalog.TABLES.values()}) == len(catalog.TABLES)
    assert all(t.sort for t in catalog.TABLES.values())
