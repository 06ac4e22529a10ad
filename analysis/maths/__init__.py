"""The mathematics of the measurements: the two-way fit and its split-half statistics, the
position probe, bootstrap and seed-level statistics. Pure functions of tensors and numbers."""
