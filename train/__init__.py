"""posleak training: configs, the training loop, checkpoints, sweeps and the benchmark."""
