"""The census and Table 1 tables of the noise ablation: which channels are inactive, and what
noising them did (`ablation.parquet`, `table1.parquet`, the printed Table 1).

Pure table building, no I/O and no Ray; `jobs.ablate` and `jobs.reproduce` write the tables.

    census = census_table(stats.to_table(model, "pool1"), model, "pool1", C)  # + near_dead
    inactive = inactive_channels(census)      # channels whose output is 0 everywhere
    rows = ablation_table(model, "pool1", inactive, subsets, [(plan, sums.totals()), ...], seeds)
    t1 = table1(rows, census)                 # mean ± std over noise (or training) seeds
    print(format_table1(t1, census))          # the console's Table 1
    cells = table1_cells(t1.to_pylist()[0])   # one row's display strings (the report's table)

The noise, the plans and the evaluation sums behind these rows are `pipeline.ablation.noise`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import pyarrow as pa

from pipeline.ablation.noise import CONDITIONS, Plan, Subset
from pipeline.results import catalog

__all__ = ["NEAR_DEAD_FRACTION", "CENSUS_SCHEMA", "census_table", "inactive_channels",
           "ABLATION_SCHEMA", "TABLE1_SCHEMA", "ablation_table", "table1", "format_table1",
           "table1_cells", "no_inactive_note"]

NEAR_DEAD_FRACTION = 1e-3   # "near dead": positive on fewer than 0.1 % of positions


CENSUS_SCHEMA = catalog.CENSUS.schema


def census_table(channels: pa.Table, model: str, layer: str, num_channels: int,
                 train_seed: int = 0) -> pa.Table:
    """The census of one layer from channel statistics (`stimuli/channels.parquet` rows, or
    `pipeline.stats.accumulators.ChannelStats.to_table`): model, layer, channel, images, max,
    positive_fraction, inactive (max == 0: output 0 on every image and position), near_dead
    (positive on fewer than `NEAR_DEAD_FRACTION` of positions; includes the inactive ones),
    train_seed (the training run the weights come from).

    ValueError when the table lacks a column, has no rows for (model, layer) or does not hold
    exactly channels 0..num_channels-1 once each.
    """
    need = ("model", "layer", "channel", "images", "max", "positive_fraction", "inactive")
    missing = [c for c in need if c not in channels.column_names]
    if missing:
        raise ValueError(f"channel statistics lack column(s) {', '.join(missing)}")
    rows = [r for r in channels.select(list(need)).to_pylist()
            if r["model"] == model and r["layer"] == layer]
    if not rows:
        have = sorted({(r["model"], r["layer"]) for r in
                       channels.select(["model", "layer"]).to_pylist()})
        raise ValueError(f"channel statistics hold no rows for model {model!r}, layer {layer!r}; "
                         f"they hold: {', '.join(f'{m}/{l}' for m, l in have) or 'nothing'}")
    rows.sort(key=lambda r: r["channel"])
    if [r["channel"] for r in rows] != list(range(num_channels)):
        raise ValueError(f"channel statistics of {model}/{layer} hold channels "
                         f"{rows[0]['channel']}..{rows[-1]['channel']} ({len(rows)} rows), but "
                         f"the model's {layer} has {num_channels}: not the same model?")
    for r in rows:
        r["near_dead"] = bool(r["positive_fraction"] < NEAR_DEAD_FRACTION)
        r["train_seed"] = int(train_seed)
    return pa.Table.from_pylist(rows, schema=CENSUS_SCHEMA)


def inactive_channels(census: pa.Table) -> list[int]:
    """Sorted channels flagged inactive in a `census_table`."""
    return sorted(int(r["channel"]) for r in census.select(["channel", "inactive"]).to_pylist()
                  if r["inactive"])


ABLATION_SCHEMA = catalog.ABLATION.schema

TABLE1_SCHEMA = catalog.TABLE1.schema


def no_inactive_note(layer: str) -> str:
    return f"no inactive channel in {layer}: nothing to noise, noise conditions not evaluated"


def ablation_table(model: str, layer: str, inactive: Sequence[int], subsets: Sequence[Subset],
                   results: Sequence[tuple[Plan, dict[str, float]]], seeds: Sequence[int],
                   train_seed: int = 0) -> pa.Table:
    """`ablation.parquet` rows from (plan, EvalSums.totals()) pairs; one must be the clean one.

    Without inactive channels, the noise conditions get one row per seed (and per subset) with
    null numbers and a note saying so (noising no channel would only repeat the clean
    evaluation). `train_seed` labels every row with the training run of the weights.
    """
    clean = [t for p, t in results if p.condition == "clean"]
    if len(clean) != 1:
        raise ValueError("exactly one clean evaluation is needed")
    clean_loss = clean[0]["loss"]
    inactive = sorted(int(c) for c in inactive)
    rows = []
    for plan, t in results:
        note = ""
        if plan.condition == "control-active" and len(plan.channels) < len(inactive):
            note = (f"only {len(plan.channels)} active channels for {len(inactive)} inactive ones: "
                    f"all active channels noised")
        if plan.count is not None and plan.count > len(inactive) and plan.subset is not None:
            note = (f"{plan.count} channels asked for, only {len(inactive)} inactive: all of "
                    f"them noised")
        sub = plan.subset
        rows.append({
            "model": model, "layer": layer, "condition": plan.condition, "seed": plan.seed,
            "images": t["images"], "loss": t["loss"], "top1": t["top1"], "top5": t["top5"],
            "top1_count": t["top1_count"], "top5_count": t["top5_count"],
            "loss_sum": t["loss_sum"], "delta_loss": t["loss"] - clean_loss,
            "inactive_channels": inactive, "noised_channels": list(plan.channels),
            "noised_per_image": t["noised_per_image"],
            "fraction": sub.fraction if sub else None,
            "subset_channels": sub.count if sub else None, "note": note,
            "train_seed": int(train_seed),
        })
    if not inactive:
        for cond in CONDITIONS[1:]:
            for sub in (subsets if cond == "inactive-random" else [None]):
                for seed in seeds:
                    rows.append({"model": model, "layer": layer, "condition": cond,
                                 "seed": seed, "images": 0, "inactive_channels": [],
                                 "noised_channels": [],
                                 "fraction": sub.fraction if sub else None,
                                 "subset_channels": sub.count if sub else None,
                                 "note": no_inactive_note(layer), "train_seed": int(train_seed)})
    rows.sort(key=_row_order)
    return pa.Table.from_pylist(rows, schema=ABLATION_SCHEMA)


def _row_subset(r: dict[str, Any]) -> Subset | None:
    if r["condition"] != "inactive-random":
        return None
    if r.get("subset_channels") is not None:
        return Subset(count=int(r["subset_channels"]))
    return Subset(fraction=float(r["fraction"]))


def _row_order(r: dict[str, Any]) -> tuple:
    order = {c: i for i, c in enumerate(CONDITIONS)}
    sub = _row_subset(r)
    return (order[r["condition"]], sub.key if sub else (-1, 0.0), r["seed"])


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; null with fewer than two values)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _train_seed(r: dict[str, Any]) -> int:
    return int(r.get("train_seed") or 0)   # tables written before the column: seed 0


def table1(ablation: pa.Table, census: pa.Table) -> pa.Table:
    """The paper's Table 1 as a statistic: per (model, layer) one `inactive-all` row (ΔL and the
    control's ΔL; `fraction` null) and one `inactive-random` row per subset size (ΔL_rnd).

    Rows of `ablation`/`census` carry a `train_seed`. Each training seed's ΔL is the mean over
    its noise seeds; a row's mean is the mean of those over training seeds and its std the
    sample std (ddof 1) across training seeds (`std_across` = "training seeds"). With a single
    training seed the std is over noise seeds, as the paper's single run allows ("noise
    seeds"). Training seeds without inactive channels have no ΔL (null in
    `delta_loss_per_seed`, named in `note`) and do not enter the mean: `contributing_seeds`
    counts those that do, `train_seeds` every seed run, and every formatted cell says
    "n = contributing of run". The inactive count is over every training seed.
    """
    rows = []
    abl, cen = ablation.to_pylist(), census.to_pylist()
    for model, layer in dict.fromkeys((r["model"], r["layer"]) for r in abl):
        mine = [r for r in abl if r["model"] == model and r["layer"] == layer]
        chans = [r for r in cen if r["model"] == model and r["layer"] == layer]
        rows += _table1_rows(model, layer, mine, chans)
    return pa.Table.from_pylist(rows, schema=TABLE1_SCHEMA)


def _common_cells(model: str, layer: str, mine: list[dict], chans: list[dict],
                  tseeds: list[int]) -> dict[str, Any]:
    """The cells every Table 1 row of (model, layer) shares: counts, clean loss, seeds."""
    multi = len(tseeds) > 1
    per = {t: [r for r in chans if _train_seed(r) == t] for t in tseeds}
    clean = {t: next(r for r in mine if r["condition"] == "clean" and _train_seed(r) == t)
             for t in tseeds}
    inactive = {t: sorted(r["channel"] for r in per[t] if r["inactive"]) for t in tseeds}
    near = {t: sum(1 for r in per[t] if r["near_dead"]) for t in tseeds}
    t0 = tseeds[0]
    counts = [len(inactive[t]) for t in tseeds]
    imean, istd = _mean_std([float(c) for c in counts])
    return {
        "model": model, "layer": layer, "images": clean[t0]["images"], "channels": len(per[t0]),
        "inactive": None if multi else counts[0], "near_dead": None if multi else near[t0],
        "inactive_channels": None if multi else inactive[t0],
        "seeds": len({r["seed"] for r in mine if r["condition"] != "clean"}),
        "clean_loss": _mean_std([clean[t]["loss"] for t in tseeds])[0],
        "clean_top1": _mean_std([clean[t]["top1"] for t in tseeds])[0],
        "train_seeds": len(tseeds), "train_seed_ids": tseeds, "inactive_mean": imean,
        "inactive_std": istd, "inactive_per_seed": counts,
        "std_across": "training seeds" if multi else "noise seeds",
    }


def _stat(mine: list[dict], tseeds: list[int], cond: str, sub: Subset | None = None):
    """ΔL mean, std, per-training-seed means and notes of one condition (and subset size)."""
    multi = len(tseeds) > 1
    sel = [r for r in mine if r["condition"] == cond and _row_subset(r) == sub]
    by_seed = {t: [r["delta_loss"] for r in sel if _train_seed(r) == t] for t in tseeds}
    per_seed = [_mean_std(by_seed[t])[0] for t in tseeds]
    mean, std = _mean_std(per_seed) if multi else _mean_std(by_seed[tseeds[0]])
    notes = sorted({(f"train seed {_train_seed(r)}: " if multi else "") + r["note"]
                    for r in sel if r["note"]})
    return mean, std, per_seed, notes, sum(v is not None for v in per_seed)


def _table1_rows(model: str, layer: str, mine: list[dict], chans: list[dict]) -> list[dict]:
    tseeds = sorted({_train_seed(r) for r in mine})
    common = _common_cells(model, layer, mine, chans, tseeds)
    dl, dl_std, dl_seeds, notes, n = _stat(mine, tseeds, "inactive-all")
    cl, cl_std, _, cnotes, _ = _stat(mine, tseeds, "control-active")
    rows = [{**common, "condition": "inactive-all", "fraction": None, "subset_channels": None,
             "delta_loss_mean": dl, "delta_loss_std": dl_std, "control_delta_loss_mean": cl,
             "control_delta_loss_std": cl_std, "delta_loss_per_seed": dl_seeds,
             "contributing_seeds": n, "note": "; ".join(sorted(set(notes + cnotes)))}]
    subs = sorted({s for s in map(_row_subset, mine) if s is not None}, key=lambda s: s.key)
    for sub in subs:
        rl, rl_std, rl_seeds, rnotes, n = _stat(mine, tseeds, "inactive-random", sub)
        rows.append({**common, "condition": "inactive-random", "fraction": sub.fraction,
                     "subset_channels": sub.count, "delta_loss_rnd_mean": rl,
                     "delta_loss_rnd_std": rl_std, "delta_loss_per_seed": rl_seeds,
                     "contributing_seeds": n, "note": "; ".join(rnotes)})
    return rows


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:+.4f}" + (f" ± {std:.4f}" if std is not None else "")


def _n(r: dict[str, Any]) -> str:
    """How many seeds a ΔL cell stands on: training seeds that have inactive channels out of
    those run, or (one training seed) the noise seeds its ± is over."""
    run = r.get("train_seeds") or 1
    if run == 1:
        return f"(n = {r['seeds']} noise seeds)" if r.get("seeds") else ""
    used = r.get("contributing_seeds")
    if used is None:   # a table written before the column: the seeds with a ΔL
        used = sum(v is not None for v in r.get("delta_loss_per_seed") or [])
    return f"(n = {used} of {run})"


def _noised(r: dict[str, Any]) -> str:
    if r["condition"] == "inactive-all":
        return "all inactive"
    if r["subset_channels"] is not None:
        return f"random {r['subset_channels']} ch"
    return f"random p={r['fraction']:g}"


def _inactive_cell(r: dict[str, Any]) -> str:
    if r["train_seeds"] == 1 or r["inactive_std"] is None:
        count = r["inactive"] if r["inactive"] is not None else f"{r['inactive_mean']:g}"
        return f"{count}/{r['channels']}"
    return f"{r['inactive_mean']:.1f}±{r['inactive_std']:.1f}/{r['channels']}"


def table1_cells(r: dict[str, Any]) -> dict[str, str]:
    """One table1.parquet row as display strings, the one formatting of Table 1 (the console's
    `format_table1` and the report both use it): model, layer, training seeds, inactive (mean ±
    std over every training seed), noised, ΔL (ΔL_rnd on random-subset rows) and control ΔL,
    each with the seeds it stands on, clean loss and top-1, note."""
    if r["condition"] == "inactive-all":
        delta = _pm(r["delta_loss_mean"], r["delta_loss_std"])
        control = _pm(r["control_delta_loss_mean"], r["control_delta_loss_std"])
        control = f"{control} {_n(r)}".rstrip()
    else:
        delta, control = _pm(r["delta_loss_rnd_mean"], r["delta_loss_rnd_std"]), ""
    return {"model": r["model"], "layer": r["layer"], "training seeds": str(r["train_seeds"]),
            "inactive": _inactive_cell(r), "noised": _noised(r),
            "ΔL": f"{delta} {_n(r)}".rstrip(), "control ΔL": control,
            "clean loss": "n/a" if r["clean_loss"] is None else f"{r['clean_loss']:.4f}",
            "clean top-1": "n/a" if r["clean_top1"] is None else f"{r['clean_top1']:.4f}",
            "note": r["note"] or ""}


def format_table1(t1: pa.Table, census: pa.Table | None = None) -> str:
    """Table 1 as text (`table1_cells`); with a census, the near-dead channels of each model
    (and training seed) and their max."""
    rows = t1.to_pylist()
    across = sorted({r["std_across"] for r in rows}) or ["noise seeds"]
    head = (f"{'model':<14}{'layer':<7}{'inactive':>12}  {'noised':<16}{'ΔL':<34}"
            "control ΔL")
    lines = [f"Table 1: validation loss change from ReLU(N(0,1)) noise, mean ± std over "
             f"{' / '.join(across)}; n = the seeds a cell stands on", head, "-" * len(head)]
    for r in rows:
        c = table1_cells(r)
        lines.append(f"{c['model']:<14}{c['layer']:<7}{c['inactive']:>12}  "
                     f"{c['noised']:<16}{c['ΔL']:<34}{c['control ΔL']}".rstrip())
    for r in rows:
        if r["condition"] != "inactive-all":
            continue
        seeds = (f"{r['seeds']} seed(s)" if r["train_seeds"] == 1 else
                 f"{r['seeds']} noise seed(s), {r['train_seeds']} training seeds "
                 f"{r['train_seed_ids']} with {r['inactive_per_seed']} inactive channels")
        lines.append(f"{r['model']}: clean loss {r['clean_loss']:.4f}, top-1 "
                     f"{r['clean_top1']:.4f} on {r['images']} images, {seeds}"
                     + (f"; {r['note']}" if r["note"] else ""))
        if census is None:
            continue
        mine = [c for c in census.to_pylist() if c["model"] == r["model"]
                and c["layer"] == r["layer"]]
        for t in r["train_seed_ids"]:
            dead = [c for c in mine if c["near_dead"] and _train_seed(c) == t]
            shown = ", ".join(f"{c['channel']} (max {c['max']:.3g}, positive "
                              f"{100 * c['positive_fraction']:.3g}%)" for c in dead)
            which = f", training seed {t}" if r["train_seeds"] > 1 else ""
            lines.append(f"  near-dead channels{which} (positive on < "
                         f"{100 * NEAR_DEAD_FRACTION:g}% of positions): {shown or 'none'}")
    return "\n".join(lines)
