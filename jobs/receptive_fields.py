"""Receptive-field table of models: RF size, jump, offset and feature-map size of every layer.

    python -m jobs.receptive_fields --model resnet34,plainnet34 --input-size 224 --out results/
    python -m jobs.receptive_fields --model densenet121 --list    # every analysable layer

Arithmetic on the module graph (pipeline.models.geometry, no Ray), for any supported torchvision CNN
and the PlainNets at any input size. Prints the table; writes it as Parquet to a `.parquet`
--out, or as receptive_fields.parquet (with run.json) into a folder --out. Rows: paper names and
block outputs (layer1.0 ...) for the ResNet family, module paths otherwise; columns as RF_SCHEMA (the contract's, then per axis
and global_context). `--list` prints every layer `--layers` accepts and writes nothing.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from jobs.runtime.inputs import check_writable
from jobs.runtime.console import Console
from jobs.runtime.options import BadInput, Options, opt, run_cli
from pipeline.results import catalog

JOB = "receptive_fields"
PROG = f"python -m jobs.{JOB}"
TABLE_NAME = catalog.RECEPTIVE_FIELDS.path


def _models(spec: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(m.strip() for m in spec.split(",") if m.strip()))


@dataclass(frozen=True)
class Config(Options):
    models: tuple[str, ...] = opt(
        ("resnet34",), "model name(s), comma separated: a torchvision classification CNN by its "
        "constructor name (resnet*, vgg*, densenet*, mobilenet_v3_small, convnext_tiny, ...) or "
        "a PlainNet (plainnet18 … plainnet152); default: resnet34", flag="--model", parse=_models,
        metavar="MODEL")
    input_size: int = opt(224, "side of the square input crop in pixels (the analysis uses 224)",
                          check=lambda v: None if v >= 1 else "must be a positive integer")
    out: str = opt(TABLE_NAME, f"output: a .parquet file, or a folder (local or s3://) that "
                   f"receives {TABLE_NAME} and run.json")
    list_layers: bool = opt(False, "print every analysable layer (paper names and module paths) "
                            "with its geometry and write nothing", flag="--list")

    def check(self) -> None:
        from pipeline.models.zoo import build_model, supported_models

        allowed = supported_models()
        if not self.models:
            raise BadInput(f"--model is empty; supported: {', '.join(allowed)}")
        for m in self.models:
            if m not in allowed:
                try:
                    build_model(m)
                except ValueError as e:  # names what is supported (transformers: why not)
                    raise BadInput(str(e).split("; also supported")[0].split("; allowed")[0]
                                   + f"; supported: {', '.join(allowed)}") from None
        if not self.out:
            raise BadInput("--out is empty; give a .parquet file or a folder")

    @property
    def table_url(self) -> str:
        from pipeline.results.tables import join

        return self.out if self.out.endswith(".parquet") else join(self.out, TABLE_NAME)


def run(cfg: Config) -> None:
    """Print (and, without --list, write) the table; run.json goes into a folder --out."""
    from pipeline.models.rf_catalogue import (COLUMNS, LIST_COLUMNS, format_rf_table,
                                              rf_catalogue, rf_notes)
    from pipeline.results.tables import exists, join, read_json, write_table

    con = Console(JOB)
    url = cfg.table_url
    folder = None if cfg.out.endswith(".parquet") else cfg.out
    with con.stage("compute", quiet=True):
        if not cfg.list_layers:
            check_writable(url.rsplit("/", 1)[0] if "/" in url.rstrip("/") else ".")
        table = rf_catalogue(cfg.models, cfg.input_size, cfg.list_layers)
    print(format_rf_table(table, LIST_COLUMNS if cfg.list_layers else COLUMNS), flush=True)
    for line in rf_notes(table):
        con.info(line)
    if cfg.list_layers:
        return
    with con.stage("write", quiet=True):
        write_table(catalog.RECEPTIVE_FIELDS.conform(table), url)   # --out may name the file
    con.info(f"wrote {table.num_rows} rows to {url}")
    run_json = join(folder, "run.json") if folder else None
    if run_json and (not exists(run_json) or read_json(run_json).get("job") == JOB):
        from jobs.runtime.runinfo import write_run   # never over another job's run.json (jobs.analyze)

        write_run(folder, JOB, cfg.to_dict(), seconds=con.seconds, total_seconds=con.wall,
                  work=table.num_rows, unit="layers", warnings=con.warnings,
                  counts={"models": len(cfg.models), "layers": table.num_rows},
                  details={"table": url, "input_size": cfg.input_size})


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, __doc__, Config, run, argv)


if __name__ == "__main__":
    sys.exit(main())
