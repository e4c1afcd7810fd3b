"""Inactive neurons and the noise ablation (paper, Table 1): noise, plans, evaluation of a shard.

Pure compute, no I/O and no Ray; `jobs.ablate` shards it, `pipeline.ablation.table1` turns the results
into the census, ablation and Table 1 tables. Any supported CNN, any layer with channel maps
(`ablation_layer`; by default `pool1` for the ResNet family, else the first max-pooling
module). The pieces:

    stats, skipped, flags = census_shard(model, preprocess, layer, batches)  # ChannelStats
    plans = make_plans(inactive, C, seeds=[0, 1, 2], subsets=parse_subsets("1ch,0.25,0.5"),
                       eval_batch=64)                 # clean, then per seed every condition
    sums, skipped, flags = eval_shard(model, preprocess, layer, plans, batches, eval_batch=64)
    merge_sums(sums, other_shard_sums)                  # {plan.label: EvalSums}, any order
    sums[plan.label].totals()                           # images, loss (float64), top1, top5

    plan = make_plan("inactive-random", seed=1, inactive=[3, 7], num_channels=64,
                     fraction=0.5, eval_batch=64)     # or count=1: exactly one channel
    logits = evaluate(model, layer, x, indices, plan)   # noise injected through a Trace edit
    EvalSums(eval_batch=64).update(logits, labels, indices, plan.mask(indices, 64))

Both shard functions run under `pipeline.models.precision.strict_fp32()` (TF32 off: the census tests
max == 0 exactly, the losses are compared to four digits) and return the flags they saw.

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

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.hooks import Trace
from pipeline.models.layers import Layer, resolve_layers
from pipeline.seeds import derive_seed

__all__ = ["CONDITIONS", "derive_seed", "image_noise", "random_subset", "random_count_subset",
           "Subset", "parse_subsets", "DEFAULT_SUBSETS", "control_channels", "Plan", "make_plan",
           "make_plans", "minibatch_shards", "batch_noise", "noise_edit", "evaluate",
           "per_image_scores", "EvalSums", "merge_sums", "census_shard", "eval_shard",
           "default_layer", "ablation_layer"]

CONDITIONS = ("clean", "inactive-all", "inactive-random", "control-active")
CLEAN_SEED = -1             # clean is deterministic: evaluated once, seed column -1


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

    @property
    def label(self) -> str:
        """File-name safe and unique among a run's plans: `inactive-random-0.25_seed1`."""
        sub = self.subset
        return f"{self.condition}{f'-{sub.label}' if sub else ''}_seed{self.seed}"

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


def minibatch_shards(n: int, eval_batch: int, shards: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of `shards` (at most) shards of n images, cut on minibatch
    boundaries: every forward batch holds the same images however the work is sharded."""
    from pipeline.data.shards import shard_ranges

    m = math.ceil(n / eval_batch)
    return [(a * eval_batch, min(b * eval_batch, n)) for a, b in shard_ranges(m, shards=shards)]


def make_plans(inactive: Sequence[int], num_channels: int, seeds: Sequence[int],
               subsets: Sequence[Subset], eval_batch: int) -> list[Plan]:
    """`clean` (once), then for every seed `inactive-all`, `inactive-random` once per subset
    size and `control-active`; only `clean` when nothing is inactive (noising no channel would
    repeat the clean evaluation)."""
    plans = [make_plan("clean", 0, inactive, num_channels)]
    if not inactive:
        return plans
    for cond in CONDITIONS[1:]:
        for sub in (subsets if cond == "inactive-random" else (None,)):
            kw = {"fraction": sub.fraction or 0.0, "count": sub.count} if sub else {}
            plans += [make_plan(cond, s, inactive, num_channels, eval_batch=eval_batch, **kw)
                      for s in seeds]
    return plans


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




def merge_sums(a: dict[str, EvalSums], b: dict[str, EvalSums]) -> dict[str, EvalSums]:
    """Merge `{plan label: EvalSums}` of two shards (or two plans' partials) into `a`."""
    for label, sums in b.items():
        a[label] = a[label].merge(sums) if label in a else sums
    return a


def census_shard(model: nn.Module, preprocess: Callable[[Tensor], Tensor], layer: Layer,
                 batches: Iterable[Any], device: str = "cpu") -> tuple[Any, list, dict]:
    """ChannelStats of `layer` over `batches` (pipeline.data.decode.Batch), the unreadable images
    the batches reported and the precision flags in force (strict fp32: max == 0 is exact)."""
    from pipeline.stats.accumulators import ChannelStats
    from pipeline.models.hooks import capture
    from pipeline.models.precision import strict_fp32

    model = model.eval().to(device)
    stats, skipped = ChannelStats(layer.channels), []
    with torch.no_grad(), strict_fp32() as flags:
        for batch in batches:
            skipped += batch.skipped
            if len(batch):
                x = preprocess(batch.as_float(device))
                stats.update(capture(model, x, [layer])[layer.name])
    return stats, skipped, flags


def eval_shard(model: nn.Module, preprocess: Callable[[Tensor], Tensor], layer: Layer,
               plans: Sequence[Plan], batches: Iterable[Any], eval_batch: int,
               device: str = "cpu") -> tuple[dict[str, EvalSums], list, dict]:
    """`{plan.label: EvalSums}` of every plan over `batches`, each batch decoded once for all
    plans and each seed's noise drawn once per batch; skipped images; precision flags."""
    from pipeline.models.precision import strict_fp32

    model = model.eval().to(device)
    sums = {plan.label: EvalSums(eval_batch) for plan in plans}
    skipped: list = []
    with torch.no_grad(), strict_fp32() as flags:
        for batch in batches:
            skipped += batch.skipped
            if not len(batch):
                continue
            x = preprocess(batch.as_float(device))
            cache: dict = {}   # this batch's noise per seed, shared by the plans of that seed
            for plan in plans:
                logits = evaluate(model, layer, x, batch.indices, plan, cache)
                sums[plan.label].update(logits, batch.labels, batch.indices,
                                        plan.mask(batch.indices, layer.channels)
                                        if plan.noisy else None)
    return sums, skipped, flags


def default_layer(model: nn.Module) -> str:
    """The layer `jobs.ablate` counts and noises when none is named: the paper's `pool1` for
    the ResNet family, else the first max-pooling module (the same place in the network: the
    first pooling after the stem). ValueError when the model has none (name a layer)."""
    from pipeline.models.layers import has_paper_names, module_layers

    if has_paper_names(model):
        return "pool1"
    modules = dict(model.named_modules())
    for path in module_layers(model):
        if isinstance(modules[path], nn.MaxPool2d):
            return path
    raise ValueError(f"{getattr(model, 'name', 'this model')} has no max-pooling layer to "
                     f"default to; name one with --layer (a module path such as "
                     f"{next(iter(module_layers(model)), 'features.0')})")


def ablation_layer(model: nn.Module, spec: str | None = None) -> Layer:
    """The one layer with channel maps that `spec` names (paper name or module path; None:
    `default_layer`). ValueError for an unknown name, several layers, or `fc`."""
    layers = resolve_layers(model, spec or default_layer(model))
    if len(layers) != 1 or layers[0].name == "fc":
        raise ValueError(f"--layer must name one layer with channel maps (pool1, conv2 ... or a "
                         f"module path), got {spec!r}")
    return layers[0]
