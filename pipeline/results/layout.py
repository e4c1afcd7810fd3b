"""Where `jobs.reproduce` puts each result under its --out: path functions only, no I/O.

`reproduce` writes this layout and `report` / `neuron_types` read it, so its paths are spelt out
here once; the file of each table inside a job's --out comes from `pipeline.results.catalog`. Training seed 0 is the top level of --out; seed s >= 1 repeats the per-seed tree
(train/, analysis/, ablation/<model>/, actmax/) under `<out>/seeds/<s>/`. The tables that cover
every model and seed (ablation/{ablation,census,table1}.parquet), and neuron_types/, report/ and
run.json, live at the top level only.

    <out>/train/<model>/{model.pt, metrics.parquet, run.json}        checkpoint(out, "resnet34")
    <out>/analysis/<model>/stimuli/{topk,mean,channels}.parquet      stimuli(out, m, "channels")
    <out>/ablation/<model>/{census,ablation,table1}.parquet          ablation_dir(out, m)
    <out>/ablation/{census,ablation,table1}.parquet  (all models, all training seeds)
    <out>/actmax/<model>/actmax.parquet, <out>/actmax/actmax.parquet
    <out>/neuron_types/{neuron_types,summary}.parquet, <out>/report/index.html, <out>/run.json
    <out>/compare/{cka,matches,selectivity}.parquet  (the first two models)  compare_table(out, "cka")
    <out>/seeds/<s>/train/<model>/model.pt, .../analysis/<model>/..., .../ablation/<model>/...
"""
from __future__ import annotations

from pipeline.results import catalog
from pipeline.results.urls import join

__all__ = ["SEEDS_DIR", "STAGE_DIRS", "join", "seed_root", "stage_dir", "model_dir", "train_dir",
           "checkpoint", "metrics", "analysis_dir", "stimuli", "stimuli_table", "ablation_dir",
           "combined", "actmax_dir", "neuron_types_dir", "report_index", "run_json",
           "ablation_table", "actmax_table", "neuron_types_table", "compare_dir", "compare_table"]

SEEDS_DIR = "seeds"
STAGE_DIRS = ("train", "analysis", "ablation", "actmax", "neuron_types", "compare", "report")


def _table(name: str) -> catalog.Table:
    if name not in catalog.TABLES:
        raise ValueError(f"unknown table {name!r}; allowed: {', '.join(catalog.TABLES)}")
    return catalog.TABLES[name]


def seed_root(out: str, train_seed: int = 0) -> str:
    """The root of one training seed's tree: --out itself for seed 0, else <out>/seeds/<s>."""
    if train_seed < 0:
        raise ValueError(f"training seeds are >= 0, got {train_seed}")
    return out.rstrip("/") if train_seed == 0 else join(out, SEEDS_DIR, str(train_seed))


def stage_dir(out: str, stage: str, train_seed: int = 0) -> str:
    """<seed root>/<stage>: the folder holding every model's output of `stage`."""
    if stage not in STAGE_DIRS:
        raise ValueError(f"unknown stage folder {stage!r}; allowed: {', '.join(STAGE_DIRS)}")
    return join(seed_root(out, train_seed), stage)


def model_dir(out: str, stage: str, model: str, train_seed: int = 0) -> str:
    """<seed root>/<stage>/<model>: one job's --out."""
    return join(stage_dir(out, stage, train_seed), model)


def train_dir(out: str, model: str, train_seed: int = 0) -> str:
    return model_dir(out, "train", model, train_seed)


def checkpoint(out: str, model: str, train_seed: int = 0) -> str:
    return join(train_dir(out, model, train_seed), "model.pt")


def metrics(out: str, model: str, train_seed: int = 0) -> str:
    return catalog.METRICS.at(train_dir(out, model, train_seed))


def analysis_dir(out: str, model: str, train_seed: int = 0) -> str:
    return model_dir(out, "analysis", model, train_seed)


def stimuli(out: str, model: str, table: str, train_seed: int = 0) -> str:
    """analysis/<model>/stimuli/<table>.parquet; table: topk, mean, channels or baseline."""
    return stimuli_table(analysis_dir(out, model, train_seed), table)


def stimuli_table(analysis_out: str, table: str) -> str:
    """<analysis out>/stimuli/<table>.parquet for any jobs.analyze --out."""
    return _table(f"stimuli/{table}").at(analysis_out)


def ablation_dir(out: str, model: str, train_seed: int = 0) -> str:
    return model_dir(out, "ablation", model, train_seed)


def combined(out: str, stage: str, table: str) -> str:
    """<out>/<stage>/<table>.parquet: one table over every model (and every training seed):
    ablation/{ablation,census,table1}, actmax/actmax."""
    return _table(table).at(stage_dir(out, stage))


def actmax_dir(out: str, model: str, train_seed: int = 0) -> str:
    return model_dir(out, "actmax", model, train_seed)


def neuron_types_dir(out: str) -> str:
    return stage_dir(out, "neuron_types")


def report_index(out: str) -> str:
    return join(stage_dir(out, "report"), "index.html")


def run_json(out: str) -> str:
    return join(out, "run.json")


def ablation_table(out: str, model: str, table: str, train_seed: int = 0) -> str:
    """ablation/<model>/<table>.parquet of one model and training seed; table: census, ablation
    or table1 (jobs.ablate's outputs)."""
    return _table(table).at(ablation_dir(out, model, train_seed))


def actmax_table(out: str, model: str, train_seed: int = 0) -> str:
    """actmax/<model>/actmax.parquet (jobs.actmax's output for one model)."""
    return catalog.ACTMAX.at(actmax_dir(out, model, train_seed))


def neuron_types_table(out: str, table: str) -> str:
    """neuron_types/<table>.parquet; table: neuron_types or summary."""
    return _table(table).at(neuron_types_dir(out))


def compare_dir(out: str) -> str:
    """compare/: jobs.compare's --out (the chain compares its first two models, seed 0)."""
    return stage_dir(out, "compare")


def compare_table(out: str, table: str) -> str:
    """compare/<table>.parquet; table: cka, matches or selectivity (jobs.compare's outputs)."""
    return _table(table).at(compare_dir(out))
