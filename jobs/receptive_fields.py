"""Receptive-field table of a model: RF size, jump, offset and feature-map size of every layer.

Derived from the model's module graph (pipeline.geometry), so it holds for any supported
torchvision CNN (and the PlainNets) at any input size. Prints the table and writes it as Parquet:

    python -m jobs.receptive_fields --model resnet34
    python -m jobs.receptive_fields --model resnet34,plainnet34 --input-size 224 --out results/
    python -m jobs.receptive_fields --model densenet121 --list    # every analysable layer

`--out` ending in `.parquet` names the file; anything else is a folder that receives
`receptive_fields.parquet`. Rows: the paper names for the ResNet family, every analysable module
path for other models. Columns: model, layer, module, channels, rf_size, jump, offset,
feature_size, input_size, then per axis rf_size_y/_x, jump_y/_x, offset_y/_x,
feature_height/_width and global_context. `--list` prints every layer `--layers` accepts (the
paper names and all module paths) with its geometry, and writes nothing. No Ray is needed: this
is arithmetic on the graph.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from jobs.common import BadInput, bad_input_exits, check_writable, job_parser

PROG = "python -m jobs.receptive_fields"
TABLE_NAME = "receptive_fields.parquet"


@dataclass(frozen=True)
class Config:
    models: tuple[str, ...] = ("resnet34",)   # names (pipeline.models.supported_models())
    input_size: int = 224                     # side of the square input crop in pixels
    out: str = TABLE_NAME                     # Parquet file, or folder for receptive_fields.parquet
    list_layers: bool = False                 # print every analysable layer, write nothing

    @property
    def table_url(self) -> str:
        if self.out.endswith(".parquet"):
            return self.out
        from pipeline.tables import join

        return join(self.out, TABLE_NAME)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Config":
        from pipeline.models import build_model, supported_models

        models = tuple(dict.fromkeys(m.strip() for m in args.model.split(",") if m.strip()))
        allowed = supported_models()
        if not models:
            raise BadInput(f"--model is empty; supported: {', '.join(allowed)}")
        for m in models:
            if m not in allowed:
                try:
                    build_model(m)
                except ValueError as e:  # names what is supported (transformers: why not)
                    raise BadInput(str(e).split("; also supported")[0].split("; allowed")[0]
                                   + f"; supported: {', '.join(allowed)}")
        if args.input_size < 1:
            raise BadInput(f"--input-size must be a positive integer, got {args.input_size}")
        if not args.out:
            raise BadInput("--out is empty; give a .parquet file or a folder")
        return cls(models=models, input_size=args.input_size, out=args.out,
                   list_layers=args.list)


def build_parser() -> argparse.ArgumentParser:
    p = job_parser("receptive_fields", __doc__)
    p.add_argument("--model", default="resnet34",
                   help="model name, or several separated by commas: any torchvision "
                        "classification CNN by its constructor name (resnet18 … resnet152, "
                        "resnext*, wide_resnet*, vgg*, alexnet, googlenet, inception_v3, "
                        "densenet*, mobilenet_v2/v3, efficientnet*, regnet*, convnext*, "
                        "mnasnet*, shufflenet*, squeezenet*) or a PlainNet (plainnet18 … "
                        "plainnet152, plain_resnext*, plain_wide_resnet*)")
    p.add_argument("--input-size", type=int, default=224,
                   help="side of the square input crop in pixels (the analysis uses 224)")
    p.add_argument("--out", default=TABLE_NAME,
                   help="output: a .parquet file, or a folder (local or s3://) that receives "
                        f"{TABLE_NAME}")
    p.add_argument("--list", action="store_true",
                   help="print every analysable layer (paper names and module paths) with its "
                        "geometry and write nothing")
    return p


def _skeleton(name: str):
    """The model for graph arithmetic: on the meta device (no weights) where it can be built
    there; RegNet computes its widths with tensors and is built on the CPU instead."""
    import torch

    from pipeline.models import build_model

    try:
        with torch.device("meta"):
            return build_model(name)
    except NotImplementedError:
        return build_model(name)


def compute(cfg: Config):
    """The concatenated RF table of every model in `cfg` (pyarrow.Table); with `list_layers`,
    every analysable layer instead of the catalogue."""
    import pyarrow as pa

    from pipeline.geometry import rf_table
    from pipeline.layers import analysable_layers, catalogue

    tables = []
    for name in cfg.models:
        model = _skeleton(name)
        layers = analysable_layers(model) if cfg.list_layers else catalogue(model)
        tables.append(rf_table(model, name, cfg.input_size, list(layers.values())))
    return pa.concat_tables(tables)


COLUMNS = ["model", "layer", "module", "channels", "rf_size", "jump", "offset", "feature_size"]
LIST_COLUMNS = ["model", "layer", "channels", "rf_size_y", "rf_size_x", "jump", "offset_y",
                "offset_x", "feature_height", "feature_width", "global_context"]


def format_table(table, cols: list[str] = COLUMNS) -> str:
    rows = [cols] + [[f"{v:g}" if isinstance(v, float) else str(v) for v in r.values()]
                     for r in table.select(cols).to_pylist()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    first_number = 3 if cols is COLUMNS else 2
    return "\n".join("  ".join(v.rjust(w) if i >= first_number else v.ljust(w)
                               for i, (v, w) in enumerate(zip(r, widths))).rstrip()
                     for r in rows)


def notes(table) -> list[str]:
    """One line per model that has global-context or non-square layers (the report states it)."""
    out = []
    for name in dict.fromkeys(table.column("model").to_pylist()):
        rows = [r for r in table.to_pylist() if r["model"] == name]
        glob = [r["layer"] for r in rows if r["global_context"]]
        rect = [r["layer"] for r in rows if r["rf_size_y"] != r["rf_size_x"]]
        if glob:
            out.append(f"{name}: {len(glob)} of {len(rows)} layers also depend on the whole "
                       f"image through a global operator (adaptive pooling, SE gate; column "
                       f"global_context), from {glob[0]} on; their rf_size is the local RF")
        if rect:
            out.append(f"{name}: {len(rect)} layers have non-square RFs (rf_size_y != "
                       f"rf_size_x; rf_size is the square holding them), e.g. {rect[0]}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with bad_input_exits(PROG):
        cfg = Config.from_args(args)
        url = cfg.table_url
        if not cfg.list_layers:
            parent = url.rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."
            check_writable(parent)
        table = compute(cfg)
    if cfg.list_layers:
        print(format_table(table, LIST_COLUMNS), flush=True)
        for line in notes(table):
            print(line, file=sys.stderr)
        return 0
    from pipeline.tables import write_table
    from pipeline.geometry import RF_SCHEMA

    print(format_table(table), flush=True)
    write_table(table, url, schema=RF_SCHEMA)
    for line in notes(table):
        print(line, file=sys.stderr)
    print(f"wrote {table.num_rows} rows to {url}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
