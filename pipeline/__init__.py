"""preferred-stimuli: the library, in stage packages (the map: docs/architecture.md).

`data` (sources, manifests, decoding, preprocessing), `models` (networks, layers, receptive
fields, hooks, checkpoints), `stats` (accumulators and the analysis that runs them), `ablation`,
`actmax`, `census`, `train`, `results` (every table declared once, the layout under --out, the
one writer) and `report`. Imports run one way, from `report` down to `results`; no module here
imports Ray or `jobs`. Compute takes bytes, arrays or callables: only the storage modules
(`results.tables`, `data.listing`, `data.decode`, `models.checkpoint`) open files.
"""
