"""The shipped miniature FLUX pipeline: loads offline, draws the digit named in the prompt."""
import os

import pytest
import torch

from svdcache.embedded import BASIS_PATH, CALL_KWARGS, GUIDANCE, PIPELINE_DIR, canonical_prompt, load_pipeline, prompts_for
from svdcache.embedded.data import load_digit_images, to_classifier_features


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(max(1, torch.get_num_threads()))
    p = load_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def digits_classifier():
    """An SVC on sklearn's digits, fed the same 8x8 pooling of the 32x32 frames the model was trained on."""
    from sklearn.svm import SVC

    imgs, labels = load_digit_images(shifts_per_image=2, seed=1)
    feats = to_classifier_features((imgs + 1) / 2)
    return SVC(gamma="scale", C=10).fit(feats.numpy(), labels.numpy())


def _generate(pipe, prompts, seeds, steps=20):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompts, num_inference_steps=steps, generator=gens, output_type="pt", **CALL_KWARGS, **GUIDANCE).images


def test_shipped_folder_is_small_safetensors_and_loads_offline(pipe):
    total = 0
    for root, _, files in os.walk(PIPELINE_DIR):
        for f in files:
            assert not f.endswith((".bin", ".pt", ".ckpt")), f  # weights are safetensors only
            total += os.path.getsize(os.path.join(root, f))
    assert total <= 30 * 2**20, total
    assert type(pipe).__name__ == "FluxPipeline"
    assert type(pipe.transformer).__name__ == "FluxTransformer2DModel"
    assert os.path.exists(BASIS_PATH)


def test_each_digit_prompt_gives_an_image_deterministic_in_the_seed(pipe):
    prompts = [canonical_prompt(d) for d in range(10)]
    a = _generate(pipe, prompts, range(10))
    assert a.shape == (10, 3, 32, 32)
    assert a.dtype == torch.float32 and torch.isfinite(a).all()
    assert a.min() >= 0 and a.max() <= 1
    assert a.flatten(1).std(1).min() > 0.05  # not blank
    b = _generate(pipe, prompts, range(10))
    assert torch.equal(a, b)  # same seeds, same batch: bit-identical
    c = _generate(pipe, prompts, range(100, 110))
    assert (a - c).abs().flatten(1).max(1).values.min() > 0.1  # other seeds: other drawings


def test_a_classifier_reads_the_digit_named_in_the_prompt(pipe, digits_classifier):
    """Two seeds per digit and two phrasings: most samples are read as the digit that was asked for."""
    prompts, labels, seeds = [], [], []
    for d in range(10):
        for j, p in enumerate((prompts_for(d)[0], prompts_for(d)[1])):
            prompts.append(p)
            labels.append(d)
            seeds.append(10 * d + j)
    imgs = _generate(pipe, prompts, seeds, steps=30)
    pred = digits_classifier.predict(to_classifier_features(imgs).numpy())
    acc = float((torch.tensor(pred) == torch.tensor(labels)).float().mean())
    assert acc >= 0.8, f"classifier agreement {acc:.2f}"
