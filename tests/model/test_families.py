"""The family layer: one lookup, and for each architecture the policy (what is 4-bit, what trains, what the
adapter holds) on tiny models built from transformers' own config classes, with real bitsandbytes and peft."""

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig

from qllava.errors import QllavaError
from qllava.model.families import FAMILIES, family_of
from qllava.model.load import check_base, load_base, load_for_training
from qllava.model.tiny import build_tiny_llm
from qllava.train.checkpoint import ADAPTER_FILE, save_checkpoint
from tests.conftest import CORPUS, kinds, make_recipe, tiny_of


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    llm = build_tiny_llm(tmp_path / "llama", "llama")
    with pytest.raises(
        QllavaError,
        match="`llama` models are not supported.*llava, llava_next, llava_onevision, qwen2_5_vl, gemma3, internvl",
    ):
        check_base(llm)
    with pytest.raises(QllavaError, match="supported architectures"):
        family_of({"model_type": "idefics3"})


def test_every_family_names_a_transformers_class_of_its_model_type():
    for model_type, family in FAMILIES.items():
        assert family.model_class().config_class.model_type == model_type


def test_part_of_sees_through_wrappers():
    next_ = FAMILIES["llava_next"]
    assert next_.part_of("base_model.model.model.image_newline") == "extra"
    assert next_.part_of("model.multi_modal_projector.modules_to_save.default.linear_1.weight") == "projector"
    assert next_.part_of("_fsdp_wrapped_module.model.vision_tower.vision_model.encoder") == "vision"
    assert next_.part_of("base_model.model.model.language_model.layers.0.mlp.up_proj.lora_A.default.weight") == "llm"
    assert next_.part_of("base_model.model.lm_head.weight") is None
    assert FAMILIES["llava"].part_of("model.image_newline") is None  # LLaVA-1.5 has no extra trainables


@pytest.mark.parametrize("kind", ["llava_next", "llava_onevision"])
def test_anyres_family_quantizes_only_the_llm(kind, tmp_path):
    """The loading policy alone (no processor: this runs for OneVision without torchvision too)."""
    from qllava.model import tiny

    build = {"llava_next": tiny.build_tiny_llava_next, "llava_onevision": tiny.build_tiny_llava_onevision}[kind]
    base = build(tmp_path / "model", CORPUS, **({"processor": False} if kind == "llava_onevision" else {}))
    family = family_of(AutoConfig.from_pretrained(base))
    assert family.model_type == kind
    plain = load_base(base, bits=16, device=torch.device("cpu"))
    llm_linears = {
        n for n, m in plain.named_modules() if n.startswith(family.llm_prefix) and isinstance(m, torch.nn.Linear)
    }
    model = load_base(base, bits=4, device=torch.device("cpu"))
    assert type(model).__name__ == family.class_name
    quantized = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized == llm_linears and llm_linears
    for name, param in model.named_parameters():
        if family.part_of(name) in ("vision", "projector", "extra") or name.startswith("lm_head"):
            assert not isinstance(param, bnb.nn.Params4bit) and param.dtype == torch.float32, name
    assert model.model.image_newline.shape == (model.config.text_config.hidden_size,)


def _policy(base, tmp_path):
    """(quantized names, names of the LLM's linear layers in the unquantized model, the peft model)."""
    family = family_of(AutoConfig.from_pretrained(base))
    plain = load_base(base, bits=16, device=torch.device("cpu"))
    llm_linears = {
        n for n, m in plain.named_modules() if n.startswith(family.llm_prefix) and isinstance(m, torch.nn.Linear)
    }
    del plain
    template = "chatml" if family.model_type == "llava_onevision" else "vicuna_v1"
    recipe = make_recipe(base, tmp_path, tmp_path / "out", data={"template": template})
    model, processor = load_for_training(recipe, torch.device("cpu"))
    strip = "base_model.model."
    quantized = {
        n.removeprefix(strip).removesuffix(".base_layer")
        for n, m in model.named_modules()
        if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    }
    return family, llm_linears, quantized, model, processor, recipe


@pytest.mark.parametrize("kind", kinds("llava_next", "llava_onevision"))
def test_anyres_family_policy(kind, request, tmp_path):
    base = tiny_of(kind, request)
    family, llm_linears, quantized, model, processor, recipe = _policy(base, tmp_path)
    assert family.model_type == kind

    # 4-bit: exactly the LLM's linear layers; the vision tower, projector and lm_head keep their float weights.
    assert quantized == llm_linears and llm_linears
    for name, param in model.named_parameters():
        if family.part_of(name) in ("vision", "projector", "extra") or "lm_head" in name:
            assert not isinstance(param, bnb.nn.Params4bit) and param.dtype == torch.float32, name

    # LoRA only on the LLM's linear layers, all of them.
    wrapped = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if getattr(m, "lora_A", None)}
    assert wrapped == llm_linears

    # Trainable: LoRA, the projector's trained copy and image_newline; the vision tower frozen.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.model.image_newline" in trainable
    for name in trainable:
        part = family.part_of(name)
        assert "lora_" in name or part == "extra" or (part == "projector" and "modules_to_save" in name), name
    assert not any(p.requires_grad for n, p in model.named_parameters() if family.part_of(n) == "vision")
    assert any(family.part_of(n) == "vision" for n, _ in model.named_parameters())

    # The adapter file holds LoRA, the projector and image_newline, and nothing of the vision tower.
    from qllava.train.checkpoint import TrainState

    with torch.no_grad():
        model.base_model.model.model.image_newline.add_(1.0)  # a trained value, to see it saved
    saved = save_checkpoint(
        tmp_path / "ckpt", model=model, processor=processor, recipe=recipe, state=TrainState(world_size=1)
    )
    keys = set(load_file(saved / ADAPTER_FILE))
    assert "base_model.model.model.image_newline" in keys
    assert any("multi_modal_projector.linear_1.weight" in k for k in keys)
    assert not any(family.part_of(k) == "vision" for k in keys)
    assert {k for k in keys if "lora_" in k} and all(
        "lora_" in k or family.part_of(k) in ("projector", "extra") for k in keys
    )

    # Restored where qllava loads an adapter: a fresh base gets the trained image_newline.
    from qllava.generate import attach_adapter

    fresh = attach_adapter(load_base(base, bits=4, device=torch.device("cpu")), saved)
    assert isinstance(fresh, PeftModel)
    torch.testing.assert_close(
        fresh.base_model.model.model.image_newline.float(), model.base_model.model.model.image_newline.float()
    )


# Relatives of LLaVA: the builder fixture and the template of each; Qwen2.5-VL's processor needs torchvision.
RELATIVES = {
    "gemma3": ("tiny_gemma3", "gemma"),
    "qwen2_5_vl": ("tiny_qwen2_5_vl", "chatml"),
    "internvl": ("tiny_internvl", "chatml"),
}


@pytest.mark.parametrize("kind", kinds(*RELATIVES))
def test_relative_family_policy(kind, request, tmp_path):
    """4-bit only on the LLM's linear layers, LoRA only there, the projector trained and saved in the adapter, the
    vision tower frozen, unquantized and absent from the adapter."""
    fixture, template = RELATIVES[kind]
    base = request.getfixturevalue(fixture)
    family = family_of(AutoConfig.from_pretrained(base))
    assert family.model_type == kind
    plain = load_base(base, bits=16, device=torch.device("cpu"))
    llm_linears = {
        n for n, m in plain.named_modules() if n.startswith(family.llm_prefix) and isinstance(m, torch.nn.Linear)
    }
    vision_params = {n for n, _ in plain.named_parameters() if family.part_of(n) == "vision"}
    projector_params = {n for n, _ in plain.named_parameters() if family.part_of(n) == "projector"}
    del plain
    recipe = make_recipe(base, tmp_path, tmp_path / "out", data={"template": template})
    model, processor = load_for_training(recipe, torch.device("cpu"))
    assert type(model.base_model.model).__name__ == family.class_name

    quantized = {
        n.removeprefix("base_model.model.").removesuffix(".base_layer")
        for n, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }
    assert quantized == llm_linears and llm_linears
    for name, param in model.named_parameters():
        if family.part_of(name) in ("vision", "projector") or "lm_head" in name:
            assert not isinstance(param, bnb.nn.Params4bit) and param.dtype == torch.float32, name

    wrapped = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if getattr(m, "lora_A", None)}
    assert wrapped == llm_linears

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name in trainable:
        assert "lora_" in name or (family.part_of(name) == "projector" and "modules_to_save" in name), name
    trained_projector = {
        n.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
        for n in trainable
        if family.part_of(n) == "projector"
    }
    assert trained_projector == projector_params and projector_params
    frozen_vision = {
        n.removeprefix("base_model.model.") for n, p in model.named_parameters() if family.part_of(n) == "vision"
    }
    assert frozen_vision == vision_params and vision_params
    assert not any(p.requires_grad for n, p in model.named_parameters() if family.part_of(n) == "vision")

    from qllava.train.checkpoint import TrainState

    saved = save_checkpoint(
        tmp_path / "ckpt", model=model, processor=processor, recipe=recipe, state=TrainState(world_size=1)
    )
    keys = set(load_file(saved / ADAPTER_FILE))
    projector_keys = {k.removeprefix("base_model.model.") for k in keys if family.part_of(k) == "projector"}
    assert projector_keys == projector_params
    assert not any(family.part_of(k) == "vision" for k in keys)
    lora = {k for k in keys if "lora_" in k}
    assert lora and keys == lora | {k for k in keys if family.part_of(k) == "projector"}


def test_qwen2_5_vl_loading_policy_without_its_processor(tmp_path):
    """The default tier's check of Qwen2.5-VL (its processor needs torchvision): 4-bit only on the LLM's linear
    layers; the ViT and its patch merger (the projector, inside the vision module) keep their float weights."""
    from qllava.model.tiny import build_tiny_qwen2_5_vl

    base = build_tiny_qwen2_5_vl(tmp_path / "model", CORPUS, processor=False)
    family = family_of(AutoConfig.from_pretrained(base))
    assert (family.vision, family.projector) == ("model.visual", "model.visual.merger")
    plain = load_base(base, bits=16, device=torch.device("cpu"))
    llm_linears = {
        n for n, m in plain.named_modules() if n.startswith(family.llm_prefix) and isinstance(m, torch.nn.Linear)
    }
    model = load_base(base, bits=4, device=torch.device("cpu"))
    quantized = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized == llm_linears and llm_linears
    parts = {family.part_of(n) for n, _ in model.named_parameters()}
    assert {"vision", "projector", "llm"} <= parts
    for name, param in model.named_parameters():
        if family.part_of(name) in ("vision", "projector") or name.startswith("lm_head"):
            assert not isinstance(param, bnb.nn.Params4bit) and param.dtype == torch.float32, name
    assert family.part_of("base_model.model.model.visual.merger.modules_to_save.default.mlp.0.weight") == "projector"
    assert family.part_of("model.visual.blocks.0.attn.qkv.weight") == "vision"
