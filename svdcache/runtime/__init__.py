"""The runtime: what the root hook consults per transformer call (per-context state, the step decision,
the schedule, true-CFG sharing, guards, FLOP and memory accounting, multi-GPU helpers)."""
