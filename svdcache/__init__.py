"""svdcache: SVD-Cache feature caching for diffusers transformers.

    import svdcache
    basis = svdcache.calibrate(pipe, prompt="a photo of a cat", num_inference_steps=50)
    basis.save("flux-dev.safetensors")
    svdcache.enable(pipe, basis=svdcache.load_basis("flux-dev.safetensors"), interval=5)
    image = pipe("a red fox in snow").images[0]
    print(svdcache.stats(pipe))
    svdcache.disable(pipe)
"""
__version__ = "0.1.0"

from .api import current_basis, disable, enable, generation, is_enabled, reset, stats  # noqa: E402
from .basis import Basis, FeatureBasis, load_basis  # noqa: E402
from .calibration import calibrate  # noqa: E402
from .config import SVDCacheConfig, fora, taylorseer  # noqa: E402
from .hub import push_to_hub  # noqa: E402
from .runtime.stats import CacheStats, RunStats  # noqa: E402

__all__ = [
    "enable",
    "disable",
    "is_enabled",
    "reset",
    "generation",
    "stats",
    "calibrate",
    "current_basis",
    "load_basis",
    "push_to_hub",
    "Basis",
    "FeatureBasis",
    "SVDCacheConfig",
    "fora",
    "taylorseer",
    "CacheStats",
    "RunStats",
]
