"""Write the embedded demo data set: train/ and val/ in the one-folder-per-class layout.

JPEG crops (random scale, position, flip) cut from scikit-image's bundled photographs; class =
photograph. Deterministic for a seed. --out may be a local folder or an s3:// URL (the data is
generated locally, then uploaded).

    python -m jobs.demo_data --out ./demo                      # 8 classes x (300 train + 50 val)
    python -m jobs.demo_data --out s3://bucket/demo --seed 1
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

from jobs.runtime.inputs import check_writable
from jobs.runtime.console import Console
from jobs.runtime.options import BadInput, Options, at_least, in_range, opt
from jobs.runtime.options import run_cli
from jobs.runtime.runinfo import write_run

PROG = "python -m jobs.demo_data"


@dataclass(frozen=True)
class DemoDataConfig(Options):
    out: str = opt(help="folder (local path or s3://...) to write train/ and val/ into")
    seed: int = opt(0, "random seed; the same seed gives the same bytes", check=at_least(0))
    train_per_class: int = opt(300, "training images per class", check=at_least(0))
    val_per_class: int = opt(50, "validation images per class", check=at_least(0))
    image_size: int = opt(72, "side in pixels of the square JPEG crops", check=in_range(8, 1024))
    overwrite: bool = opt(False, "replace train/ and val/ if --out already has them")

    def check(self) -> None:
        if not self.out.strip():
            raise BadInput("--out is empty; give a local folder or an s3:// URL")
        if self.train_per_class + self.val_per_class < 1:
            raise BadInput("--train-per-class + --val-per-class must be >= 1")




def run(cfg: DemoDataConfig) -> dict[str, int]:
    """Generate into a local temporary folder, then move (or upload) train/ and val/ into place."""
    from fsspec.implementations.local import LocalFileSystem

    from pipeline.data.demo import DemoSpec, generate_demo_data
    from pipeline.results.tables import fs_path, join

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


def _job(cfg: DemoDataConfig) -> dict:
    """Generate, write run.json beside train/ and val/, print --out (for scripts)."""
    con = Console("demo_data")
    with con.stage("generate", quiet=True):
        counts = run(cfg)
    n = counts["train"] + counts["val"]
    con.info(f"wrote {counts['train']} train + {counts['val']} val images to {cfg.out} in "
             f"{con.wall:.1f} s ({n / max(con.wall, 1e-9):.0f} images/s)")
    info = write_run(cfg.out, "demo_data", cfg.to_dict(), counts={"images_written": n, **counts},
                     seconds=con.seconds, total_seconds=con.wall, work=n, unit="images")
    print(cfg.out.rstrip("/"))
    return info


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, __doc__, DemoDataConfig, _job, argv)


if __name__ == "__main__":
    sys.exit(main())
