"""The base fingerprint: the same for a moved copy, different for other weights or another layout."""

import shutil

import torch
from safetensors.torch import load_file, save_file

from qllava.model.fingerprint import identify
from qllava.model.tiny import build_tiny_llava
from tests.conftest import CORPUS


def test_fingerprint_follows_the_weights_not_the_path(tiny_base, tmp_path):
    original = identify(tiny_base)
    moved = identify(shutil.copytree(tiny_base, tmp_path / "moved"))
    assert (moved.layout, moved.weights) == (original.layout, original.weights)
    assert moved.path != original.path == str(tiny_base.resolve())
    assert original.model_type == "llava" and original.architectures == ["LlavaForConditionalGeneration"]
    tensors = load_file(tiny_base / "model.safetensors")
    assert original.parameters == sum(t.numel() for t in tensors.values())

    other_seed = identify(build_tiny_llava(tmp_path / "seed1", CORPUS, seed=1))
    assert other_seed.layout == original.layout and other_seed.weights != original.weights
    wider = identify(build_tiny_llava(tmp_path / "wide", CORPUS, seed=0, text_hidden=96))
    assert wider.layout != original.layout


def test_a_merge_into_one_matrix_changes_the_fingerprint(tiny_base, tmp_path):
    """What a merged export is: the base's names, shapes and dtypes, with a dense delta added to some matrices."""
    merged = shutil.copytree(tiny_base, tmp_path / "merged")
    tensors = load_file(merged / "model.safetensors")
    name = next(n for n in sorted(tensors) if n.endswith("q_proj.weight"))
    out_features, in_features = tensors[name].shape
    torch.manual_seed(0)  # a rank-4 LoRA delta, B @ A, dense like every merged one
    tensors[name] = tensors[name] + 1e-3 * torch.randn(out_features, 4) @ torch.randn(4, in_features)
    save_file(tensors, merged / "model.safetensors", metadata={"format": "pt"})
    original, changed = identify(tiny_base), identify(merged)
    assert changed.layout == original.layout and changed.weights != original.weights
