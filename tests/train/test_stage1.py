"""Stage 1 (projector alignment): only the projector trains, its file starts stage 2."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

from qllava.errors import QllavaError
from qllava.export import read_checkpoint
from qllava.generate import load_for_inference
from qllava.model.load import load_for_training
from qllava.model.projector import PROJECTOR_FILE, load_projector, projector_of, save_projector
from qllava.model.tiny import build_tiny_llava
from qllava.train.loop import train
from tests.conftest import COLORS, CORPUS, make_recipe, write_image


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    """Caption pairs as LLaVA's stage-1 data has them: `<image>` alone, then the caption."""
    root = tmp_path_factory.mktemp("captions")
    (root / "images").mkdir()
    records = []
    for i in range(12):
        name, rgb = list(COLORS.items())[i % 3]
        write_image(root / "images" / f"{i}.png", rgb, size=(32, 32))
        convs = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"a {name} circle"}]
        records.append({"id": f"c{i}", "image": f"{i}.png", "conversations": convs})
    (root / "train.json").write_text(json.dumps(records))
    return root


def stage1(base, data, out, **train):
    return make_recipe(
        base,
        data,
        out,
        lora={"enabled": False},
        data={"template": "plain"},
        optim={"projector_lr": 1e-2},
        train={"max_steps": 4, "micro_batch_size": 4, "grad_accum": 1, **train},
    )


def base_projector(base):
    model = LlavaForConditionalGeneration.from_pretrained(base)
    return {k: v.clone() for k, v in model.model.multi_modal_projector.state_dict().items()}


def test_stage1_trains_only_the_projector_and_resumes(tiny_base, captions, tmp_path):
    model, _ = load_for_training(stage1(tiny_base, captions, tmp_path / "probe"), torch.device("cpu"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("multi_modal_projector" in n for n in trainable)
    assert len(trainable) == len(list(projector_of(model).parameters()))
    assert not any("lora" in n for n, _ in model.named_parameters())

    run = tmp_path / "run"
    final = train(stage1(tiny_base, captions, run, save_every=2), progress=False)
    files = {p.name for p in final.iterdir()}
    assert PROJECTOR_FILE in files and "adapter_model.safetensors" not in files
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    trained = load_file(final / PROJECTOR_FILE)
    before = base_projector(tiny_base)
    assert set(trained) == {f"multi_modal_projector.{k}" for k in before}
    assert any(not torch.equal(trained[f"multi_modal_projector.{k}"], v) for k, v in before.items())

    resumed = tmp_path / "resumed"
    train(stage1(tiny_base, captions, resumed, resume=str(run / "checkpoint-2")), progress=False)
    again = load_file(resumed / "final" / PROJECTOR_FILE)
    for key in trained:
        torch.testing.assert_close(again[key], trained[key], rtol=0, atol=1e-6)

    # Stage 2 starts from the stage-1 projector: peft's trained copy holds it.
    stage2 = make_recipe(tiny_base, captions, tmp_path / "s2", model={"projector_from": str(final)})
    model, _ = load_for_training(stage2, torch.device("cpu"))
    for key, value in projector_of(model).state_dict().items():
        assert torch.equal(value, trained[f"multi_modal_projector.{key}"])

    # Inference with a stage-1 checkpoint loads its projector; merge has nothing to merge.
    model, _ = load_for_inference(tiny_base, final)
    assert torch.equal(projector_of(model).linear_2.weight, trained["multi_modal_projector.linear_2.weight"])
    with pytest.raises(QllavaError, match="stage-1 run .* nothing to merge"):
        read_checkpoint(final)


def test_llava_mm_projector_bin_loads(tiny_base, tmp_path):
    before = base_projector(tiny_base)
    fake = {k: torch.randn_like(v) for k, v in before.items()}
    names = {"linear_1": "0", "linear_2": "2"}
    llava = {f"model.mm_projector.{names[k.split('.')[0]]}.{k.split('.')[1]}": v for k, v in fake.items()}
    torch.save(llava, tmp_path / "mm_projector.bin")
    model = LlavaForConditionalGeneration.from_pretrained(tiny_base)
    load_projector(model, tmp_path)
    for key, value in model.model.multi_modal_projector.state_dict().items():
        assert torch.equal(value, fake[key])


def test_projector_of_another_llm_is_refused(tiny_base, tmp_path):
    other = build_tiny_llava(tmp_path / "other", CORPUS, text_hidden=64)
    save_projector(LlavaForConditionalGeneration.from_pretrained(other), tmp_path)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_base)
    with pytest.raises(QllavaError, match=r"needs \(128, 64\) \(vision hidden 64 -> LLM hidden 128\).*another"):
        load_projector(model, tmp_path / PROJECTOR_FILE)
    with pytest.raises(QllavaError, match="does not exist"):
        load_projector(model, tmp_path / "missing.safetensors")


def test_stage1_needs_a_projector_learning_rate(tiny_base, captions, tmp_path):
    with pytest.raises(QllavaError, match="nothing would train"):
        make_recipe(tiny_base, captions, tmp_path, lora={"enabled": False}, optim={"projector_lr": 0})


def test_stage1_refuses_text_only_samples(tiny_base, tiny_data, tmp_path):
    # tiny_data has text-only samples; with no LoRA a text-only batch would train nothing.
    with pytest.raises(QllavaError, match="text-only sample.*lora.enabled=false trains only the projector"):
        train(stage1(tiny_base, tiny_data, tmp_path / "run"), progress=False)
