"""Demo data: deterministic bytes per seed, the promised layout and counts, decodable, and
classes that are learnable but not trivially so."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from pipeline.data.demo import (DEMO_CLASSES, DEMO_CROP, DEMO_IMAGE_SIZE, DEMO_RESIZE, DEMO_VERSION,
                           DemoSpec, default_demo_root, demo_transform, ensure_demo_data,
                           generate_demo_data)
from pipeline.data.listing import build_manifest
from pipeline.data.decode import EvalTransform, load_batch


def _digests(root) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            full = os.path.join(d, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    spec = DemoSpec(seed=3, train_per_class=4, val_per_class=2)
    assert generate_demo_data(str(tmp_path / "a"), spec) == {"train": 32, "val": 16}
    generate_demo_data(str(tmp_path / "b"), spec)
    generate_demo_data(str(tmp_path / "c"), DemoSpec(seed=4, train_per_class=4, val_per_class=2))
    a, b, c = (_digests(tmp_path / k) for k in "abc")
    assert len(a) == 48 and a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)
    # Each split has its own generator: more training images leave val/ unchanged.
    generate_demo_data(str(tmp_path / "d"), DemoSpec(seed=3, train_per_class=6, val_per_class=2))
    d = _digests(tmp_path / "d")
    assert {k: v for k, v in d.items() if k.startswith("val")} == {k: v for k, v in a.items() if k.startswith("val")}


def test_layout_decodes_as_class_folders(tmp_path):
    generate_demo_data(str(tmp_path / "d"), DemoSpec(seed=0, train_per_class=3, val_per_class=2))
    for split, per in (("train", 3), ("val", 2)):
        m = build_manifest(str(tmp_path / "d" / split), require_labels=True)
        assert m.classes == sorted(DEMO_CLASSES) and len(m) == per * len(DEMO_CLASSES)
        assert np.bincount(m.labels).tolist() == [per] * len(DEMO_CLASSES)
        raw = load_batch(m, range(len(m)), EvalTransform(DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE))
        assert raw.skipped == [] and raw.images.shape[1:] == (3, DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE)
        b = load_batch(m, range(len(m)), demo_transform())
        assert b.images.shape == (len(m), 3, DEMO_CROP, DEMO_CROP)
    assert demo_transform() == EvalTransform(resize=DEMO_RESIZE, crop=DEMO_CROP)


def test_default_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFERRED_STIMULI_DATA", str(tmp_path / "cache"))
    assert default_demo_root(5) == str(tmp_path / "cache" / f"demo-v{DEMO_VERSION}-seed5")
    monkeypatch.delenv("PREFERRED_STIMULI_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_demo_root() == str(tmp_path / "home" / ".cache" / "preferred-stimuli"
                                      / f"demo-v{DEMO_VERSION}-seed0")


def test_ensure_demo_data_generates_once_and_classes_are_learnable(demo_root, _demo_cache):
    # conftest's session cache: generated there once, atomically (no temporary folder left).
    root = demo_root
    assert root == default_demo_root(0) and os.path.dirname(root) == _demo_cache
    assert sorted(os.listdir(root)) == ["_DEMO_COMPLETE.json", "train", "val"]
    assert [p for p in os.listdir(_demo_cache) if p.startswith(".")] == []
    marker = os.stat(os.path.join(root, "_DEMO_COMPLETE.json"))
    assert ensure_demo_data() == root
    assert os.stat(os.path.join(root, "_DEMO_COMPLETE.json")).st_mtime_ns == marker.st_mtime_ns
    assert ensure_demo_data(root) == root
    with pytest.raises(ValueError, match="not seed 1"):
        ensure_demo_data(root, seed=1)

    train = build_manifest(root + "/train", require_labels=True)
    val = build_manifest(root + "/val", require_labels=True)
    assert len(train) == 300 * 8 and len(val) == 50 * 8

    # Nearest class mean of the mean colour: far above chance (1/8), far from perfect.
    def features(m, step):
        b = load_batch(m, range(0, len(m), step), demo_transform())
        assert b.skipped == []
        return b.as_float().mean((2, 3)).numpy(), b.labels

    xt, yt = features(train, 2)
    xv, yv = features(val, 1)
    centres = np.stack([xt[yt == k].mean(0) for k in range(8)])
    acc = (((xv[:, None] - centres[None]) ** 2).sum(-1).argmin(1) == yv).mean()
    assert 0.35 < acc < 0.9


def test_ensure_demo_data_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match="no complete demo data"):
        ensure_demo_data(str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "keep.txt").read_text() == "precious"


def test_bad_specs_are_rejected():
    for kwargs in ({"train_per_class": -1}, {"train_per_class": 0, "val_per_class": 0},
                   {"image_size": 4}, {"min_scale": 0.7, "max_scale": 0.5}, {"quality": 0}):
        with pytest.raises(ValueError):
            DemoSpec(**kwargs)
