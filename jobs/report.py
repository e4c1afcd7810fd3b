"""Build the static HTML report (index.html + PNGs) from the Parquet results under --out.

    python -m jobs.report --out ./results                # -> ./results/report/index.html
    python -m jobs.report --out s3://bucket/run1 --report ./report-run1

Reads the layout `jobs.reproduce` writes (pipeline.results.layout: analysis/<model>/…, ablation/…,
actmax/…, train/<model>/…, neuron_types/…; training seed 0); a single job's output folder
(receptive_fields.parquet and stimuli/ at its top, or actmax.parquet, ablation.parquet …)
works too. Missing parts become a "not available" section. Needs no Ray and no GPU; opens from
disk, no server. Writes <report>/run.json next to index.html.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Sequence

from jobs.runtime.inputs import check_writable
from jobs.runtime.console import Console
from jobs.runtime.options import Options, at_least, bad_input, opt, run_cli
from jobs.runtime.runinfo import write_run

__all__ = ["ReportConfig", "run", "main"]

PROG = "python -m jobs.report"


@dataclass(frozen=True)
class ReportConfig(Options):
    out: str = opt(help="results root written by jobs.reproduce (local path or "
                   "s3://bucket/prefix)")
    report: str | None = opt(None, "where to write index.html and img/ (default: <out>/report)")
    figure_channels: int = opt(8, "how many channels per layer the top-16 and actmax figures "
                               "show", check=at_least(1))
    topk_neuron: str = opt("any", "top-k of each image's strongest position (any) or of the "
                           "centre neuron", choices=("any", "center"))
    mean_neuron: str = opt("center", "mean preferred stimulus of the centre neuron or of all "
                           "positions", choices=("center", "all"))
    atlas: bool = opt(True, "skip the per-layer atlas pages of every channel", flag="--no-atlas")
    title: str | None = opt(None, "page title (default: 'Preferred stimuli: ResNet vs PlainNet' "
                            "for ResNets/PlainNets, else 'Preferred stimuli: <model> vs <model>')")

    @property
    def root(self) -> str:
        return self.out.rstrip("/") or self.out

    @property
    def report_url(self) -> str:
        from pipeline.results import layout

        return (self.report or layout.stage_dir(self.root, "report")).rstrip("/")

    def options(self):
        from pipeline.report import ReportOptions

        return ReportOptions(figure_channels=self.figure_channels, topk_neuron=self.topk_neuron,
                             mean_neuron=self.mean_neuron, atlas=self.atlas, title=self.title)


def run(cfg: ReportConfig) -> str:
    """Build the report; prints the URL of its index.html (con.result) and returns it."""
    from pipeline.census.inputs import first_conv_filters
    from pipeline.report import render_report
    from pipeline.report.load import ReportInputError, load_inputs
    from pipeline.results.tables import join, write_bytes

    con = Console("report")
    with con.stage("read", quiet=True):
        with bad_input(ReportInputError):
            inputs = load_inputs(cfg.root, warn=con.warn, filters=first_conv_filters)
        check_writable(cfg.report_url)
    n, size = 0, 0
    with con.stage("render"):
        for rel, data in render_report(inputs, cfg.options()):
            write_bytes(join(cfg.report_url, rel), data)   # index.html last: a complete report
            n, size = n + 1, size + len(data)
    write_run(cfg.report_url, "report", cfg.to_dict(), seconds=con.seconds,
              total_seconds=con.wall, work=n, unit="files", warnings=con.warnings,
              counts={"files": n, "bytes": size},
              details={"source": cfg.root, "missing": inputs.missing})
    index = join(cfg.report_url, "index.html")
    con.info(f"{n} files, {size / 1e6:.1f} MB -> {index}")
    con.result(index)
    return index


def chained(ctx: Any, model: None, seed: int) -> tuple[ReportConfig, None]:
    """jobs.reproduce's report over its whole --out, rebuilt on every run."""
    return ReportConfig(out=ctx.out), None


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, __doc__, ReportConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
