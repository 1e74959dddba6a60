"""What is 4-bit, what trains, where LoRA sits, where gradients go (real bitsandbytes and peft)."""

import bitsandbytes as bnb
import pytest
import torch

from qllava.model.load import LLM_PREFIX, describe, load_for_training
from tests.conftest import make_recipe

LLM_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def trained_setup(tiny_base, tmp_path_factory):
    recipe = make_recipe(tiny_base, tmp_path_factory.mktemp("d"), tmp_path_factory.mktemp("o"))
    model, processor = load_for_training(recipe, torch.device("cpu"))
    return model, processor


def _strip(name: str) -> str:
    return name.removeprefix("base_model.model.")


def test_only_llm_linears_are_4bit(trained_setup):
    model, _ = trained_setup
    four_bit = {_strip(n) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert four_bit, "no Linear4bit at all"
    assert all(n.startswith(LLM_PREFIX) for n in four_bit), sorted(four_bit)[:3]
    llm_linears = {n.removesuffix(".base_layer") for n in four_bit}
    expected = {
        _strip(n)
        for n, m in model.named_modules()
        if _strip(n).startswith(LLM_PREFIX) and n.rsplit(".", 1)[-1] in LLM_LINEARS
    }
    assert expected <= llm_linears | {n + ".base_layer" for n in llm_linears} | llm_linears
    for name, module in model.named_modules():
        if any(part in name for part in ("vision_tower", "multi_modal_projector", "lm_head")):
            assert not isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)), name


def test_trainable_set_is_lora_and_projector(trained_setup):
    model, _ = trained_setup
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name in trainable:
        assert "lora_" in name or ("multi_modal_projector" in name and "modules_to_save" in name), name
    assert any("multi_modal_projector" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_lora_on_every_llm_linear_and_nowhere_else(trained_setup):
    model, _ = trained_setup
    wrapped = {_strip(n) for n, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    leaves = {n.rsplit(".", 1)[-1] for n in wrapped}
    assert leaves == LLM_LINEARS
    assert all(n.startswith(LLM_PREFIX) for n in wrapped)
    layers = model.config.text_config.num_hidden_layers
    assert len(wrapped) == layers * len(LLM_LINEARS)


def test_gradients_reach_projector_and_lora_not_vision_tower(trained_setup):
    model, processor = trained_setup
    model.train()
    seen = {}
    vision = model.base_model.model.model.vision_tower

    def keep_output(module, inputs, output):
        seen["vision_out"] = output.last_hidden_state

    handle = vision.register_forward_hook(keep_output)
    config = model.config
    n_img = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    ids = [processor.tokenizer.bos_token_id] + [config.image_token_id] * n_img + [5, 6, 7, 8]
    input_ids = torch.tensor([ids])
    pixel_values = torch.randn(1, 3, config.vision_config.image_size, config.vision_config.image_size)
    out = model(input_ids=input_ids, pixel_values=pixel_values, labels=input_ids, use_cache=False)
    out.loss.backward()
    handle.remove()
    assert not seen["vision_out"].requires_grad, "the vision tower's output is part of the autograd graph"
    assert all(p.grad is None for p in vision.parameters())
    proj = [p for n, p in model.named_parameters() if "multi_modal_projector" in n and p.requires_grad]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    model.zero_grad()


def test_cpu_repack_guard_keeps_outputs_stable(trained_setup):
    """An eval forward without grad must not change what later forwards compute (NOTES trap)."""
    model, _ = trained_setup
    assert all(not m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    model.train()
    before = model(input_ids=ids, use_cache=False).logits.detach()
    model.eval()
    with torch.no_grad():
        evaluated = model(input_ids=ids, use_cache=False).logits
    model.train()
    after = model(input_ids=ids, use_cache=False).logits.detach()
    torch.testing.assert_close(evaluated, before, rtol=0, atol=1e-5)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_startup_table_names_each_group(trained_setup):
    table = describe(trained_setup[0])
    for row in ("vision tower", "projector (trained copy)", "LLM linear layers", "LoRA adapters", "lm_head"):
        assert row in table
    line = next(r for r in table.splitlines() if r.startswith("LLM linear layers"))
    assert "nf4" in line and "yes" in line


@pytest.mark.parametrize("bits, dtype, quantized", [(4, "nf4", "yes"), (8, "int8", "yes"), (16, "float32", "no")])
def test_other_precisions_load_and_train(tiny_base, tmp_path, bits, dtype, quantized):
    recipe = make_recipe(tiny_base, tmp_path, tmp_path / "o", model={"bits": bits})
    model, _ = load_for_training(recipe, torch.device("cpu"))
    line = next(r for r in describe(model).splitlines() if r.startswith("LLM linear layers")).split()
    assert line[3:5] == [dtype, quantized]
    # No input-embedding hook is left to make the frozen vision tower's forward record a graph
    # (transformers and, for 16-bit bases, peft each add a set; measured: 16-bit kept one).
    hooked = [n for n, m in model.named_modules() if m._forward_hooks]
    assert hooked == []
    ids = torch.tensor([[1, 5, 6, 7]])
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "vision_tower" in n)
