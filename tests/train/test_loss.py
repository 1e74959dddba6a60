"""The logged loss of an optimizer step is the token-weighted loss over the whole accumulated batch."""

import json

import torch
from accelerate import Accelerator

from qllava.data.dataset import dataset_from_recipe
from qllava.data.sampler import GroupedSampler
from qllava.model.load import load_base, load_processor
from qllava.recipe import load_recipe
from qllava.train.loop import make_accelerator, train
from qllava.train.loss import loss_sum, trained_tokens
from tests.conftest import make_recipe


def test_step_loss_equals_hand_computation(tiny_base, tiny_data, tmp_path):
    recipe = make_recipe(tiny_base, tiny_data, tmp_path / "run", train={"max_steps": 1})
    train(recipe, progress=False)
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["loss"]

    # By hand: LoRA B starts at zero, so step 1 sees the 4-bit base. Take the samples of the first
    # accumulation window in sampler order, one by one without padding, and weight every token equally.
    base = load_base(tiny_base, bits=4, device=torch.device("cpu"))
    base.eval()
    dataset = dataset_from_recipe(recipe, recipe.data.train, load_processor(tiny_base), base.config)
    order = list(GroupedSampler(dataset.modality_lengths(), 2, seed=0))[:4]
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
