"""diffusers hooks of the cache, and their names in a model's hook registry.

- root.py: the root hook on the transformer (one call: begin -> decide -> run -> end);
- block.py: the block hook on each cached block (its full or its cached forward);
- site.py: the feature site, a thin wrapper on a module whose output is a cached feature;
- registry.py: install / uninstall all of them on a model.
"""
ROOT_HOOK = "svdcache"
BLOCK_HOOK = "svdcache_block"
CAPTURE_HOOK = "svdcache_capture"
CALIBRATION_HOOK = "svdcache_calibration"  # the calibration's root hook (svdcache.calibration)
