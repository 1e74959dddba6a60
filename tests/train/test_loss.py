"""The logged loss of an optimizer step is the token-weighted loss over the whole accumulated batch."""

import json

import torch
from accelerate import Accelerator

from qllava.data.dataset import collate
from qllava.data.sampler import GroupedSampler
from qllava.data.validate import dataset_from_recipe
from qllava.model.load import load_base, load_processor
from qllava.recipe import load_recipe
from qllava.train.loop import make_accelerator, train
from qllava.train.loss import forward_loss_sum, loss_sum, trained_tokens
from tests.conftest import lora_model_with_random_b, make_recipe


def test_step_loss_equals_hand_computation(tiny_base, tiny_data, tmp_path):
    recipe = make_recipe(tiny_base, tiny_data, tmp_path / "run", train={"max_steps": 1})
    train(recipe, progress=False)
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["loss"]

    # By hand: LoRA B starts at zero, so step 1 sees the 4-bit base. Take the samples of the first
    # accumulation window in sampler order, one by one without padding, and weight every token equally.
    base = load_base(tiny_base, bits=4, device=torch.device("cpu"))
    base.eval()
    dataset = dataset_from_recipe(recipe, recipe.data.train, load_processor(tiny_base), base.config)
    order = list(GroupedSampler(dataset.modality_lengths(), 2, seed=0, length_bucket=recipe.train.grad_accum))[:4]
    sums, counts = [], []
    with torch.no_grad():
        for i in order:
            item = dataset[i]
            ids, labels = torch.tensor([item["input_ids"]]), torch.tensor([item["labels"]])
            pv = None if item["pixel_values"] is None else item["pixel_values"][None]
            logits = base(input_ids=ids, pixel_values=pv, use_cache=False).logits
            per_token = torch.nn.functional.cross_entropy(
                logits[0, :-1], labels[0, 1:], reduction="none", ignore_index=-100
            )
            sums.append(per_token.sum().item())
            counts.append(int((labels[0, 1:] != -100).sum()))
    by_hand = sum(sums) / sum(counts)
    assert abs(logged - by_hand) < 1e-4, (logged, by_hand)
    micro_means = [(sums[i] + sums[i + 1]) / (counts[i] + counts[i + 1]) for i in (0, 2)]
    mean_of_micro_means = sum(micro_means) / 2
    assert abs(mean_of_micro_means - by_hand) > 1e-3, "fixture too uniform to tell the two apart"


def test_loss_helpers_ignore_masked_tokens():
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, 3, 4, -100, -100], [-100, -100, -100, -100, 7]])
    expected = sum(
        torch.nn.functional.cross_entropy(logits[b, t - 1][None], labels[b, t][None])
        for b, t in [(0, 1), (0, 2), (1, 4)]
    )
    assert int(trained_tokens(labels)) == 3
    torch.testing.assert_close(loss_sum(logits, labels), expected)


def test_an_accelerate_accumulation_setting_does_not_rescale_gradients(tmp_path, monkeypatch):
    # An `accelerate config` with gradient_accumulation_steps would make backward() divide losses that
    # the loop already scaled. (Adam hides a constant gradient scale, so check the setting itself.)
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    recipe = load_recipe("demo")
    assert Accelerator().gradient_accumulation_steps == 4
    assert make_accelerator(recipe, tmp_path).gradient_accumulation_steps == 1


def _lora_model_and_batch(tiny_base, tiny_data, tmp_path, **data):
    """The tiny base, 4-bit + LoRA (B randomized so every LoRA weight gets a gradient), and a padded
    micro-batch of image and text-only samples of different lengths."""
    recipe = make_recipe(tiny_base, tiny_data, tmp_path / "run", data=data)
    model, processor, dataset = lora_model_with_random_b(recipe)
    items = [dataset[i] for i in (0, 3, 1, 7)]  # image, text-only, image (two turns), text-only
    assert len({len(it["input_ids"]) for it in items}) > 2
    return model, collate(items, pad_token_id=processor.tokenizer.pad_token_id), dataset


def _loss_and_grads(model, batch, chunk_size):
    model.zero_grad(set_to_none=True)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    loss = forward_loss_sum(model, batch["labels"], chunk_size, use_cache=False, **inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_chunked_loss_equals_full_logits_loss(tiny_base, tiny_data, tmp_path):
    model, batch, _ = _lora_model_and_batch(tiny_base, tiny_data, tmp_path)
    trained = int(trained_tokens(batch["labels"]))
    assert (batch["attention_mask"] == 0).any() and batch["pixel_values"].shape[0] == 2
    full_loss, full_grads = _loss_and_grads(model, batch, 0)
    assert any(k for k in full_grads if "multi_modal_projector" in k) and all(
        g.abs().sum() > 0 for g in full_grads.values()
    )
    # Measured (fp32 on CPU, tiny base, 4-bit + LoRA, 12 trained tokens): loss 1.0e-7 relative, every
    # gradient within 4.5e-7 relative (norm of the difference / norm).
    for chunk in (1, 3, trained - 1, trained, 4 * trained):
        loss, grads = _loss_and_grads(model, batch, chunk)
        torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=0)
        assert grads.keys() == full_grads.keys()
        for name, grad in grads.items():
            err = (grad - full_grads[name]).norm() / full_grads[name].norm()
            assert err < 2e-6, (chunk, name, err.item())
    # The chunked path swaps lm_head out only during the forward.
    assert isinstance(model.base_model.model.lm_head, torch.nn.Linear)
