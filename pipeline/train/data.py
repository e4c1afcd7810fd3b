"""Training data: (url, label) datasets, the global-batch sampler and the DataLoaders.

    ds = ImageDataset(urls, labels, TrainTransform(64), read=tables.read_bytes)
    sampler = GlobalBatchSampler(len(ds), batch_size=256, world=3, rank=1, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate)   # (uint8, labels, skipped)

The dataset reads bytes through an injected `read` function (the jobs pass
`pipeline.results.tables.read_bytes`), so this module never opens files itself. A global batch of
exactly `batch_size` images is split over any number of ranks (`split_sizes`), so the paper's
256-image batch does not depend on the worker count.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch import Tensor

from pipeline.data.augment import TrainTransform, decode_rgb
from pipeline.seeds import derive_seed

__all__ = ["IGNORE", "ImageDataset", "collate", "split_sizes", "epoch_order", "GlobalBatchSampler",
           "build_train_loader", "build_val_loader"]

# Labels of unusable rows; cross-entropy ignores them (torch's default ignore_index).
IGNORE = -100


class ImageDataset(torch.utils.data.Dataset):
    """(url, label) pairs -> (uint8 image, label); an unreadable file yields None (counted).

    `read` maps a URL to its bytes (I/O is injected, so this module never opens files).
    """

    def __init__(self, urls: Sequence[str], labels: Sequence[int],
                 transform: Callable[[Image.Image], Tensor], read: Callable[[str], bytes]):
        if len(urls) != len(labels):
            raise ValueError(f"{len(urls)} urls but {len(labels)} labels")
        self.urls, self.labels = list(urls), [int(v) for v in labels]
        self.transform, self.read = transform, read

    def __len__(self) -> int:
        return len(self.urls)

    def __getitem__(self, i: int) -> tuple[Tensor, int] | None:
        try:
            image = decode_rgb(self.read(self.urls[i]))
        except Exception:  # noqa: BLE001 - any unreadable/undecodable file is skipped, counted
            return None
        return self.transform(image), self.labels[i]


def collate(items: list[tuple[Tensor, int] | None]) -> tuple[Tensor, Tensor, int]:
    """Stack readable items; returns (uint8 images (N,3,H,W), int64 labels (N,), skipped)."""
    good = [it for it in items if it is not None]
    skipped = len(items) - len(good)
    if not good:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), skipped
    images = torch.stack([im for im, _ in good])
    labels = torch.tensor([lab for _, lab in good], dtype=torch.int64)
    return images, labels, skipped


def split_sizes(total: int, world: int) -> list[int]:
    """`total` images over `world` ranks as evenly as possible: the first total % world get one more."""
    base, extra = divmod(total, world)
    return [base + (r < extra) for r in range(world)]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The permutation of `n` images that training seed `seed` uses in epoch `epoch`.

    Seeded by the pair (seed, epoch) jointly (`pipeline.seeds.derive_seed`, a hash of both), not
    by `seed + epoch` as torch's DistributedSampler does: with the sum, seed 1's epoch e would be
    seed 0's epoch e + 1, and two "independent" training runs would see the same shuffles
    shifted by one epoch. The order depends only on (n, seed, epoch): identical on every rank
    and on a resumed run.
    """
    g = torch.Generator().manual_seed(derive_seed("data-order", int(seed), int(epoch)))
    return torch.randperm(n, generator=g).tolist()


class GlobalBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Rank `rank`'s share of each global batch of `batch_size` images, for any worker count.

    Every rank draws the same permutation per epoch (`epoch_order`: seeded by (seed, epoch)
    jointly), cuts it into global batches and takes its `split_sizes` part of each, so all ranks take the
    same number of steps and every step's global batch size (`step_sizes`) is known on every rank
    without communication. The trailing incomplete batch is dropped when a full one exists.
    """

    def __init__(self, n: int, batch_size: int, world: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside 0..{world - 1}")
        self.n, self.batch_size, self.world, self.rank = n, batch_size, world, rank
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        if self.shuffle:
            order = epoch_order(self.n, self.seed, self.epoch)
        else:
            order = list(range(self.n))
        batches = [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        if len(batches) > 1 and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    @property
    def step_sizes(self) -> list[int]:
        """Images in each step's global batch (all ranks together)."""
        return [len(b) for b in self.global_batches()]

    def __iter__(self):
        for b in self.global_batches():
            start = sum(split_sizes(len(b), self.world)[:self.rank])
            yield b[start:start + split_sizes(len(b), self.world)[self.rank]]

    def __len__(self) -> int:
        return len(self.global_batches())


def build_train_loader(urls: Sequence[str], labels: Sequence[int], recipe: Any,
                       read: Callable[[str], bytes], world: int = 1, rank: int = 0,
                       loader_workers: int = 0, pin_memory: bool = False
                       ) -> tuple[torch.utils.data.DataLoader, GlobalBatchSampler]:
    """This rank's training DataLoader (augmented, `recipe.augment`) and its batch sampler."""
    ds = ImageDataset(urls, labels, TrainTransform(recipe.input_size, recipe.crop_scale,
                                                   recipe.crop_ratio, augment=recipe.augment),
                      read=read)
    sampler = GlobalBatchSampler(len(ds), recipe.batch_size, world, rank, seed=recipe.seed)
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=sampler, collate_fn=collate, num_workers=loader_workers,
        pin_memory=pin_memory, persistent_workers=False)
    return loader, sampler


def build_val_loader(dataset: torch.utils.data.Dataset, batch_size: int, loader_workers: int = 0,
                     pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A validation DataLoader over this rank's images (the caller builds the dataset)."""
    return torch.utils.data.DataLoader(dataset, batch_size=max(1, batch_size), shuffle=False,
                                       collate_fn=collate, num_workers=loader_workers,
                                       pin_memory=pin_memory)

