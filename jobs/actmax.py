"""Activation maximization with the paper's settings, many channels per batch, over Ray workers.

    python -m jobs.actmax --checkpoint s3://bucket/ckpt/resnet34.pt --layers conv3,conv7 \\
        --channels all --out s3://bucket/results/actmax

Each (layer, channel chunk) is one unit of jobs.runtime.engine: a Ray task optimises its channels as one
batch (row = channel) with `pipeline.actmax.optimize.maximize_channels` and stores its rows under
`--out/_partials/<fingerprint>/`, then a marker; a rerun with the same settings skips finished
chunks. The rows are merged into `actmax.parquet` (forward layer order, channels ascending), then
`run.json` is written and the partials removed. Any torchvision CNN (`--model`), layers by paper
name or module path; without --checkpoint an untrained demo model is used (docs/actmax.md).
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from jobs.runtime import engine
from jobs.runtime.inputs import check_writable, model_choices
from jobs.runtime.console import Console, init_ray, no_cluster
from jobs.runtime.options import BadInput, Options, at_least, bad_input, opt, run_cli
from jobs.runtime.runinfo import write_run
from pipeline.actmax.optimize import TABLE_SCHEMA as SCHEMA
from pipeline.actmax.optimize import chunk_table, sort_rows, timed_chunk
from pipeline.results.png import png_bytes

__all__ = ["ActmaxConfig", "SCHEMA", "parse_channels", "parse_scales", "main",
           "run", "chunk_table", "units", "store", "BadInput"]

PROG = "python -m jobs.actmax"


def parse_scales(spec: str) -> tuple[float, ...]:
    """"0.9,1.0,1.1" -> (0.9, 1.0, 1.1); BadInput names what is allowed (Settings checks > 0)."""
    try:
        return tuple(float(v) for v in spec.split(",") if v.strip())
    except ValueError:
        raise BadInput(f"invalid --scale {spec!r}; allowed: comma-separated positive factors, "
                       "e.g. 0.9,1.0,1.1") from None


@dataclass(frozen=True)
class ActmaxConfig(Options):
    out: str = opt(help="output URL (local folder or s3://bucket/prefix)")
    checkpoint: str | None = opt(None, "checkpoint URL (preferred-stimuli format or torchvision "
                                 "state_dict); default: an untrained demo model", decides=True)
    model: str | None = opt(None, "any torchvision CNN by name; default: the checkpoint's "
                            "(resnet34 for a plain state_dict or without a checkpoint)",
                            choices=model_choices, metavar="NAME", decides=True)
    layers: str = opt("conv3,conv7", "layers, comma separated: paper names (pool1, conv1..convN, "
                      "fc; ResNets), module paths (features.6), or all")
    channels: str = opt("all", "channels of each layer: all, a range 0-63, a list 0,5,7 or a mix")
    steps: int = opt(31, "Adam steps (paper: 31)", check=at_least(1), decides=True)
    lr: float = opt(0.1, "Adam learning rate (paper: 0.1)",
                    check=lambda v: None if v > 0 else "must be > 0", decides=True)
    weight_decay: float = opt(1e-6, "Adam weight decay, the paper's L2 penalty on the input "
                              "(paper: 1e-6)", check=at_least(0), decides=True)
    input_size: int | None = opt(None, "side of the optimised input; default: the checkpoint's "
                                 "input_size, else 224 (64 for the demo model)", check=at_least(16),
                                 decides=True)
    chunk: int = opt(64, "channels per Ray task (one batch)", check=at_least(1))
    workers: int = opt(0, "concurrent tasks; 0: one per GPU, or one per 8 CPUs without GPUs",
                       check=at_least(0))
    device: str = opt("auto", "where tasks compute; auto: cuda when the cluster has GPUs",
                      choices=("auto", "cpu", "cuda"))
    param: str = opt("pixel", "image parameterisation: pixel (paper) or Lucent's decorrelated / "
                     "fft", choices=("pixel", "decorrelated", "fft"), decides=True)
    jitter: int = opt(0, "Lucent: random shift of up to N pixels per step (0: off)",
                      check=at_least(0), decides=True)
    scale: tuple[float, ...] = opt((), "Lucent: random zoom factors per step, e.g. 0.9,1.0,1.1 "
                                   "(default off)", parse=parse_scales, decides=True)
    tv: float = opt(0.0, "total-variation penalty weight (0: off)", check=at_least(0), decides=True)
    l2: float = opt(0.0, "extra L2 penalty weight on the input (0: off)", check=at_least(0),
                    decides=True)
    seed: int = opt(0, "seed of the transforms, random starts and the demo model", decides=True)
    crop: bool = opt(True, "optimise the whole input even where cropping to the receptive field "
                     "is exact (slower, same result)", flag="--no-crop", decides=True)

    def check(self) -> None:
        with bad_input():
            self.settings()        # the parameterisation's own ranges

    def settings(self):
        from pipeline.actmax.optimize import Settings

        return Settings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Settings)})




def parse_channels(spec: str, layer_name: str, n: int) -> list[int]:
    """"all" | "0-63" | "0,5,7" | "0-3,8" -> sorted unique channels; BadInput names 0-(n-1)."""
    from pipeline.actmax.optimize import channel_list

    try:
        return channel_list(spec, n)
    except ValueError as e:
        raise BadInput(f"{e} for {layer_name} ({n} channels); allowed: all or channels in "
                       f"0-{n - 1} (e.g. 0-{n - 1}, 0,5,7)") from None


@dataclass
class _Setup:
    model: Any
    model_name: str
    preprocess: Any
    input_size: int
    untrained: bool
    layers: list                                   # pipeline.models.layers.Layer
    channels: dict[str, list[int]]                 # layer name -> its channels

    @property
    def details(self) -> dict[str, Any]:
        return {"model": self.model_name, "untrained": self.untrained,
                "preprocess": self.preprocess.state(), "input_size": self.input_size}


def prepare(cfg: ActmaxConfig) -> _Setup:
    """Load or build the model and resolve layers/channels in one pass: all bad input surfaces
    here, nothing is written."""
    from pipeline.actmax.optimize import calibrate_bn
    from pipeline.data.demo import DEMO_CLASSES, DEMO_CROP, DEMO_WIDTH
    from pipeline.models.layers import resolve_layers
    from pipeline.models.study import load_model

    with bad_input(ValueError, FileNotFoundError, first_line=True):
        jm = load_model(cfg.checkpoint, cfg.model, num_classes=len(DEMO_CLASSES),
                        width=DEMO_WIDTH, seed=cfg.seed)
    recipe = jm.meta.get("recipe") or {}   # the size the checkpoint was evaluated at, else 224
    size = cfg.input_size or (DEMO_CROP if jm.untrained else
                              int(recipe.get("eval_crop", jm.meta.get("input_size", 224))))
    if jm.untrained:   # BN statistics from noise, else the zero start is a dead fixed point
        calibrate_bn(jm.model, size, seed=cfg.seed)
    with bad_input():                # pipeline's message lists the allowed names
        layers = resolve_layers(jm.model, cfg.layers)
    channels = {layer.name: parse_channels(cfg.channels, layer.name, layer.channels)
                for layer in layers}
    return _Setup(jm.model.eval(), jm.name, jm.preprocess, size, jm.untrained, layers, channels)


def _chunk(model: Any, model_name: str, preprocess: Any, size: int, settings: Any, device: str,
           threads: int | None, layer: Any, channels: list[int]) -> engine.Result:
    """One unit: the chunk's rows; for the marker its mean objective and its seconds (in the
    Adam steps, and in all: the rest of a task's time is its start)."""
    t, secs = timed_chunk(model, model_name, preprocess, layer, channels, size, settings, device,
                          threads, encode=png_bytes)
    return engine.Result(t, {**{k: float(np.mean(t[k])) for k in ("objective_start",
                                                                   "objective_end")},
                             "steps_seconds": secs["steps"], "chunk_seconds": secs["total"]})


def _where_time_went(con: Console, ran: list[dict]) -> dict[str, float]:
    """run.json's `details.time`: of the run's wall seconds, those in the Adam steps of the
    units computed now (summed over tasks), the rest of those tasks (geometry, measurements,
    PNGs) and everything else: Ray's and the workers' start, setup, the write."""
    steps = sum(i.get("steps_seconds", 0.0) for i in ran)
    tasks = sum(i.get("chunk_seconds", 0.0) for i in ran)
    return {"steps_seconds": round(steps, 3), "task_seconds_besides_steps": round(tasks - steps, 3),
            "wall_seconds": round(con.wall, 3), "start_up_and_io_seconds":
            round(max(0.0, con.wall - tasks), 3)}


def _where(cfg: ActmaxConfig) -> tuple[engine.Device, engine.Plan, bool]:
    """(device, plan, here): without a cluster (console.no_cluster) a job that one worker would
    run (one GPU, or fewer than 16 CPUs, and no --workers above 1) runs in this process: Ray's
    start and a worker's interpreter were most of a small run's seconds (the Adam steps of
    conv3's 64 channels take ~0.4 s at 224 px). Otherwise Ray, started or joined here."""
    if no_cluster() and (cfg.workers or 1) == 1:
        device = engine.resolve_device(cfg.device, cluster=False)
        plan = device.plan(cfg.workers or None, cpus_per_worker=8)
        if plan.workers == 1:
            return device, plan, True
    init_ray(cfg.out)
    device = engine.resolve_device(cfg.device)
    return device, device.plan(cfg.workers or None, cpus_per_worker=8), False


def units(cfg: ActmaxConfig, setup: _Setup) -> list[engine.Unit]:
    """One unit per (layer, chunk of --chunk channels), named layer-first-last."""
    out = []
    for lay in setup.layers:
        ch = setup.channels[lay.name]
        out += [engine.Unit(f"{lay.name}-{c[0]:05d}-{c[-1]:05d}", (lay, c), len(c))
                for c in (ch[i:i + cfg.chunk] for i in range(0, len(ch), cfg.chunk))]
    return out


def store(cfg: ActmaxConfig, setup: _Setup, device: engine.Device) -> engine.Store:
    """The partial store: the options that decide a channel's numbers (not layers, channels,
    chunking, workers or --out: a unit is a layer's channels), what they resolved to and the
    weights."""
    weights = engine.digest(setup.model.state_dict())
    return engine.Store(cfg.out, engine.fingerprint(cfg, setup.details, weights, device=device))


def run(cfg: ActmaxConfig, setup: _Setup | None = None) -> dict[str, Any]:
    """The whole job after argument parsing (Ray is started if needed); returns run.json."""
    from pipeline.results import catalog, tables

    con = Console("actmax")
    with con.stage("setup", quiet=True):
        setup = setup or prepare(cfg)            # all bad input surfaces here, before any write
        check_writable(cfg.out, device=cfg.device)
        if setup.untrained:
            con.warn(f"no --checkpoint: visualising an UNTRAINED {setup.model_name} (BN "
                     f"statistics from noise); pass --checkpoint for real results")
        device, plan, here = _where(cfg)
        todo, st = units(cfg, setup), store(cfg, setup, device)
    total = sum(u.size for u in todo)
    con.info(f"{len(setup.layers)} layer(s), {total} channel(s), {len(todo)} unit(s) on "
             f"{device.kind} x{plan.workers}" + (" in this process (no Ray cluster needed)"
                                                  if here else ""))
    with con.stage("optimize"):
        work = engine.Task(_chunk, setup.model, setup.model_name, setup.preprocess,
                           setup.input_size, cfg.settings(), device.kind,
                           plan.threads if device.kind == "cpu" else None)
        ran: list[dict] = []                  # marker infos of the units computed now
        stats = engine.run_units(todo, work, st, plan=plan,
                                 progress=con.progress(total, "channels"),
                                 on_done=lambda u, i: ran.append(i), here=here)
    with con.stage("write"):
        table = sort_rows(engine.merge(st, stats.names, lambda a, b: pa.concat_tables([a, b])),
                          [lay.name for lay in setup.layers])
        url = tables.write(catalog.ACTMAX, table, cfg.out)
    info = write_run(
        cfg.out, "actmax", cfg.to_dict(), device=device.report(plan.workers),
        fingerprint=st.fingerprint, seconds=con.seconds, total_seconds=con.wall,
        counts={**stats.counts(), "layers": len(setup.layers), "channels": table.num_rows},
        work=table.num_rows, unit="channels", warnings=con.warnings,
        details={**setup.details, "time": _where_time_went(con, ran),
                 "executor": "this process" if here else "ray"})
    st.clear()
    con.info(f"wrote {table.num_rows} rows to {url} in "
             f"{con.wall:.1f} s")
    return info


def chained(ctx: Any, model: str, seed: int) -> tuple[ActmaxConfig, str]:
    """jobs.reproduce's activation maximization of `model` (training seed 0) at the input size
    its checkpoint was trained on."""
    from pipeline.results import layout

    cfg = ActmaxConfig(out=layout.actmax_dir(ctx.out, model), checkpoint=ctx.checkpoint(model),
                       model=model, layers=ctx.layers[model].actmax,
                       input_size=ctx.transform(model)[1])
    return cfg, layout.actmax_table(ctx.out, model)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, __doc__, ActmaxConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
