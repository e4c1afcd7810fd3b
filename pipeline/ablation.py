"""Inactive neurons and the noise ablation (paper, Table 1): census, noise, evaluation sums.

Pure compute, no I/O and no Ray; `jobs.ablate` shards it. The pieces:

    stats = ChannelStats(C).update(acts)      # pipeline.accumulators; acts: pool1 outputs
    census = census_table(stats.to_table(model, "pool1"), model, "pool1", C)  # + near_dead
    inactive = inactive_channels(census)      # channels whose output is 0 everywhere

    plan = make_plan("inactive-random", seed=1, inactive=[3, 7], num_channels=64,
                     fraction=0.5, eval_batch=64)
    sums = EvalSums(eval_batch=64)
    logits = evaluate(model, layer, x, indices, plan)   # noise injected through a Trace edit
    sums.update(logits, labels, indices, plan.mask(indices, 64))
    sums.merge(other_shard_sums); sums.totals()         # images, loss (float64), top1, top5

Determinism (so that numbers do not depend on sharding, worker count or batch size):
- Noise for image `i` under seed `s` is `relu(torch.randn((C, H, W), generator=g))` with
  `g = torch.Generator("cpu").manual_seed(derive_seed("noise", s, i))`, drawn on the CPU and
  then moved to the model's device; a plan masks it to the channels it noises, so every
  condition with the same seed sees the same noise values on a given (image, channel, y, x).
- `derive_seed(*parts)` = the first 8 bytes (little-endian) of SHA-256 over the parts joined
  by "/" (e.g. b"noise/1/4711"), with the top bit cleared: stable across Python processes
  (unlike `hash()`), platforms and library versions.
- `inactive-random` draws a fresh subset for every minibatch of the GLOBAL image order,
  m = image_index // eval_batch: each inactive channel is kept iff
  `torch.rand(len(inactive), generator=manual_seed(derive_seed("subset", s, m))) < fraction`.
- `control-active` noises `len(inactive)` channels drawn once per seed from the active ones:
  the first k of `torch.randperm(len(active), generator=manual_seed(derive_seed("control", s)))`.
- Loss and top-k counts are kept per minibatch; totals add the per-minibatch float64 sums with
  `math.fsum` (exactly rounded, so independent of merge order).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hooks import Trace
from .layers import Layer

__all__ = ["CONDITIONS", "NEAR_DEAD_FRACTION", "derive_seed", "image_noise", "random_subset",
           "control_channels", "Plan", "make_plan", "batch_noise", "noise_edit", "evaluate", "per_image_scores",
           "EvalSums", "CENSUS_SCHEMA", "census_table", "inactive_channels", "ABLATION_SCHEMA",
           "TABLE1_SCHEMA", "ablation_table", "table1", "format_table1", "no_inactive_note"]

CONDITIONS = ("clean", "inactive-all", "inactive-random", "control-active")
NEAR_DEAD_FRACTION = 1e-3   # "near dead": positive on fewer than 0.1 % of positions
CLEAN_SEED = -1             # clean is deterministic: evaluated once, seed column -1


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from `parts`: SHA-256 of "/".join(parts), first 8 bytes little-endian."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generator(*parts: int | str) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(derive_seed(*parts))


def image_noise(seed: int, image_index: int, shape: Sequence[int]) -> Tensor:
    """ReLU(N(0, 1)) noise of `shape` (C, H, W) for one image: a function of (seed, image_index)."""
    return torch.randn(tuple(shape), generator=_generator("noise", seed, image_index)).clamp_min_(0)


def random_subset(seed: int, minibatch: int, channels: Sequence[int], fraction: float) -> list[int]:
    """The channels of `channels` kept (each with probability `fraction`) in minibatch `minibatch`."""
    if not channels:
        return []
    keep = torch.rand(len(channels), generator=_generator("subset", seed, minibatch)) < fraction
    return [int(c) for c, k in zip(channels, keep.tolist()) if k]


def control_channels(seed: int, active: Sequence[int], count: int) -> list[int]:
    """`count` channels drawn without replacement from `active` (fixed per seed), sorted."""
    count = min(count, len(active))
    if count == 0:
        return []
    perm = torch.randperm(len(active), generator=_generator("control", seed))[:count]
    return sorted(int(active[i]) for i in perm.tolist())


@dataclass(frozen=True)
class Plan:
    """Which channels one (condition, seed) evaluation noises, image by image."""

    condition: str
    seed: int
    channels: tuple[int, ...]    # the noised set; for inactive-random the pool it draws from
    fraction: float = 1.0        # inactive-random: probability of keeping each pool channel
    eval_batch: int = 64         # inactive-random: minibatch m = image_index // eval_batch

    @property
    def noisy(self) -> bool:
        return self.condition != "clean" and bool(self.channels)

    def channels_for(self, image_index: int) -> list[int]:
        if not self.noisy:
            return []
        if self.condition == "inactive-random":
            return random_subset(self.seed, image_index // self.eval_batch, self.channels,
                                 self.fraction)
        return list(self.channels)

    def mask(self, indices: Sequence[int] | np.ndarray, num_channels: int) -> Tensor:
        """Boolean (N, C): True where image n's channel c gets noise."""
        out = torch.zeros(len(indices), num_channels, dtype=torch.bool)
        cache: dict[int, list[int]] = {}   # one subset per minibatch, not per image
        for n, idx in enumerate(np.asarray(indices, dtype=np.int64).tolist()):
            key = idx // self.eval_batch if self.condition == "inactive-random" else 0
            if key not in cache:
                cache[key] = self.channels_for(idx)
            out[n, cache[key]] = True
        return out


def make_plan(condition: str, seed: int, inactive: Sequence[int], num_channels: int,
              fraction: float = 0.5, eval_batch: int = 64) -> Plan:
    """The plan of `condition`; ValueError on an unknown condition or out-of-range channels."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; allowed: {', '.join(CONDITIONS)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    if eval_batch < 1:
        raise ValueError(f"eval_batch must be a positive integer, got {eval_batch}")
    inactive = sorted({int(c) for c in inactive})
    bad = [c for c in inactive if not 0 <= c < num_channels]
    if bad:
        raise ValueError(f"inactive channel {bad[0]} outside 0..{num_channels - 1}")
    if condition == "clean":
        return Plan("clean", CLEAN_SEED, ())
    if condition == "inactive-all":
        return Plan(condition, seed, tuple(inactive))
    if condition == "inactive-random":
        return Plan(condition, seed, tuple(inactive), fraction=fraction, eval_batch=eval_batch)
    active = [c for c in range(num_channels) if c not in set(inactive)]
    return Plan(condition, seed, tuple(control_channels(seed, active, len(inactive))))


def batch_noise(seed: int, indices: Sequence[int] | np.ndarray, shape: Sequence[int]) -> Tensor:
    """(N, C, H, W): `image_noise` of every image in `indices`."""
    return torch.stack([image_noise(seed, int(i), shape)
                        for i in np.asarray(indices, dtype=np.int64).tolist()])


def noise_edit(seed: int, indices: Sequence[int] | np.ndarray, mask: Tensor,
               cache: dict[int, Tensor] | None = None) -> Callable[[Tensor], Tensor]:
    """A `Trace` edit adding each image's noise on the channels `mask` (N, C) selects.

    `cache` (one dict per batch) keeps the batch's noise per seed, so several plans with the
    same seed evaluated on one batch draw it once.
    """
    def edit(out: Tensor) -> Tensor:
        if out.shape[0] != len(indices) or out.shape[1] != mask.shape[1]:
            raise ValueError(f"edit built for {len(indices)} images x {mask.shape[1]} channels, "
                             f"layer output is {tuple(out.shape)}")
        noise = cache.get(seed) if cache is not None else None
        if noise is None or noise.shape != out.shape:
            noise = batch_noise(seed, indices, out.shape[1:])
            if cache is not None:
                cache[seed] = noise
        noise = noise * mask[:, :, None, None]
        return out + noise.to(device=out.device, dtype=out.dtype)
    return edit


@torch.no_grad()
def evaluate(model: nn.Module, layer: Layer, x: Tensor, indices: Sequence[int] | np.ndarray,
             plan: Plan, cache: dict[int, Tensor] | None = None) -> Tensor:
    """Logits of `x` with the plan's noise added to `layer`'s output (a plain forward if clean);
    `cache`: see `noise_edit`."""
    if not plan.noisy:
        return model(x)
    mask = plan.mask(indices, layer.channels)
    with Trace(model, [layer], edit={layer.name: noise_edit(plan.seed, indices, mask, cache)},
               stop=False) as tr:
        return tr.run(x)


def per_image_scores(logits: Tensor, labels: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: cross-entropy (float64), top-1 hit, top-5 hit (top-k with k = min(5, classes))."""
    labels = labels.to(device=logits.device, dtype=torch.long)
    loss = F.cross_entropy(logits.float(), labels, reduction="none")
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    hit = topk == labels[:, None]
    return (loss.double().cpu().numpy(), hit[:, 0].cpu().numpy(), hit.any(1).cpu().numpy())


@dataclass
class EvalSums:
    """Mergeable evaluation sums, kept per minibatch m = image_index // eval_batch."""

    eval_batch: int
    # minibatch -> [images, loss sum (float64), top1, top5, noised channel-images]
    rows: dict[int, list[float]] = field(default_factory=dict)

    def update(self, logits: Tensor, labels: Tensor | np.ndarray,
               indices: Sequence[int] | np.ndarray, mask: Tensor | None = None) -> "EvalSums":
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        loss, top1, top5 = per_image_scores(logits, labels)
        idx = np.asarray(indices, dtype=np.int64)
        noised = (mask.sum(1).numpy() if mask is not None else np.zeros(len(idx), np.int64))
        for m in np.unique(idx // self.eval_batch).tolist():
            sel = idx // self.eval_batch == m
            row = self.rows.setdefault(int(m), [0, 0.0, 0, 0, 0])
            row[0] += int(sel.sum())
            row[1] = math.fsum([row[1], *loss[sel].tolist()])
            row[2] += int(top1[sel].sum())
            row[3] += int(top5[sel].sum())
            row[4] += int(noised[sel].sum())
        return self

    def merge(self, other: "EvalSums") -> "EvalSums":
        if other.eval_batch != self.eval_batch:
            raise ValueError(f"cannot merge sums of eval_batch {other.eval_batch} into "
                             f"{self.eval_batch}")
        for m, o in other.rows.items():
            if m in self.rows:
                # a minibatch split across two partials: never happens when shards are cut on
                # minibatch boundaries, and the sum is still right (only rounding may differ)
                r = self.rows[m]
                self.rows[m] = [r[0] + o[0], math.fsum([r[1], o[1]]), r[2] + o[2], r[3] + o[3],
                                r[4] + o[4]]
            else:
                self.rows[m] = list(o)
        return self

    def state(self) -> dict[str, Any]:
        return {"eval_batch": self.eval_batch,
                "rows": [[m, *r] for m, r in sorted(self.rows.items())]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "EvalSums":
        out = cls(int(state["eval_batch"]))
        for m, images, loss, top1, top5, noised in state["rows"]:
            out.rows[int(m)] = [int(images), float(loss), int(top1), int(top5), int(noised)]
        return out

    def totals(self) -> dict[str, float]:
        """images, loss (mean cross-entropy), top1/top5 (accuracy), counts and noised per image."""
        rows = list(self.rows.values())
        images = sum(int(r[0]) for r in rows)
        loss_sum = math.fsum(r[1] for r in rows)
        top1 = sum(int(r[2]) for r in rows)
        top5 = sum(int(r[3]) for r in rows)
        noised = sum(int(r[4]) for r in rows)
        n = max(images, 1)
        return {"images": images, "loss_sum": loss_sum, "top1_count": top1, "top5_count": top5,
                "loss": loss_sum / n if images else math.nan,
                "top1": top1 / n if images else math.nan, "top5": top5 / n if images else math.nan,
                "noised_per_image": noised / n if images else math.nan}


CENSUS_SCHEMA = pa.schema([
    ("model", pa.string()), ("layer", pa.string()), ("channel", pa.int32()),
    ("images", pa.int64()), ("max", pa.float32()), ("positive_fraction", pa.float64()),
    ("inactive", pa.bool_()), ("near_dead", pa.bool_()),
])


def census_table(channels: pa.Table, model: str, layer: str, num_channels: int) -> pa.Table:
    """The census of one layer from channel statistics (`stimuli/channels.parquet` rows, or
    `pipeline.accumulators.ChannelStats.to_table`): model, layer, channel, images, max,
    positive_fraction, inactive (max == 0: output 0 on every image and position), near_dead
    (positive on fewer than `NEAR_DEAD_FRACTION` of positions; includes the inactive ones).

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
    return pa.Table.from_pylist(rows, schema=CENSUS_SCHEMA)


def inactive_channels(census: pa.Table) -> list[int]:
    """Sorted channels flagged inactive in a `census_table`."""
    return sorted(int(r["channel"]) for r in census.select(["channel", "inactive"]).to_pylist()
                  if r["inactive"])


ABLATION_SCHEMA = pa.schema([
    ("model", pa.string()), ("layer", pa.string()), ("condition", pa.string()),
    ("seed", pa.int64()), ("images", pa.int64()), ("loss", pa.float64()),
    ("top1", pa.float64()), ("top5", pa.float64()),
    ("top1_count", pa.int64()), ("top5_count", pa.int64()), ("loss_sum", pa.float64()),
    ("delta_loss", pa.float64()), ("inactive_channels", pa.list_(pa.int32())),
    ("noised_channels", pa.list_(pa.int32())), ("noised_per_image", pa.float64()),
    ("fraction", pa.float64()), ("note", pa.string()),
])

TABLE1_SCHEMA = pa.schema([
    ("model", pa.string()), ("layer", pa.string()), ("images", pa.int64()),
    ("channels", pa.int32()), ("inactive", pa.int32()), ("near_dead", pa.int32()),
    ("inactive_channels", pa.list_(pa.int32())), ("seeds", pa.int32()),
    ("fraction", pa.float64()), ("clean_loss", pa.float64()), ("clean_top1", pa.float64()),
    ("delta_loss_mean", pa.float64()), ("delta_loss_std", pa.float64()),
    ("delta_loss_rnd_mean", pa.float64()), ("delta_loss_rnd_std", pa.float64()),
    ("control_delta_loss_mean", pa.float64()), ("control_delta_loss_std", pa.float64()),
    ("note", pa.string()),
])


def no_inactive_note(layer: str) -> str:
    return f"no inactive channel in {layer}: nothing to noise, noise conditions not evaluated"


def ablation_table(model: str, layer: str, inactive: Sequence[int], fraction: float,
                   results: Sequence[tuple[Plan, dict[str, float]]], seeds: Sequence[int]) -> pa.Table:
    """`ablation.parquet` rows from (plan, EvalSums.totals()) pairs; one must be the clean one.

    Without inactive channels, the noise conditions get one row per seed with null numbers
    and a note saying so (noising no channel would only repeat the clean evaluation).
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
        rows.append({
            "model": model, "layer": layer, "condition": plan.condition, "seed": plan.seed,
            "images": t["images"], "loss": t["loss"], "top1": t["top1"], "top5": t["top5"],
            "top1_count": t["top1_count"], "top5_count": t["top5_count"],
            "loss_sum": t["loss_sum"], "delta_loss": t["loss"] - clean_loss,
            "inactive_channels": inactive, "noised_channels": list(plan.channels),
            "noised_per_image": t["noised_per_image"],
            "fraction": plan.fraction if plan.condition == "inactive-random" else None,
            "note": note,
        })
    if not inactive:
        for cond in CONDITIONS[1:]:
            for seed in seeds:
                rows.append({"model": model, "layer": layer, "condition": cond, "seed": seed,
                             "images": 0, "inactive_channels": [], "noised_channels": [],
                             "fraction": fraction if cond == "inactive-random" else None,
                             "note": no_inactive_note(layer)})
    order = {c: i for i, c in enumerate(CONDITIONS)}
    rows.sort(key=lambda r: (order[r["condition"]], r["seed"]))
    return pa.Table.from_pylist(rows, schema=ABLATION_SCHEMA)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; null with fewer than two values)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def table1(ablation: pa.Table, census: pa.Table) -> pa.Table:
    """The paper's Table 1 layout, one row per (model, layer): inactive count, ΔL, ΔL_rnd and
    the control's ΔL, each mean ± std over seeds."""
    rows = []
    abl = ablation.to_pylist()
    cen = census.to_pylist()
    for model, layer in dict.fromkeys((r["model"], r["layer"]) for r in abl):
        mine = [r for r in abl if r["model"] == model and r["layer"] == layer]
        chans = [r for r in cen if r["model"] == model and r["layer"] == layer]
        clean = next(r for r in mine if r["condition"] == "clean")
        stats = {}
        for cond, key in (("inactive-all", "delta_loss"), ("inactive-random", "delta_loss_rnd"),
                          ("control-active", "control_delta_loss")):
            mean, std = _mean_std([r["delta_loss"] for r in mine if r["condition"] == cond])
            stats[f"{key}_mean"], stats[f"{key}_std"] = mean, std
        inactive = sorted(r["channel"] for r in chans if r["inactive"])
        seeds = sorted({r["seed"] for r in mine if r["condition"] != "clean"})
        fractions = [r["fraction"] for r in mine if r["condition"] == "inactive-random"]
        notes = sorted({r["note"] for r in mine if r["note"]})
        rows.append({"model": model, "layer": layer, "images": clean["images"],
                     "channels": len(chans), "inactive": len(inactive),
                     "near_dead": sum(1 for r in chans if r["near_dead"]),
                     "inactive_channels": inactive, "seeds": len(seeds),
                     "fraction": fractions[0] if fractions else None,
                     "clean_loss": clean["loss"], "clean_top1": clean["top1"], **stats,
                     "note": "; ".join(notes)})
    return pa.Table.from_pylist(rows, schema=TABLE1_SCHEMA)


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:+.4f}" + (f" ± {std:.4f}" if std is not None else "")


def format_table1(t1: pa.Table, census: pa.Table | None = None) -> str:
    """Table 1 as text; with a census, the near-dead channels of each model and their max."""
    head = f"{'model':<14}{'layer':<7}{'inactive':>9}  {'ΔL':<20}{'ΔL_rnd':<20}{'control ΔL':<20}"
    lines = ["Table 1: validation loss change from ReLU(N(0,1)) noise, mean ± std over seeds",
             head, "-" * len(head)]
    for r in t1.to_pylist():
        lines.append(f"{r['model']:<14}{r['layer']:<7}{r['inactive']:>5}/{r['channels']:<3}  "
                     f"{_pm(r['delta_loss_mean'], r['delta_loss_std']):<20}"
                     f"{_pm(r['delta_loss_rnd_mean'], r['delta_loss_rnd_std']):<20}"
                     f"{_pm(r['control_delta_loss_mean'], r['control_delta_loss_std']):<20}")
    for r in t1.to_pylist():
        lines.append(f"{r['model']}: clean loss {r['clean_loss']:.4f}, top-1 "
                     f"{r['clean_top1']:.4f} on {r['images']} images, {r['seeds']} seed(s)"
                     + (f"; {r['note']}" if r["note"] else ""))
        if census is not None:
            dead = [c for c in census.to_pylist() if c["model"] == r["model"]
                    and c["layer"] == r["layer"] and c["near_dead"]]
            shown = ", ".join(f"{c['channel']} (max {c['max']:.3g}, positive "
                              f"{100 * c['positive_fraction']:.3g}%)" for c in dead)
            lines.append(f"  near-dead channels (positive on < {100 * NEAR_DEAD_FRACTION:g}% of "
                         f"positions): {shown or 'none'}")
    return "\n".join(lines)
