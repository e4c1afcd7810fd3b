"""jobs.demo_data end to end: the layout on disk and on S3, refusals with exit code 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jobs.demo_data import main
from pipeline.data.demo import DEMO_CLASSES
from pipeline.data.listing import build_manifest
from tests.helpers import assert_run_shape

SMALL = ["--train-per-class", "3", "--val-per-class", "2"]


def _files(root) -> dict[str, bytes]:
    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), root)] = fh.read()
    return out


def test_writes_class_folder_layout_and_refuses_to_clobber(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--out", str(out), "--seed", "2", *SMALL]) == 0
    # no temporary folder left; run.json is the common run report
    assert sorted(os.listdir(out)) == ["run.json", "train", "val"]
    for split, per in (("train", 3), ("val", 2)):
        m = build_manifest(str(out / split), require_labels=True)
        assert m.classes == sorted(DEMO_CLASSES) and len(m) == per * len(DEMO_CLASSES)
    run = json.loads((out / "run.json").read_text())
    assert_run_shape(run)
    assert run["counts"]["images_written"] == 5 * len(DEMO_CLASSES)
    assert run["config"]["seed"] == 2 and run["throughput"]["unit"] == "images"
    first = {k: v for k, v in _files(out).items() if k != "run.json"}
    capsys.readouterr()

    with pytest.raises(SystemExit) as e:
        main(["--out", str(out), "--seed", "3", *SMALL])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already has train/ and val/" in err[0] and "--overwrite" in err[0]
    assert {k: v for k, v in _files(out).items() if k != "run.json"} == first

    assert main(["--out", str(out), "--seed", "3", "--overwrite", *SMALL]) == 0
    again = {k: v for k, v in _files(out).items() if k != "run.json"}
    assert again.keys() == first.keys() and again != first


@pytest.mark.parametrize("args, words", [
    (["--train-per-class", "-1"], "--train-per-class"),
    (["--train-per-class", "0", "--val-per-class", "0"], ">= 1"),
    (["--seed", "-5"], "--seed"),
    (["--image-size", "2"], "--image-size"),
    (["--seed", "x"], "invalid int"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, args, words):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        main(["--out", str(out), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]
    assert not out.exists()


def test_help_and_missing_out():
    ok = subprocess.run([sys.executable, "-m", "jobs.demo_data", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "--train-per-class" in ok.stdout and "--overwrite" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "jobs.demo_data"], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--out" in bad.stderr


def test_writes_to_s3(s3_bucket, tmp_path):
    url = f"s3://{s3_bucket}/demo"
    assert main(["--out", url, *SMALL]) == 0
    assert main(["--out", str(tmp_path / "local"), *SMALL]) == 0
    remote = build_manifest(url + "/val", require_labels=True)
    local = build_manifest(str(tmp_path / "local" / "val"), require_labels=True)
    assert remote.table.equals(local.table)
    import fsspec

    fs = fsspec.filesystem("s3")
    assert fs.cat(f"{s3_bucket}/demo/val/{local.table.column('path')[0].as_py()}") == \
        (tmp_path / "local" / "val" / local.table.column("path")[0].as_py()).read_bytes()
