"""The step count of each run comes from the scheduler of the pipeline running it, read at each call (issue
29): a scheduler replaced after ``enable`` (even by an identical one) and a second pipeline sharing the
transformer give what enabling after the change gives: the calibrated plan, ``tail``, one generation per
pipeline call."""
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

import svdcache
from svdcache.embedded import load_basis

KW = dict(interval=3, warmup=2, tail=2)


def _gen(emb, pipe, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe(num_inference_steps=steps, generator=g, output_type="latent", **emb.embeds, **emb.kw).images


def _counts(pipe):
    st = svdcache.stats(pipe).last_generation
    return st.full_steps, st.cached_steps


def _new_scheduler(pipe):
    return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)


@pytest.fixture
def pipe(emb):
    """The embedded pipeline; its own scheduler is put back afterwards."""
    sched = emb.pipe.scheduler
    yield emb.pipe
    svdcache.disable(emb.pipe)
    emb.pipe.scheduler = sched


@pytest.mark.parametrize("schedule", ["calibrated", "uniform"])
@pytest.mark.parametrize("steps", [50, 7])  # the embedded basis's calibrated plan is for 50 steps
def test_scheduler_replaced_after_enable(emb, pipe, schedule, steps):
    svdcache.enable(pipe, basis=load_basis(), schedule=schedule, **KW)
    pipe.scheduler = _new_scheduler(pipe)  # before any generation: the old one never ran
    got, got_n = _gen(emb, pipe, steps), _counts(pipe)
    pipe.scheduler = _new_scheduler(pipe)  # after one
    again, again_n = _gen(emb, pipe, steps), _counts(pipe)
    svdcache.enable(pipe, basis=load_basis(), schedule=schedule, **KW)  # enabled after the change
    want, want_n = _gen(emb, pipe, steps), _counts(pipe)
    assert got_n == want_n == again_n and want_n[1] > 0
    assert torch.equal(got, want) and torch.equal(again, want)


def test_second_pipeline_sharing_the_transformer(emb, pipe):
    """Each pipeline call runs with its own scheduler's step count (tail, calibrated plan) and counts one
    generation, whichever pipeline ``enable`` was given."""
    other = FluxPipeline(**dict(pipe.components, scheduler=_new_scheduler(pipe)))
    other.set_progress_bar_config(disable=True)
    try:
        svdcache.enable(other, basis=load_basis(), schedule="calibrated", **KW)
        want_other, want_other_n = _gen(emb, other, 50), _counts(other)  # its calibrated plan
        svdcache.enable(pipe, basis=load_basis(), schedule="calibrated", **KW)
        want, want_n = _gen(emb, pipe, 6), _counts(pipe)
        svdcache.enable(pipe, basis=load_basis(), schedule="calibrated", **KW)  # only the first pipeline
        got, got_n = _gen(emb, pipe, 6), _counts(pipe)
        got_other, got_other_n = _gen(emb, other, 50), _counts(pipe)
        got_again, got_again_n = _gen(emb, pipe, 6), _counts(pipe)
        gens = svdcache.stats(pipe).generations
    finally:
        svdcache.disable(other)
    assert gens == 3
    assert got_n == got_again_n == want_n and got_other_n == want_other_n and want_other_n[1] > 0
    assert torch.equal(got, want) and torch.equal(got_again, want) and torch.equal(got_other, want_other)


def test_transformer_enabled_alone_called_by_a_pipeline(emb):
    """Enabled on the transformer itself (no pipeline given), a pipeline calling it is found: its scheduler
    gives the step count (tail, calibrated plan), as if the pipeline had been enabled."""
    tr = emb.pipe.transformer
    try:
        svdcache.enable(tr, basis=load_basis(), schedule="calibrated", **KW)
        a, a_n = _gen(emb, emb.pipe, 6), _counts(tr)
        svdcache.enable(emb.pipe, basis=load_basis(), schedule="calibrated", **KW)
        b, b_n = _gen(emb, emb.pipe, 6), _counts(emb.pipe)
    finally:
        svdcache.disable(tr)
    assert a_n == b_n and torch.equal(a, b)
