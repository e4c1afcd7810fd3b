"""Training: a recipe -> a trained checkpoint and per-epoch metrics.

`recipe` is the training and evaluation step (plain functions, no Ray); `data` the sharded,
resumable training loader; `run` what a job run of it decides (configuration, resume); `syncbn`
BatchNorm synchronised across ranks."""
