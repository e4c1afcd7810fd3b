"""What `jobs.ablate` settles before its Ray work and records after it, without Ray: the labels
checked against the model, the census read from an analysis output (--from), and the setup
that fills run.json's counts and details (jobs.ablate.fingerprint keys the partials).

    check_labels(manifest.labels, model, url, "resnet34")       # ValueError: labels it lacks
    census = read_census(analysis_out, "resnet34", layer, train_seed=0)   # ValueError: no rows
    s = AblationSetup(model, "resnet34", preprocess, False, layer, url, manifest, transform, 0,
                      weights)
    s.details([3, 7], precision)                 # run.json's details

The layer itself is `pipeline.ablation.noise.ablation_layer`; the tables are `pipeline.ablation.table1`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from pipeline.models.layers import Layer

__all__ = ["AblationSetup", "check_labels", "read_census"]


def check_labels(labels: Any, model: Any, data: str, model_name: str) -> None:
    """ValueError when the labels of `data` run past the model's classes (or below 0)."""
    from pipeline.models.zoo import n_classes

    classes = n_classes(model)
    if int(labels.max()) >= classes or int(labels.min()) < 0:
        raise ValueError(f"labels of {data} run 0..{int(labels.max())} but {model_name} has "
                         f"{classes} classes: the model does not cover this data set")


def read_census(analysis: str, model: str, layer: Layer, train_seed: int) -> pa.Table:
    """The census of `layer` from a jobs.analyze output's stimuli/channels.parquet. ValueError
    when the table is missing or does not hold the layer's channels (`census_table`)."""
    from pipeline.results import layout
    from pipeline.ablation.table1 import census_table
    from pipeline.results.tables import exists, read_table

    url = layout.stimuli_table(analysis, "channels")
    if not exists(url):
        raise ValueError(f"{url} does not exist (run jobs.analyze with --layers {layer.name} "
                         f"first)")
    return census_table(read_table(url), model, layer.name, layer.channels, train_seed)


@dataclass
class AblationSetup:
    """Everything jobs.ablate checks and loads before Ray starts."""

    model: Any                 # the CNN (pipeline.models.zoo), eval mode
    model_name: str
    preprocess: Any            # pipeline.data.preprocess.Preprocess
    untrained: bool
    layer: Layer               # the layer counted and noised
    data: str                  # the source URL read
    manifest: Any              # pipeline.data.listing.Manifest (after --limit)
    transform: Any             # pipeline.data.decode.EvalTransform
    train_seed: int            # the training run the weights come from
    weights: bytes             # digest of the weights (jobs.runtime.device.digest)
    census: pa.Table | None = None   # from --from; None: a census pass computes it

    def counts(self, skipped: int, eval_batch: int, shards: int,
               evaluations: int) -> dict[str, int]:
        """run.json's image counts (the engine adds its unit counts)."""
        n = len(self.manifest)
        return {"images": n, "images_read": n - skipped, "images_skipped": skipped,
                "shards": shards, "minibatches": math.ceil(n / eval_batch),
                "evaluations": evaluations}

    def details(self, inactive: list[int], precision: dict) -> dict[str, Any]:
        """run.json's details; `precision`: the setting and the flags the workers saw."""
        return {"model": self.model_name, "untrained": self.untrained, "data": self.data,
                "transform": asdict(self.transform), "layer": self.layer.name,
                "train_seed": self.train_seed,
                "census_source": "census pass" if self.census is None else "--from",
                "inactive_channels": inactive, "precision": precision}
