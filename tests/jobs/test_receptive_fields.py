"""The receptive_fields job: printed table, Parquet output, one-line errors with exit code 2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from jobs.receptive_fields import main
from pipeline.models.rf_catalogue import RF_SCHEMA, receptive_fields
from pipeline.models.zoo import build_model

ROOT = Path(__file__).resolve().parents[2]
DESIGN_COLUMNS = ["model", "layer", "module", "channels", "rf_size", "jump", "offset",
                  "feature_size"]


def test_subprocess_prints_and_writes_both_models(tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "jobs.receptive_fields",
                           "--model", "resnet34,plainnet34", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == DESIGN_COLUMNS
    rows = {(ln.split()[0], ln.split()[1]): ln.split() for ln in lines[1:]}
    # per model 35 layers (conv1, pool1, conv2..conv33, fc) and 16 block outputs
    assert len(rows) == 2 * (35 + 16)
    for model in ("resnet34", "plainnet34"):
        assert rows[(model, "pool1")][4] == "11"
        assert rows[(model, "conv3")][2:5] == ["layer1.0.conv2", "64", "27"]
        assert rows[(model, "conv7")][4:] == ["59", "4", "0", "56"]
        assert rows[(model, "layer1.2")][2:] == ["layer1.2", *rows[(model, "conv7")][3:]]
        assert rows[(model, "layer3.5")][4:] == rows[(model, "conv27")][4:]

    table = pq.read_table(out / "receptive_fields.parquet")
    assert table.schema.names[:8] == DESIGN_COLUMNS
    assert table.schema == RF_SCHEMA
    res = table.filter(pc.equal(table["model"], "resnet34"))
    plain = table.filter(pc.equal(table["model"], "plainnet34"))
    assert res.drop_columns(["model"]).equals(plain.drop_columns(["model"]))
    # the written values are those of the library on a real (not meta) model
    rfs = receptive_fields(build_model("resnet34", width=8), 224)
    got = {r["layer"]: (r["rf_size"], r["jump"], r["offset"], r["feature_size"])
           for r in res.to_pylist()}
    assert got == {k: (v.size, v.jump, v.offset, v.feature_size) for k, v in rfs.items()}
    assert list(tmp_path.iterdir()) == [out]  # nothing else written
    # the per-axis columns repeat the square ones; only fc has global context
    for a, b in (("rf_size", "rf_size_y"), ("rf_size", "rf_size_x"), ("jump", "jump_x"),
                 ("offset", "offset_x"), ("feature_size", "feature_width")):
        assert res[a].equals(res[b])
    flagged = res.filter(res["global_context"])["layer"].to_pylist()
    assert flagged == ["fc"] and "1 of 51 layers also depend on the whole image" in proc.stderr


def test_list_prints_every_analysable_layer_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--model", "resnet18,alexnet", "--input-size", "64", "--list"]) == 0
    captured = capsys.readouterr()
    rows = [ln.split() for ln in captured.out.splitlines()]
    assert rows[0] == ["model", "layer", "channels", "rf_size_y", "rf_size_x", "jump",
                       "offset_y", "offset_x", "feature_height", "feature_width",
                       "global_context"]
    layers = {(r[0], r[1]): r for r in rows[1:]}
    # paper names first, then module paths; the paper's conv3 is layer1.0.relu2's output
    assert layers[("resnet18", "conv3")][2:] == layers[("resnet18", "layer1.0.relu2")][2:]
    assert layers[("resnet18", "layer1.0.conv1")][3] == layers[("resnet18", "conv2")][3] == "19"
    assert layers[("alexnet", "features.0")][2:5] == ["64", "11", "11"]
    assert layers[("alexnet", "avgpool")][-1] == "False"          # 1x1 -> 6x6: replication
    assert ("resnet18", "fc") in layers and ("resnet18", "avgpool") in layers
    assert list(tmp_path.iterdir()) == []


def test_any_model_writes_module_path_rows(tmp_path):
    path = tmp_path / "rf.parquet"
    assert main(["--model", "mobilenet_v3_small", "--input-size", "64", "--out", str(path)]) == 0
    table = pq.read_table(path).to_pylist()
    by = {r["layer"]: r for r in table}
    assert by["features.0.0"]["module"] == "features.0.0" and by["features.0.0"]["rf_size"] == 3
    assert not by["features.0"]["global_context"] and by["features.1.block.1"]["global_context"]


def test_file_out_and_input_size(tmp_path, capsys):
    path = tmp_path / "sub" / "rf18.parquet"
    assert main(["--model", "plainnet18", "--input-size", "97", "--out", str(path)]) == 0
    table = pq.read_table(path)
    assert set(table.column("model").to_pylist()) == {"plainnet18"}
    assert set(table.column("input_size").to_pylist()) == {97}
    assert table.column("feature_size").to_pylist()[:3] == [49, 25, 25]
    assert "plainnet18" in capsys.readouterr().out
    assert sorted(os.listdir(path.parent)) == ["rf18.parquet"]  # no temporary left behind


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet99"], "unknown model 'resnet99'; supported: alexnet, convnext_base, "),
    (["--model", "resnet34,vit_b_16"], "model 'vit_b_16' is a transformer without "
                                       "convolutional feature maps; supported: alexnet, "),
    (["--model", ","], "--model is empty"),
    (["--input-size", "0"], "--input-size must be a positive integer, got 0"),
    (["--input-size", "-5"], "--input-size must be a positive integer, got -5"),
    (["--input-size", "2.5"], "invalid int value: '2.5'"),
    (["--colour", "red"], "unrecognized arguments: --colour red"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out.parquet"
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--out", str(out)])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m jobs.receptive_fields: error: ")
    assert message in err[0]
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []


def test_unwritable_out_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(blocker / "rf.parquet")])
    assert exc.value.code == 2
    assert "is not writable" in capsys.readouterr().err
    assert blocker.read_text() == "not a folder"


def test_folder_out_gets_run_json_but_never_over_another_jobs(tmp_path):
    import json

    from tests.helpers import assert_run_shape

    out = tmp_path / "rf"
    assert main(["--model", "resnet18", "--input-size", "64", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert_run_shape(run)
    assert run["job"] == "receptive_fields" and run["config"]["models"] == ["resnet18"]
    assert run["counts"]["layers"] == pq.read_table(out / "receptive_fields.parquet").num_rows
    analysis = tmp_path / "analysis"              # e.g. a jobs.analyze --out
    analysis.mkdir()
    (analysis / "run.json").write_text('{"job": "analyze"}')
    assert main(["--model", "resnet18", "--input-size", "64", "--out", str(analysis)]) == 0
    assert json.loads((analysis / "run.json").read_text()) == {"job": "analyze"}
