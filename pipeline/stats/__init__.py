"""Statistics: activations -> mergeable per-channel state -> tables.

`collection` says what an accumulator is (one class: kind, table, build/add/merge/state/rows)
and how a collection of them is listed; `accumulators` holds top-k, positive mean and channel
statistics, `baseline` the unconditional mean patch; `analysis` runs a model over batches into
any collection (`ShardRunner`, `AnalysisResult`) and merges shards; `worker` is an analysis
worker's body (decodes its shards: the package's one reader of files); `stimuli` cuts the RF
patches of the top-k rows; `benchmark` times the same path."""
