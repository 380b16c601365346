"""svdcache runtime (work in progress)."""
