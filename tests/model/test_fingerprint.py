"""The base fingerprint: the same for a moved copy, different for other weights or another layout."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qllava.errors import QllavaError
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


def test_bases_stored_as_pytorch_bin_are_told_apart(tiny_base, tmp_path):
    """A `.bin` base has no header to list its tensors: its files' sizes and sampled bytes count instead."""
    tensors = load_file(tiny_base / "model.safetensors")
    fingerprints = []
    for name, scale in (("a", 1.0), ("b", 1.0), ("c", 2.0)):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(tiny_base / "config.json", folder)
        torch.save({k: v * scale for k, v in tensors.items()}, folder / "pytorch_model.bin")
        fingerprints.append(identify(folder))
    same, also_same, doubled = fingerprints
    assert (same.layout, same.weights) == (also_same.layout, also_same.weights)
    assert doubled.weights != same.weights
    assert same.layout != identify(tiny_base).layout  # its weights live elsewhere than the safetensors base's


def test_a_weights_file_that_is_not_safetensors_is_one_message(tiny_base, tmp_path):
    """A git-lfs pointer where the weights should be (a clone without git lfs) once made identify() allocate."""
    pointer = shutil.copytree(tiny_base, tmp_path / "pointer")
    (pointer / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
    with pytest.raises(QllavaError, match="is not a readable safetensors file.*git lfs pull"):
        identify(pointer)


def test_pickled_weights_beside_safetensors_do_not_count(tiny_base, tmp_path):
    """Some repositories ship both formats; transformers then loads the safetensors, and so must a moved copy
    that kept only those be the same base."""
    both = shutil.copytree(tiny_base, tmp_path / "both")
    torch.save(load_file(tiny_base / "model.safetensors"), both / "pytorch_model.bin")
    assert (identify(both).layout, identify(both).weights) == (identify(tiny_base).layout, identify(tiny_base).weights)
