"""FastDropout: LoRA's dropout with its CPU mask drawn from 16-bit slices of 64-bit random integers."""

from __future__ import annotations

import math

import pytest
import torch

from qwen_cls.train import FastDropout, recipe_lora_config, use_fast_dropout


def test_keeps_with_probability_one_minus_p_rounded_to_a_multiple_of_2_to_the_minus_16():
    n = 2_000_000
    dropout = FastDropout(0.1).train()
    torch.manual_seed(0)
    out = dropout(torch.ones(n))
    kept = int((out != 0).sum())
    p_keep = 1 - 6554 / 65536  # round(0.1 * 65536) = 6554 of the 65536 16-bit values are dropped
    sigma = math.sqrt(n * p_keep * (1 - p_keep))
    assert abs(kept - n * p_keep) < 5 * sigma  # about 424 rows of slack on 1.8 million
    # every kept element is scaled by 1 / (1 - p), as nn.Dropout scales it; the others are exactly 0
    assert set(out.unique().tolist()) == {0.0, torch.tensor(1 / 0.9).item()}


def test_each_element_is_dropped_where_its_16_bit_number_is_below_the_threshold():
    x = torch.arange(1.0, 10.0).reshape(3, 3)
    torch.manual_seed(7)
    out = FastDropout(0.5).train()(x)
    torch.manual_seed(7)
    words = torch.randint(-2**63, 2**63 - 1, (3,), dtype=torch.int64)  # ceil(9 / 4) words, 4 numbers each
    keep = words.view(torch.int16)[:9].reshape(3, 3) >= 0  # round(0.5 * 65536) - 32768 = 0
    assert torch.equal(out, torch.where(keep, x * 2, torch.zeros_like(x)))


def test_seeded_like_torch_and_keeps_the_dtype_and_shape():
    x = torch.randn(4, 5, 6, dtype=torch.bfloat16)
    dropout = FastDropout(0.3).train()
    torch.manual_seed(1)
    a = dropout(x)
    torch.manual_seed(1)
    b = dropout(x)
    torch.manual_seed(2)
    c = dropout(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.bfloat16 and a.shape == x.shape


def test_identity_in_eval_mode_and_at_p_0_all_zero_at_p_1():
    x = torch.randn(3, 7)
    assert torch.equal(FastDropout(0.1).eval()(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)
    assert torch.equal(FastDropout(1.0).train()(x), torch.zeros_like(x))


def test_every_lora_dropout_is_replaced_with_its_own_p(tiny_dir):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    model = get_peft_model(model, recipe_lora_config(model))
    before = [m.p for m in model.modules() if type(m) is torch.nn.Dropout]
    assert before and set(before) == {0.1}
    use_fast_dropout(model)
    layers = [m for m in model.modules() if hasattr(m, "lora_dropout")]
    assert len(layers) == 7 * model.config.num_hidden_layers
    assert all(type(m.lora_dropout["default"]) is FastDropout and m.lora_dropout["default"].p == 0.1 for m in layers)
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())


@pytest.mark.parametrize("p", [0.1, 0.25])
def test_a_training_step_matches_nn_dropout_in_expectation_of_the_scale(p):
    """The same expected output as nn.Dropout: E[out] = x (mean over many draws)."""
    x = torch.full((400_000,), 2.0)
    torch.manual_seed(3)
    out = FastDropout(p).train()(x)
    assert out.mean().item() == pytest.approx(2.0, abs=0.01)
