"""Neuron-type census: orientation-selective, double-opponent, single-opponent, other or no structure.

    python -m jobs.neuron_types --from ./results --out ./results/neuron_types   # reproduce root
    python -m jobs.neuron_types --from ./out/analysis-resnet34 --actmax ./out/actmax \\
        --checkpoint vgg16=s3://bucket/vgg16.pt --out s3://bucket/run1/neuron_types

Patterns: the first conv on RGB input of each checkpoint (any model) in stimulus space, the
mean preferred stimuli (stimuli/mean.parquet) and the actmax images (actmax.parquet); a
reproduce root (training seed 0) holds all three. Each chunk of channels is one jobs.runtime.engine unit
reading only its own rows (a rerun resumes); `pipeline.census.inputs` finds and reads the
inputs, `pipeline.census.patterns` measures them. Every pattern is read against its null and its
noise (a mean stimulus against stimuli/baseline.parquet, the mean patch of all images, with the
standard error of its count); below the floor it is 'no structure'. Writes
<out>/neuron_types.parquet, <out>/summary.parquet (types), <out>/properties.parquet (each property
on its own) and <out>/run.json and prints both counts (docs/neuron_types.md).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Sequence

import pyarrow as pa

from jobs.runtime import engine
from jobs.runtime.inputs import check_writable
from jobs.runtime.console import Console, init_ray
from jobs.runtime.options import BadInput, Options, at_least, bad_input, opt, run_cli
from jobs.runtime.runinfo import write_run
from pipeline.census.patterns import (OUT_SCHEMA, SOURCES, SUMMARY_SCHEMA,
                                      PatternError, format_summary, properties, sort_rows,
                                      summarise)

__all__ = ["NeuronTypesConfig", "OUT_SCHEMA", "SUMMARY_SCHEMA", "format_summary", "store", "main",
           "run"]

PROG = "python -m jobs.neuron_types"


def _items(text: str) -> tuple[str, ...]:
    return tuple(filter(None, map(str.strip, text.split(","))))


@dataclass(frozen=True)
class NeuronTypesConfig(Options):
    out: str = opt(help="output folder (local path or s3://...)")
    sources_from: tuple[str, ...] = opt((), "analysis output (stimuli/mean.parquet) or "
                                        "jobs.reproduce root; repeatable", flag="--from",
                                        metavar="URL", decides=True)
    actmax: tuple[str, ...] = opt((), "activation-maximization output folder (actmax.parquet); "
                                  "repeatable", metavar="URL", decides=True)
    checkpoints: tuple[str, ...] = opt((), "checkpoint whose first-conv filters to measure, one "
                                       "per model; MODEL=URL names the architecture of a plain "
                                       "torchvision state_dict", flag="--checkpoint",
                                       metavar="[MODEL=]URL", decides=True)
    sources: tuple[str, ...] | None = opt(None, "comma list of filter, mean, actmax; unset: every "
                                          "source that has inputs", parse=_items, decides=True)
    osi_threshold: float = opt(0.5, "orientation-selective when the orientation selectivity "
                               "index is >= this", decides=True)
    chromatic_threshold: float = opt(1 / 3, "a colour pattern when its chromatic share of the "
                                     "energy is >= this", decides=True)
    double_opponent_threshold: float = opt(0.5, "double-opponent (if a colour pattern) when the "
                                           "double-opponent score is >= this", decides=True)
    neuron: str = opt("center", "which mean preferred stimulus of stimuli/mean.parquet",
                      choices=("center", "all"), decides=True)
    neutral: str = opt("auto", "colour meaning 'nothing preferred' for mean and actmax patterns: "
                       "auto (estimated from the data), checkpoint (its preprocessing mean), "
                       "gray, imagenet or R,G,B in [0, 1]", decides=True)
    chunk: int = opt(0, "patterns per unit (0: as many as fit a fixed FFT memory budget)",
                     check=at_least(0))

    def check(self) -> None:
        from pipeline.census.inputs import check_options

        if not self.out.strip():
            raise BadInput("--out is empty; give a local folder or an s3:// URL")
        with bad_input():
            check_options(self.sources, self.neutral, self.thresholds)
        if "mean" in self.wants and not self.sources_from:
            raise BadInput("--from is required for the 'mean' source; give an analysis output")

    @property
    def wants(self) -> set[str]:
        return set(SOURCES if self.sources is None else self.sources)

    @property
    def thresholds(self) -> tuple[float, float, float]:
        return self.osi_threshold, self.chromatic_threshold, self.double_opponent_threshold


def prepare(cfg: NeuronTypesConfig):
    """Inputs, filters, chunks and input stamps; every bad input surfaces here, before writing."""
    from pipeline.census import inputs as ni

    with bad_input():                     # InputError, PatternError: the message names the file
        found = ni.discover(cfg.sources_from, cfg.actmax, cfg.checkpoints, "mean" in cfg.wants,
                            require=cfg.sources or ())
        prep, filters = ni.load_filters(found.checkpoints)
        chunks = ni.plan_chunks(found, cfg.wants, cfg.neuron, cfg.neutral, prep, cfg.thresholds,
                                cfg.chunk)
    urls = found.mean + found.actmax + [u for _, u in found.checkpoints]
    return found, prep, filters, chunks, [ni.stamp(u) for u in urls]


def store(cfg: NeuronTypesConfig, stamps: list, device: engine.Device) -> engine.Store:
    """Partials keyed by the options that decide the numbers (not --out or --chunk: a unit
    names its channels) and the inputs' size and mtime."""
    return engine.Store(cfg.out, engine.fingerprint(cfg, stamps, device=device))


def _measure_units(cfg: NeuronTypesConfig, chunks: list, stamps: list, con: Console):
    """The chunks as engine units (resume, bounded retries) -> (rows, stats, store, device)."""
    from pipeline.census.inputs import measure_chunk

    units = [engine.Unit(c.name, (c,), size=c.channels[1] - c.channels[0]) for c in chunks]
    con.info(f"{len(units)} unit(s) over {len({(c.source, c.model, c.layer) for c in chunks})} "
             "(source, model, layer) group(s)")
    init_ray(cfg.out)
    device = engine.resolve_device("cpu")             # numpy FFTs: one CPU per unit
    plan, st = device.plan(None, cpus_per_worker=1), store(cfg, stamps, device)
    try:
        stats = engine.run_units(units, engine.Task(measure_chunk), st, plan=plan,
                                 progress=con.progress(sum(u.size for u in units), "patterns"))
    except Exception as e:  # noqa: BLE001 - a malformed row (in a Ray task) is the user's input
        if isinstance(getattr(e, "cause", None), PatternError):
            raise BadInput(str(e.cause)) from None
        raise
    rows = engine.merge(st, stats.names, lambda a, b: pa.concat_tables([a, b]))
    return rows, stats, st, device.report(plan.workers)


def run(cfg: NeuronTypesConfig) -> dict:
    """The census after argument parsing; returns run.json."""
    from pipeline.census.inputs import filter_rows
    from pipeline.results import catalog
    from pipeline.results.tables import write

    con = Console("neuron_types")
    with con.stage("setup", quiet=True):      # inputs, then the filters (tiny: on the driver)
        found, prep, filters, chunks, stamps = prepare(cfg)
        check_writable(cfg.out)
        parts = filter_rows(filters if "filter" in cfg.wants else [], cfg.thresholds, prep)
    work = {"setup": sum(p.num_rows for p in parts), "measure": 0}     # patterns per stage
    for source, have in (("filter", filters), ("actmax", found.actmax)):
        if source in cfg.wants and not have:
            con.info(f"no {source} input, skipping the '{source}' source")
    for url in [u for u in found.mean if u not in found.baseline] if "mean" in cfg.wants else []:
        con.warn(f"no baseline.parquet beside {url} (results from before the baseline table): "
                 "its mean stimuli are read against the neutral colour, without the mean patch "
                 "of all images as null")
    stats, st, device = None, None, None
    if chunks:
        with con.stage("measure"):
            rows, stats, st, device = _measure_units(cfg, chunks, stamps, con)
            parts.append(rows)
            work["measure"] = rows.num_rows
    rows = sort_rows(pa.concat_tables(parts) if parts else OUT_SCHEMA.empty_table())
    summary, props = summarise(rows), properties(rows)
    with con.stage("write", quiet=True):
        write(catalog.NEURON_TYPES, rows, cfg.out)
        write(catalog.SUMMARY, summary, cfg.out)
        write(catalog.PROPERTIES, props, cfg.out)
    info = write_run(
        cfg.out, "neuron_types", cfg.to_dict(), device=device,
        fingerprint=st.fingerprint if st else "", seconds=con.seconds, total_seconds=con.wall,
        counts={**(stats.counts() if stats else {}), "patterns": rows.num_rows,
                "tasks": len(chunks)}, work=rows.num_rows, unit="patterns",
        stage_work=work,
        warnings=con.warnings, details={"inputs": {
            "mean": found.mean, "baseline": found.baseline, "actmax": found.actmax,
            "checkpoints": [u for _, u in found.checkpoints]}})
    if st is not None:
        st.clear()
    con.result(format_summary(summary, props))
    return info


def chained(ctx: Any, model: None, seed: int) -> tuple[NeuronTypesConfig, str]:
    """jobs.reproduce's census over its whole --out; the checkpoints given outside --out are
    named for their filters (those under it are found there)."""
    from pipeline.results import layout

    o = ctx.o
    given = tuple(f"{m}={c}" for m in o.models
                  if (c := ctx.checkpoint(m)) and not c.startswith(o.out))
    cfg = NeuronTypesConfig(out=layout.neuron_types_dir(o.out), sources_from=(o.out,),
                            checkpoints=given)
    return cfg, layout.neuron_types_table(o.out, "summary")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, __doc__, NeuronTypesConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
