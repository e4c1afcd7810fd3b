"""`render_report`: the sections in order, their images handed out as they are made, the atlas
pages, then index.html last (so that an index.html on disk is always complete)."""
from __future__ import annotations

from itertools import chain
from typing import Iterator

from pipeline.report import sections as s
from pipeline.report.atlas import atlas_pages
from pipeline.report.compare import compare_section
from pipeline.report.data import ReportData, ReportInputs, ReportOptions, prepare
from pipeline.report.images import ImageSink
from pipeline.report.templating import render

__all__ = ["render_report"]


def _atlas_section(d: ReportData, opt: ReportOptions, imgs: ImageSink
                   ) -> Iterator[tuple[str, bytes] | s.Section]:
    """The atlas pages, then the section that links them (the generator's last item)."""
    links = {}
    if opt.atlas:
        links = yield from atlas_pages(d, imgs)
    why = "disabled" if not opt.atlas else "no per-channel tables"
    yield s.Section("atlas", "Atlas of every channel",
                    render("sections/atlas_links.html.j2", links=links, why=why))


def render_report(inputs: ReportInputs, options: ReportOptions = ReportOptions()
                  ) -> Iterator[tuple[str, bytes]]:
    """Yield (relative path, bytes) of every report file; images first, `index.html` last."""
    d = prepare(inputs, options)
    imgs = ImageSink()
    parts = [lambda: s.rf_section(inputs, d), lambda: s.table1_section(inputs),
             lambda: s.topk_section(inputs, d, options, imgs),
             lambda: s.mean_section(inputs, d, imgs),
             lambda: s.actmax_section(inputs, d, options, imgs),
             lambda: s.types_section(inputs, d), lambda: s.train_section(inputs)]
    done: list[s.Section] = []
    for part in parts:
        done.append(part())
        yield from imgs.drain()   # hand images out as they are made, not all at the end
    for item in chain(compare_section(inputs, d, imgs), _atlas_section(d, options, imgs)):
        if isinstance(item, s.Section):
            done.append(item)
        else:
            yield item
    runs = s.runs_section(inputs)
    done += [runs] if runs else []
    yield from imgs.drain()
    yield "index.html", render(
        "index.html.j2", title=d.title, source=inputs.source, models=d.models,
        layers=d.layers, sections=done).encode("utf-8")
