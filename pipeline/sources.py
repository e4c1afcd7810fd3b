"""Compatibility re-export: `pipeline.listing` (manifests, layouts, labels, shards) and
`pipeline.decode` (decoding, batches, prefetch). New code imports from those two modules;
this module goes away once every caller has switched."""
from __future__ import annotations

from .decode import (Batch, Decoder, EvalTransform, Prefetcher, decode_image, decode_rgb,
                     iter_batches, load_batch, read_many, resize_crop)
from .listing import (IMAGE_EXTENSIONS, MANIFEST_SCHEMA, EmptySourceError, Manifest,
                      MissingLabelsError, SourceError, build_manifest, read_manifest, shard_ranges,
                      write_manifest)

__all__ = ["EvalTransform", "Manifest", "Batch", "SourceError", "EmptySourceError",
           "MissingLabelsError", "MANIFEST_SCHEMA", "IMAGE_EXTENSIONS", "build_manifest",
           "write_manifest", "read_manifest", "shard_ranges", "decode_image", "load_batch",
           "iter_batches", "read_many", "Decoder", "Prefetcher", "decode_rgb", "resize_crop"]
