"""Every output table, declared once: its path under the writing job's --out, schema, row order.

Writers (`pipeline.results.tables.write`), readers (`tables.read`, the report's loader, the
census's inputs), the code that builds rows (`TOPK.schema`) and the docs (docs/tables.md is
`markdown()`'s output, checked by a test) all take a table from here; nothing else spells a
table's file name or columns. No I/O here: pyarrow schemas and path strings only.

    from pipeline.results import catalog
    catalog.TOPK.at("./results/analysis/resnet34")   # .../stimuli/topk.parquet
    catalog.TOPK.conform(rows)                        # columns of the schema, cast, rows ordered
    catalog.TABLES["stimuli/topk"] is catalog.TOPK

Row order (`sort`): rows are grouped by the `sort` columns, left to right; within a group a
numeric column ascends and a string column keeps the order in which the job first wrote its
values (layers in forward order, conditions in the paper's order): `order` is a stable sort
under that rule, so a table written in its declared order passes through unchanged. Later
rows of a group keep the order they were written in.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.results.urls import join

__all__ = ["Table", "TABLES", "MANIFEST", "RECEPTIVE_FIELDS", "TOPK", "MEAN", "CHANNELS",
           "BASELINE", "CENSUS", "ABLATION", "TABLE1", "ACTMAX", "NEURON_TYPES", "SUMMARY",
           "PROPERTIES", "METRICS", "CKA", "MATCHES", "SELECTIVITY", "markdown"]


@dataclass(frozen=True)
class Table:
    """One output table: `name` is its path under the writing job's --out, without .parquet."""

    name: str
    schema: pa.Schema
    sort: tuple[str, ...]       # row order (see the module docstring)
    job: str                    # the job that writes it (jobs.NAME)
    about: str                  # one line: what a row is

    def __post_init__(self) -> None:
        missing = [c for c in self.sort if c not in self.schema.names]
        if missing:
            raise ValueError(f"{self.name}: sort columns {missing} are not in the schema")

    @property
    def path(self) -> str:
        """Relative to the writing job's --out: `stimuli/topk.parquet`."""
        return f"{self.name}.parquet"

    @property
    def file(self) -> str:
        """The file name alone: `topk.parquet`."""
        return self.path.rsplit("/", 1)[-1]

    def at(self, out: str) -> str:
        """The table's URL under a job's --out (local path or s3://)."""
        return join(out, self.path)

    def without(self, *names: str) -> pa.Schema:
        """The schema less some columns (rows before a later stage adds them)."""
        unknown = [n for n in names if n not in self.schema.names]
        if unknown:
            raise ValueError(f"{self.name} has no column(s) {unknown}")
        return pa.schema([f for f in self.schema if f.name not in names])

    def order(self, table: pa.Table) -> pa.Table:
        """`table`'s rows in the declared order (stable: unchanged when already in it)."""
        if table.num_rows < 2 or not self.sort:
            return table
        keys = [_rank(table.column(c)) for c in reversed(self.sort)]   # lexsort: last key first
        idx = np.lexsort(keys)
        if (idx == np.arange(len(idx))).all():
            return table
        return table.take(pa.array(idx, pa.int64()))

    def conform(self, table: pa.Table) -> pa.Table:
        """The schema's columns in its order, cast to its types, rows in the declared order
        (a missing column: KeyError naming it)."""
        missing = [n for n in self.schema.names if n not in table.column_names]
        if missing:
            raise KeyError(f"{self.name}: rows lack column(s) {', '.join(missing)}")
        return self.order(table.select(self.schema.names).cast(self.schema))


def _rank(col: pa.ChunkedArray) -> np.ndarray:
    """Integer sort key of a column: strings by first appearance, other values ascending
    (ties share a key; np.lexsort is stable); nulls last."""
    import pyarrow.compute as pc

    col = col.combine_chunks()
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        key = pc.index_in(col, value_set=pc.unique(col))      # unique: in order of appearance
        return key.fill_null(len(key)).to_numpy().astype(np.int64)
    return pc.rank(col, sort_keys="ascending", tiebreaker="dense").to_numpy().astype(np.int64)


_I32, _I64, _F32, _F64, _STR, _BOOL = (pa.int32(), pa.int64(), pa.float32(), pa.float64(),
                                        pa.string(), pa.bool_())


def _schema(*fields: tuple) -> pa.Schema:
    return pa.schema([pa.field(*f) for f in fields])


MANIFEST = Table("manifest", _schema(
    ("image_index", _I64, False), ("path", _STR, False), ("label", _I64, True),
), sort=("image_index",), job="analyze, ablate, compare",
    about="one image of the data source: 0-based position in path order, relative path, label "
          "(index into the sorted synset ids / class folders; null if unknown)")

RECEPTIVE_FIELDS = Table("receptive_fields", _schema(
    ("model", _STR), ("layer", _STR), ("module", _STR), ("channels", _I64), ("rf_size", _I64),
    ("jump", _I64), ("offset", _F64), ("feature_size", _I64), ("input_size", _I64),
    ("rf_size_y", _I64), ("rf_size_x", _I64), ("jump_y", _I64), ("jump_x", _I64),
    ("offset_y", _F64), ("offset_x", _F64), ("feature_height", _I64), ("feature_width", _I64),
    ("global_context", _BOOL),
), sort=("model", "layer"), job="receptive_fields, analyze",
    about="one layer: its receptive field (size, jump, offset; per axis) and feature map")

_TOPK_ROW = (
    ("model", _STR), ("layer", _STR), ("channel", _I32), ("neuron", _STR), ("rank", _I32),
    ("activation", _F32), ("image_index", _I64), ("y", _I32), ("x", _I32),
)
TOPK = Table("stimuli/topk", _schema(
    *_TOPK_ROW, ("top", _I32), ("left", _I32), ("size", _I32), ("patch", pa.binary()),
), sort=("model", "layer", "neuron", "channel", "rank"), job="analyze",
    about="one of a channel's k strongest images for neuron `any` (each image's strongest "
          "position) or `center`, with its RF box and the RF patch as PNG (RGB, black outside "
          "the image)")

MEAN = Table("stimuli/mean", _schema(
    ("model", _STR), ("layer", _STR), ("channel", _I32), ("neuron", _STR), ("count", _I64),
    ("images", _I64), ("size", _I32), ("mean", pa.list_(_F32)), ("sum", pa.list_(_F64)),
    ("weight", pa.list_(_F64)),
), sort=("model", "layer", "neuron", "channel"), job="analyze",
    about="a channel's mean preferred stimulus: the mean RF patch over the images (`center`) or "
          "positions (`all`) where it is positive; 3*size*size RGB in [0, 1], C-order, NaN where "
          "no image pixel lay; `sum`, `weight`: raw per-pixel sums and counts (mergeable)")

CHANNELS = Table("stimuli/channels", _schema(
    ("model", _STR), ("layer", _STR), ("channel", _I32), ("images", _I64), ("max", _F32),
    ("mean", _F64), ("positive_fraction", _F64), ("inactive", _BOOL), ("positions", _I64),
    ("positive", _I64), ("sum", _F64),
), sort=("model", "layer", "channel"), job="analyze",
    about="a channel's statistics over every image and position: max, mean, positive fraction, "
          "inactive (0 everywhere); `positions`, `positive`, `sum` are the mergeable raw figures")

BASELINE = Table("stimuli/baseline", _schema(
    ("model", _STR), ("layer", _STR), ("neuron", _STR), ("images", _I64), ("size", _I32),
    ("mean", pa.list_(_F32)), ("sum", pa.list_(_F64)), ("weight", pa.list_(_F64)),
), sort=("model", "layer", "neuron"), job="analyze",
    about="a layer's unconditional mean RF patch, the null of a mean preferred stimulus: over "
          "every image at the centre neuron (`center`) or at every position (`all`); columns as "
          "in stimuli/mean")

CENSUS = Table("census", _schema(
    ("model", _STR), ("layer", _STR), ("channel", _I32), ("images", _I64), ("max", _F32),
    ("positive_fraction", _F64), ("inactive", _BOOL), ("near_dead", _BOOL),
    ("train_seed", _I64),
), sort=("train_seed", "model", "layer", "channel"), job="ablate",
    about="a channel of the ablated layer: inactive (0 on every image) or near dead (positive "
          "on < 0.1 % of positions), per training seed")

ABLATION = Table("ablation", _schema(
    ("model", _STR), ("layer", _STR), ("condition", _STR), ("seed", _I64), ("images", _I64),
    ("loss", _F64), ("top1", _F64), ("top5", _F64), ("top1_count", _I64),
    ("top5_count", _I64), ("loss_sum", _F64), ("delta_loss", _F64),
    ("inactive_channels", pa.list_(_I32)), ("noised_channels", pa.list_(_I32)),
    ("noised_per_image", _F64), ("fraction", _F64), ("note", _STR),
    ("subset_channels", _I32), ("train_seed", _I64),
), sort=("train_seed", "model", "layer", "condition"), job="ablate",
    about="one evaluation: clean, or noise in the inactive channels (all, a random subset), "
          "or in active ones (control); loss, accuracies, ΔL")

TABLE1 = Table("table1", _schema(
    ("model", _STR), ("layer", _STR), ("images", _I64), ("channels", _I32),
    ("inactive", _I32), ("near_dead", _I32), ("inactive_channels", pa.list_(_I32)),
    ("seeds", _I32), ("fraction", _F64), ("clean_loss", _F64), ("clean_top1", _F64),
    ("delta_loss_mean", _F64), ("delta_loss_std", _F64), ("delta_loss_rnd_mean", _F64),
    ("delta_loss_rnd_std", _F64), ("control_delta_loss_mean", _F64),
    ("control_delta_loss_std", _F64), ("note", _STR),
    # added with the training-seed statistics and the subset sweep
    ("condition", _STR), ("subset_channels", _I32), ("train_seeds", _I32),
    ("train_seed_ids", pa.list_(_I64)), ("inactive_mean", _F64), ("inactive_std", _F64),
    ("inactive_per_seed", pa.list_(_I32)), ("delta_loss_per_seed", pa.list_(_F64)),
    ("std_across", _STR),
    # the training seeds whose ΔL (ΔL_rnd, control ΔL) enters the row: those with inactive
    # channels; `train_seeds` is every seed run
    ("contributing_seeds", _I32),
), sort=("model", "layer", "condition"), job="ablate",
    about="the paper's Table 1 as a statistic: per (model, layer) the `inactive-all` row (ΔL) "
          "and one `inactive-random` row per subset size (ΔL_rnd), mean ± std")

ACTMAX = Table("actmax", _schema(
    ("model", _STR), ("layer", _STR), ("channel", _I32), ("steps", _I32), ("lr", _F64),
    ("weight_decay", _F64),
    ("objective_start", _F32),    # pre-ReLU centre neuron at the start image
    ("objective_end", _F32),      # ... and at the optimised image
    ("image", pa.binary()),       # PNG, RGB after preprocess.inverse, min-max stretched
    ("input", pa.list_(_F32)),    # optimised model input, C-order (3, H, W)
    ("input_size", _I32),         # H = W
    ("y", _I32),                  # the centre neuron (H//2, W//2) of the feature map
    ("x", _I32),
    ("param", _STR),              # pixel | decorrelated | fft
), sort=("model", "layer", "channel"), job="actmax",
    about="a channel's activation maximization: the optimised input (PNG and floats), the "
          "objective before and after")

NEURON_TYPES = Table("neuron_types", _schema(
    ("model", _STR), ("layer", _STR), ("channel", _I32), ("source", _STR), ("size", _I32),
    ("osi", _F64), ("orientation_deg", _F64), ("chromatic_fraction", _F64),
    ("opponent_axis", _STR), ("chromatic_balance", _F64), ("chromatic_coherence", _F64),
    ("double_opponent_score", _F64), ("double_opponent", _BOOL),
    ("orientation_selective", _BOOL), ("energy", _F64), ("neutral", pa.list_(_F32)),
    ("type", _STR),
    # the noise floor and the properties on their own
    ("single_opponent", _BOOL), ("no_structure", _BOOL), ("contrast", _F64), ("noise", _F64),
    ("contrast_z", _F64), ("floor", _F64), ("reference", _STR),
), sort=("source", "model", "layer", "channel"), job="neuron_types",
    about="a channel's pattern (first-conv filter in stimulus space, mean stimulus or actmax "
          "image) measured against its null and noise, and typed ('no structure' below the "
          "floor)")

SUMMARY = Table("summary", _schema(
    ("model", _STR), ("layer", _STR), ("source", _STR), ("type", _STR), ("count", _I64),
), sort=("source", "layer", "model", "type"), job="neuron_types",
    about="how many channels of each type per (model, layer, source)")

PROPERTIES = Table("properties", _schema(
    ("model", _STR), ("layer", _STR), ("source", _STR), ("channels", _I64),
    ("structured", _I64),
    # each property on its own (pipeline.census.types.PROPERTIES), then the overlaps
    ("orientation_selective", _I64), ("single_opponent", _I64), ("double_opponent", _I64),
    ("no_structure", _I64), ("oriented_single_opponent", _I64),
    ("oriented_double_opponent", _I64),
), sort=("source", "layer", "model"), job="neuron_types",
    about="per (model, layer, source): how many channels have each property on its own "
          "(oriented, single-, double-opponent, no structure) and how many two at once")

METRICS = Table("metrics", _schema(
    ("epoch", _I64), ("train_loss", _F64), ("val_loss", _F64), ("top1", _F64), ("top5", _F64),
    ("lr", _F64), ("seconds", _F64), ("images_per_s", _F64), ("train_images", _I64),
    ("val_images", _I64), ("skipped", _I64), ("workers", _I64),
    ("seed", _I64),               # training seed (init, data order, augmentation)
    ("precision", _STR),          # fp32 | bf16
    ("augment", _STR),            # pipeline.data.augment.AUGMENTS
    ("sync_bn", _BOOL),           # BatchNorm statistics over the whole global batch
), sort=("epoch",), job="train",
    about="one training epoch: losses, accuracies, learning rate, throughput")

CKA = Table("cka", _schema(
    ("net_a", _STR), ("layer_a", _STR), ("net_b", _STR), ("layer_b", _STR), ("cka", _F64),
    ("hsic_ab", _F64), ("hsic_aa", _F64), ("hsic_bb", _F64), ("n_images", _I64),
    ("n_batches", _I64),
), sort=("net_a", "net_b", "layer_a", "layer_b"), job="compare",
    about="one (network, layer) pair of the grids A×B, A×A, B×B: linear CKA from the unbiased "
          "HSIC averaged over minibatches (hsic_*: the means), the images and minibatches counted "
          "(docs/compare.md)")

MATCHES = Table("matches", _schema(
    ("net_a", _STR), ("net_b", _STR), ("layer", _STR), ("channel_a", _I32), ("best_b", _I32),
    ("best_r", _F64), ("matched_b", _I32), ("matched_r", _F64), ("samples", _I64),
    ("per", _STR),
), sort=("net_a", "net_b", "layer", "channel_a"), job="compare",
    about="a channel of A and its partner in B at the same layer name: the most correlated "
          "channel (best) and the one-to-one assignment maximising the summed Pearson r "
          "(matched); null / NaN for a constant channel; samples per image and position, or per "
          "image (`per`) when the maps differ in size")

SELECTIVITY = Table("selectivity", _schema(
    ("net", _STR), ("layer", _STR), ("channel", _I32), ("selectivity", _F64),
    ("top_class", _I64), ("n_classes", _I64), ("images", _I64), ("mu_max", _F64),
    ("mu_rest", _F64),
), sort=("net", "layer", "channel"), job="compare",
    about="a channel's class selectivity index (Morcos et al. 2018) on the manifest's labels: "
          "(μ_max − μ_rest)/(μ_max + μ_rest) of its per-image spatial mean of max(activation, 0), "
          "the top class, the classes with images")

TABLES: dict[str, Table] = {t.name: t for t in (
    MANIFEST, RECEPTIVE_FIELDS, TOPK, MEAN, CHANNELS, BASELINE, CENSUS, ABLATION, TABLE1,
    ACTMAX, NEURON_TYPES, SUMMARY, PROPERTIES, METRICS, CKA, MATCHES, SELECTIVITY)}


def markdown() -> str:
    """docs/tables.md: every table with its path, writer, row order and typed columns."""
    out = ["# Output tables", "",
           "Generated from `pipeline/results/catalog.py` (`python -m pipeline.results.catalog`"
           " > docs/tables.md; a test keeps it current). Paths are under the writing job's "
           "`--out`; row order: grouped by the listed columns, numbers ascending, strings in the "
           "order the job wrote them.", ""]
    for t in TABLES.values():
        cols = ", ".join(f"{f.name} {f.type}" for f in t.schema)
        out += [f"## `{t.path}`", "", t.about[0].upper() + t.about[1:] + ".", "",
                f"- written by: `jobs.{t.job.split(', ')[0]}`"
                + "".join(f", `jobs.{j}`" for j in t.job.split(", ")[1:]),
                f"- row order: {', '.join(t.sort) or 'as written'}",
                f"- columns: {cols}", ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown(), end="")
