"""jobs.reproduce end to end: the demo chain with --out on a real S3 server (moto, loopback).

One small run (tiny class-folder data, 1 epoch) through every stage; then: every table is on S3,
the credentials appear in no log and no run.json, a rerun skips every finished stage, and the
README's pandas/duckdb snippet runs on a local copy of the output.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

SECRET_ID = "AKIAREPRODUCETEST0001"
SECRET_KEY = "reproduce-secret-must-never-be-logged"


@pytest.fixture(scope="module")
def run(s3_server, tmp_path_factory):
    import boto3
    import ray

    from pipeline.demo import DemoSpec, generate_demo_data

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ACCESS_KEY_ID=SECRET_ID, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    data = tmp_path_factory.mktemp("reproduce") / "data"
    generate_demo_data(str(data), DemoSpec(seed=3, train_per_class=12, val_per_class=6))
    boto3.client("s3").create_bucket(Bucket="reproduce")
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=200 * 1024**2)
    try:
        yield {"data": data, "out": "s3://reproduce/results"}
    finally:
        ray.shutdown()
        for k, v in saved.items():
            os.environ[k] = v if v is not None else os.environ.pop(k, "")


def _reproduce(run, capsys, *extra):
    from jobs.reproduce import main

    argv = ["--train-data", str(run["data"] / "train"), "--data", str(run["data"] / "val"),
            "--out", run["out"], "--epochs", "1", "--workers", "1", "--noise-seeds", "2",
            "--actmax-layers", "conv3", *extra]
    assert main(argv) == 0
    return capsys.readouterr()


@pytest.fixture(scope="module")
def first(run):
    return {}


def test_chain_writes_every_table_to_s3_without_leaking_credentials(run, capsys, first):
    import fsspec

    captured = _reproduce(run, capsys)
    first["log"] = captured.err
    fs = fsspec.filesystem("s3")
    root = run["out"][len("s3://"):]
    expected = [
        "train/resnet34/model.pt", "train/plainnet34/metrics.parquet",
        "analysis/resnet34/stimuli/topk.parquet", "analysis/plainnet34/stimuli/mean.parquet",
        "analysis/plainnet34/stimuli/channels.parquet", "analysis/resnet34/receptive_fields.parquet",
        "ablation/ablation.parquet", "ablation/table1.parquet", "actmax/actmax.parquet",
        "neuron_types/summary.parquet", "report/index.html", "run.json",
    ]
    missing = [p for p in expected if not fs.exists(f"{root}/{p}")]
    assert not missing, missing
    import pandas as pd

    with fs.open(f"{root}/ablation/ablation.parquet") as f:
        ablation = pd.read_parquet(f)
    assert set(ablation.model) == {"resnet34", "plainnet34"}
    with fs.open(f"{root}/actmax/actmax.parquet") as f:
        actmax = pd.read_parquet(f, columns=["model", "layer", "channel"])
    assert set(actmax.model) == {"resnet34", "plainnet34"} and set(actmax.layer) == {"conv3"}
    # credentials: in no log line and no run.json anywhere under --out
    text = captured.out + captured.err
    for path in fs.find(root):
        if path.endswith(".json"):
            text += fs.cat(path).decode()
    assert SECRET_KEY not in text and SECRET_ID not in text
    assert re.search(r"\[6/6\] report done", captured.err)


def test_rerun_skips_every_finished_stage(run, capsys, first):
    if "log" not in first:
        pytest.skip("the first run failed")
    err = _reproduce(run, capsys).err
    for stage in ("train:resnet34", "train:plainnet34", "analyze:resnet34", "ablate:plainnet34",
                  "actmax:resnet34", "neuron_types"):
        assert f"{stage}: already complete" in err, err


def test_readme_snippet_reads_the_tables(run, tmp_path, first):
    if "log" not in first:
        pytest.skip("the first run failed")
    import fsspec

    fs = fsspec.filesystem("s3")
    local = tmp_path / "results"
    fs.get(run["out"][len("s3://"):] + "/analysis", str(local / "analysis"), recursive=True)
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = re.search(r"### Reading the tables\n+```python\n(.*?)```", readme, re.S).group(1)
    block = block.replace('out = "./results"', f'out = "{local}"')
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    best = namespace["best"]
    assert len(best) > 0 and (best["rank"] == 0).all()
    # the duckdb query saw both models' channel tables
    import duckdb

    n = duckdb.sql(f"SELECT count(DISTINCT model) FROM read_parquet('{local}/analysis/*/stimuli/"
                   "channels.parquet')").fetchall()[0][0]
    assert n == 2


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    from jobs.reproduce import main

    for argv, needle in ((["--preset", "huge"], "allowed: demo, paper"),
                         (["--preset", "paper"], "--data"),
                         (["--stages", "train,dance"], "unknown stage 'dance'"),
                         (["--data", str(tmp_path)], "both --train-data and --data"),
                         (["--seeds", "0"], "--seeds must be >= 1"),
                         (["--noise-seeds", "0"], "--noise-seeds must be >= 1"),
                         (["--fractions", "0.5,2"], "--fractions item '2' is neither"),
                         (["--seeds", "2", "--checkpoint-resnet", str(tmp_path / "r.pt")],
                          "use --seeds 1")):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out" / "run.json").exists()


def test_given_checkpoints_skip_training(run, capsys, first):
    if "log" not in first:
        pytest.skip("the first run failed")
    import fsspec

    from pipeline.tables import read_json

    ckpt = {m: f"{run['out']}/train/{m}/model.pt" for m in ("resnet34", "plainnet34")}
    out = "s3://reproduce/given"
    _reproduce({**run, "out": out}, capsys, "--checkpoint-resnet", ckpt["resnet34"],
               "--checkpoint-plainnet", ckpt["plainnet34"], "--stages", "analyze")
    fs = fsspec.filesystem("s3")
    assert not fs.exists("reproduce/given/train")
    assert fs.exists("reproduce/given/analysis/plainnet34/stimuli/topk.parquet")
    assert read_json(f"{out}/run.json")["checkpoints"] == ckpt
    analysed = read_json(f"{out}/analysis/resnet34/run.json")["config"]["checkpoint"]
    assert analysed == ckpt["resnet34"]


def _train_has_seed() -> bool:
    """jobs.train --seed (issue 11): the multi-seed chain needs it."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "jobs.train", "--help"], capture_output=True,
                         text=True, timeout=120).stdout
    return re.search(r"--seed\b(?!-)", out) is not None


def test_two_training_seeds_give_per_seed_census_rows_and_table1_across_them(run, capsys, first):
    """--seeds 2 on the first run's output: seed 0's stages are complete and skipped, seed 1 is
    trained, analysed and ablated under seeds/1/, and the top-level census, ablation and Table 1
    cover both. (Runs last: it adds seed 1 to the shared output.) Needs jobs.train --seed."""
    if "log" not in first:
        pytest.skip("the first run failed")
    if not _train_has_seed():
        pytest.skip("jobs.train has no --seed yet (issue 11): enable once it does")
    import fsspec
    import pandas as pd

    from pipeline import layout

    err = _reproduce(run, capsys, "--seeds", "2", "--stages", "train,analyze,ablate").err
    assert "train:resnet34: already complete" in err and "train:resnet34:seed1 ..." in err
    fs = fsspec.filesystem("s3")
    root = run["out"][len("s3://"):]
    for model in ("resnet34", "plainnet34"):
        assert fs.exists(layout.checkpoint(root, model, 1))
        assert fs.exists(layout.stimuli(root, model, "channels", 1))

    def read(name):
        with fs.open(layout.combined(root, "ablation", name)) as f:
            return pd.read_parquet(f)

    census, ablation, t1 = read("census"), read("ablation"), read("table1")
    channels = census.groupby(["model", "train_seed"]).channel.count()
    assert sorted(channels.index) == [(m, s) for m in ("plainnet34", "resnet34") for s in (0, 1)]
    assert channels.nunique() == 1                       # every seed: every channel once
    assert set(ablation.train_seed) == {0, 1}
    assert (t1.train_seeds == 2).all() and (t1.std_across == "training seeds").all()
    for model, g in census.groupby("model"):
        per_seed = [int(g[g.train_seed == s].inactive.sum()) for s in (0, 1)]
        row = t1[(t1.model == model) & (t1.condition == "inactive-all")].iloc[0]
        assert list(row.inactive_per_seed) == per_seed
        assert row.inactive_mean == pytest.approx(sum(per_seed) / 2)
        clean = ablation[(ablation.model == model) & (ablation.condition == "clean")]
        assert row.clean_loss == pytest.approx(clean.loss.mean())
