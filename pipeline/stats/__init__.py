"""Statistics: activations -> mergeable per-channel state -> tables.

`accumulators` holds the accumulators (top-k, positive mean, channel statistics); `analysis` runs a
model over batches into them (`ShardRunner`) and merges shards; `stimuli` cuts the RF patches of
the top-k rows; `benchmark` times the same path."""
