import pytest
import torch


@pytest.fixture(scope="module")
def tiny_pipe():
    """The embedded FluxPipeline architecture with random weights (no training needed)."""
    from svdcache.embedded.build import build_pipeline

    pipe = build_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe
