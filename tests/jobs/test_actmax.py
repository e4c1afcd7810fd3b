"""jobs.actmax end to end on a real local Ray cluster, plus its defaults and its bad inputs."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs import actmax as job
from jobs.runtime import engine
from jobs.runtime.options import parse_config
from tests.helpers import assert_run_shape, local_ray
from pipeline.actmax import optimize as am
from pipeline.models.checkpoint import save_checkpoint
from pipeline.models.layers import catalogue
from pipeline.models.zoo import build_model
from pipeline.data.preprocess import ZCA

SIZE = 32


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray(2, 200) as address:
        yield address


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny resnet18 with BN statistics (a fresh one is dead at the zero start) and a ZCA
    preprocessing, so that inverse preprocessing is not the ImageNet default."""
    torch.manual_seed(0)
    model = am.calibrate_bn(build_model("resnet18", num_classes=8, width=8), SIZE, images=8)
    zca = ZCA([0.4, 0.5, 0.6], [[2.0, 0.1, 0.0], [0.1, 3.0, 0.2], [0.0, 0.2, 4.0]])
    url = str(tmp_path_factory.mktemp("ckpt") / "tiny.pt")
    save_checkpoint(url, model, zca, input_size=SIZE)
    return url, model, zca


def _args(out, *extra):
    return ["--out", str(out), "--workers", "2", *extra]


def test_defaults_are_the_papers():
    cfg = parse_config(job.ActmaxConfig, ["--out", "x"], job.PROG)
    assert (cfg.steps, cfg.lr, cfg.weight_decay) == (31, 0.1, 1e-6)
    assert (cfg.param, cfg.jitter, cfg.scale, cfg.tv, cfg.l2) == ("pixel", 0, (), 0.0, 0.0)
    assert cfg.channels == "all" and cfg.checkpoint is None and cfg.model is None
    assert cfg.settings() == am.Settings()


def test_parse_channels():
    assert job.parse_channels("all", "conv3", 4) == [0, 1, 2, 3]
    assert job.parse_channels("0-2,7,1", "conv3", 8) == [0, 1, 2, 7]
    assert job.parse_channels(" 5 ", "conv3", 8) == [5]
    for bad in ("8", "0-8", "-1", "3-1", "a", "0,,1", ""):
        with pytest.raises(job.BadInput, match="0-7"):
            job.parse_channels(bad, "conv3", 8)


@pytest.mark.parametrize("extra, message", [
    (["--layers", "conv99"], "unknown layer 'conv99'"),
    (["--layers", "conv3", "--channels", "0-8"], "channel 8 out of range for conv3 (8 channels)"),
    (["--channels", "x"], "invalid channel spec"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--scale", "0.9,zero"], "invalid --scale"),
    (["--param", "lbfgs"], "invalid --param 'lbfgs'; allowed: pixel, decorrelated, fft"),
    (["--model", "vit_b_16"], "invalid --model 'vit_b_16'; allowed: "),
    (["--model", "vgg16"], "checkpoint holds resnet18, not vgg16"),
    (["--scale", "0.9,0"], "scales > 0"),
    (["--model", "plainnet18"], "checkpoint holds resnet18, not plainnet18"),
])
def test_bad_input_one_line_exit_2_no_output(tmp_path, capsys, checkpoint, extra, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        job.main(_args(out, "--checkpoint", checkpoint[0], "--model", "resnet18", *extra))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert err[0].startswith("python -m jobs.actmax: error:")
    assert not out.exists()


def test_missing_checkpoint_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        job.main(_args(tmp_path / "out", "--checkpoint", str(tmp_path / "nope.pt")))
    assert e.value.code == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_job_end_to_end(ray_cluster, checkpoint, tmp_path):
    url, model, zca = checkpoint
    out = tmp_path / "out"
    assert job.main(_args(out, "--checkpoint", url,   # no --model: the checkpoint's
                          "--layers", "conv3,pool1", "--channels", "1-6", "--chunk", "4")) == 0
    table = pq.read_table(out / "actmax.parquet")
    assert table.schema.equals(job.SCHEMA)
    assert table.num_rows == 12
    rows = table.to_pylist()
    # forward order: pool1 before conv3, channels ascending
    assert [(r["layer"], r["channel"]) for r in rows] == \
        [("pool1", c) for c in range(1, 7)] + [("conv3", c) for c in range(1, 7)]
    cat = catalogue(model)
    for lay in ("pool1", "conv3"):
        # the job's chunks (4 + 2 channels over two Ray tasks) = one direct batched call
        want = am.maximize_channels(model, cat[lay], range(1, 7), SIZE, zca)
        got = [r for r in rows if r["layer"] == lay]
        inputs = np.array([r["input"] for r in got], dtype=np.float32)
        assert inputs.shape == (6, 3 * SIZE * SIZE)
        np.testing.assert_allclose(inputs, want.input.reshape(6, -1).numpy(), atol=1e-3)
        np.testing.assert_allclose([r["objective_end"] for r in got], want.end.numpy(),
                                   rtol=1e-4)
        pics = am.display_images(want.input, zca)
        for r, pic in zip(got, pics):
            assert r["objective_end"] > r["objective_start"]
            assert (r["steps"], r["lr"], r["weight_decay"]) == (31, 0.1, 1e-6)
            assert (r["model"], r["input_size"], r["param"]) == ("resnet18", SIZE, "pixel")
            img = Image.open(io.BytesIO(r["image"]))
            assert img.size == (SIZE, SIZE) and img.mode == "RGB"
            assert np.abs(np.asarray(img).astype(int) - pic.astype(int)).max() <= 1
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["steps"] == 31 and run["details"]["untrained"] is False
    assert run["counts"] == {"units": 4, "units_computed": 4, "units_resumed": 0, "retries": 0,
                             "images_read": 0, "images_skipped": 0, "layers": 2, "channels": 12}
    assert run["details"]["preprocess"]["kind"] == "zca" and "torch" in run["versions"]
    assert run["throughput"]["unit"] == "channels" and run["device"]["kind"] == "cpu"
    assert_run_shape(run)
    assert list((out / "_partials").iterdir()) == []


def test_without_a_cluster_one_worker_runs_in_the_jobs_own_process(checkpoint, tmp_path):
    """No RAY_ADDRESS, no Ray in the process, one worker (--workers 1): the units run in
    the job's process, Ray is never started, and the rows are the batched call's."""
    import os
    import subprocess
    import sys

    url, model, zca = checkpoint
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "jobs.actmax", "--out", str(out), "--checkpoint",
                           url, "--layers", "conv3", "--channels", "1-6", "--chunk", "4",
                           "--workers", "1"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "in this process" in done.stdout + done.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["details"]["executor"] == "this process"
    assert run["counts"]["units_computed"] == 2 and run["counts"]["retries"] == 0
    assert not (out / "_logs").exists()                   # Ray never started: no Ray log
    rows = pq.read_table(out / "actmax.parquet").to_pylist()
    want = am.maximize_channels(model, catalogue(model)["conv3"], range(1, 7), SIZE, zca)
    np.testing.assert_allclose(np.array([r["input"] for r in rows], dtype=np.float32),
                               want.input.reshape(6, -1).numpy(), atol=1e-3)
    np.testing.assert_allclose([r["objective_end"] for r in rows], want.end.numpy(), rtol=1e-4)


def test_job_resumes_from_partials(ray_cluster, checkpoint, tmp_path):
    """A partial of the same configuration is reused, not recomputed (marker values survive)."""
    url, model, zca = checkpoint
    out = tmp_path / "out"
    argv = _args(out, "--checkpoint", url, "--model", "resnet18", "--layers", "conv3",
                 "--channels", "0-3", "--steps", "3", "--chunk", "2")
    cfg = parse_config(job.ActmaxConfig, argv, job.PROG)
    setup = job.prepare(cfg)
    part = job.chunk_table(model, "resnet18", zca, catalogue(model)["conv3"], [0, 1], SIZE,
                           cfg.settings(), encode=job.png_bytes)
    part = part.set_column(part.schema.get_field_index("objective_end"), "objective_end",
                           pa.array([-123.0, -456.0], "float32"))
    store = job.store(cfg, setup, engine.resolve_device("auto"))
    store.save("conv3-00000-00001", part, {"channels": 2})
    store.save("conv3-00002-00003", part, {})     # a partial without ...
    (tmp_path / "out" / "_partials" / store.fingerprint / "conv3-00002-00003.done").unlink()
    assert job.main(argv) == 0
    table = pq.read_table(out / "actmax.parquet").to_pylist()
    assert [r["channel"] for r in table] == [0, 1, 2, 3]
    assert [r["objective_end"] for r in table[:2]] == [-123.0, -456.0]
    assert all(r["objective_end"] > r["objective_start"] for r in table[2:])
    run = json.loads((out / "run.json").read_text())
    # ... its marker is not trusted: recomputed
    assert run["counts"]["units_resumed"] == 1 and run["counts"]["units_computed"] == 1


def test_demo_default_model_and_lucent_flags(ray_cluster, tmp_path, capsys):
    out = tmp_path / "out"
    assert job.main(_args(out, "--model", "resnet18", "--layers", "conv3", "--channels", "0,1",
                          "--steps", "4", "--param", "fft", "--jitter", "2",
                          "--scale", "0.9,1.1", "--tv", "0.01", "--l2", "0.01")) == 0
    assert "UNTRAINED" in capsys.readouterr().err
    from pipeline.data.demo import DEMO_CROP

    table = pq.read_table(out / "actmax.parquet").to_pylist()
    assert [r["param"] for r in table] == ["fft", "fft"]
    assert all(len(r["input"]) == 3 * DEMO_CROP**2 for r in table)
    run = json.loads((out / "run.json").read_text())
    assert run["details"]["untrained"] is True and run["details"]["input_size"] == DEMO_CROP
    assert any("UNTRAINED" in w for w in run["warnings"])
    assert run["config"]["scale"] == [0.9, 1.1]


def test_any_cnn_by_module_path(ray_cluster, tmp_path):
    """An untrained mobilenet_v3_small: a ReLU module path (optimised at its input, the BN
    output, inside its RF window) and a layer after the first SE gate (whole image)."""
    out = tmp_path / "out"
    layers = "features.1.block.0.2,features.1"
    argv = _args(out, "--model", "mobilenet_v3_small", "--layers", layers, "--channels", "0-2",
                 "--steps", "4", "--chunk", "2")
    assert job.main(argv) == 0
    rows = pq.read_table(out / "actmax.parquet").to_pylist()
    assert [(r["layer"], r["channel"]) for r in rows] == \
        [(lay, c) for lay in layers.split(",") for c in range(3)]
    cfg = parse_config(job.ActmaxConfig, argv, job.PROG)
    setup = job.prepare(cfg)          # the same seeded, BN-calibrated stand-in the job built
    for lay in setup.layers:
        want = am.maximize_channels(setup.model, lay, range(3), setup.input_size,
                                    setup.preprocess, cfg.settings())
        got = [r for r in rows if r["layer"] == lay.name]
        np.testing.assert_allclose([r["objective_end"] for r in got], want.end.numpy(),
                                   rtol=1e-4, atol=1e-5)
        assert {(r["y"], r["x"]) for r in got} == {(want.y, want.x)}
    assert sum(r["objective_end"] > r["objective_start"] for r in rows) >= 4
