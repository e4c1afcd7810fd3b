"""Activation maximization with the paper's settings, many channels per batch, over Ray workers.

    python -m jobs.actmax --checkpoint s3://bucket/ckpt/resnet34.pt --layers conv3,conv7 \\
        --channels all --out s3://bucket/results/actmax

Each Ray task optimises one (layer, channel chunk) as one batch (row = channel) with
`pipeline.actmax.maximize_channels`; the driver stores every finished chunk under
`--out/_partials/actmax-<config hash>/` (a rerun with the same settings skips those), then writes
`actmax.parquet` and `run.json` and removes the partials. Without --checkpoint an untrained demo
model is used (see docs/actmax.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from jobs.common import (BadInput, Stopwatch, bad_input_exits, check_writable, init_ray,
                         job_parser, load_job_model, log, package_versions)

__all__ = ["ActmaxConfig", "SCHEMA", "parse_channels", "build_parser", "main", "bench_actmax",
           "chunk_table"]

PROG = "python -m jobs.actmax"

SCHEMA = pa.schema([
    ("model", pa.string()),
    ("layer", pa.string()),
    ("channel", pa.int32()),
    ("steps", pa.int32()),
    ("lr", pa.float64()),
    ("weight_decay", pa.float64()),
    ("objective_start", pa.float32()),   # pre-ReLU centre neuron at the start image
    ("objective_end", pa.float32()),     # ... and at the optimised image
    ("image", pa.binary()),              # PNG, RGB after preprocess.inverse, min-max stretched
    ("input", pa.list_(pa.float32())),   # optimised model input, C-order (3, H, W)
    ("input_size", pa.int32()),          # H = W
    ("y", pa.int32()),                   # the centre neuron (H//2, W//2) of the feature map
    ("x", pa.int32()),
    ("param", pa.string()),              # pixel | decorrelated | fft
])


@dataclass(frozen=True)
class ActmaxConfig:
    out: str                              # output URL (local path or s3://...)
    checkpoint: str | None = None         # None: untrained demo model (warned about)
    model: str | None = None              # None: the checkpoint's, resnet34 for a state_dict / demo
    layers: str = "conv3,conv7"           # paper layer names, comma separated, or "all"
    channels: str = "all"                 # "all", "0-63", "0,5,7", "0-3,8"
    steps: int = 31                       # paper
    lr: float = 0.1                       # paper (Adam)
    weight_decay: float = 1e-6            # paper (Adam)
    input_size: int | None = None         # None: checkpoint meta "input_size", else 224 (demo: 64)
    chunk: int = 64                       # channels per Ray task (one batch)
    workers: int = 0                      # concurrent tasks; 0: one per GPU, else CPUs // 8
    device: str = "auto"                  # auto | cpu | cuda
    param: str = "pixel"                  # Lucent options, off by default ...
    jitter: int = 0
    scale: tuple[float, ...] = ()
    tv: float = 0.0
    l2: float = 0.0
    seed: int = 0
    crop: bool = True                     # optimise only the RF window where exact

    def settings(self):
        from pipeline.actmax import Settings

        return Settings(steps=self.steps, lr=self.lr, weight_decay=self.weight_decay,
                        param=self.param, jitter=self.jitter, scale=self.scale, tv=self.tv,
                        l2=self.l2, seed=self.seed, crop=self.crop)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ActmaxConfig":
        cfg = cls(out=args.out, checkpoint=args.checkpoint, model=args.model, layers=args.layers,
                  channels=args.channels, steps=args.steps, lr=args.lr,
                  weight_decay=args.weight_decay, input_size=args.input_size, chunk=args.chunk,
                  workers=args.workers, device=args.device, param=args.param,
                  jitter=args.jitter, scale=_parse_scales(args.scale), tv=args.tv, l2=args.l2,
                  seed=args.seed, crop=not args.no_crop)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        from pipeline.models import model_names

        if self.model is not None and self.model not in model_names():
            raise BadInput(f"unknown model {self.model!r}; allowed: {', '.join(model_names())}")
        if self.steps < 1:
            raise BadInput(f"--steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise BadInput(f"--lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise BadInput(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.input_size is not None and self.input_size < 16:
            raise BadInput(f"--input-size must be >= 16, got {self.input_size}")
        if self.chunk < 1:
            raise BadInput(f"--chunk must be >= 1, got {self.chunk}")
        if self.workers < 0:
            raise BadInput(f"--workers must be >= 0 (0: automatic), got {self.workers}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise BadInput(f"invalid device {self.device!r}; allowed: auto, cpu, cuda")
        if self.jitter < 0 or self.tv < 0 or self.l2 < 0:
            raise BadInput("--jitter, --tv and --l2 must be >= 0")
        self.settings()  # parameterisation and remaining ranges (ValueError -> exit 2)


def _parse_scales(spec: str | None) -> tuple[float, ...]:
    if not spec:
        return ()
    try:
        scales = tuple(float(v) for v in spec.split(",") if v.strip())
    except ValueError:
        raise BadInput(f"invalid --scale {spec!r}; allowed: comma-separated positive factors, "
                       "e.g. 0.9,1.0,1.1") from None
    if any(not s > 0 for s in scales):
        raise BadInput(f"invalid --scale {spec!r}: factors must be > 0")
    return scales


def parse_channels(spec: str, layer_name: str, n: int) -> list[int]:
    """"all" | "0-63" | "0,5,7" | "0-3,8" -> sorted unique channels; BadInput names 0-(n-1)."""
    allowed = f"allowed: all or channels in 0-{n - 1} (e.g. 0-{n - 1}, 0,5,7)"
    spec = spec.strip()
    if spec == "all":
        return list(range(n))
    out: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if lo > hi:
                    raise ValueError
                vals = range(lo, hi + 1)
            else:
                vals = [int(part)]
        except ValueError:
            raise BadInput(f"invalid channel spec {spec!r}; {allowed}") from None
        bad = [v for v in vals if not 0 <= v < n]
        if bad:
            raise BadInput(f"channel {bad[0]} out of range for {layer_name} ({n} channels); "
                           f"{allowed}")
        out.update(vals)
    return sorted(out)


def build_parser() -> argparse.ArgumentParser:
    from pipeline.models import model_names

    p = job_parser("actmax", __doc__)
    p.add_argument("--out", required=True, help="output URL (local folder or s3://bucket/prefix)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint URL (preferred-stimuli format or torchvision state_dict); "
                        "default: an untrained demo model")
    p.add_argument("--model", default=None, choices=model_names(),
                   help="architecture; default: the checkpoint's (resnet34 for a plain "
                        "state_dict or without a checkpoint); with a checkpoint it must match")
    p.add_argument("--layers", default="conv3,conv7",
                   help="layers to visualise: paper names (pool1, conv1..convN, fc) comma "
                        "separated, or all")
    p.add_argument("--channels", default="all",
                   help="channels of each layer: all, a range 0-63, a list 0,5,7 or a mix")
    p.add_argument("--steps", type=int, default=31, help="Adam steps (paper: 31)")
    p.add_argument("--lr", type=float, default=0.1, help="Adam learning rate (paper: 0.1)")
    p.add_argument("--weight-decay", type=float, default=1e-6,
                   help="Adam weight decay, the paper's L2 penalty on the input (paper: 1e-6)")
    p.add_argument("--input-size", type=int, default=None,
                   help="side of the optimised input; default: the checkpoint's input_size, "
                        "else 224 (64 for the demo model)")
    p.add_argument("--chunk", type=int, default=64, help="channels per Ray task (one batch)")
    p.add_argument("--workers", type=int, default=0,
                   help="concurrent tasks; 0: one per GPU, or one per 8 CPUs without GPUs")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where tasks compute; auto: cuda when the cluster has GPUs")
    p.add_argument("--param", default="pixel", choices=("pixel", "decorrelated", "fft"),
                   help="image parameterisation: pixel (paper) or Lucent's decorrelated / fft")
    p.add_argument("--jitter", type=int, default=0,
                   help="Lucent: random shift of up to N pixels per step (0: off)")
    p.add_argument("--scale", default=None,
                   help="Lucent: random zoom factors per step, e.g. 0.9,1.0,1.1 (default off)")
    p.add_argument("--tv", type=float, default=0.0, help="total-variation penalty weight (0: off)")
    p.add_argument("--l2", type=float, default=0.0,
                   help="extra L2 penalty weight on the input (0: off)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the transforms, random starts and the demo model")
    p.add_argument("--no-crop", action="store_true",
                   help="optimise the whole input even where cropping to the receptive field "
                        "is exact (slower, same result)")
    return p


# --------------------------------------------------------------------------- model resolution
@dataclass
class _Setup:
    model: Any
    model_name: str
    preprocess: Any
    input_size: int
    untrained: bool
    layers: list                                   # pipeline.layers.Layer
    channels: dict[str, list[int]] = field(default_factory=dict)


def _setup(cfg: ActmaxConfig) -> _Setup:
    """Load or build the model and resolve layers/channels: all bad input surfaces here."""
    from pipeline.actmax import calibrate_bn
    from pipeline.demo import DEMO_CLASSES, DEMO_CROP, DEMO_WIDTH
    from pipeline.layers import resolve_layers

    jm = load_job_model(cfg.checkpoint, cfg.model, num_classes=len(DEMO_CLASSES),
                        width=DEMO_WIDTH, seed=cfg.seed)
    model, name, pre, untrained = jm.model, jm.name, jm.preprocess, jm.untrained
    if untrained:
        size = cfg.input_size or DEMO_CROP
        # untrained: BN statistics from noise, else the zero start is a dead fixed point
        calibrate_bn(model, size, seed=cfg.seed)
    else:  # the input size the checkpoint was evaluated at (its recipe), else ImageNet's
        recipe = jm.meta.get("recipe") or {}
        size = cfg.input_size or int(recipe.get("eval_crop", jm.meta.get("input_size", 224)))
    layers = resolve_layers(model, cfg.layers)
    channels = {layer.name: parse_channels(cfg.channels, layer.name, layer.channels)
                for layer in layers}
    return _Setup(model.eval(), name, pre, size, untrained, layers, channels)


# ------------------------------------------------------------------------------ compute (task)
def chunk_table(model: Any, model_name: str, preprocess: Any, layer: Any, channels: list[int],
                size: int, settings: Any, device: str = "cpu", threads: int | None = None
                ) -> pa.Table:
    """Optimise one (layer, channel chunk) and return its rows (the Ray task's body)."""
    import torch

    from pipeline.actmax import display_images, maximize_channels, png_bytes

    if threads:
        torch.set_num_threads(threads)
    res = maximize_channels(model, layer, channels, size, preprocess, settings, device)
    pics = display_images(res.input, preprocess)
    n = len(channels)
    inputs = res.input.numpy().astype(np.float32).reshape(n, -1)
    return pa.table({
        "model": [model_name] * n,
        "layer": [layer.name] * n,
        "channel": channels,
        "steps": [settings.steps] * n,
        "lr": [settings.lr] * n,
        "weight_decay": [settings.weight_decay] * n,
        "objective_start": res.start.numpy(),
        "objective_end": res.end.numpy(),
        "image": [png_bytes(p) for p in pics],
        "input": pa.FixedSizeListArray.from_arrays(pa.array(inputs.ravel()),
                                                   inputs.shape[1]).cast(pa.list_(pa.float32())),
        "input_size": [size] * n,
        "y": [res.y] * n,
        "x": [res.x] * n,
        "param": [settings.param] * n,
    }).cast(SCHEMA)


def _config_key(cfg: ActmaxConfig, setup: _Setup) -> str:
    """What decides a channel's result (not chunking, workers or device): names the partials."""
    d = asdict(cfg)
    for k in ("out", "layers", "channels", "chunk", "workers", "device", "crop"):
        d.pop(k)
    d["input_size"] = setup.input_size
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _resources(cfg: ActmaxConfig) -> tuple[str, int, dict[str, float]]:
    """(device, workers, per-task resources) from the cluster."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
    if cfg.device == "cuda" and gpus == 0:
        raise BadInput("--device cuda asked for, but the Ray cluster has no GPU; use auto or cpu")
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0) else "cpu"
    if device == "cuda":
        workers = cfg.workers or gpus
        return device, workers, {"num_gpus": 1, "num_cpus": 1}
    workers = cfg.workers or max(1, cpus // 8)
    return device, workers, {"num_cpus": max(1, cpus // workers)}


def run(cfg: ActmaxConfig, setup: _Setup | None = None) -> dict[str, Any]:
    """The whole job after argument parsing (Ray is started if needed); returns run.json."""
    import ray

    from pipeline import tables

    sw = Stopwatch()
    t0 = time.perf_counter()
    with sw("setup"):
        setup = setup or _setup(cfg)
        check_writable(cfg.out)
    if setup.untrained:
        log(f"warning: no --checkpoint: visualising an UNTRAINED {setup.model_name} (width "
            f"{setup.model.width}, BN statistics from noise); pass --checkpoint for real results")
    settings = cfg.settings()
    init_ray()
    device, workers, task_res = _resources(cfg)
    key = _config_key(cfg, setup)
    part_dir = tables.join(cfg.out, "_partials", f"actmax-{key}")

    # resume: channels already in a partial of this configuration are not recomputed
    done: dict[str, set[int]] = {}
    fs, ppath = tables.fs_path(part_dir)
    partial_urls = []
    if fs.exists(ppath):
        for f in sorted(fs.glob(ppath.rstrip("/") + "/*.parquet")):
            url = tables.join(cfg.out, "_partials", f"actmax-{key}", f.rsplit("/", 1)[-1])
            t = tables.read_table(url, columns=["layer", "channel"])
            for lay, ch in zip(t["layer"].to_pylist(), t["channel"].to_pylist()):
                done.setdefault(lay, set()).add(ch)
            partial_urls.append(url)
    chunks = []
    for layer in setup.layers:
        todo = [c for c in setup.channels[layer.name] if c not in done.get(layer.name, set())]
        chunks += [(layer, todo[i:i + cfg.chunk]) for i in range(0, len(todo), cfg.chunk)]
    resumed = sum(len(v) for v in done.values())
    log(f"actmax: {len(setup.layers)} layer(s), {sum(map(len, setup.channels.values()))} "
        f"channel(s), {len(chunks)} task(s) on {device} x{workers}"
        + (f", {resumed} channel(s) resumed" if resumed else ""))

    threads = int(task_res.get("num_cpus", 1)) if device == "cpu" else None
    task = ray.remote(chunk_table).options(max_retries=2, **task_res)
    with sw("optimize"):
        model_ref = ray.put(setup.model)
        pending = {task.remote(model_ref, setup.model_name, setup.preprocess, layer, chans,
                               setup.input_size, settings, device, threads): (layer, chans)
                   for layer, chans in chunks}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            layer, chans = pending.pop(ready[0])
            table = ray.get(ready[0])
            url = tables.join(part_dir, f"{layer.name}-{chans[0]:05d}-{chans[-1]:05d}.parquet")
            tables.write_table(table, url, SCHEMA)
            partial_urls.append(url)
            log(f"actmax: {layer.name} channels {chans[0]}-{chans[-1]} done, objective "
                f"{float(np.mean(table['objective_start'])):.3g} -> "
                f"{float(np.mean(table['objective_end'])):.3g} (mean)")
    with sw("write"):
        wanted = {(lay.name, c) for lay in setup.layers for c in setup.channels[lay.name]}
        order = {lay.name: lay.index for lay in setup.layers}
        parts = [tables.read_table(u) for u in dict.fromkeys(partial_urls)]
        table = pa.concat_tables(parts).cast(SCHEMA)
        keep = [(lay, ch) in wanted for lay, ch in zip(table["layer"].to_pylist(),
                                                        table["channel"].to_pylist())]
        table = table.filter(pa.array(keep))
        idx = sorted(range(table.num_rows), key=lambda i: (order[table["layer"][i].as_py()],
                                                           table["channel"][i].as_py()))
        table = table.take(pa.array(idx, type=pa.int64()))
        tables.write_table(table, tables.join(cfg.out, "actmax.parquet"), SCHEMA)
    wall = time.perf_counter() - t0
    info = {
        "job": "actmax",
        "config": asdict(cfg),
        "versions": package_versions(),
        "model": setup.model_name,
        "untrained": setup.untrained,
        "preprocess": setup.preprocess.state(),
        "input_size": setup.input_size,
        "device": device,
        "workers": workers,
        "counts": {"layers": len(setup.layers), "channels": table.num_rows,
                   "tasks": len(chunks), "channels_resumed": resumed},
        "seconds": {**sw.seconds, "wall": wall},
        "throughput": {"channels_per_s": table.num_rows / max(sw.seconds.get("optimize", 0), 1e-9)},
    }
    tables.write_json(tables.join(cfg.out, "run.json"), info)
    tables.remove(part_dir, recursive=True)
    log(f"actmax: wrote {table.num_rows} rows to {tables.join(cfg.out, 'actmax.parquet')} "
        f"in {wall:.1f} s")
    return info


# --------------------------------------------------------------------------------- benchmark
def bench_actmax(model: str = "resnet34", width: int = 64, layer: str = "conv3",
                 channels: int = 64, size: int = 224, steps: int = 31,
                 no_crop: bool = False, threads: int | None = None) -> dict[str, float]:
    """Seconds for all `channels` of `layer` batched (forward stopped at the layer, RF window
    crop) vs ONE channel through the full network (batch 1, whole input, forward to the logits);
    `ratio` = batched / one-channel, the issue's "no more than about four" figure."""
    import torch

    from pipeline import actmax as am
    from pipeline.layers import catalogue
    from pipeline.models import build_model
    from pipeline.preprocess import IMAGENET

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = am.calibrate_bn(build_model(model, width=width), size, images=4, batch=4)
    lay = catalogue(net)[layer]
    settings = am.Settings(steps=steps)
    # warm-up outside the clock: Adam's first step imports torch._dynamo (seconds, once)
    am.maximize_channels(net, lay, [0], size, IMAGENET, replace(settings, steps=1))
    t = time.perf_counter()
    am.maximize_channels(net, lay, range(channels), size, IMAGENET, settings)
    batched = time.perf_counter() - t
    t = time.perf_counter()
    params, image_fn = am.pixel((1, 3, size, size))
    am.optimize(net, am.neuron(layer, 0), params, image_fn, steps=steps, stop=False)
    one = time.perf_counter() - t
    out = {"model": model, "width": width, "layer": layer, "channels": channels, "size": size,
           "steps": steps, "threads": torch.get_num_threads(),
           "batched_s": batched, "one_channel_full_s": one, "ratio": batched / one}
    if no_crop:
        t = time.perf_counter()
        am.maximize_channels(net, lay, range(channels), size, IMAGENET,
                             replace(settings, crop=False))
        out["batched_no_crop_s"] = time.perf_counter() - t
        out["ratio_no_crop"] = out["batched_no_crop_s"] / one
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with bad_input_exits(PROG):
        cfg = ActmaxConfig.from_args(args)
        # model, layers, channels and --out are checked before Ray starts or anything is written
        setup = _setup(cfg)
        check_writable(cfg.out)
        init_ray()
        _resources(cfg)            # --device cuda on a cluster without GPUs
    run(cfg, setup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
