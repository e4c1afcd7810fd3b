"""Listing a data source: a URL -> a manifest (image_index, path, label) and its shards.

A source is a URL, a local path or anything fsspec opens (s3://bucket/prefix through s3fs, with
the endpoint and credentials taken only from the standard AWS environment variables and fsspec's
configuration). Three layouts are recognised:

* ImageNet's flat validation folder, `ILSVRC2012_val_*.JPEG`, labelled by the devkit's
  `ILSVRC2012_validation_ground_truth.txt` + `meta.mat` (next to the images or in
  `ILSVRC2012_devkit_t12/data/`) or by Kaggle's `LOC_val_solution.csv`; a flat folder without
  either gives null labels;
* one folder per class (labels = positions in the sorted folder names, as torchvision's
  ImageFolder);
* a Parquet manifest (URL ending in `.parquet`), read as it is.

Labels index the sorted list of class names (synset ids for ImageNet), as torchvision's
checkpoints expect. Turning the listed files into pixels is `pipeline.data.decode`'s job.

    manifest = build_manifest("s3://bucket/imagenet/val", require_labels=True)
    for start, stop in shard_ranges(len(manifest), shards=8): ...
"""
from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.shards import shard_ranges   # noqa: F401 - the manifest's shards, listed here too
from pipeline.results import catalog

__all__ = ["Manifest", "SourceError", "EmptySourceError", "MissingLabelsError", "MANIFEST_SCHEMA",
           "IMAGE_EXTENSIONS", "build_manifest", "write_manifest", "read_manifest", "shard_ranges"]

# torchvision's IMG_EXTENSIONS (ImageFolder), compared case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

MANIFEST_SCHEMA = catalog.MANIFEST.schema

_GT_NAME = "ILSVRC2012_validation_ground_truth.txt"
_META_NAME = "meta.mat"
_DEVKIT_DATA = "ILSVRC2012_devkit_t12/data"
_KAGGLE_CSV = "LOC_val_solution.csv"
_KAGGLE_SYNSETS = "LOC_synset_mapping.txt"
_VAL_RE = re.compile(r"^ILSVRC2012_val_(\d+)$")


class SourceError(ValueError):
    """A data source that cannot be used as asked (one clear line)."""


class EmptySourceError(SourceError):
    """No images found."""


class MissingLabelsError(SourceError):
    """Labels were required but the source has none (or not for every image)."""


@dataclass
class Manifest:
    root: str                   # dataset root URL (local path or s3://...)
    table: pa.Table             # image_index int64, path string (relative to root), label int64 (null if none)
    classes: list[str] = field(default_factory=list)   # label -> class name (synset id / folder name)

    def __len__(self) -> int:
        return self.table.num_rows

    def url(self, image_index: int) -> str:
        """Full URL of one image (paths that are absolute URLs/paths are returned as they are)."""
        return _resolve(self.root, self._paths()[int(image_index)])

    def urls(self, indices: Sequence[int] | np.ndarray) -> list[str]:
        paths = self._paths()
        return [_resolve(self.root, paths[int(i)]) for i in indices]

    def locate(self, indices: Sequence[int] | np.ndarray
               ) -> list[tuple[fsspec.AbstractFileSystem, str] | Exception]:
        """(filesystem, path) of each image, the root's filesystem resolved once per manifest
        (not once per image: a decoder asks for every file it reads); absolute paths in the
        manifest resolve on their own, and one that does not resolve comes back as the
        exception (that image is unreadable, the others are not)."""
        cached = self.__dict__.get("_fs_cache")
        if cached is None or cached[0] != self.root:
            fs, base = _fs(self.root)
            cached = self.__dict__["_fs_cache"] = (self.root, fs, base.rstrip("/") + "/")
        _, fs, base = cached
        paths = self._paths()
        out = []
        for i in indices:
            p = paths[int(i)]
            if not _is_absolute(p):
                out.append((fs, base + p))
                continue
            try:
                out.append(_fs(p))
            except Exception as e:  # noqa: BLE001 - an unknown protocol, a bad URL
                out.append(e)
        return out

    def _paths(self) -> list[str]:
        # The column as a Python list, built once: url() is called per image.
        cached = self.__dict__.get("_path_cache")
        if cached is None or cached[0] is not self.table:
            cached = (self.table, self.table.column("path").to_pylist())
            self.__dict__["_path_cache"] = cached
        return cached[1]

    def __getstate__(self) -> dict:
        # Ray pickles manifests to every worker: the path and label caches are rebuilt there.
        return {k: v for k, v in self.__dict__.items()
                if k not in ("_path_cache", "_label_cache", "_fs_cache")}

    @property
    def labels(self) -> np.ndarray:
        """int64 labels in image_index order, -1 where unknown (built once per table, like
        `_paths`: every decoded batch reads it; read-only)."""
        cached = self.__dict__.get("_label_cache")
        if cached is None or cached[0] is not self.table:
            col = self.table.column("label").fill_null(-1).to_numpy(zero_copy_only=False)
            labels = np.array(col, dtype=np.int64)
            labels.setflags(write=False)
            cached = self.__dict__["_label_cache"] = (self.table, labels)
        return cached[1]

    @property
    def has_labels(self) -> bool:
        return self.table.num_rows > 0 and self.table.column("label").null_count == 0


# ----------------------------------------------------------------------------- URLs

def _is_absolute(path: str) -> bool:
    return "://" in path or path.startswith("/")


def _resolve(root: str, path: str) -> str:
    if _is_absolute(path):
        return path
    return root.rstrip("/") + "/" + path


def _normalise_root(url: str) -> str:
    """Local paths become absolute (a manifest stays valid from any working directory)."""
    url = url.strip()
    if "://" not in url and "::" not in url:
        return os.path.abspath(os.path.expanduser(url))
    if url.startswith("file://"):
        return os.path.abspath(url[len("file://"):])
    return url.rstrip("/")


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(url)


def _read_small(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    with fs.open(path, "rb") as f:
        return f.read()


# ----------------------------------------------------------------------------- manifests

def build_manifest(url: str, require_labels: bool = False) -> Manifest:
    """List a data source into a manifest ordered by relative path (image_index = position).

    Raises SourceError (a ValueError) with one line when the URL does not exist, holds no
    images, or (with require_labels) lacks labels for any image.
    """
    if not isinstance(url, str) or not url.strip():
        raise SourceError("data source URL is empty; give a local folder, an s3:// URL or a .parquet manifest")
    if url.rstrip("/").endswith(".parquet"):
        manifest = read_manifest(url)
        if manifest.table.num_rows == 0:
            raise EmptySourceError(f"manifest {url} lists no images")
        _check_labels(manifest, url, require_labels)
        return manifest

    root = _normalise_root(url)
    try:
        fs, base = _fs(root)
        if not fs.exists(base):
            raise SourceError(f"data source {url} does not exist")
        if fs.isfile(base):
            raise SourceError(f"data source {url} is a file; give a folder of images or a .parquet manifest")
        files = _list_files(fs, base)
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - credentials, endpoint, permissions: one line
        raise SourceError(f"cannot list data source {url}: {e.__class__.__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None

    base = base.rstrip("/")
    rel = sorted(p[len(base) + 1:] for p in files if p.startswith(base + "/"))
    images = [p for p in rel if _is_image_name(p)]
    top = [p for p in images if "/" not in p]
    nested = [p for p in images if "/" in p]
    if top and nested:
        raise SourceError(
            f"{url} mixes layouts: {len(top)} images at the top (flat) and {len(nested)} in "
            f"subfolders (one folder per class); point at one layout or write a .parquet manifest")
    if top:
        table, classes = _flat(fs, base, root, top, set(rel))
    else:
        if not nested:
            raise EmptySourceError(
                f"no images found under {url}: expected ILSVRC2012_val_*.JPEG with a ground-truth "
                f"file, one folder per class, or a .parquet manifest")
        table, classes = _class_folders(nested)
    manifest = Manifest(root=root, table=table, classes=classes)
    _check_labels(manifest, url, require_labels)
    return manifest


LIST_CONCURRENCY = 32       # subfolders listed at once on a remote filesystem


def _list_files(fs: fsspec.AbstractFileSystem, base: str) -> list[str]:
    """Every file under `base`. Remote stores list the top level once, then each subfolder
    (one per class: ImageNet's training set has 1,000) concurrently, LIST_CONCURRENCY at a time:
    an object store pages through 1,000 keys per request, so one recursive listing of 1.28 M
    files is ~1,300 requests one after the other."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        # Follow symlinked folders (ImageNet trees are often assembled from links), as ImageFolder.
        return [os.path.join(d, f).replace(os.sep, "/")
                for d, _, names in os.walk(base, followlinks=True) for f in names]
    top = fs.ls(base, detail=True)
    files = [e["name"] for e in top if e.get("type") != "directory"]
    folders = [e["name"] for e in top if e.get("type") == "directory"]
    return files + [f for found in _find_all(fs, folders) for f in found]


def _find_all(fs: fsspec.AbstractFileSystem, folders: list[str]) -> list[list[str]]:
    """`fs.find` of each folder, LIST_CONCURRENCY at a time: coroutines on an async filesystem's
    loop (s3fs), threads otherwise."""
    if not folders:
        return []
    if getattr(fs, "async_impl", False):
        import asyncio

        from fsspec.asyn import sync

        async def each() -> list[list[str]]:
            gate = asyncio.Semaphore(LIST_CONCURRENCY)

            async def one(folder: str) -> list[str]:
                async with gate:
                    return list(await fs._find(folder, detail=False))

            return list(await asyncio.gather(*(one(f) for f in folders)))

        return sync(fs.loop, each)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(LIST_CONCURRENCY, len(folders))) as pool:
        return list(pool.map(lambda f: list(fs.find(f, detail=False)), folders))


def _is_image_name(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    # Hidden files (macOS ._ resource forks, editors' temporaries) are not images.
    return not name.startswith(".") and not any(part.startswith(".") for part in rel.split("/")[:-1]) \
        and name.lower().endswith(IMAGE_EXTENSIONS)


def _make_table(paths: list[str], labels: list[int | None]) -> pa.Table:
    return pa.table({
        "image_index": pa.array(np.arange(len(paths), dtype=np.int64), pa.int64()),
        "path": pa.array(paths, pa.string()),
        "label": pa.array(labels, pa.int64()),
    }, schema=MANIFEST_SCHEMA)


def _class_folders(paths: list[str]) -> tuple[pa.Table, list[str]]:
    # As torchvision's ImageFolder: the first folder level names the class, files may sit deeper.
    classes = sorted({p.split("/", 1)[0] for p in paths})
    index = {c: i for i, c in enumerate(classes)}
    return _make_table(paths, [index[p.split("/", 1)[0]] for p in paths]), classes


def _flat(fs: fsspec.AbstractFileSystem, base: str, root: str, paths: list[str],
          present: set[str]) -> tuple[pa.Table, list[str]]:
    def find(name: str) -> str | None:
        # Next to the images, in the devkit folder below them, or in a devkit folder beside them.
        for cand in (name, f"{_DEVKIT_DATA}/{name}"):
            if cand in present:
                return f"{base}/{cand}"
        sibling = f"{posixpath.dirname(base)}/{_DEVKIT_DATA}/{name}"
        return sibling if posixpath.dirname(base) and fs.exists(sibling) else None

    gt, meta = find(_GT_NAME), find(_META_NAME)
    if gt is not None:
        if meta is None:
            raise SourceError(f"{root} has {_GT_NAME} but no {_META_NAME} next to it or in "
                              f"{_DEVKIT_DATA}/: it is needed to map ILSVRC2012_IDs to synset ids")
        by_number, classes = _devkit_labels(_read_small(fs, gt), _read_small(fs, meta), root)
        labels = [by_number.get(_val_number(p)) for p in paths]
        return _make_table(paths, labels), classes
    kaggle = _kaggle_csv_path(fs, base, present)
    if kaggle is not None:
        csv_path, mapping_path = kaggle
        by_stem, classes = _kaggle_labels(_read_small(fs, csv_path),
                                          _read_small(fs, mapping_path) if mapping_path else None, root)
        labels = [by_stem.get(_stem(p)) for p in paths]
        return _make_table(paths, labels), classes
    return _make_table(paths, [None] * len(paths)), []


def _kaggle_csv_path(fs: fsspec.AbstractFileSystem, base: str,
                     present: set[str]) -> tuple[str, str | None] | None:
    if _KAGGLE_CSV in present:
        return f"{base}/{_KAGGLE_CSV}", (f"{base}/{_KAGGLE_SYNSETS}" if _KAGGLE_SYNSETS in present else None)
    # Kaggle's own layout keeps the images in ILSVRC/Data/CLS-LOC/val and the CSV four levels up.
    if base.endswith("ILSVRC/Data/CLS-LOC/val"):
        top = base[: -len("ILSVRC/Data/CLS-LOC/val")].rstrip("/")
        if fs.exists(f"{top}/{_KAGGLE_CSV}"):
            mapping = f"{top}/{_KAGGLE_SYNSETS}"
            return f"{top}/{_KAGGLE_CSV}", (mapping if fs.exists(mapping) else None)
    return None


def _stem(rel: str) -> str:
    name = rel.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0]


def _val_number(rel: str) -> int | None:
    m = _VAL_RE.match(_stem(rel))
    return int(m.group(1)) if m else None


def _devkit_labels(gt: bytes, meta: bytes, root: str) -> tuple[dict[int, int], list[str]]:
    """Line n of the ground truth -> label, through meta.mat's ILSVRC2012_ID -> WNID."""
    import scipy.io  # only the devkit layout needs it

    try:
        synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"cannot read {_META_NAME} of {root}: {e.__class__.__name__}: {e}") from None
    synsets = np.atleast_1d(synsets)
    names = synsets.dtype.names or ()
    if "ILSVRC2012_ID" not in names or "WNID" not in names:
        raise SourceError(f"{_META_NAME} of {root} has no synsets with ILSVRC2012_ID and WNID")
    ids = [int(np.asarray(v).squeeze()) for v in synsets["ILSVRC2012_ID"]]
    wnids = [str(np.asarray(v).squeeze()) for v in synsets["WNID"]]
    if "num_children" in names:
        # The real devkit lists 1860 synsets; the 1000 classes are the leaves (IDs 1..1000).
        leaf = [int(np.asarray(v).squeeze()) == 0 for v in synsets["num_children"]]
    else:
        leaf = [True] * len(ids)
    id_to_wnid = {i: w for i, w, keep in zip(ids, wnids, leaf) if keep}
    classes = sorted(set(id_to_wnid.values()))
    label_of = {w: k for k, w in enumerate(classes)}
    out: dict[int, int] = {}
    for n, line in enumerate(gt.decode("ascii", "replace").split(), start=1):
        try:
            out[n] = label_of[id_to_wnid[int(line)]]
        except (ValueError, KeyError):
            raise SourceError(f"{_GT_NAME} of {root}: line {n} holds {line!r}, which is not an "
                              f"ILSVRC2012_ID of a class in {_META_NAME}") from None
    return out, classes


def _kaggle_labels(data: bytes, mapping: bytes | None, root: str) -> tuple[dict[str, int], list[str]]:
    """LOC_val_solution.csv: ImageId -> first token of PredictionString (a synset id)."""
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8", "replace"))))
    synset_of: dict[str, str] = {}
    for row in rows:
        image, pred = (row.get("ImageId") or "").strip(), (row.get("PredictionString") or "").split()
        if image and pred:
            synset_of[image] = pred[0]
    if not synset_of:
        raise SourceError(f"{_KAGGLE_CSV} of {root} has no ImageId,PredictionString rows")
    if mapping is not None:
        classes = sorted({line.split()[0] for line in mapping.decode("utf-8", "replace").splitlines()
                          if line.strip()})
    else:
        classes = sorted(set(synset_of.values()))
    label_of = {w: k for k, w in enumerate(classes)}
    unknown = sorted(set(synset_of.values()) - set(label_of))
    if unknown:
        raise SourceError(f"{_KAGGLE_CSV} of {root} names synsets missing from {_KAGGLE_SYNSETS}: "
                          f"{', '.join(unknown[:5])}")
    return {k: label_of[v] for k, v in synset_of.items()}, classes


def _check_labels(manifest: Manifest, url: str, require_labels: bool) -> None:
    if not require_labels:
        return
    missing = manifest.table.column("label").null_count
    if missing == manifest.table.num_rows:
        raise MissingLabelsError(
            f"labels required but {url} has none: add {_GT_NAME} + {_META_NAME} or {_KAGGLE_CSV}, "
            f"use one folder per class, or a manifest with a label column")
    if missing:
        first = manifest.table.filter(manifest.table.column("label").is_null()).column("path")[0]
        raise MissingLabelsError(f"labels required but {missing} of {manifest.table.num_rows} images "
                                 f"in {url} have none (first: {first})")


def write_manifest(manifest: Manifest, url: str) -> None:
    """Write the manifest as Parquet; root and classes go into the schema metadata."""
    from pipeline.results.tables import write_bytes

    meta = {b"preferred_stimuli.root": manifest.root.encode(),
            b"preferred_stimuli.classes": json.dumps(list(manifest.classes)).encode()}
    table = manifest.table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_bytes(url, sink.getvalue().to_pybytes())


def read_manifest(url: str) -> Manifest:
    """Read a Parquet manifest (ours, or any with image_index, path and optionally label).

    Root: the one stored by write_manifest, else the manifest's folder (relative paths in it
    are relative to that folder). Classes: stored ones, else a `classes` metadata entry (JSON
    list), else none.
    """
    try:
        fs, path = _fs(url)
        if not fs.exists(path):
            raise SourceError(f"manifest {url} does not exist")
        table = pq.read_table(path, filesystem=fs)
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"cannot read manifest {url}: {e.__class__.__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None
    meta = table.schema.metadata or {}
    if "path" not in table.column_names:
        raise SourceError(f"manifest {url} has no 'path' column (columns: {', '.join(table.column_names)})")
    n = table.num_rows
    idx = (table.column("image_index").cast(pa.int64()) if "image_index" in table.column_names
           else pa.array(np.arange(n, dtype=np.int64)))
    label = (table.column("label").cast(pa.int64()) if "label" in table.column_names
             else pa.nulls(n, pa.int64()))
    out = pa.table({"image_index": idx, "path": table.column("path").cast(pa.string()), "label": label},
                   schema=MANIFEST_SCHEMA)
    if n and not np.array_equal(out.column("image_index").to_numpy(), np.arange(n)):
        # image_index is the position: a manifest in another order is re-sorted by it.
        out = out.sort_by("image_index")
        if not np.array_equal(out.column("image_index").to_numpy(), np.arange(n)):
            raise SourceError(f"manifest {url}: image_index must be 0..{n - 1}, each once")
    here = _normalise_root(url).rsplit("/", 1)[0]
    root = meta.get(b"preferred_stimuli.root", b"").decode() or here
    if not _is_absolute(root):
        root = _resolve(here, root)
    raw = meta.get(b"preferred_stimuli.classes") or meta.get(b"classes")
    classes = [str(c) for c in json.loads(raw)] if raw else []
    return Manifest(root=root, table=out, classes=classes)
