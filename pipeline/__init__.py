"""preferred-stimuli: the library.

Pure compute (models, receptive fields, hooks, accumulators, whitening, actmax, ablation
noise) lives in modules that never touch storage or Ray; `sources` and `tables` do the I/O.
"""
