"""Receptive-field table of a model: RF size, jump, offset and feature-map size of every layer.

Derived from the model's module graph (pipeline.geometry), so it holds for any ResNet/PlainNet
built here and any input size. Prints the table and writes it as Parquet:

    python -m jobs.receptive_fields --model resnet34
    python -m jobs.receptive_fields --model resnet34,plainnet34 --input-size 224 --out results/

`--out` ending in `.parquet` names the file; anything else is a folder that receives
`receptive_fields.parquet`. Columns: model, layer, module, channels, rf_size, jump, offset,
feature_size, input_size. No Ray is needed: this is arithmetic on the graph, well under a second.
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
    models: tuple[str, ...] = ("resnet34",)   # model names (pipeline.models.model_names())
    input_size: int = 224                     # side of the square input crop in pixels
    out: str = TABLE_NAME                     # Parquet file, or folder for receptive_fields.parquet

    @property
    def table_url(self) -> str:
        if self.out.endswith(".parquet"):
            return self.out
        from pipeline.tables import join

        return join(self.out, TABLE_NAME)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Config":
        from pipeline.models import model_names

        models = tuple(dict.fromkeys(m.strip() for m in args.model.split(",") if m.strip()))
        allowed = model_names()
        if not models:
            raise BadInput(f"--model is empty; allowed: {', '.join(allowed)}")
        for m in models:
            if m not in allowed:
                raise BadInput(f"unknown model {m!r}; allowed: {', '.join(allowed)}")
        if args.input_size < 1:
            raise BadInput(f"--input-size must be a positive integer, got {args.input_size}")
        if not args.out:
            raise BadInput("--out is empty; give a .parquet file or a folder")
        return cls(models=models, input_size=args.input_size, out=args.out)


def build_parser() -> argparse.ArgumentParser:
    from pipeline.models import model_names

    p = job_parser("receptive_fields", __doc__)
    p.add_argument("--model", default="resnet34",
                   help="model name, or several separated by commas "
                        f"({', '.join(model_names())})")
    p.add_argument("--input-size", type=int, default=224,
                   help="side of the square input crop in pixels (the analysis uses 224)")
    p.add_argument("--out", default=TABLE_NAME,
                   help="output: a .parquet file, or a folder (local or s3://) that receives "
                        f"{TABLE_NAME}")
    return p


def compute(cfg: Config):
    """The concatenated RF table of every model in `cfg` (pyarrow.Table)."""
    import pyarrow as pa
    import torch

    from pipeline.geometry import rf_table
    from pipeline.models import build_model

    tables = []
    for name in cfg.models:
        with torch.device("meta"):  # geometry needs the graph only: skip allocating weights
            model = build_model(name)
        tables.append(rf_table(model, name, cfg.input_size))
    return pa.concat_tables(tables)


def format_table(table) -> str:
    cols = ["model", "layer", "module", "channels", "rf_size", "jump", "offset", "feature_size"]
    rows = [cols] + [[f"{v:g}" if isinstance(v, float) else str(v) for v in r.values()]
                     for r in table.select(cols).to_pylist()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) if i >= 3 else v.ljust(w)
                               for i, (v, w) in enumerate(zip(r, widths))).rstrip()
                     for r in rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with bad_input_exits(PROG):
        cfg = Config.from_args(args)
        url = cfg.table_url
        parent = url.rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."
        check_writable(parent)
        table = compute(cfg)
    from pipeline.tables import write_table
    from pipeline.geometry import RF_SCHEMA

    print(format_table(table), flush=True)
    write_table(table, url, schema=RF_SCHEMA)
    print(f"wrote {table.num_rows} rows to {url}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
