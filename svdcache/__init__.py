"""svdcache: SVD-Cache feature caching for diffusers transformers.

    import svdcache
    basis = svdcache.calibrate(pipe, prompt="a photo of a cat", num_inference_steps=50)
    basis.save("flux-dev.safetensors")
    svdcache.enable(pipe, basis=svdcache.load_basis("flux-dev.safetensors"), interval=5)
    image = pipe("a red fox in snow").images[0]
    print(svdcache.stats(pipe))
    svdcache.disable(pipe)
"""
from typing import TYPE_CHECKING

__version__ = "0.2.0"

# the public names, imported on first use: ``python -m svdcache --help`` answers without torch or diffusers
_EXPORTS = {
    "current_basis": ".api", "disable": ".api", "enable": ".api", "generation": ".api", "is_enabled": ".api",
    "reset": ".api", "stats": ".api",
    "Basis": ".basis", "FeatureBasis": ".basis", "load_basis": ".basis",
    "calibrate": ".calibration",
    "SVDCacheConfig": ".config", "fora": ".config", "taylorseer": ".config",
    "push_to_hub": ".hub",
    "CacheStats": ".runtime.stats", "RunStats": ".runtime.stats",
}


def __getattr__(name):
    import importlib
    import importlib.util

    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module, __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)  # a submodule, as an eager package would have it
    else:
        raise AttributeError(f"module 'svdcache' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from .api import current_basis, disable, enable, generation, is_enabled, reset, stats  # noqa: F401
    from .basis import Basis, FeatureBasis, load_basis  # noqa: F401
    from .calibration import calibrate  # noqa: F401
    from .config import SVDCacheConfig, fora, taylorseer  # noqa: F401
    from .hub import push_to_hub  # noqa: F401
    from .runtime.stats import CacheStats, RunStats  # noqa: F401

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
