"""The resolution demo (`qllava demo --arch llava_next`): its images, and both of its runs end to end.

Its learning claim (LLaVA-NeXT learns which kind of shape a wide image holds, LLaVA-1.5 trained alike does not) is
measured in the README; here, what makes it true without training: the shape reaches NeXT's vision tower at the size
the demo base was pretrained on, and LLaVA-1.5's at a third of it in each direction.
"""

import json

import pytest
import torch
from PIL import Image

from qllava.data.images import images_inputs, open_rgb
from qllava.demo import materialize, materialize_wide, run_demo
from qllava.errors import QllavaError
from qllava.model.families import image_tokens
from qllava.model.load import load_processor

pytestmark = pytest.mark.recipe


def _shape_pixels(pixels: torch.Tensor, processor) -> int:
    """Colored pixels of a processed image (3, H, W): the shape's (the background and the padding are grey)."""
    mean = torch.tensor(processor.image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(3, 1, 1)
    rgb = pixels * std + mean
    return int((rgb.amax(0) - rgb.amin(0) > 0.25).sum())


def test_the_shape_reaches_next_at_the_pretraining_scale():
    root, wide = materialize(), materialize_wide()
    next_processor = load_processor(wide / "tiny-llava-next")
    llava_processor = load_processor(root / "tiny-llava")
    record = json.loads((wide / "wide-train.json").read_text())[0]
    path = wide / "wide-images" / record["image"]
    assert Image.open(path).size == (192, 64)

    tiles = images_inputs([open_rgb(path)], "pad", next_processor.image_processor, tiles=True)["pixel_values"]
    assert tiles.shape[0] == 4  # the whole image downscaled, then one tile per panel (1x3 grid)
    in_tiles = max(_shape_pixels(tile, next_processor) for tile in tiles[1:])
    square = images_inputs([open_rgb(path)], "pad", llava_processor.image_processor)["pixel_values"]
    # A demo image of the pretraining data with one shape of the same kind (its radius is drawn from the same range).
    kind = record["conversations"][1]["value"]
    pretrain = next(
        r
        for r in json.loads((root / "pretrain.json").read_text())
        if r.get("scene", {}).get("count") == "one" and r["scene"]["kind"] == kind
    )
    seen_in_pretraining = _shape_pixels(
        images_inputs([open_rgb(root / "images" / pretrain["image"])], "pad", llava_processor.image_processor)[
            "pixel_values"
        ],
        llava_processor,
    )
    assert 0.6 * seen_in_pretraining < in_tiles < 1.6 * seen_in_pretraining, (in_tiles, seen_in_pretraining)
    in_square = _shape_pixels(square, llava_processor)
    assert in_square < in_tiles / 4, (in_square, in_tiles)
    # 16 tokens for the downscaled image, 3 tiles of 16 in a 4 x 12 grid with a newline after each row.
    assert image_tokens(next_processor, [(64, 192)]) == [16 + 48 + 4]
    assert image_tokens(llava_processor, [(64, 192)]) == [16]


def test_the_resolution_demo_trains_and_scores_both_architectures(tmp_path):
    wide = materialize_wide()
    eval_file = tmp_path / "eval.json"
    eval_file.write_text(json.dumps(json.loads((wide / "wide-eval.json").read_text())[:8]))
    overrides = ["train.max_steps=2", f"data.eval={eval_file}"]
    metrics = run_demo(tmp_path / "run", overrides, arch="llava_next")
    assert set(metrics) == {"llava_next", "llava", "wall_time_s"}
    for arch in ("llava_next", "llava"):
        assert 0.0 <= metrics[arch]["accuracy_after"] <= 1.0
        assert (tmp_path / "run" / arch / "final" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics
    (tmp_path / "default" / "final").mkdir(parents=True)  # a default demo's run is never removed
    with pytest.raises(QllavaError, match="holds a run of the default demo"):
        run_demo(tmp_path / "default", overrides, arch="llava_next")
    assert (tmp_path / "default" / "final").is_dir()
    with pytest.raises(QllavaError, match="--two-stage belongs to the default demo"):
        run_demo(tmp_path / "other", overrides, two_stage=True, arch="llava_next")
    with pytest.raises(QllavaError, match="unknown --arch `qwen`"):
        run_demo(tmp_path / "other", overrides, arch="qwen")
