"""torchao int8 weight-only quantization (an optional extra: skipped without torchao): FLUX's module
adapter on a quantized tiny FLUX (its AdaLN gate Linears hold torchao tensor subclasses, whose gate
rows cannot be viewed: the cached step computes the whole modulation through the quantized Linear)."""
from __future__ import annotations

import warnings

import pytest
import torch

torchao = pytest.importorskip("torchao")

import model_zoo as Z  # noqa: E402
import svdcache  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _quantized_flux():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = Z.build("flux")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, Int8WeightOnlyConfig())
    w = model.single_transformer_blocks[0].norm.linear.weight
    if type(w) in (torch.Tensor, torch.nn.Parameter):
        pytest.skip("this torchao leaves the Linears unquantized")
    return model


def test_flux_module_level_on_torchao_int8():
    model = _quantized_flux()
    ref, _ = Z.denoise("flux", model, steps=10, batch=2)
    svdcache.enable(model, interval=1)
    one, _ = Z.denoise("flux", model, steps=10, batch=2)
    assert torch.equal(one, ref)
    svdcache.enable(model, interval=3, warmup=2)
    x, _ = Z.denoise("flux", model, steps=10, batch=2)
    st = svdcache.stats(model).last_generation
    assert svdcache.adapters.last_plan(model).granularity == "module"
    assert st.cached_steps == 6 and st.fallbacks == 0
    x_T, _ = Z.make_inputs("flux", batch=2)
    assert float((x - ref).norm() / (ref - x_T).norm()) < 0.12  # test_models.py's flux bound
    svdcache.disable(model)
    assert torch.equal(Z.denoise("flux", model, steps=10, batch=2)[0], ref)
