"""jobs.bench at the job's settings: every figure, ratios named by what they divide, fixed costs
measured with the job's code, a 50k projection that adds them up; a last JSON line that agrees."""
from __future__ import annotations

import json

import pytest

from jobs import bench

# every key of the JSON line on CPU (CUDA adds gpu, decode_cpu_to_host_images_per_s and
# nvjpeg_decode_images_per_s)
KEYS = {"accumulator_cold_ms_per_batch", "accumulator_ms_per_batch",
        "accumulator_over_amax_floor", "accumulator_over_truncated_forward",
        "amax_floor_ms_per_batch", "analysis_images_per_s", "analysis_over_full_forward",
        "analysis_over_truncated_forward", "batch_size", "compute_seconds_50k", "cpus", "crop",
        "data", "decode_images_per_s", "decode_images_per_s_cpus1", "decode_images_per_s_cpus2",
        "decode_over_analysis", "decode_scaling_2_over_1", "decode_threads", "device",
        "end_to_end_images_per_s", "end_to_end_over_analysis", "files", "fixed_seconds",
        "fixed_seconds_50k", "forward_images_per_s", "images", "layers", "mean_all", "model",
        "paper_worker_state_bytes", "precision", "projected_seconds_50k", "resize",
        "scaling_images", "setup_seconds", "shards_50k", "skipped", "threads", "top_k",
        "truncated_forward_images_per_s", "versions", "width", "worker_start_seconds",
        "worker_state_bytes", "workers"}
FIXED = {"ray_start", "worker_process", "state_save", "state_load", "merge_pair", "tables",
         "patches", "write"}


def test_bench_prints_figures_and_json(capsys):
    assert bench.main(["--images", "6", "--batch-size", "4", "--repeats", "1", "--device", "cpu",
                       "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    res = json.loads(lines[-1])
    assert set(res) == KEYS and set(res["fixed_seconds"]) == FIXED
    assert res["images"] == 6 and res["device"] == "cpu" and res["precision"] == "strict-fp32"
    assert res["forward_images_per_s"] > 0 and res["analysis_images_per_s"] > 0
    assert res["analysis_over_truncated_forward"] == pytest.approx(
        res["analysis_images_per_s"] / res["truncated_forward_images_per_s"], rel=0.01)
    assert res["analysis_over_full_forward"] == pytest.approx(
        res["analysis_images_per_s"] / res["forward_images_per_s"], rel=0.01)
    assert lines[0].startswith("forward") and lines[2].startswith("analysis")
    # where the time goes: decode (and its 1 -> 2 thread scaling), end to end, accumulators
    for key in ("decode_images_per_s", "decode_images_per_s_cpus1", "decode_images_per_s_cpus2",
                "end_to_end_images_per_s", "truncated_forward_images_per_s",
                "accumulator_ms_per_batch", "accumulator_cold_ms_per_batch",
                "amax_floor_ms_per_batch"):
        assert res[key] > 0, key
    assert res["decode_scaling_2_over_1"] == pytest.approx(
        res["decode_images_per_s_cpus2"] / res["decode_images_per_s_cpus1"], rel=0.01)
    # the job's share of this machine: jobs.analyze's plan for one worker
    workers, threads, dec = bench.job_plan("cpu", res["cpus"])
    assert (res["workers"], res["threads"], res["decode_threads"]) == (workers, threads, dec)
    assert res["shards_50k"] % res["workers"] == 0
    # fixed costs are measured (Ray's start too) and the projection adds them up
    fixed = res["fixed_seconds"]
    assert all(v >= 0 for v in fixed.values()) and fixed["ray_start"] > 0
    assert fixed["worker_process"] > 0 and fixed["patches"] > 0 and fixed["write"] > 0
    assert res["compute_seconds_50k"] == pytest.approx(
        50_000 / (res["workers"] * res["end_to_end_images_per_s"]), rel=0.01)
    assert res["projected_seconds_50k"] == pytest.approx(
        res["fixed_seconds_50k"] + res["compute_seconds_50k"], abs=0.2)
    assert res["fixed_seconds_50k"] > res["fixed_seconds"]["ray_start"] + res["setup_seconds"]
    assert res["skipped"] == 0 and res["data"] == "demo" and res["versions"]["torch"]
    # paper layers of a full-size resnet34: C x (2 x k x 28 B + 4 x RF^2 x 8 B) + O(C) per layer,
    # plus the layer's baseline mean patch (4 x RF^2 x 8 B, whatever C)
    want = sum(64 * (2 * 16 * 28 + 4 * rf * rf * 8) + 4 * rf * rf * 8 for rf in (11, 27, 59))
    assert want <= res["paper_worker_state_bytes"] < want + 3 * 64 * 64


def test_bench_defaults_are_the_jobs(capsys):
    """No batch or thread flags: jobs.analyze's batch for the crop and device, its threads."""
    from pipeline.stats.analysis import default_batch_size

    assert bench.main(["--images", "8", "--repeats", "1", "--device", "cpu", "--cpus", "8",
                       "--no-ray", "--scaling-images", "4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["batch_size"] == default_batch_size(64, "cpu") == 256
    # the job's rule: CPU ~3.2 M pixels, CUDA 256 up to 224 px, never more than the images
    # (rounded up to a power of two: every forward runs one batch shape, padded)
    assert [default_batch_size(c) for c in (224, 128, 64)] == [64, 128, 256]
    assert [default_batch_size(c, "cuda") for c in (224, 448, 64)] == [256, 64, 256]
    assert [default_batch_size(64, "cpu", n) for n in (1, 3, 64, 65, 400)] == [1, 4, 64, 128, 256]
    assert (res["workers"], res["threads"], res["decode_threads"]) == (2, 3, 1)  # 4 CPUs each
    assert res["shards_50k"] == 26 and res["fixed_seconds"]["ray_start"] is None


@pytest.mark.parametrize("argv", [["--images", "0"], ["--cpus", "0"], ["--threads", "0"],
                                  ["--decode-threads", "0"], ["--synthetic", "-1"],
                                  ["--synthetic", "4", "--data", "s3://bucket/x"],
                                  ["--model", "vit_b_16"], ["--model", "mobilenet_v3_small"],
                                  ["--layers", "conv99"], ["--data", "/nonexistent/images"]])
def test_bench_bad_input_exits_2(capsys, argv):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_bench_reads_synthetic_imagenet_size_jpegs(tmp_path, capsys):
    folder = tmp_path / "synthetic"
    assert bench.main(["--synthetic", "12", "--data", str(folder), "--images", "12",
                       "--batch-size", "4", "--repeats", "1", "--device", "cpu", "--cpus", "1",
                       "--width", "8", "--resize", "40", "--crop", "32", "--scaling-images", "4",
                       "--no-ray", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 13)]
    from PIL import Image

    sizes = [Image.open(f).size for f in files]
    assert all(150 <= min(s) and max(s) <= 800 for s in sizes) and (500, 375) in sizes
    assert Image.open(files[7]).mode == "L"             # 1 in 100 grayscale (index 7)
    assert res["data"] == "synthetic" and res["files"] == 12 and res["images"] == 12
    assert res["cpus"] == 1 and res["crop"] == 32 and res["end_to_end_images_per_s"] > 0
    assert (res["threads"], res["decode_threads"]) == (1, 1)


def test_bench_any_cnn_by_module_path(capsys):
    assert bench.main(["--model", "mobilenet_v3_small",
                       "--layers", "features.1.block.0.2,features.3", "--images", "4", "--batch-size", "4", "--repeats", "1", "--device", "cpu",
                       "--cpus", "1", "--scaling-images", "4", "--no-ray", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert set(res) == KEYS and res["model"] == "mobilenet_v3_small" and res["width"] == 64
    assert res["layers"] == ["features.1.block.0.2", "features.3"]
    assert res["analysis_images_per_s"] > 0 and res["worker_state_bytes"] > 0
    assert out[0].startswith("forward") and "mobilenet_v3_small width 64" in out[0]


def test_synthetic_jpegs_are_deterministic():
    from pipeline.stats.benchmark import synthetic_jpeg, synthetic_name

    assert synthetic_jpeg(3, seed=1) == synthetic_jpeg(3, seed=1) != synthetic_jpeg(3, seed=2)
    assert synthetic_name(0) == "ILSVRC2012_val_00000001.JPEG"


COMPARE_KEYS = {"activation_bytes", "batch_size", "class_sum_bytes", "compare_float64_images_per_s",
                "compare_images_per_s", "compare_layers", "compare_models", "cpus", "crop",
                "cross_sum_bytes", "data", "device", "files", "forwards_images_per_s",
                "gram_bytes", "hsic_bytes", "images", "peak_rss_compare_bytes",
                "peak_rss_compare_extra_bytes", "peak_rss_forwards_bytes",
                "peak_rss_models_bytes", "precision", "compare_over_two_truncated_forwards",
                "compare_float64_over_two_truncated_forwards", "resize", "width"}


def test_bench_compare_times_the_pair_and_sizes_its_state(capsys):
    assert bench.main(["--compare", "--images", "8", "--batch-size", "4", "--repeats", "1",
                       "--device", "cpu", "--cpus", "1", "--width", "8", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    res = json.loads(lines[-1])
    assert set(res) == COMPARE_KEYS
    assert res["compare_models"] == ["resnet34", "plainnet34"]
    assert res["compare_layers"] == ["pool1", "conv3", "conv7"] and res["images"] == 8
    assert res["compare_over_two_truncated_forwards"] == pytest.approx(
        res["compare_images_per_s"] / res["forwards_images_per_s"], rel=0.01)
    assert lines[0].startswith("forwards") and lines[1].startswith("compare")
    # width 8 at 64 px: pool1, conv3, conv7 all (8, 16, 16); M = 6 Grams of 4 x 4 float64
    assert res["gram_bytes"] == 6 * 4 * 4 * 8 and res["hsic_bytes"] == 6 * 6 * 8
    assert res["cross_sum_bytes"] == 3 * (8 * 8 + 6 * 8) * 8
    assert res["class_sum_bytes"] == 6 * (1000 * 8 * 8 + 1000 * 8)
    assert res["activation_bytes"] == 2 * 3 * 4 * 8 * 16 * 16 * 4
    assert res["peak_rss_compare_bytes"] >= res["peak_rss_models_bytes"] > 0
    assert res["peak_rss_compare_extra_bytes"] == (res["peak_rss_compare_bytes"]
                                                   - res["peak_rss_forwards_bytes"])
