"""Ablation: a checkpoint and its census -> the loss change under noise (the paper's Table 1).

`noise` injects ReLU(N(0,1)) noise into chosen channels and evaluates; `setup` decides which
channels and conditions; `table1` aggregates the evaluations (and training seeds) into Table 1."""
