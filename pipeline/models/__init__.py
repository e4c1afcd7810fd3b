"""Models: a name or checkpoint -> a network, its layers, their receptive fields, hooks on them.

`zoo` builds torchvision CNNs and PlainNet variants; `checkpoint` reads and writes this project's
checkpoints (and torchvision state_dicts); `layers` names the measurement points (paper names and
module paths); `geometry` computes receptive fields from the traced graph and cuts RF patches;
`rf_catalogue` tabulates them; `hooks.Trace` captures, edits and stops a forward pass;
`precision` holds the strict-fp32 switches; `order` puts model and layer names in display order
(the paper's first); `study` resolves a job's inputs in one pass (source, checkpoint, model,
transform, layers). `checkpoint` is the only module here that opens files itself (`study` reads
through it and pipeline.data)."""
