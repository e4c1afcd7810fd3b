"""Build the static HTML report (index.html + PNGs) from the Parquet results under --out.

    python -m jobs.report --out ./results                # -> ./results/report/index.html
    python -m jobs.report --out s3://bucket/run1 --report ./report-run1

Reads the layout `jobs.reproduce` writes (analysis/<model>/…, ablation/…, actmax/…,
train/<model>/…, neuron_types/…); a single job's output folder (receptive_fields.parquet and
stimuli/ at its top, or actmax.parquet, ablation.parquet …) works too. Missing parts become a
"not available" section. Needs no Ray and no GPU; opens from disk, no server.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.common import BadInput, bad_input_exits, check_writable, job_parser, log
from pipeline.report import ReportInputs, ReportOptions, order_models, render_report
from pipeline.tables import exists, fs_path, join, read_json, read_table, write_bytes

PROG = "python -m jobs.report"


@dataclass(frozen=True)
class ReportConfig:
    out: str                        # results root (local path or s3://…)
    report: str                     # where index.html and img/ go
    figure_channels: int = 8        # channels per layer in the top-16 and actmax figures
    topk_neuron: str = "any"        # any | center
    mean_neuron: str = "center"     # center | all
    atlas: bool = True              # per-layer atlas pages of every channel
    title: str | None = None        # None: "Preferred stimuli: ResNet vs PlainNet" for the
                                    # paper's families, else "Preferred stimuli: A vs B"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ReportConfig":
        out = args.out.rstrip("/") or args.out
        if args.figure_channels < 1:
            raise BadInput(f"--figure-channels must be >= 1, got {args.figure_channels}")
        return cls(out=out, report=(args.report or join(out, "report")).rstrip("/"),
                   figure_channels=args.figure_channels, topk_neuron=args.topk_neuron,
                   mean_neuron=args.mean_neuron, atlas=not args.no_atlas, title=args.title)

    def options(self) -> ReportOptions:
        return ReportOptions(figure_channels=self.figure_channels, topk_neuron=self.topk_neuron,
                             mean_neuron=self.mean_neuron, atlas=self.atlas, title=self.title)


def build_parser() -> argparse.ArgumentParser:
    p = job_parser("report", __doc__)
    p.add_argument("--out", required=True,
                   help="results root written by jobs.reproduce (local path or s3://bucket/prefix)")
    p.add_argument("--report", default=None,
                   help="where to write index.html and img/ (default: <out>/report)")
    p.add_argument("--figure-channels", type=int, default=8,
                   help="how many channels per layer the top-16 and actmax figures show")
    p.add_argument("--topk-neuron", choices=("any", "center"), default="any",
                   help="top-k of each image's strongest position (any) or of the centre neuron")
    p.add_argument("--mean-neuron", choices=("center", "all"), default="center",
                   help="mean preferred stimulus of the centre neuron or of all positions")
    p.add_argument("--no-atlas", action="store_true",
                   help="skip the per-layer atlas pages of every channel")
    p.add_argument("--title", default=ReportConfig.title,
                   help="page title (default: 'Preferred stimuli: ResNet vs PlainNet' for "
                        "ResNets/PlainNets, else 'Preferred stimuli: <model> vs <model>')")
    return p


def _subdirs(url: str) -> list[str]:
    fs, path = fs_path(url)
    if not fs.exists(path):
        return []
    names = []
    for entry in fs.ls(path, detail=True):
        if entry.get("type") == "directory":
            names.append(entry["name"].rstrip("/").rsplit("/", 1)[-1])
    return sorted(names)


def _read(url: str, drop: tuple[str, ...] = ()) -> pa.Table | None:
    """The table at `url` without the columns in `drop`, None when there is no file."""
    if not exists(url):
        return None
    try:
        columns = None
        if drop:
            fs, path = fs_path(url)
            columns = [n for n in pq.read_schema(path, filesystem=fs).names if n not in drop]
        return read_table(url, columns=columns)
    except Exception as e:  # noqa: BLE001 - name the file, whatever pyarrow/fsspec raised
        raise BadInput(f"{url} is not a readable Parquet table ({e.__class__.__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _first(*urls: str, drop: tuple[str, ...] = ()) -> pa.Table | None:
    for url in urls:
        t = _read(url, drop)
        if t is not None:
            return t
    return None


def _concat(tables: list[pa.Table]) -> pa.Table | None:
    tables = [t for t in tables if t is not None]
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")


def _load_analysis(out: str, inputs: ReportInputs) -> None:
    """One analysis folder per model (reproduce layout), or a single jobs.analyze output."""
    analysis_dirs = [join(out, "analysis", m) for m in _subdirs(join(out, "analysis"))]
    if exists(join(out, "receptive_fields.parquet")) or exists(join(out, "stimuli")):
        analysis_dirs.append(out)
    parts: dict[str, list[pa.Table]] = {k: [] for k in ("rf", "topk", "mean", "channels")}
    for d in analysis_dirs:
        parts["rf"].append(_read(join(d, "receptive_fields.parquet")))
        parts["topk"].append(_read(join(d, "stimuli", "topk.parquet")))
        parts["mean"].append(_read(join(d, "stimuli", "mean.parquet")))
        parts["channels"].append(_read(join(d, "stimuli", "channels.parquet")))
        if exists(join(d, "run.json")):
            inputs.runs[d.rsplit("/", 1)[-1] if d != out else "analysis"] = read_json(join(d, "run.json"))
    inputs.rf, inputs.topk = _concat(parts["rf"]), _concat(parts["topk"])
    inputs.mean, inputs.channels = _concat(parts["mean"]), _concat(parts["channels"])
    if not analysis_dirs:
        inputs.missing["analysis"] = f"no {join(out, 'analysis')}/<model>/"


def _load_results(out: str, inputs: ReportInputs) -> None:
    """actmax, ablation and neuron-type tables: under their job's folder or at the top."""
    # `input` holds each optimised model input as floats (MBs per row at 224 px): not needed.
    inputs.actmax = _first(join(out, "actmax", "actmax.parquet"), join(out, "actmax.parquet"),
                           drop=("input",))
    if inputs.actmax is None:
        inputs.missing["actmax"] = f"no {join(out, 'actmax', 'actmax.parquet')}"
    inputs.table1 = _first(join(out, "ablation", "table1.parquet"), join(out, "table1.parquet"))
    inputs.ablation = _first(join(out, "ablation", "ablation.parquet"),
                             join(out, "ablation.parquet"))
    inputs.census = _first(join(out, "ablation", "census.parquet"), join(out, "census.parquet"))
    if inputs.table1 is None and inputs.ablation is None:
        inputs.missing["ablation"] = f"no {join(out, 'ablation')}/table1.parquet"
    inputs.neuron_types = _read(join(out, "neuron_types", "summary.parquet"))
    if inputs.neuron_types is None:
        inputs.missing["neuron_types"] = f"no {join(out, 'neuron_types', 'summary.parquet')}"


def _load_train(out: str, inputs: ReportInputs) -> None:
    """Per trained model: its metrics and the first conv's weights of its checkpoint."""
    for model in order_models(_subdirs(join(out, "train"))):
        metrics = _read(join(out, "train", model, "metrics.parquet"))
        if metrics is not None:
            inputs.metrics[model] = metrics
        ckpt = join(out, "train", model, "model.pt")
        weight = _first_conv(ckpt, model) if exists(ckpt) else None
        if weight is not None:
            inputs.filters[model] = weight
    if not inputs.metrics:
        inputs.missing["train"] = f"no {join(out, 'train')}/<model>/metrics.parquet"


def load_inputs(out: str) -> ReportInputs:
    """Read every table the report shows from a results root; absent parts stay None."""
    fs, path = fs_path(out)
    if not fs.exists(path):
        raise BadInput(f"results folder {out} does not exist; give the --out of jobs.reproduce")
    inputs = ReportInputs(source=out)
    _load_analysis(out, inputs)
    _load_results(out, inputs)
    _load_train(out, inputs)
    found = [inputs.rf, inputs.topk, inputs.mean, inputs.channels, inputs.actmax, inputs.table1,
             inputs.ablation, inputs.neuron_types]
    if all(t is None for t in found) and not inputs.metrics and not inputs.filters:
        raise BadInput(f"no results under {out}: expected analysis/<model>/stimuli/*.parquet, "
                       "ablation/table1.parquet, actmax/actmax.parquet, train/<model>/ or "
                       "neuron_types/summary.parquet")
    return inputs


def _first_conv(url: str, model: str) -> np.ndarray | None:
    """A checkpoint's first convolution on RGB input (`conv1` of a ResNet, `features.0` of a
    VGG) in stimulus space (S·Aᵀw, the expected mean preferred stimulus of each filter, as the
    neuron-type census sees it; docs/neuron_types.md), or None (with a log line)."""
    from torch import nn

    from pipeline.checkpoint import CheckpointError, load_checkpoint

    try:
        loaded = load_checkpoint(url, model_name=model)
    except CheckpointError:
        try:  # a checkpoint saved under another model name still has a first conv
            loaded = load_checkpoint(url)
        except CheckpointError as e:
            log(f"report: skipping conv1 filters of {model}: {e}")
            return None
    conv = next((m for m in loaded.model.modules()
                 if isinstance(m, nn.Conv2d) and m.in_channels == 3 and m.groups == 1), None)
    if conv is None:
        log(f"report: skipping conv1 filters of {model}: no convolution on RGB input")
        return None
    from pipeline.neuron_types import filter_to_stimulus

    return filter_to_stimulus(conv.weight.detach().cpu().numpy(), loaded.preprocess.state())


def run(cfg: ReportConfig) -> str:
    """Build the report; returns the URL of its index.html."""
    inputs = load_inputs(cfg.out)
    check_writable(cfg.report)
    n, size = 0, 0
    for rel, data in render_report(inputs, cfg.options()):
        write_bytes(join(cfg.report, rel), data)   # index.html comes last: a complete report
        n, size = n + 1, size + len(data)
    index = join(cfg.report, "index.html")
    log(f"report: {n} files, {size / 1e6:.1f} MB -> {index}")
    return index


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with bad_input_exits(PROG):
        cfg = ReportConfig.from_args(args)
        index = run(cfg)
    print(index)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
