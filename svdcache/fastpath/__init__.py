"""Fast paths: many features' cache work in a few ops (the deferred stacked sum, arenas of stacked small
states, batched full-step updates, CUDA graphs of the cached step). Each consumes the forecast policies'
terms through their interface and each has a switch and an equivalence test against the per-feature path."""
