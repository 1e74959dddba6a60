"""Packed (padding-free) micro-batches train exactly like padded ones; padding_fraction counts padding."""

import pytest
import torch

from qllava.data.dataset import IGNORE_INDEX, collate
from qllava.data.packing import collate_packed, padding_fraction
from qllava.train.loop import _forward_loss
from tests.conftest import lora_model_with_random_b, make_recipe

ORDER = (0, 3, 1, 7)  # image, text-only, image (two turns), text-only: three lengths


@pytest.fixture()
def packed_setup(tiny_base, tiny_data, tmp_path):
    """The tiny base, 4-bit + LoRA on sdpa (LoRA B randomized so every LoRA weight gets a gradient), and its items."""
    recipe = make_recipe(tiny_base, tiny_data, tmp_path / "run", model={"attention": "sdpa"})
    model, processor, dataset = lora_model_with_random_b(recipe)
    items = [dataset[i] for i in ORDER]
    assert len({len(it["input_ids"]) for it in items}) == 3
    return model, items, processor.tokenizer.pad_token_id


def _loss_and_grads(model, batches):
    model.zero_grad(set_to_none=True)
    loss = sum(_forward_loss(model, b, torch.device("cpu"), torch.float32, 1024) for b in batches)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_collate_packed_one_row_positions_restart_images_in_order(packed_setup):
    _, items, pad_id = packed_setup
    batch = collate_packed(items, pad_id)
    lengths = [len(it["input_ids"]) for it in items]
    assert batch["input_ids"].shape == (1, sum(lengths)) and batch["labels"].shape == (1, sum(lengths))
    starts = [sum(lengths[:k]) for k in range(len(items))]
    assert batch["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    # No sample's first token is predicted from the sample before it.
    assert all(batch["labels"][0, s] == IGNORE_INDEX for s in starts)
    torch.testing.assert_close(batch["pixel_values"], torch.stack([items[0]["pixel_values"], items[2]["pixel_values"]]))


def test_packed_loss_and_gradients_equal_padded_and_alone(packed_setup):
    model, items, pad_id = packed_setup
    packed_loss, packed_grads = _loss_and_grads(model, [collate_packed(items, pad_id)])
    padded_loss, padded_grads = _loss_and_grads(model, [collate(items, pad_id)])
    alone_loss, alone_grads = _loss_and_grads(model, [collate([it], pad_id) for it in items])
    assert any("multi_modal_projector" in n for n in packed_grads) and any("lora_A" in n for n in packed_grads)
    # Measured (fp32 on CPU): packed vs padded loss 0.0 and vs alone 1.0e-7 relative; every gradient
    # within 7.5e-7 relative (difference norm / norm).
    for loss, grads in ((padded_loss, padded_grads), (alone_loss, alone_grads)):
        torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=0)
        for name, grad in grads.items():
            err = (packed_grads[name] - grad).norm() / grad.norm()
            assert err < 1e-5, (name, err.item())


@torch.no_grad()
def test_packed_logits_equal_each_sample_alone_and_need_the_position_reset(packed_setup):
    model, items, pad_id = packed_setup
    model.eval()
    batch = collate_packed(items, pad_id)

    def logits(position_ids):
        return model(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"],
            position_ids=position_ids,
            attention_mask=None,
            use_cache=False,
        ).logits[0]

    packed = logits(batch["position_ids"])
    plain = logits(torch.arange(batch["input_ids"].shape[1])[None])  # one long sequence: samples see each other
    start = 0
    for k, it in enumerate(items):
        n = len(it["input_ids"])
        alone = model(
            input_ids=torch.tensor([it["input_ids"]]),
            pixel_values=None if it["pixel_values"] is None else it["pixel_values"][None],
            use_cache=False,
        ).logits[0]
        # Measured: at most 4.8e-7 apart; with plain arange position_ids 0.84 to 0.92 apart.
        torch.testing.assert_close(packed[start : start + n], alone, rtol=1e-5, atol=1e-5)
        if k > 0:  # the test has teeth: without the reset, every later sample's logits change
            assert (plain[start : start + n] - alone).abs().max() > 1e-3
        start += n


def test_padding_fraction():
    lengths = [10, 4, 6, 6, 3]
    assert padding_fraction(lengths, [0, 1, 2, 3], 2) == pytest.approx(1 - 26 / 32)
    assert padding_fraction(lengths, [0, 1, 2, 3], 2, packed=True) == 0.0
    assert padding_fraction(lengths, [2, 3, 0, 1, 4], 2) == pytest.approx(1 - 26 / 32)  # the short tail is dropped
