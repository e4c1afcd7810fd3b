"""The one evaluation path against the truth: PIL's decoder, training's validation dataset, and a
Prefetcher that runs across shard boundaries, the nvJPEG batch route rehearsed on the CPU. The
CUDA tests are in test_decode_cuda.py."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from pipeline.data.decode import (Batch, Decoder, EvalTransform, Prefetcher, decode_rgb, jpeg_info,
                             load_batch)
from pipeline.data.listing import build_manifest
from tests.images import KINDS, encode as _encode, folder as _folder, image as _image, pil_rgb as _pil


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_decode_rgb_equals_pil(kind):
    data = KINDS[kind](_image(1, 37, 50))
    got = decode_rgb(data)
    assert got.dtype == torch.uint8 and got.shape == (3, 37, 50)
    assert torch.equal(got, _pil(data))


def test_jpeg_info_routes_only_complete_jpegs():
    a = _image(2, 30, 41)
    assert jpeg_info(_encode(a)) == (30, 41, 3)
    assert jpeg_info(_encode(a, "L")) == (30, 41, 1)
    assert jpeg_info(_encode(a, "CMYK")) == (30, 41, 4)
    assert jpeg_info(_encode(a, progressive=True)) == (30, 41, 3)
    good = _encode(a)
    assert jpeg_info(good[: len(good) // 2]) is None         # truncated: PIL decides (skips)
    assert jpeg_info(_encode(a, fmt="PNG")) is None and jpeg_info(b"") is None
    with pytest.raises(Exception):
        decode_rgb(good[: len(good) // 2])


def test_validation_and_analysis_see_the_same_pixels(tmp_path):
    # Training's validation dataset (PIL decode + EvalResizeCrop) and the analysis' load_batch:
    # the same pixels for every image, whatever its format and size.
    from pipeline.results.tables import read_bytes
    from pipeline.train.recipe import EvalResizeCrop, ImageDataset

    _folder(tmp_path)
    m = build_manifest(str(tmp_path))
    for resize, crop in ((72, 64), (40, 32), (256, 224)):
        ds = ImageDataset(m.urls(range(len(m))), [0] * len(m), EvalResizeCrop(resize, crop),
                          read=read_bytes)
        batch = load_batch(m, range(len(m)), EvalTransform(resize, crop))
        assert batch.indices.tolist() == list(range(len(m)))
        for i in range(len(m)):
            assert torch.equal(ds[i][0], batch.images[i]), (resize, crop, i)


def test_decoder_threads_do_not_change_pixels_or_skips(tmp_path):
    good = _folder(tmp_path)
    (tmp_path / "z_truncated.JPEG").write_bytes(good[0][: len(good[0]) // 2])
    m = build_manifest(str(tmp_path))
    tf = EvalTransform(40, 32)
    with Decoder(tf, cpus=1) as one, Decoder(tf, cpus=3) as three:
        a, b = one.load(m, range(len(m))), three.load(m, range(len(m)))
    assert torch.equal(a.images, b.images) and a.indices.tolist() == b.indices.tolist() == [0, 1, 2, 3, 4]
    assert [s[:2] for s in a.skipped] == [s[:2] for s in b.skipped] == [(5, "z_truncated.JPEG")]
    with pytest.raises(ValueError):
        Decoder(tf, cpus=0)
    with pytest.raises(ValueError):
        Decoder(tf, nvjpeg=True)            # nvJPEG needs a CUDA device


class _CountingDecoder(Decoder):
    """A real Decoder that records which chunks it was asked for (to see the read-ahead)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls: list[list[int]] = []
        self.lock = threading.Lock()

    def submit(self, manifest, indices):
        with self.lock:
            self.calls.append(list(map(int, indices)))
        return super().submit(manifest, indices)


def test_prefetcher_runs_across_shard_boundaries(tmp_path):
    _folder(tmp_path, sizes=[(40 + i, 50) for i in range(7)])
    m = build_manifest(str(tmp_path))
    tf = EvalTransform(32, 32)
    whole = load_batch(m, range(len(m)), tf)
    units = [(0, 3), (3, 5), np.array([6, 1])]
    with _CountingDecoder(tf, cpus=2) as dec:
        it = Prefetcher(m, dec, batch_size=2, depth=2).run(units)
        got = []
        for b in it:
            got.append(b)
            if b.unit == 0 and b.last:
                # Unit 0 ended; unit 1's first batch is already being (or has been) decoded.
                deadline = time.monotonic() + 10
                while [3, 4] not in dec.calls and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert [3, 4] in dec.calls
    assert [(b.unit, b.last, b.indices.tolist()) for b in got] == [
        (0, False, [0, 1]), (0, True, [2]), (1, True, [3, 4]), (2, True, [6, 1])]
    for b in got:
        assert torch.equal(b.images, whole.images[b.indices])
    # Stopping early ends the background thread; a bad unit raises in the consumer.
    with Decoder(tf, cpus=1) as dec:
        it = Prefetcher(m, dec, batch_size=1, depth=1).run([(0, 7)])
        next(it)
        it.close()
        assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())
        with pytest.raises(ValueError, match="not inside"):
            list(Prefetcher(m, dec, batch_size=2).run([(0, 2), (5, 99)]))


def test_prefetcher_hands_over_a_units_last_batch_before_the_next_unit_arrives(tmp_path):
    """An actor feeds its next shard only after finishing this one: the read-ahead across
    batches must never hold back a unit's last batch waiting for the next unit (a deadlock)."""
    import queue

    _folder(tmp_path, sizes=[(40 + i, 50) for i in range(5)])
    m = build_manifest(str(tmp_path))
    fed: queue.Queue = queue.Queue()
    fed.put((0, 5))

    def units():
        while (u := fed.get()) is not None:
            yield u

    got: list = []
    with Decoder(EvalTransform(32, 32), cpus=2) as dec:
        it = Prefetcher(m, dec, batch_size=2, depth=2).run(units())
        reader = threading.Thread(target=lambda: got.extend(next(it) for _ in range(3)))
        reader.start()
        reader.join(timeout=30)
        assert not reader.is_alive(), "the unit's last batch was held back"
        fed.put(None)
        assert list(it) == []
    assert [(b.indices.tolist(), b.last) for b in got] == [([0, 1], False), ([2, 3], False),
                                                          ([4], True)]


def test_nvjpeg_route_rehearsed_on_the_cpu_equals_the_per_image_path(tmp_path):
    """The nvJPEG path (files routed by the threads, one batched decode call, one resize per
    image size, CPU rows staged and copied over, rows stacked in order), run on the CPU, where
    libjpeg-turbo does the batched call: bit-identical to the per-image path, skips included.
    On a GPU only nvJPEG's own rounding differs (test_decode_cuda.py)."""
    sizes = [(300, 200), (64, 90), (72, 72), (120, 80), (50, 61), (300, 200), (300, 200), (90, 64)]
    good = _folder(tmp_path, sizes)        # rgb, gray, cmyk, png, progressive, rgb, gray, cmyk
    (tmp_path / "z_truncated.JPEG").write_bytes(good[0][: len(good[0]) // 2])
    (tmp_path / "z_text.JPEG").write_bytes(b"not an image")
    m = build_manifest(str(tmp_path))
    tf = EvalTransform(64, 56)
    with Decoder(tf, cpus=2) as per_image, Decoder(tf, cpus=2) as batched:
        batched.nvjpeg = True     # the GPU route on the CPU: the same code, libjpeg-turbo decodes
        a, b = per_image.load(m, range(len(m))), batched.load(m, range(len(m)))
        streamed = list(Prefetcher(m, batched, batch_size=3).run([(0, 4), (4, len(m))]))
    assert torch.equal(a.images, b.images) and a.indices.tolist() == b.indices.tolist()
    assert [s[:2] for s in a.skipped] == [s[:2] for s in b.skipped] == [
        (8, "z_text.JPEG"), (9, "z_truncated.JPEG")]
    assert torch.equal(torch.cat([x.images for x in streamed]), a.images)
    assert [x.indices.tolist() for x in streamed] == [[0, 1, 2], [3], [4, 5, 6], [7]]
