"""jobs.analyze end to end on a real local Ray cluster, real JPEG files and a real S3 server.

One cluster per module. Checks: 1 shard / 1 worker and many shards / 2 workers (output on S3)
give identical tables; patches are the RF squares of the decoded images; a run killed for real
after some shards resumes from their markers and gives the same tables; one worker's decode
pipeline reads on into its next shard while the current one computes, with the same result; a
non-ResNet (mobilenet_v3_small, module-path layers) matches a brute-force computation; bad
inputs exit 2 with one line and write no final table.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs import analyze as job
from pipeline.models.checkpoint import save_checkpoint
from pipeline.models.geometry import cut_patch
from pipeline.models.zoo import build_model
from pipeline.data.preprocess import IMAGENET
from pipeline.data.listing import build_manifest
from pipeline.data.decode import EvalTransform, load_batch
from pipeline.results.tables import read_json, read_table
from jobs.runtime.options import parse_config
from tests.helpers import assert_run_shape, local_ray

ROOT = Path(__file__).resolve().parents[2]
N_GOOD = 18
TABLES = ("topk", "mean", "channels", "baseline")


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    # after s3_server: Ray's workers inherit its AWS_* variables
    with local_ray(2, 200) as address:
        yield address


def make_data(root: Path) -> dict:
    """Two class folders of real JPEGs (crops of scikit-image photos) plus one broken file,
    and a checkpoint of a tiny resnet18 (shared with test_analyze_faults)."""
    import skimage.data

    rng = np.random.default_rng(0)
    for cls, photo in (("a_astronaut", skimage.data.astronaut()), ("b_coffee", skimage.data.coffee())):
        (root / "data" / cls).mkdir(parents=True)
        for i in range(N_GOOD // 2):
            y, x = rng.integers(0, 300, 2)
            crop = Image.fromarray(photo[y:y + 150, x:x + 150]).resize((44, 40))
            crop.save(root / "data" / cls / f"img{i:02d}.jpg", quality=90)
    (root / "data" / "a_astronaut" / "img99_broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    torch.manual_seed(0)
    ckpt = str(root / "tiny.pt")
    save_checkpoint(ckpt, build_model("resnet18", num_classes=2, width=8), IMAGENET)
    return {"root": root, "data": str(root / "data"), "ckpt": ckpt}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return make_data(tmp_path_factory.mktemp("analyze"))


def argv_for(data: dict, out: str, *extra: str) -> list[str]:
    return ["--data", data["data"], "--checkpoint", data["ckpt"], "--layers", "pool1,conv3,conv7",
            "--top-k", "3", "--resize", "36", "--crop", "32", "--batch-size", "4", "--out", out,
            *extra]


# the job in a subprocess (a real kill needs a process), each unit slowed: its worker class,
# a public name of jobs.analyze, replaced by a slowed subclass (tests.helpers.slowed)
HOOKED = ("import sys; from jobs import analyze; from tests.helpers import slowed; "
          "analyze.ShardWorker = slowed(analyze.ShardWorker, float(sys.argv[1])); "
          "sys.exit(analyze.main(sys.argv[2:]))")


def hooked_job(sleep: float, argv: list[str]) -> list[str]:
    return [sys.executable, "-c", HOOKED, str(sleep), *argv]


def tables_of(out: str) -> dict:
    return {t: read_table(f"{out}/stimuli/{t}.parquet") for t in TABLES}


def assert_same_tables(a: dict, b: dict) -> None:
    assert a["topk"].equals(b["topk"])                               # patches included
    assert a["mean"].drop(["mean"]).equals(b["mean"].drop(["mean"]))  # exact integer sums
    ma, mb = (t["mean"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
              for t in (a["mean"], b["mean"]))
    assert np.array_equal(ma, mb, equal_nan=True)                    # NaN: pixels never seen
    ba, bb = a["baseline"], b["baseline"]                              # exact integer sums
    assert ba.drop(["mean"]).equals(bb.drop(["mean"])) and np.array_equal(
        *(t["mean"].combine_chunks().flatten().to_numpy() for t in (ba, bb)), equal_nan=True)
    ca, cb = a["channels"], b["channels"]
    assert ca.drop(["mean", "sum"]).equals(cb.drop(["mean", "sum"]))
    np.testing.assert_allclose(ca["sum"].to_numpy(), cb["sum"].to_numpy(), rtol=1e-12)


@pytest.fixture(scope="module")
def single(ray_cluster, data) -> str:
    out = str(data["root"] / "single")
    assert job.main(argv_for(data, out, "--shards", "1", "--workers", "1")) == 0
    return out


def test_one_shard_equals_many_shards_and_workers_on_s3(single, data, s3_bucket):
    out = f"s3://{s3_bucket}/analysis"
    assert job.main(argv_for(data, out, "--shard-size", "3", "--workers", "2")) == 0
    assert_same_tables(tables_of(single), tables_of(out))
    run = json.loads(Path(single, "run.json").read_text())
    run_s3 = read_json(f"{out}/run.json")
    assert run_s3["counts"]["shards"] == 7 and run["counts"]["shards"] == 1
    for r in (run, run_s3):
        assert_run_shape(r)
        assert r["counts"]["images_read"] == N_GOOD and r["counts"]["images_skipped"] == 1
        assert r["skipped"][0]["path"].endswith("img99_broken.jpg")
        assert {"setup", "analyze", "merge", "patches", "write"} <= set(r["seconds"])
        assert r["throughput"]["analyze"] > 0 and r["throughput"]["total"] > 0
        assert r["versions"]["torch"] and r["config"]["top_k"] == 3
        assert not r["details"]["untrained"] and r["details"]["model"] == "resnet18"
        assert r["details"]["compiled_scan"] is False        # a few images: never worth it


def test_actors_run_in_strict_fp32_and_the_fingerprint_records_it(single, data):
    """TF32 is off inside every analyze actor (each reports its torch.backends flags), although
    a plain Ray worker starts with torch's defaults (cuDNN convolutions in TF32); the partials'
    fingerprint changes with the precision setting."""
    import ray

    from jobs.runtime import engine
    from pipeline.models.precision import current, setting, strict_flags

    default = ray.get(ray.remote(current).options(num_cpus=0).remote())
    assert default != strict_flags()
    summary = read_json(f"{single}/run.json")
    assert summary["details"]["precision"] == {**setting(), "workers": [strict_flags()]}
    cfg = parse_config(job.Config, argv_for(data, single, "--shards", "1", "--workers", "1"),
                       job.PROG)
    prep = job.prepare(cfg)
    device = engine.resolve_device("cpu")
    assert job.store(prep, device).fingerprint == summary["fingerprint"]
    tf32 = {**setting(), "tf32": True, "flags": default}
    assert job.store(prep, device, precision=tf32).fingerprint != summary["fingerprint"]


def test_tables_hold_the_design_columns_and_true_patches(single, data):
    t = tables_of(single)
    man = pq.read_table(f"{single}/manifest.parquet")
    assert man.column_names[:3] == ["image_index", "path", "label"] and man.num_rows == N_GOOD + 1
    rf = pq.read_table(f"{single}/receptive_fields.parquet").to_pylist()
    sizes = {r["layer"]: r["rf_size"] for r in rf}
    topk = t["topk"].to_pylist()
    # 8 + 8 + 16 channels, 2 neurons, k = 3
    assert len(topk) == (8 + 8 + 16) * 2 * 3
    manifest = build_manifest(data["data"])
    for row in topk[::7]:
        batch = load_batch(manifest, [row["image_index"]], EvalTransform(36, 32))
        want, _ = cut_patch(batch.images[0], row["top"], row["left"], row["size"])
        got = np.asarray(Image.open(io.BytesIO(row["patch"])).convert("RGB")).transpose(2, 0, 1)
        assert np.array_equal(got, want.numpy()) and row["size"] == sizes[row["layer"]]
    ch = t["channels"].to_pylist()
    assert all(r["images"] == N_GOOD for r in ch)
    assert all(r["inactive"] == (r["max"] == 0) for r in ch)
    mean = t["mean"].to_pylist()
    assert {(r["layer"], r["neuron"]) for r in mean} == {(l, "center") for l in sizes if l in
                                                         ("pool1", "conv3", "conv7")}
    for r in mean:
        assert len(r["mean"]) == 3 * r["size"] ** 2 and 0 <= r["count"] <= N_GOOD
    # the null of each mean stimulus: one row per (layer, neuron), over every image read
    base = t["baseline"].to_pylist()
    assert [(r["layer"], r["neuron"], r["images"]) for r in base] == \
        [(r["layer"], "center", N_GOOD) for r in mean if r["channel"] == 0]
    assert all(len(r["mean"]) == 3 * r["size"] ** 2 == 3 * sizes[r["layer"]] ** 2 for r in base)


def test_interrupted_run_resumes_with_identical_tables(single, data, ray_cluster):
    out = str(data["root"] / "interrupted")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "PYTHONPATH": str(ROOT)}
    argv = argv_for(data, out, "--shards", "6", "--workers", "1")
    proc = subprocess.Popen(hooked_job(0.7, argv),
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        markers: list = []
        while time.monotonic() < deadline and proc.poll() is None:
            markers = list(Path(out, "_partials").glob("*/*.done"))
            if len(markers) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert 2 <= len(markers) < 6
    finally:
        os.killpg(proc.pid, signal.SIGKILL)   # the driver, for real (its actors die with it)
        proc.wait()
    assert not Path(out, "stimuli").exists() and not Path(out, "run.json").exists()
    assert job.main(argv_for(data, out, "--shards", "6", "--workers", "2")) == 0
    run = json.loads(Path(out, "run.json").read_text())
    assert run["counts"]["units_resumed"] >= 2
    assert run["counts"]["units_computed"] == 6 - run["counts"]["units_resumed"]
    assert_same_tables(tables_of(single), tables_of(out))


def test_one_decode_pipeline_runs_across_shards_with_the_same_result(data, tmp_path):
    """ShardFeed (the actor's body, no Ray here): the next shard's first batch is decoded before
    the current shard's last batch is computed, and two shards merge to the one-shard result."""
    from pipeline.stats.worker import FeedSpec, ShardFeed
    from pipeline.models.precision import current, restore

    flags = current()                    # ShardFeed makes its process strict-fp32 for good
    try:
        _feed_across_shards(job.prepare(parse_config(job.Config, argv_for(data, str(tmp_path)),
                                                     job.PROG)), FeedSpec, ShardFeed)
    finally:
        restore(flags)


def _feed_across_shards(prep, FeedSpec, ShardFeed) -> None:
    from pipeline.stats.analysis import AnalysisResult, merge_states

    coll = prep.options.collection()
    spec = FeedSpec(prep.specs, coll, prep.manifest, prep.transform, None, "cpu", 4, 1, 1)
    feeder, events = ShardFeed(prep.blob, spec), []
    submit, step = feeder.decoder.submit, feeder.runner.step

    def logged_submit(manifest, idx):
        collect = submit(manifest, idx)

        def decoded():
            batch = collect()
            events.append(("decoded", int(idx[0])))
            return batch
        return decoded

    def slow_step(result, images, indices):
        time.sleep(0.3)                  # computing takes longer than decoding the next batch
        step(result, images, indices)
        events.append(("computed", int(indices[-1])))

    feeder.decoder.submit, feeder.runner.step = logged_submit, slow_step
    feeder.feed(0, 8)
    feeder.feed(8, N_GOOD + 1)
    first, info = feeder.run(0, 8)
    assert info["images"] == 8 and info["skipped"] == []
    assert events.index(("decoded", 8)) < events.index(("computed", 7)), events
    second, info = feeder.run(8, N_GOOD + 1)
    assert info["images"] == N_GOOD - 8 and info["skipped"][0][0] == 9       # the broken file
    feeder.close()
    single = ShardFeed(prep.blob, spec)
    whole, _ = single.run(0, N_GOOD + 1)                 # never fed: run feeds it itself
    single.close()
    got = AnalysisResult.from_state(merge_states(first, second, coll), coll).tables("m")
    want = AnalysisResult.from_state(whole, coll).tables("m")
    assert all(got[t].equals(want[t]) for t in ("stimuli/topk", "stimuli/channels"))


def test_non_resnet_module_paths_match_brute_force(ray_cluster, data, tmp_path):
    """mobilenet_v3_small (untrained, seeded) at 64 px, two module-path layers, 3 shards on 2
    workers: top-k (any and centre) and channel statistics equal a forward over all images."""
    from pipeline.models.hooks import capture
    from pipeline.models.layers import resolve_layers
    from pipeline.models.precision import strict_fp32
    from pipeline.models.study import load_model

    out, k, layers = str(tmp_path / "mnv3"), 3, "features.1,features.2"
    argv = ["--data", data["data"], "--model", "mobilenet_v3_small", "--layers", layers,
            "--top-k", str(k), "--resize", "72", "--crop", "64", "--batch-size", "4",
            "--shards", "3", "--workers", "2", "--out", out]
    assert job.main(argv) == 0
    t = tables_of(out)
    jm = load_model(None, "mobilenet_v3_small", num_classes=1000, width=64, seed=0)
    batch = load_batch(build_manifest(data["data"]), list(range(N_GOOD + 1)),
                       EvalTransform(72, 64))
    x = IMAGENET(batch.images.float() / 255)
    acts = {}
    with strict_fp32(), torch.no_grad():
        for a in range(0, len(x), 4):                  # the job's batch shape (4, padded)
            chunk = torch.cat([x[a:a + 4], x.new_zeros((4 - len(x[a:a + 4]), *x.shape[1:]))])
            for name, v in capture(jm.model, chunk, resolve_layers(jm.model, layers)).items():
                acts.setdefault(name, []).append(v[:len(x[a:a + 4])])
    idx = batch.indices
    for name, parts in acts.items():
        v = torch.cat(parts).double()                                   # (N, C, H, W)
        ch = [r for r in t["channels"].to_pylist() if r["layer"] == name]
        np.testing.assert_allclose([r["max"] for r in ch], v.amax((0, 2, 3)), rtol=1e-6)
        np.testing.assert_allclose([r["mean"] for r in ch], v.mean((0, 2, 3)), rtol=1e-6)
        np.testing.assert_allclose([r["positive_fraction"] for r in ch],
                                   (v > 0).double().mean((0, 2, 3)), rtol=1e-9)
        h, w = v.shape[2:]
        for neuron, per_image in (("any", v.flatten(2).amax(2)),
                                  ("center", v[:, :, h // 2, w // 2])):
            rows = [r for r in t["topk"].to_pylist()
                    if r["layer"] == name and r["neuron"] == neuron]
            for c in range(v.shape[1]):
                order = sorted(range(len(idx)),
                               key=lambda i: (-per_image[i, c].item(), idx[i]))[:k]
                got = sorted((r for r in rows if r["channel"] == c), key=lambda r: r["rank"])
                assert [r["image_index"] for r in got] == [int(idx[i]) for i in order]
                np.testing.assert_allclose([r["activation"] for r in got],
                                           [per_image[i, c].item() for i in order], rtol=1e-6)


def _bad(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        job.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_inputs_exit_2_with_one_line_and_no_tables(ray_cluster, data, capsys, tmp_path):
    out = str(tmp_path / "out")
    assert "unknown layer 'conv99'" in _bad(capsys, argv_for(data, out) + ["--layers", "pool1,conv99"])
    assert "fc" in _bad(capsys, argv_for(data, out) + ["--layers", "fc"])
    assert "invalid --model 'resnet35'; allowed: " in _bad(capsys, argv_for(data, out) +
                                                            ["--model", "resnet35"])
    # a resnet18 state_dict does not fit plainnet18 (no projection shortcuts)
    sd = str(tmp_path / "sd.pt")
    torch.save(build_model("resnet18", num_classes=2, width=8).state_dict(), sd)
    err = _bad(capsys, ["--data", data["data"], "--checkpoint", sd, "--model", "plainnet18",
                        "--out", out])
    assert "does not fit plainnet18" in err and "unexpected keys" in err and "downsample" in err
    torch.save(build_model("plainnet18", num_classes=2, width=8).state_dict(), sd)
    err = _bad(capsys, ["--data", data["data"], "--checkpoint", sd, "--model", "resnet18",
                        "--out", out])
    assert "does not fit resnet18" in err and "missing keys" in err
    (tmp_path / "empty").mkdir()
    assert "no images" in _bad(capsys, argv_for(data, out) + ["--data", str(tmp_path / "empty")])
    assert not Path(out).exists()           # every input above is refused before --out exists
    Path(tmp_path / "file").write_text("x")
    assert "not writable" in _bad(capsys, argv_for(data, str(tmp_path / "file" / "out")))
    assert "--top-k" in _bad(capsys, argv_for(data, out) + ["--top-k", "0"])
    assert "cuda" in _bad(capsys, argv_for(data, out) + ["--device", "cuda"])
    assert not Path(out, "stimuli").exists() and not Path(out, "run.json").exists()
