"""jobs.reproduce end to end: the demo chain with --out on a real S3 server (moto, loopback).

One small chain run (tiny class-folder data, 1 epoch, 16 images analysed and ablated, one
inactive-random fraction) through every stage, shared by the tests of this file; then: every
table is on S3, the credentials appear in no log and no run.json, a rerun skips every finished
stage, the README's pandas/duckdb snippet runs on a local copy of the output, given checkpoints
skip training, and a second training seed adds only its own stages to the same output.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import pytest

from tests.helpers import LOOPBACK, assert_run_shape

SECRET_ID = "AKIAREPRODUCETEST0001"
SECRET_KEY = "reproduce-secret-must-never-be-logged"
MODELS = ("resnet34", "plainnet34")


@pytest.fixture(scope="module")
def run(s3_server, tmp_path_factory):
    import boto3
    import ray

    from pipeline.data.demo import DemoSpec, generate_demo_data

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ACCESS_KEY_ID=SECRET_ID, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    data = tmp_path_factory.mktemp("reproduce") / "data"
    generate_demo_data(str(data), DemoSpec(seed=3, train_per_class=12, val_per_class=6))
    boto3.client("s3").create_bucket(Bucket="reproduce")
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=200 * 1024**2, _node_ip_address=LOOPBACK, log_to_driver=False)
    try:
        yield {"data": data, "out": "s3://reproduce/results"}
    finally:
        ray.shutdown()
        for k, v in saved.items():
            os.environ[k] = v if v is not None else os.environ.pop(k, "")


def _reproduce(run, *extra, out: str | None = None) -> str:
    """Run the chain in this process (the fixture's Ray); returns its console (stdout+stderr)."""
    from jobs.reproduce import main

    argv = ["--train-data", str(run["data"] / "train"), "--data", str(run["data"] / "val"),
            "--out", out or run["out"], "--epochs", "1", "--workers", "1", "--noise-seeds", "2",
            "--limit", "16", "--fractions", "0.5", "--actmax-layers", "conv3", *extra]
    text = io.StringIO()
    with contextlib.redirect_stderr(text), contextlib.redirect_stdout(text):
        rc = main(argv)
    assert rc == 0, text.getvalue()[-3000:]
    return text.getvalue()


@pytest.fixture(scope="module")
def chain(run) -> str:
    """The console of one full chain run into run["out"] (every test below reads its output)."""
    return _reproduce(run)


def test_chain_writes_every_table_to_s3_without_leaking_credentials(run, chain):
    import fsspec

    from pipeline.results.tables import read_json
    fs = fsspec.filesystem("s3")
    root = run["out"][len("s3://"):]
    expected = [
        "train/resnet34/model.pt", "train/plainnet34/metrics.parquet",
        "analysis/resnet34/stimuli/topk.parquet", "analysis/plainnet34/stimuli/mean.parquet",
        "analysis/plainnet34/stimuli/channels.parquet", "analysis/resnet34/receptive_fields.parquet",
        "ablation/ablation.parquet", "ablation/table1.parquet", "actmax/actmax.parquet",
        "neuron_types/summary.parquet", "compare/cka.parquet", "compare/matches.parquet",
        "compare/selectivity.parquet", "report/index.html", "report/compare.html", "run.json",
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
    text = chain
    for path in fs.find(root):
        if path.endswith(".json"):
            text += fs.cat(path).decode()
    assert SECRET_KEY not in text and SECRET_ID not in text
    assert re.search(r"\[7/7\] report done", chain)
    info = read_json(f"{run['out']}/run.json")
    assert_run_shape(info)
    assert info["counts"]["stages_run"] == 2 * 4 + 3     # train, analyze, ablate, actmax x 2
    compare = info["details"]["commands"]["compare"]    # and neuron_types, compare, report
    assert "--models resnet34,plainnet34" in compare and "--batch-size 4" in compare
    ablate = info["details"]["commands"]["ablate:resnet34"]
    assert ablate.startswith("python -m jobs.ablate ") and " --layer " not in ablate  # its pool1


PROGRESS = re.compile(r"\d+/\d+ .*/s, ETA \d+:\d\d$")


def test_chain_console_is_one_screen_of_stage_epoch_and_progress_lines(chain):
    """The sub-jobs' consoles are nested: no Table 1, no neuron-type summary, no setup or
    sub-stage chatter; what is left is a start and an end line per stage, the epochs, the
    final line, and progress lines of stages long enough to print one, named by their stage."""
    stamp = re.compile(r"\[\d\d:\d\d:\d\d\] ")      # our lines; Ray's own have none
    lines = [line for line in chain.strip().splitlines() if stamp.match(line)]
    assert "Table 1" not in chain and "double-opponent" not in chain, chain
    assert all(line[11:].startswith("reproduce: ") for line in lines), chain
    progress = [line for line in lines if PROGRESS.search(line)]
    assert all(re.search(r"reproduce: (train|analyze|ablate|actmax):\w+: \w+ \d+/", line)
               or re.search(r"reproduce: (neuron_types|compare): ", line) for line in progress), \
        progress
    others = [line[len("[00:00:00] reproduce: "):] for line in lines
              if line not in progress and "WARNING" not in line]
    epochs = [o for o in others if re.fullmatch(r"train:\w+: epoch 1/1 .*", o)]
    assert sorted(e.split(":")[1] for e in epochs) == sorted(MODELS), others
    census = [o for o in others
              if re.fullmatch(r"ablate:\w+: pool1: \d+ of \d+ channels inactive .*", o)]
    assert sorted(c.split(":")[1] for c in census) == sorted(MODELS), others   # one line each
    rest = [o for o in others if o not in epochs and o not in census]
    stages = [f"{s}:{m}" for s in ("train", "analyze", "ablate", "actmax") for m in MODELS]
    assert len(rest) == 2 * (len(stages) + 3) + 1, rest  # + neuron_types, compare, report, done
    for name in [*stages, "neuron_types", "compare", "report"]:
        assert sum(bool(re.fullmatch(rf"\[\d/7\] {name} (\.\.\.|done in .* s)", o))
                   for o in rest) == 2, (name, rest)


def test_a_job_run_alone_prints_table1_and_nested_prints_none(run, chain):
    """jobs.ablate's own command from run.json: alone it prints Table 1 (stdout) and its stage
    lines; inside the chain's nest block, its console keeps none of them."""
    import shlex

    from jobs.ablate import main
    from pipeline.results.tables import read_json
    from jobs.runtime.console import Console

    argv = shlex.split(read_json(f"{run['out']}/run.json")["details"]["commands"]
                       ["ablate:resnet34"])[3:]
    i = argv.index("--out")

    def ablate(out: str, nested: bool) -> tuple[str, str]:
        argv[i + 1] = out
        so, se = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
            if nested:
                with Console("reproduce").nest("ablate:resnet34"):
                    assert main(argv) == 0
            else:
                assert main(argv) == 0
        return so.getvalue(), se.getvalue()

    out, err = ablate(f"{run['out']}-alone/ablation", nested=False)
    assert out.startswith("Table 1: validation loss change") and "resnet34" in out, out
    assert re.search(r"ablate: evaluate done in", err) and "ablate: wrote census" in err, err
    out, err = ablate(f"{run['out']}-nested/ablation", nested=True)
    assert out == "", out
    lines = err.splitlines()
    assert sum("channels inactive" in line for line in lines) == 1, err    # the census line
    assert all((PROGRESS.search(line) or "channels inactive" in line) and line.split("] ", 1)[1]
               .startswith("reproduce: ablate:resnet34: ") for line in lines), err


def test_rerun_skips_every_finished_stage(run, chain):
    # the report is rebuilt on every run: left out here, it is what the first run tested
    err = _reproduce(run, "--stages", "train,analyze,ablate,actmax,neuron_types,compare")
    for stage in ("train:resnet34", "train:plainnet34", "analyze:resnet34", "ablate:plainnet34",
                  "actmax:resnet34", "neuron_types", "compare"):
        assert f"{stage}: already complete" in err, err


def test_readme_snippet_reads_the_tables(run, tmp_path, chain):
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
                          "use --seeds 1"),
                         (["--models", "resnet34,vit_b_16"],
                          "unknown model 'vit_b_16'; allowed: distinct names among alexnet,"),
                         (["--models", "resnet50,vgg16"], "--layers is required for vgg16"),
                         (["--models", "resnet50,vgg16", "--layers", "vgg16=features.4"],
                          "--ablate-layer needs exactly one layer for vgg16"),
                         (["--layers", "conv3"], "ablation layer pool1 of resnet34 is not among"),
                         (["--checkpoints", "vgg16=s3://b/v.pt"],
                          "MODEL one of --models (resnet34, plainnet34)")):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists()          # every bad input surfaced before --out


def test_any_pair_gets_per_model_layers_and_the_paper_pair_keeps_its_own():
    """--models A,B: paper layers for the ResNet family, the given module paths for others;
    the default keeps the paper pair, its layers and jobs.ablate's own --layer (pool1)."""
    from jobs.reproduce import ReproduceConfig

    paper = ReproduceConfig()
    assert paper.models == MODELS
    assert paper.layer_plan() == {m: ("pool1,conv3,conv7",) * 2 + (None,) for m in MODELS}
    cfg = ReproduceConfig(models=("resnet50", "vgg16"), data="v", train_data="t",
                          layers="conv3,conv7,vgg16=features.4,features.28",
                          actmax_layers="vgg16=features.28", ablate_layer="vgg16=features.4,"
                          "resnet50=conv3", checkpoints="vgg16=s3://b/v16.pt")
    assert cfg.layer_plan() == {"resnet50": ("conv3,conv7", "conv3,conv7", "conv3"),
                                "vgg16": ("features.4,features.28", "features.28", "features.4")}
    assert cfg.given_checkpoints() == {"vgg16": "s3://b/v16.pt"}


def test_given_checkpoints_skip_training(run, chain):
    import fsspec

    from pipeline.results.tables import read_json

    ckpt = {m: f"{run['out']}/train/{m}/model.pt" for m in ("resnet34", "plainnet34")}
    out = "s3://reproduce/given"
    _reproduce(run, "--checkpoint-resnet", ckpt["resnet34"], "--checkpoint-plainnet",
               ckpt["plainnet34"], "--stages", "analyze", "--layers", "pool1", "--limit", "4",
               out=out)
    fs = fsspec.filesystem("s3")
    assert not fs.exists("reproduce/given/train")
    assert fs.exists("reproduce/given/analysis/plainnet34/stimuli/topk.parquet")
    assert read_json(f"{out}/run.json")["details"]["checkpoints"] == ckpt
    analysed = read_json(f"{out}/analysis/resnet34/run.json")["config"]["checkpoint"]
    assert analysed == ckpt["resnet34"]


DEAD = [2, 7, 11]


def test_a_demo_checkpoint_with_dead_pool1_channels_is_censused_and_noised(run, chain):
    """The paper-scale path where a condition can fail: the chain's trained resnet34 with the
    BatchNorm scale and shift of three conv1 channels zeroed (their ReLU, hence pool1, is 0 on
    every image), given as a checkpoint: the census finds exactly those channels, every noise
    condition is evaluated on them, and Table 1 states its numbers with their seeds."""
    import torch

    from pipeline.ablation.table1 import format_table1, table1_cells
    from pipeline.models.checkpoint import load_checkpoint, save_checkpoint
    from pipeline.results import layout
    from pipeline.results.tables import read_table

    loaded = load_checkpoint(f"{run['out']}/train/resnet34/model.pt", "resnet34")
    with torch.no_grad():
        loaded.model.bn1.weight[DEAD] = 0.0
        loaded.model.bn1.bias[DEAD] = 0.0
    ckpt = "s3://reproduce/dead/resnet34.pt"
    save_checkpoint(ckpt, loaded.model, loaded.preprocess, recipe=loaded.meta.get("recipe"))
    out = "s3://reproduce/dead/results"
    err = _reproduce(run, "--models", "resnet34", "--checkpoints", f"resnet34={ckpt}",
                     "--stages", "analyze,ablate", "--layers", "pool1", out=out)
    assert f"pool1: 3 of 16 channels inactive (--from): {DEAD}" in err
    census = read_table(layout.combined(out, "ablation", "census")).to_pandas()
    assert sorted(census[census.inactive].channel) == DEAD
    ablation = read_table(layout.combined(out, "ablation", "ablation")).to_pandas()
    noisy = ablation[ablation.condition != "clean"]
    assert set(noisy.condition) == {"inactive-all", "inactive-random", "control-active"}
    assert noisy.images.gt(0).all() and noisy.delta_loss.notna().all()
    full = noisy[noisy.condition == "inactive-all"]
    assert all(list(c) == DEAD for c in full.noised_channels)
    assert (full.noised_per_image == 3).all() and (full.delta_loss > 0).all()
    control = noisy[noisy.condition == "control-active"]
    assert all(len(c) == 3 and not set(c) & set(DEAD) for c in control.noised_channels)
    rnd = noisy[noisy.condition == "inactive-random"]
    assert all(set(c) <= set(DEAD) for c in rnd.noised_channels)
    assert ((rnd.noised_per_image > 0) & (rnd.noised_per_image < 3)).all()   # p = 0.5 of 3
    t1 = read_table(layout.combined(out, "ablation", "table1"))
    rows = t1.to_pylist()
    assert [(r["condition"], r["inactive"], r["train_seeds"]) for r in rows] == [
        ("inactive-all", 3, 1), ("inactive-random", 3, 1)]
    assert rows[0]["delta_loss_mean"] == pytest.approx(full.delta_loss.mean())
    assert table1_cells(rows[0])["ΔL"] == (f"{full.delta_loss.mean():+.4f} ± "
                                           f"{full.delta_loss.std(ddof=1):.4f} (n = 2 noise seeds)")
    assert "3/16" in format_table1(t1)


def test_two_training_seeds_give_per_seed_census_rows_and_table1_across_them(run, chain):
    """--seeds 2 on the first run's output: seed 0's stages are complete and skipped, seed 1 is
    trained, analysed and ablated under seeds/1/, and the top-level census, ablation and Table 1
    cover both. (Runs last: it adds seed 1 to the shared output, and runs only what seed 1 adds.)"""
    import fsspec
    import pandas as pd

    from pipeline.results import layout

    err = _reproduce(run, "--seeds", "2", "--stages", "train,analyze,ablate")
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


def test_without_the_train_stage_or_a_checkpoint_later_stages_get_stand_ins(tmp_path):
    """`--stages analyze,...` with nothing trained and no checkpoint given: the jobs' Configs
    have no checkpoint (seeded untrained stand-ins), with a warning, not a missing path."""
    from jobs import analyze
    from jobs.chain import LINKS
    from jobs.reproduce import Chain, ReproduceConfig
    from jobs.runtime.console import Console

    con = Console("reproduce")
    cfg = ReproduceConfig(stages=("analyze",), out=str(tmp_path))
    chain = Chain(cfg, con)
    chain.stage(LINKS[0], "resnet34", 0)
    chain.record_checkpoint("resnet34", 0)
    built, _ = analyze.chained(chain.ctx, "resnet34", 0)
    assert built.checkpoint is None and built.argv()[:2] == ["--model", "resnet34"]
    assert chain.skipped == ["train:resnet34"]
    assert any("untrained stand-in" in w for w in con.warnings)
