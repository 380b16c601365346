from setuptools import find_packages, setup

setup(
    name="svdcache",
    version="0.2.0",
    description="SVD-Cache: subspace-aware feature caching for diffusion transformers, with fused Triton kernels",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["svdcache", "svdcache.*", "svdcache_kernels", "svdcache_kernels.*"]),
    package_data={"svdcache.embedded": ["tiny-flux-digits/*", "tiny-flux-digits/*/*", "tiny-wan-digits/*"]},
    include_package_data=True,
    install_requires=[
        # torch is not pinned here: install the build you want first (scripts/setup.sh pins the CPU one).
        "torch>=2.4",
        "triton>=3.2; platform_system=='Linux'",
        "diffusers>=0.42.1",
        "transformers>=4.50",
        "safetensors>=0.4",
        "tqdm",
        "numpy",
        "pillow",
        "scikit-learn>=1.3",
    ],
    extras_require={
        # peft (pure Python; it brings accelerate and psutil): diffusers' LoRA calls on an enabled pipeline
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "peft>=0.21"],
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.7"],
        # optional peer of bench/fidelity.py --cache-dit (not installed by CI; no test needs it)
        "cachedit": ["cache-dit==1.5.3"],
        # optional: int8 weight-only quantized transformers (bench/accelerated.py; tests skip without it)
        "torchao": ["torchao>=0.18"],
    },
    entry_points={"console_scripts": ["svdcache=svdcache.__main__:main"]},
)
