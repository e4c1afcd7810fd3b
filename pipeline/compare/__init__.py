"""Comparison of two networks on the same images: layer similarity, matched channels, selectivity.

Three accumulators of the `pipeline.stats.collection` contract, one file each: `cka.CKA` (the
unbiased minibatch HSIC / linear CKA grid), `pearson.CrossSums` (channel cross sums and their
matching), `selectivity.ClassMeans` (the class-selectivity index). `collection` puts them in one
`Collection` over both networks' layers (`scan.feature` names) with the minibatch rule; `scan`
is the per-image read they share; `runner` the two truncated forwards that feed them and a
worker's body (an edge module: it decodes files); `benchmark` what `jobs.bench --compare`
measures. `jobs.compare` shards the images and merges the states; docs/compare.md defines every
estimator.
"""
