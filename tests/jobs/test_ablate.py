"""jobs.ablate end to end on a real local Ray cluster and real JPEG files.

A tiny resnet18 (width 8, 3 classes) has three conv1 channels forced dead (very negative BN
bias), so pool1 has exactly those inactive channels; its numbers are checked against a plain
evaluation and a brute-force census, and across shard counts, reruns and --from. A squeezenet1_1
(a torchvision CNN without paper names) has channels of its first max-pool (`features.2`, the
default layer there) forced dead; its ΔL equals a hand-written noisy forward.
"""
from __future__ import annotations

import contextlib
import io
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
from pipeline.ablation.noise import image_noise, random_count_subset
from pipeline.ablation.noise import evaluate, make_plan, random_subset
from pipeline.stats.accumulators import ChannelStats
from pipeline.models.checkpoint import load_checkpoint, save_checkpoint
from pipeline.models.hooks import capture
from pipeline.models.layers import catalogue
from pipeline.models.zoo import build_model
from pipeline.data.preprocess import IMAGENET
from pipeline.data.decode import EvalTransform, load_batch
from pipeline.data.listing import build_manifest
from tests.helpers import assert_run_shape, local_ray

DEAD = [1, 4, 6]
CLASSES = ("ant", "bee", "cat")
PER_CLASS = 7          # 21 images: 6 minibatches of 4, the last one short
FRACTIONS = "1ch,0.5,1"  # one channel, each kept with p = 0.5, all of them (= inactive-all)
COMMON = ["--resize", "32", "--crop", "32", "--eval-batch", "4", "--seeds", "2",
          "--fraction", FRACTIONS, "--device", "cpu"]


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    # after s3_server: Ray's workers inherit its AWS_* variables
    with local_ray(2, 200) as address:
        yield address


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
    save_checkpoint(str(root / "squeeze.pt"), _squeezenet(), IMAGENET)
    return root


SQUEEZE_DEAD = [2, 5, 9]


def _squeezenet():
    """squeezenet1_1 with SQUEEZE_DEAD channels of features.0 (hence of the max-pool
    features.2 after its ReLU) forced dead, and a final conv scaled up so that noise moves
    the loss."""
    torch.manual_seed(0)
    model = build_model("squeezenet1_1", num_classes=len(CLASSES)).eval()
    with torch.no_grad():
        model.features[0].bias[SQUEEZE_DEAD] = -1e4
        model.classifier[1].weight.mul_(300)
    return model


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
    (["--task-per", "seed"], "invalid --task-per 'seed'; allowed: plan, shard"),
    (["--layer", "fc"], "--layer must name one layer with channel maps"),
    (["--layer", "conv99"], "unknown layer 'conv99'; allowed"),
    (["--model", "vit_b_16"], "invalid --model 'vit_b_16'; allowed: alexnet"),
    (["--model", "mobilenet_v3_small"], "has no max-pooling layer to default to; name one with "
                                        "--layer"),
    (["--checkpoint", "{root}/squeeze.pt", "--layer", "features.99"],
     "unknown layer 'features.99'; allowed: all, or a module path"),
    (["--checkpoint", "{root}/two.pt"], "has 2 classes"),
    (["--from", "{root}/nowhere"], "channels.parquet does not exist"),
    (["--data", "{root}/missing"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(world, capsys, args, message):
    out = world / "bad-out"
    args = [a.replace("{root}", str(world)) for a in args]
    base = {"--data": str(world / "val"), "--checkpoint": str(world / "dead.pt")}
    for flag in ("--data", "--checkpoint"):
        if flag not in args and not (flag == "--checkpoint" and "--model" in args):
            args = [flag, base[flag], *args]
    with pytest.raises(SystemExit) as e:
        main([*args, "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not any((out / f).exists() for f in ("ablation.parquet", "table1.parquet"))


def test_s3_data_and_output_match_the_local_run_and_a_rerun_resumes(world, runs, s3_bucket,
                                                                    capsys):
    import json

    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put(str(world / "val"), f"{s3_bucket}/val", recursive=True)
    out = f"s3://{s3_bucket}/ablation"
    args = ["--data", f"s3://{s3_bucket}/val", "--checkpoint", world / "dead.pt", *COMMON,
            "--seeds", "1", "--shards", "2", "--out", out]
    _run(args)
    err = capsys.readouterr().err
    # progress: census in images, evaluation in images x plans (6 plans of one seed)
    assert "ablate: 21/21 images," in err and "ablate: 126/126 images evaluated, " in err
    assert "images evaluated/s, ETA" in err
    local = [r for r in _read(runs["a"] / "ablation.parquet") if r["seed"] in (-1, 0)]
    with fs.open(f"{s3_bucket}/ablation/ablation.parquet", "rb") as f:
        assert pq.read_table(f).to_pylist() == local
    with fs.open(f"{s3_bucket}/ablation/table1.parquet", "rb") as f:
        t1 = pq.read_table(f).to_pylist()
    fs.rm(f"{s3_bucket}/ablation/table1.parquet")
    _run(args)
    err = capsys.readouterr().err
    # 2 shards x (clean + inactive-all + control + 3 subset sizes) for one seed
    assert "census: 2 of 2 units resumed" in err and "evaluate: 12 of 12 units resumed" in err
    with fs.open(f"{s3_bucket}/ablation/table1.parquet", "rb") as f:
        assert pq.read_table(f).to_pylist() == t1
    counts = json.loads(fs.cat(f"{s3_bucket}/ablation/run.json"))["counts"]
    assert (counts["units"], counts["units_resumed"], counts["units_computed"]) == (14, 14, 0)


def test_exit_code_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jobs.ablate", "--seeds", "0", "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "python -m jobs.ablate: error: --seeds must be >= 1, got 0"


def test_units_run_in_strict_fp32_and_the_fingerprint_records_it(world, runs, ray_cluster):
    """TF32 is off inside every census/evaluation unit (as each worker reports its
    torch.backends flags), although a plain Ray worker starts with torch's defaults (cuDNN
    convolutions in TF32); the partials' fingerprint changes with the precision setting."""
    import json

    import ray

    from jobs import ablate
    from jobs.runtime import engine
    from jobs.runtime.options import parse_config
    from pipeline.models.precision import current, setting, strict_flags

    default = ray.get(ray.remote(current).options(num_cpus=0).remote())
    assert default != strict_flags()
    info = json.loads((runs["a"] / "run.json").read_text())
    assert_run_shape(info)
    assert info["details"]["precision"] == {**setting(), "workers": [strict_flags()]}
    assert (info["details"]["train_seed"], info["details"]["layer"]) == (0, "pool1")
    n = len(CLASSES) * PER_CLASS
    assert info["counts"] | {"retries": 0} == info["counts"]
    assert (info["counts"]["units"], info["counts"]["images_read"], info["counts"]["shards"],
            info["counts"]["evaluations"]) == (1 + 11, n, 1, 11)   # census + 11 plans
    assert info["throughput"]["unit"] == "images" and info["throughput"]["evaluate"] > 0

    cfg = parse_config(ablate.AblateConfig, [str(a) for a in [
        "--data", world / "val", "--checkpoint", world / "dead.pt", *COMMON, "--shards", "1",
        "--out", runs["a"]]], ablate.PROG)
    setup, _ = ablate.prepare(cfg)
    device = engine.resolve_device("cpu")
    census = ablate.fingerprint(cfg, setup, device)
    assert info["fingerprint"] == ablate.fingerprint(cfg, setup, device, DEAD)
    for fp in (census, info["fingerprint"]):
        assert (runs["a"] / "_partials" / fp).is_dir()
    tf32 = {**setting(), "tf32": True, "flags": default}
    assert ablate.fingerprint(cfg, setup, device, precision=tf32) != census


def test_any_cnn_a_max_pool_of_squeezenet_gives_the_brute_force_delta_loss(world, ray_cluster):
    """squeezenet1_1 (module-path layers): without --layer the first max-pool `features.2`;
    the census equals a brute-force one and each row's ΔL equals the loss of the model's
    forward written out by hand with the noise added after features.2, minus the clean loss."""
    out = world / "squeeze-out"
    _run(["--data", world / "val", "--checkpoint", world / "squeeze.pt", "--resize", "32",
          "--crop", "32", "--eval-batch", "4", "--seeds", "1", "--fraction", "1ch",
          "--device", "cpu", "--shards", "2", "--task-per", "shard", "--out", out])
    loaded = load_checkpoint(str(world / "squeeze.pt"))
    model, n = loaded.model, len(CLASSES) * PER_CLASS
    batch = load_batch(build_manifest(str(world / "val")), np.arange(n), EvalTransform(32, 32))
    x, labels = loaded.preprocess(batch.as_float()), torch.as_tensor(batch.labels)
    with torch.no_grad():
        head = model.features[:3](x)       # features.2: the max-pool

        def loss(noise):
            logits = torch.flatten(model.classifier(model.features[3:](head + noise)), 1)
            return F.cross_entropy(logits, labels).item()

        brute = [c for c in range(head.shape[1]) if (head[:, c] == 0).all()]
        assert [r["channel"] for r in _read(out / "census.parquet") if r["inactive"]] == brute
        assert set(SQUEEZE_DEAD) <= set(brute)
        rows = _read(out / "ablation.parquet")
        assert {r["layer"] for r in rows} == {"features.2"} and len(rows) == 4
        clean = loss(torch.zeros_like(head))
        noise = torch.stack([image_noise(0, i, head.shape[1:]) for i in range(n)])
        for r in rows:
            mask = torch.zeros(n, head.shape[1], 1, 1)
            for i in range(n):
                chans = (random_count_subset(0, i // 4, brute, 1)
                         if r["condition"] == "inactive-random" else r["noised_channels"])
                mask[i, chans if r["condition"] != "clean" else []] = 1
            assert r["loss"] == pytest.approx(loss(noise * mask), rel=1e-5, abs=1e-6), r
            assert r["delta_loss"] == pytest.approx(r["loss"] - clean, abs=1e-5)
            assert r["condition"] == "clean" or abs(r["delta_loss"]) > 1e-3
    t1 = _read(out / "table1.parquet")
    assert [(r["layer"], r["inactive"], r["channels"]) for r in t1] == \
        [("features.2", len(brute), 64)] * 2
