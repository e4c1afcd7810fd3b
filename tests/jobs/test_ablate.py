"""jobs.ablate end to end on a real local Ray cluster and real JPEG files.

A tiny resnet18 (width 8, 3 classes) has three conv1 channels forced dead (very negative BN
bias), so pool1 has exactly those inactive channels; its numbers are checked against a plain
evaluation and a brute-force census, and across shard counts, reruns and --from.
"""
from __future__ import annotations

import contextlib
import io
import os
import statistics
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from jobs.ablate import main
from pipeline.ablation import evaluate, make_plan, random_subset
from pipeline.accumulators import ChannelStats
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.hooks import capture
from pipeline.layers import catalogue
from pipeline.models import build_model
from pipeline.preprocess import IMAGENET
from pipeline.sources import EvalTransform, build_manifest, load_batch

DEAD = [1, 4, 6]
CLASSES = ("ant", "bee", "cat")
PER_CLASS = 7          # 21 images: 6 minibatches of 4, the last one short
FRACTIONS = "1ch,0.5,1"  # one channel, each kept with p = 0.5, all of them (= inactive-all)
COMMON = ["--resize", "32", "--crop", "32", "--eval-batch", "4", "--seeds", "2",
          "--fraction", FRACTIONS, "--device", "cpu"]


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    # after s3_server: workers inherit the AWS_* variables that point at it
    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=200 * 1024**2)
    yield
    ray.shutdown()


def _model(dead, classes=len(CLASSES)):
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=classes, width=8).eval()
    with torch.no_grad():
        for c in dead:
            model.bn1.bias[c] = -1e4
        model.fc.weight.mul_(20)   # confident logits: noise that reaches them moves the loss
    return model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablate")
    rng = np.random.default_rng(0)
    for k, name in enumerate(CLASSES):
        (root / "val" / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            base = np.zeros((40, 40, 3)) + rng.uniform(0, 255, 3) * (k + 1) / 3
            img = np.clip(base + rng.normal(0, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / "val" / name / f"{i:03d}.JPEG", quality=90)
    for name, dead, classes in (("dead", DEAD, 3), ("alive", [], 3), ("two", DEAD, 2)):
        save_checkpoint(str(root / f"{name}.pt"), _model(dead, classes), IMAGENET)
    return root


def _run(args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([str(a) for a in args]) == 0
    return out.getvalue()


def _read(path):
    return pq.read_table(path).to_pylist()


@pytest.fixture(scope="module")
def runs(world, ray_cluster):
    data, ckpt = world / "val", world / "dead.pt"
    base = ["--data", data, "--checkpoint", ckpt, *COMMON]
    printed = _run([*base, "--shards", "1", "--out", world / "a"])
    # --from: an analysis output's channels.parquet, here written from a brute-force census
    loaded, transform = load_checkpoint(str(ckpt)), EvalTransform(32, 32)
    batch = load_batch(build_manifest(str(data)), np.arange(len(CLASSES) * PER_CLASS), transform)
    pool1 = catalogue(loaded.model)["pool1"]
    acts = capture(loaded.model, loaded.preprocess(batch.as_float()), [pool1])["pool1"]
    (world / "analysis" / "stimuli").mkdir(parents=True)
    pq.write_table(ChannelStats(8).update(acts).to_table("resnet18", "pool1"),
                   world / "analysis" / "stimuli" / "channels.parquet")
    # a rerun with the same seeds, on 3 shards, census from --from, one task per shard
    _run([*base, "--shards", "3", "--from", world / "analysis", "--task-per", "shard",
          "--out", world / "c"])
    return {"a": world / "a", "c": world / "c", "printed": printed,
            "model": loaded.model, "preprocess": loaded.preprocess, "batch": batch,
            "pool1_acts": acts}


def test_clean_loss_equals_a_plain_evaluation(runs):
    clean = next(r for r in _read(runs["a"] / "ablation.parquet") if r["condition"] == "clean")
    b = runs["batch"]
    with torch.no_grad():
        logits = runs["model"](runs["preprocess"](b.as_float()))
    labels = torch.as_tensor(b.labels)
    assert clean["seed"] == -1 and clean["images"] == len(CLASSES) * PER_CLASS
    assert clean["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert clean["top1_count"] == int((logits.argmax(1) == labels).sum())
    assert clean["top5_count"] == len(labels)   # three classes: top-5 holds every class
    assert clean["delta_loss"] == 0.0


def test_inactive_set_equals_a_brute_force_census(runs):
    census = _read(runs["a"] / "census.parquet")
    acts = runs["pool1_acts"]
    brute = [c for c in range(8) if (acts[:, c] == 0).all()]
    assert [r["channel"] for r in census if r["inactive"]] == brute == DEAD
    for r in census:
        assert r["max"] == pytest.approx(acts[:, r["channel"]].max().item(), rel=1e-5)
        assert r["near_dead"] == (r["channel"] in DEAD)
    assert all(r["inactive_channels"] == DEAD for r in _read(runs["a"] / "ablation.parquet"))
    assert _read(runs["c"] / "census.parquet") == census


def test_identical_numbers_for_any_shard_count_and_a_rerun(runs):
    a = _read(runs["a"] / "ablation.parquet")
    assert len(a) == 1 + (2 + 3) * 2    # clean; all, control and 3 subset sizes per seed
    assert _read(runs["c"] / "ablation.parquet") == a   # rerun: 3 shards, --from, per shard
    assert _read(runs["c"] / "table1.parquet") == _read(runs["a"] / "table1.parquet")


def test_noise_is_applied_and_the_control_uses_active_channels_only(runs):
    rows = _read(runs["a"] / "ablation.parquet")
    b, model = runs["batch"], runs["model"]
    x = runs["preprocess"](b.as_float())
    pool1 = catalogue(model)["pool1"]
    for r in rows:
        if r["condition"] == "clean":
            continue
        assert abs(r["delta_loss"]) > 1e-3, r   # the noise reached the logits
        plan = make_plan(r["condition"], r["seed"], DEAD, 8, fraction=r["fraction"] or 0.0,
                         eval_batch=4, count=r["subset_channels"])
        want = F.cross_entropy(evaluate(model, pool1, x, b.indices, plan),
                               torch.as_tensor(b.labels)).item()
        assert r["loss"] == pytest.approx(want, rel=1e-5)   # one batch == the sharded job
        if r["condition"] == "control-active":
            assert len(r["noised_channels"]) == len(DEAD)
            assert not set(r["noised_channels"]) & set(DEAD)
        elif r["condition"] == "inactive-all":
            assert r["noised_channels"] == DEAD and r["noised_per_image"] == len(DEAD)
        else:
            assert r["condition"] == "inactive-random"


def test_each_subset_size_is_a_row_per_seed_with_the_right_subsets(runs):
    """--fraction 1ch,0.5,1: exactly one channel; each kept with p = 0.5 (the brute-force
    per-minibatch draws); all three, which is inactive-all's evaluation exactly."""
    rows = _read(runs["a"] / "ablation.parquet")
    rnd = [r for r in rows if r["condition"] == "inactive-random"]
    assert [(r["subset_channels"], r["fraction"], r["seed"]) for r in rnd] == \
        [(1, None, 0), (1, None, 1), (None, 0.5, 0), (None, 0.5, 1), (None, 1.0, 0), (None, 1.0, 1)]
    n = len(CLASSES) * PER_CLASS
    for r in rnd:
        if r["subset_channels"] == 1:
            assert r["noised_per_image"] == 1.0
        elif r["fraction"] == 0.5:
            sizes = [len(random_subset(r["seed"], i // 4, DEAD, 0.5)) for i in range(n)]
            assert r["noised_per_image"] == pytest.approx(sum(sizes) / n)
            assert 0 < r["noised_per_image"] < len(DEAD)
        else:
            full = next(a for a in rows if a["condition"] == "inactive-all"
                        and a["seed"] == r["seed"])
            assert r["noised_per_image"] == len(DEAD) and r["loss"] == full["loss"]
        assert r["train_seed"] == 0 and r["images"] == n


def test_table1_summarises_the_seeds(runs):
    rows = _read(runs["a"] / "ablation.parquet")
    t1 = _read(runs["a"] / "table1.parquet")
    assert [(r["condition"], r["subset_channels"], r["fraction"]) for r in t1] == [
        ("inactive-all", None, None), ("inactive-random", 1, None),
        ("inactive-random", None, 0.5), ("inactive-random", None, 1.0)]
    for r in t1:
        assert (r["model"], r["inactive"], r["inactive_channels"], r["seeds"]) == \
            ("resnet18", 3, DEAD, 2)
        assert (r["train_seeds"], r["train_seed_ids"], r["inactive_per_seed"]) == (1, [0], [3])
        assert r["std_across"] == "noise seeds"
    full = t1[0]
    for cond, key in (("inactive-all", "delta_loss"), ("control-active", "control_delta_loss")):
        d = [r["delta_loss"] for r in rows if r["condition"] == cond]
        assert full[f"{key}_mean"] == pytest.approx(statistics.mean(d))
        assert full[f"{key}_std"] == pytest.approx(statistics.stdev(d))
    assert full["delta_loss_rnd_mean"] is None
    for t in t1[1:]:
        d = [r["delta_loss"] for r in rows if r["condition"] == "inactive-random"
             and (r["subset_channels"], r["fraction"]) == (t["subset_channels"], t["fraction"])]
        assert t["delta_loss_rnd_mean"] == pytest.approx(statistics.mean(d))
        assert t["delta_loss_rnd_std"] == pytest.approx(statistics.stdev(d))
        assert t["delta_loss_mean"] is None and t["control_delta_loss_mean"] is None
    printed = runs["printed"]
    assert "Table 1" in printed and "3/8" in printed and "random 1 ch" in printed
    assert f"{full['delta_loss_mean']:+.4f} ± {full['delta_loss_std']:.4f}" in printed
    assert "near-dead channels" in printed and "1 (max 0" in printed


def test_a_model_without_inactive_channels_says_so(world, ray_cluster):
    out = world / "alive-out"
    printed = _run(["--data", world / "val", "--checkpoint", world / "alive.pt", *COMMON,
                    "--shards", "2", "--out", out])
    t1 = _read(out / "table1.parquet")
    assert len(t1) == 1 + 3    # the full row and one per subset size, all without numbers
    for r in t1:
        assert r["inactive"] == 0 and "no inactive channel in pool1" in r["note"]
        assert r["delta_loss_mean"] is None and r["control_delta_loss_mean"] is None
        assert r["delta_loss_rnd_mean"] is None
    rows = _read(out / "ablation.parquet")
    assert [r["condition"] for r in rows if r["loss"] is not None] == ["clean"]
    assert all("no inactive channel" in r["note"] for r in rows if r["condition"] != "clean")
    assert "no inactive channel in pool1" in printed and "n/a" in printed


@pytest.mark.parametrize("args, message", [
    (["--fraction", "1.5"], "--fraction item '1.5' is neither a fraction in (0, 1]"),
    (["--fraction", "0.5,0ch"], "--fraction item '0ch' is neither"),
    (["--train-seed", "-1"], "--train-seed must be >= 0"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--task-per", "seed"], "argument --task-per: invalid choice"),
    (["--layer", "fc"], "--layer must name one layer with channel maps"),
    (["--layer", "conv99"], "unknown layer 'conv99'; allowed"),
    (["--model", "vgg16"], "unknown --model 'vgg16'; allowed"),
    (["--checkpoint", "{root}/two.pt"], "has 2 classes"),
    (["--from", "{root}/nowhere"], "channels.parquet does not exist"),
    (["--data", "{root}/missing"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(world, capsys, args, message):
    out = world / "bad-out"
    args = [a.replace("{root}", str(world)) for a in args]
    base = {"--data": str(world / "val"), "--checkpoint": str(world / "dead.pt")}
    for flag in ("--data", "--checkpoint"):
        if flag not in args:
            args = [flag, base[flag], *args]
    with pytest.raises(SystemExit) as e:
        main([*args, "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not any((out / f).exists() for f in ("ablation.parquet", "table1.parquet"))


def test_s3_data_and_output_match_the_local_run_and_a_rerun_resumes(world, runs, s3_bucket,
                                                                    capsys):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put(str(world / "val"), f"{s3_bucket}/val", recursive=True)
    out = f"s3://{s3_bucket}/ablation"
    args = ["--data", f"s3://{s3_bucket}/val", "--checkpoint", world / "dead.pt", *COMMON,
            "--seeds", "1", "--shards", "2", "--out", out]
    _run(args)
    local = [r for r in _read(runs["a"] / "ablation.parquet") if r["seed"] in (-1, 0)]
    with fs.open(f"{s3_bucket}/ablation/ablation.parquet", "rb") as f:
        assert pq.read_table(f).to_pylist() == local
    with fs.open(f"{s3_bucket}/ablation/table1.parquet", "rb") as f:
        t1 = pq.read_table(f).to_pylist()
    fs.rm(f"{s3_bucket}/ablation/table1.parquet")
    capsys.readouterr()
    _run(args)
    err = capsys.readouterr().err
    # 2 shards x (clean + inactive-all + control + 3 subset sizes) for one seed
    assert "census: 2 of 2 partials resumed" in err and "evaluate: 12 of 12 partials resumed" in err
    with fs.open(f"{s3_bucket}/ablation/table1.parquet", "rb") as f:
        assert pq.read_table(f).to_pylist() == t1


def test_exit_code_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jobs.ablate", "--seeds", "0", "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "python -m jobs.ablate: error: --seeds must be >= 1, got 0"


def test_workers_run_in_strict_fp32_and_the_partials_key_records_it(world, runs, ray_cluster):
    """TF32 is off inside every census/evaluation task of jobs.ablate and every jobs.analyze
    actor (as each worker reports its torch.backends flags), although a plain Ray worker starts
    with torch's defaults (cuDNN convolutions in TF32); both jobs' partial keys change with the
    precision setting."""
    import json
    import math

    import ray

    from jobs import ablate, analyze
    from pipeline.precision import current, setting, strict_flags
    from pipeline.sources import shard_ranges

    default = ray.get(ray.remote(current).options(num_cpus=0).remote())
    assert default != strict_flags()
    info = json.loads((runs["a"] / "run.json").read_text())
    assert info["precision"] == {**setting(), "workers": [strict_flags()]}
    assert info["train_seed"] == 0

    out = world / "analysis-strict"
    with contextlib.redirect_stdout(io.StringIO()):
        assert analyze.main(["--data", str(world / "val"), "--checkpoint", str(world / "dead.pt"),
                             "--layers", "pool1", "--top-k", "1", "--shards", "1", "--workers",
                             "1", "--resize", "32", "--crop", "32", "--device", "cpu",
                             "--out", str(out)]) == 0
    summary = json.loads((out / "run.json").read_text())
    assert summary["precision"] == {**setting(), "workers": [strict_flags()]}
    channels = _read(out / "stimuli" / "channels.parquet")
    assert [r["channel"] for r in channels if r["inactive"]] == DEAD
    cfg = analyze.Config(data=str(world / "val"), checkpoint=str(world / "dead.pt"),
                         layers="pool1", top_k=1, out=str(out), resize=32, crop=32)
    prep = analyze.prepare(cfg)
    tf32 = {**setting(), "tf32": True, "flags": default}
    assert analyze.fingerprint(prep, "cpu") == summary["fingerprint"]
    assert analyze.fingerprint(prep, "cpu", precision=tf32) != summary["fingerprint"]

    acfg = ablate.AblateConfig.from_args(ablate.build_parser().parse_args(
        [str(a) for a in ["--data", world / "val", "--checkpoint", world / "dead.pt", *COMMON,
                          "--shards", "1", "--out", runs["a"]]]))
    aprep = ablate.prepare(acfg)
    spec = ablate.model_spec(aprep.model, aprep.preprocess)
    n, B = len(aprep.manifest), 4
    ranges = [(a * B, min(b * B, n)) for a, b in shard_ranges(math.ceil(n / B), shards=1)]
    key = ablate.partials_key(aprep, spec, ranges)
    assert (runs["a"] / "_partials" / f"ablate-{key}").is_dir()
    assert ablate.partials_key(aprep, spec, ranges, precision=tf32) != key
