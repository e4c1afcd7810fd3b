"""Write the embedded demo data set: train/ and val/ in the one-folder-per-class layout.

JPEG crops (random scale, position, flip) cut from scikit-image's bundled photographs; class =
photograph. Deterministic for a seed. --out may be a local folder or an s3:// URL (the data is
generated locally, then uploaded).

    python -m jobs.demo_data --out ./demo                      # 8 classes x (300 train + 50 val)
    python -m jobs.demo_data --out s3://bucket/demo --seed 1
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

from jobs.common import BadInput, bad_input_exits, check_writable, job_parser, log

PROG = "python -m jobs.demo_data"


@dataclass(frozen=True)
class DemoDataConfig:
    out: str                     # folder (local or s3://) that receives train/ and val/
    seed: int = 0                # same seed -> same bytes
    train_per_class: int = 300   # images per class in train/
    val_per_class: int = 50      # images per class in val/
    image_size: int = 72         # side of the square JPEGs
    overwrite: bool = False      # replace existing train/ and val/ under --out

    def __post_init__(self) -> None:
        if not self.out.strip():
            raise BadInput("--out is empty; give a local folder or an s3:// URL")
        if self.seed < 0:
            raise BadInput(f"--seed must be >= 0, got {self.seed}")
        if self.train_per_class < 0 or self.val_per_class < 0:
            raise BadInput("--train-per-class and --val-per-class must be >= 0")
        if self.train_per_class + self.val_per_class < 1:
            raise BadInput("--train-per-class + --val-per-class must be >= 1")
        if not 8 <= self.image_size <= 1024:
            raise BadInput(f"--image-size must be in 8..1024, got {self.image_size}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DemoDataConfig":
        return cls(out=args.out, seed=args.seed, train_per_class=args.train_per_class,
                   val_per_class=args.val_per_class, image_size=args.image_size,
                   overwrite=args.overwrite)


def build_parser() -> argparse.ArgumentParser:
    p = job_parser("demo_data", __doc__)
    p.add_argument("--out", required=True, help="folder (local path or s3://...) to write train/ and val/ into")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same bytes")
    p.add_argument("--train-per-class", type=int, default=300, help="training images per class")
    p.add_argument("--val-per-class", type=int, default=50, help="validation images per class")
    p.add_argument("--image-size", type=int, default=72, help="side in pixels of the square JPEG crops")
    p.add_argument("--overwrite", action="store_true", help="replace train/ and val/ if --out already has them")
    return p


def run(cfg: DemoDataConfig) -> dict[str, int]:
    """Generate into a local temporary folder, then move (or upload) train/ and val/ into place."""
    from fsspec.implementations.local import LocalFileSystem

    from pipeline.demo import DemoSpec, generate_demo_data
    from pipeline.tables import fs_path, join

    fs, base = fs_path(cfg.out)
    existing = [s for s in ("train", "val") if fs.exists(join(base, s))]
    if existing and not cfg.overwrite:
        raise BadInput(f"{cfg.out} already has {' and '.join(s + '/' for s in existing)}; pass --overwrite or choose another --out")
    check_writable(cfg.out)
    spec = DemoSpec(seed=cfg.seed, train_per_class=cfg.train_per_class,
                    val_per_class=cfg.val_per_class, image_size=cfg.image_size)
    local = isinstance(fs, LocalFileSystem)
    # A local temporary folder inside --out makes the final moves renames on one filesystem.
    scratch = tempfile.mkdtemp(prefix=".demo-tmp-", dir=base if local else None)
    try:
        gen = os.path.join(scratch, "data")
        counts = generate_demo_data(gen, spec)
        for split in ("train", "val"):
            src, dst = os.path.join(gen, split), join(base, split)
            if fs.exists(dst):
                fs.rm(dst, recursive=True)
            if local:
                os.rename(src, dst)
            else:
                files = sorted(os.path.join(d, f) for d, _, fs_ in os.walk(src) for f in fs_)
                fs.put(files, [join(dst, os.path.relpath(f, src).replace(os.sep, "/")) for f in files])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return counts


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with bad_input_exits(PROG):
        cfg = DemoDataConfig.from_args(args)
        t0 = time.perf_counter()
        counts = run(cfg)
    log(f"wrote {counts['train']} train + {counts['val']} val images to {cfg.out} "
        f"in {time.perf_counter() - t0:.1f} s")
    print(cfg.out.rstrip("/"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
