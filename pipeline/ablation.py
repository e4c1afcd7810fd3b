"""Inactive neurons and the noise ablation (paper, Table 1): census, noise, evaluation sums.

Pure compute, no I/O and no Ray; `jobs.ablate` shards it. The pieces:

    stats = ChannelStats(C).update(acts)      # pipeline.accumulators; acts: pool1 outputs
    census = census_table(stats.to_table(model, "pool1"), model, "pool1", C)  # + near_dead
    inactive = inactive_channels(census)      # channels whose output is 0 everywhere

    plan = make_plan("inactive-random", seed=1, inactive=[3, 7], num_channels=64,
                     fraction=0.5, eval_batch=64)     # or count=1: exactly one channel
    subsets = parse_subsets("1ch,0.25,0.5,0.75")  # the --fraction sweep
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
  m = image_index // eval_batch. A fraction p keeps each inactive channel iff
  `torch.rand(len(inactive), generator=manual_seed(derive_seed("subset", s, m))) < p` (so the
  subsets of one seed are nested: p = 0.25's lies inside p = 0.5's); a count k ("1ch") noises
  exactly the first k of `torch.randperm(len(inactive), generator=manual_seed(
  derive_seed("subset-count", s, m)))` (all of them when k exceeds the inactive count).
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
           "random_count_subset", "Subset", "parse_subsets", "DEFAULT_SUBSETS",
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


def random_count_subset(seed: int, minibatch: int, channels: Sequence[int],
                        count: int) -> list[int]:
    """Exactly min(count, len(channels)) channels of `channels` for `minibatch`, sorted."""
    if not channels or count < 1:
        return []
    perm = torch.randperm(len(channels), generator=_generator("subset-count", seed, minibatch))
    return sorted(int(channels[i]) for i in perm[:count].tolist())


@dataclass(frozen=True)
class Subset:
    """How big inactive-random's subset is: each inactive channel kept with probability
    `fraction`, or exactly `count` channels ("1ch"). One of the two is set."""

    fraction: float | None = None
    count: int | None = None

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.count is None):
            raise ValueError("a subset is a fraction or a channel count, not both or neither")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must lie in (0, 1], got {self.fraction}")
        if self.count is not None and self.count < 1:
            raise ValueError(f"a channel count must be >= 1, got {self.count}")

    @property
    def label(self) -> str:
        return f"{self.count}ch" if self.count is not None else f"{self.fraction:g}"

    @property
    def key(self) -> tuple[int, float]:
        """Sort key: channel counts first (ascending), then fractions (ascending)."""
        return (0, float(self.count)) if self.count is not None else (1, float(self.fraction))


DEFAULT_SUBSETS = "1ch,0.25,0.5,0.75"


def parse_subsets(text: str) -> tuple[Subset, ...]:
    """"1ch,0.25,0.5" -> Subsets, sorted by `Subset.key`, duplicates dropped. ValueError naming
    the bad item and what is allowed."""
    out: dict[Subset, None] = {}
    for item in (t.strip() for t in str(text).split(",")):
        if not item:
            continue
        try:
            if item.lower().endswith("ch"):
                sub = Subset(count=int(item[:-2]))
            else:
                sub = Subset(fraction=float(item.rstrip("%")) / (100 if item.endswith("%") else 1))
        except ValueError:
            raise ValueError(f"--fraction item {item!r} is neither a fraction in (0, 1] (0.25 or "
                             f"25%) nor a channel count (1ch, 2ch ...)") from None
        out[sub] = None
    if not out:
        raise ValueError("--fraction is empty; give fractions in (0, 1] and/or channel counts "
                         f"such as {DEFAULT_SUBSETS}")
    return tuple(sorted(out, key=lambda s: s.key))


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
    fraction: float | None = 1.0  # inactive-random: probability of keeping each pool channel
    eval_batch: int = 64         # inactive-random: minibatch m = image_index // eval_batch
    count: int | None = None     # inactive-random: exactly this many pool channels instead

    @property
    def subset(self) -> Subset | None:
        """inactive-random's subset size; None for the other conditions."""
        if self.condition != "inactive-random":
            return None
        return Subset(count=self.count) if self.count is not None else Subset(self.fraction)

    @property
    def noisy(self) -> bool:
        return self.condition != "clean" and bool(self.channels)

    def channels_for(self, image_index: int) -> list[int]:
        if not self.noisy:
            return []
        if self.condition == "inactive-random":
            m = image_index // self.eval_batch
            if self.count is not None:
                return random_count_subset(self.seed, m, self.channels, self.count)
            return random_subset(self.seed, m, self.channels, self.fraction)
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
              fraction: float = 0.5, eval_batch: int = 64, count: int | None = None) -> Plan:
    """The plan of `condition`; inactive-random keeps each channel with probability `fraction`,
    or exactly `count` channels when given. ValueError on an unknown condition or out-of-range
    channels."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; allowed: {', '.join(CONDITIONS)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    if count is not None and count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
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
        if count is not None:
            return Plan(condition, seed, tuple(inactive), fraction=None, eval_batch=eval_batch,
                        count=count)
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
    ("inactive", pa.bool_()), ("near_dead", pa.bool_()), ("train_seed", pa.int64()),
])


def census_table(channels: pa.Table, model: str, layer: str, num_channels: int,
                 train_seed: int = 0) -> pa.Table:
    """The census of one layer from channel statistics (`stimuli/channels.parquet` rows, or
    `pipeline.accumulators.ChannelStats.to_table`): model, layer, channel, images, max,
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


ABLATION_SCHEMA = pa.schema([
    ("model", pa.string()), ("layer", pa.string()), ("condition", pa.string()),
    ("seed", pa.int64()), ("images", pa.int64()), ("loss", pa.float64()),
    ("top1", pa.float64()), ("top5", pa.float64()),
    ("top1_count", pa.int64()), ("top5_count", pa.int64()), ("loss_sum", pa.float64()),
    ("delta_loss", pa.float64()), ("inactive_channels", pa.list_(pa.int32())),
    ("noised_channels", pa.list_(pa.int32())), ("noised_per_image", pa.float64()),
    ("fraction", pa.float64()), ("note", pa.string()),
    ("subset_channels", pa.int32()), ("train_seed", pa.int64()),
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
    # added with the training-seed statistics and the subset sweep
    ("condition", pa.string()), ("subset_channels", pa.int32()), ("train_seeds", pa.int32()),
    ("train_seed_ids", pa.list_(pa.int64())), ("inactive_mean", pa.float64()),
    ("inactive_std", pa.float64()), ("inactive_per_seed", pa.list_(pa.int32())),
    ("delta_loss_per_seed", pa.list_(pa.float64())), ("std_across", pa.string()),
])


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
    `delta_loss_per_seed`, named in `note`) and do not enter the mean.
    """
    rows = []
    abl = ablation.to_pylist()
    cen = census.to_pylist()
    for model, layer in dict.fromkeys((r["model"], r["layer"]) for r in abl):
        mine = [r for r in abl if r["model"] == model and r["layer"] == layer]
        tseeds = sorted({_train_seed(r) for r in mine})
        multi = len(tseeds) > 1
        chans = {t: [r for r in cen if r["model"] == model and r["layer"] == layer
                     and _train_seed(r) == t] for t in tseeds}
        clean = {t: next(r for r in mine if r["condition"] == "clean" and _train_seed(r) == t)
                 for t in tseeds}
        inactive = {t: sorted(r["channel"] for r in chans[t] if r["inactive"]) for t in tseeds}
        near = {t: sum(1 for r in chans[t] if r["near_dead"]) for t in tseeds}
        t0 = tseeds[0]
        counts = [len(inactive[t]) for t in tseeds]
        imean, istd = _mean_std([float(c) for c in counts])
        common = {
            "model": model, "layer": layer, "images": clean[t0]["images"],
            "channels": len(chans[t0]),
            "inactive": None if multi else counts[0], "near_dead": None if multi else near[t0],
            "inactive_channels": None if multi else inactive[t0],
            "seeds": len({r["seed"] for r in mine if r["condition"] != "clean"}),
            "clean_loss": _mean_std([clean[t]["loss"] for t in tseeds])[0],
            "clean_top1": _mean_std([clean[t]["top1"] for t in tseeds])[0],
            "train_seeds": len(tseeds), "train_seed_ids": tseeds, "inactive_mean": imean,
            "inactive_std": istd, "inactive_per_seed": counts,
            "std_across": "training seeds" if multi else "noise seeds",
        }

        def stat(cond: str, sub: Subset | None = None):
            sel = [r for r in mine if r["condition"] == cond and _row_subset(r) == sub]
            by_seed = {t: [r["delta_loss"] for r in sel if _train_seed(r) == t] for t in tseeds}
            per_seed = [_mean_std(by_seed[t])[0] for t in tseeds]
            mean, std = _mean_std(per_seed) if multi else _mean_std(by_seed[t0])
            notes = sorted({(f"train seed {_train_seed(r)}: " if multi else "") + r["note"]
                            for r in sel if r["note"]})
            return mean, std, per_seed, notes

        dl, dl_std, dl_seeds, notes = stat("inactive-all")
        cl, cl_std, _, cnotes = stat("control-active")
        rows.append({**common, "condition": "inactive-all", "fraction": None,
                     "subset_channels": None, "delta_loss_mean": dl, "delta_loss_std": dl_std,
                     "control_delta_loss_mean": cl, "control_delta_loss_std": cl_std,
                     "delta_loss_per_seed": dl_seeds,
                     "note": "; ".join(sorted(set(notes + cnotes)))})
        subs = sorted({s for s in map(_row_subset, mine) if s is not None}, key=lambda s: s.key)
        for sub in subs:
            rl, rl_std, rl_seeds, rnotes = stat("inactive-random", sub)
            rows.append({**common, "condition": "inactive-random", "fraction": sub.fraction,
                         "subset_channels": sub.count, "delta_loss_rnd_mean": rl,
                         "delta_loss_rnd_std": rl_std, "delta_loss_per_seed": rl_seeds,
                         "note": "; ".join(rnotes)})
    return pa.Table.from_pylist(rows, schema=TABLE1_SCHEMA)


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:+.4f}" + (f" ± {std:.4f}" if std is not None else "")


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


def format_table1(t1: pa.Table, census: pa.Table | None = None) -> str:
    """Table 1 as text; with a census, the near-dead channels of each model (and training seed)
    and their max."""
    rows = t1.to_pylist()
    across = sorted({r["std_across"] for r in rows}) or ["noise seeds"]
    head = (f"{'model':<14}{'layer':<7}{'inactive':>12}  {'noised':<16}{'ΔL':<20}"
            "control ΔL")
    lines = [f"Table 1: validation loss change from ReLU(N(0,1)) noise, mean ± std over "
             f"{' / '.join(across)}", head, "-" * len(head)]
    for r in rows:
        if r["condition"] == "inactive-all":
            delta, control = (r["delta_loss_mean"], r["delta_loss_std"]), _pm(
                r["control_delta_loss_mean"], r["control_delta_loss_std"])
        else:
            delta, control = (r["delta_loss_rnd_mean"], r["delta_loss_rnd_std"]), ""
        lines.append(f"{r['model']:<14}{r['layer']:<7}{_inactive_cell(r):>12}  "
                     f"{_noised(r):<16}{_pm(*delta):<20}{control:<20}".rstrip())
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
