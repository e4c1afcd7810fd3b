"""Data: a URL -> a manifest (image_index, path, label), shards, decoded uint8 batches, model-ready tensors.

`listing` reads a source (local or s3://) into a `Manifest`; `shards` cuts it into contiguous ranges;
`decode` turns its files into uint8 batches (CPU threads or nvJPEG); `preprocess` whitens them (ZCA
or mean/std); `augment` is training's augmentation; `demo` writes the embedded demo images; `hostmem`
keeps freed host memory for the next batch. `listing` and `decode` are the only modules here that
touch storage."""
