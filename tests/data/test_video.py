"""Video samples (`"video": "clip.mp4"` with one `<video>`): the format, decoding and uniform sampling, refusals naming
the sample and file, and, on the tiny LLaVA-OneVision and Qwen2.5-VL (the `torchvision` tier), items equal to what
the HF processor makes of the same frames, the forward on batches mixing clips, images and text, `data check` /
`data show`, truncation, length grouping and a short training run."""

import hashlib
import json
import re

import av
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from qllava.data.check import check_dataset, show_sample
from qllava.data.dataset import UnreadableImage, collate, parse_sample
from qllava.data.templates import render
from qllava.data.validate import datasets_from_recipe
from qllava.data.video import Header, VideoError, decoded_frames, frame_indices, read_clip, read_header, video_problem
from qllava.errors import QllavaError
from qllava.model.families import family_named, forward_image_inputs
from qllava.model.load import load_processor
from qllava.train.checkpoint import TrainState, record_samples
from tests.conftest import (
    COLORS,
    assert_each_sample_computes_alone,
    kinds,
    make_recipe,
    template_of,
    tiny_of,
    train_is_refused,
)

VIDEO_KINDS = kinds("llava_onevision", "qwen2_5_vl")
FRAMES = 12
"""Frames of each test clip: more than data.video_frames, so sampling picks distinct frames."""


def write_clip(path, color=(220, 30, 30), frames=FRAMES, size=(32, 48), fps=10, **options):
    """An mpeg4 clip of `frames` frames of (height, width) `size`, frame i `color` darkened by 15 i (so that which frame
    was taken shows)."""
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        container.start_encoding()  # writes the header even when no frame follows
        for i in range(frames):
            rgb = np.full((*size, 3), [max(c - 15 * i, 0) for c in color], np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _turns(question, answer):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write_video_data(root, n):
    """n samples: a clip (colored: answer its color), an image, a clip, text-only, in turn; clips of two sizes."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    records = []
    for i in range(n):
        name, rgb = list(COLORS.items())[i % 3]
        if i % 4 == 3:
            records.append({"id": f"t{i}", "conversations": _turns("Say a color.", name)})
        elif i % 4 == 1:
            Image.new("RGB", (40, 28), rgb).save(root / "images" / f"{i}.png")
            convs = _turns("<image>\nWhat color is the shape?", name)
            records.append({"id": f"s{i}", "image": f"{i}.png", "conversations": convs})
        else:
            write_clip(root / "images" / f"{i}.mp4", rgb, size=((32, 48), (48, 32))[i % 8 // 4])
            convs = _turns("What color is the shape? <video>", name)
            records.append({"id": f"v{i}", "video": f"{i}.mp4", "conversations": convs})
    (root / "train.json").write_text(json.dumps(records))
    return root


# --- the format ---


def test_a_video_tag_is_placed_as_a_single_image_is():
    sample = parse_sample({"id": "v", "video": "a.mp4", "conversations": _turns("Which color? <video>", "red")}, 0, "m")
    assert sample.videos == ["a.mp4"] and sample.images == []
    assert sample.turns[0] == ("user", "<video>\nWhich color?")


@pytest.mark.parametrize(
    "record, message",
    [
        ({"video": "a.mp4", "conversations": _turns("Which color?", "red")}, "0 `<video>` tag(s) but 1 video(s)"),
        ({"conversations": _turns("Which <video>?", "red")}, "1 `<video>` tag(s) but 0 video(s)"),
        ({"video": "a.mp4", "conversations": _turns("<video> <video>", "red")}, "2 `<video>` tag(s) but 1 video(s)"),
        ({"video": ["a.mp4"], "conversations": _turns("<video>", "red")}, "`video` must be one relative path string"),
        (
            {"video": "a.mp4", "image": "b.png", "conversations": _turns("<video> <image>", "red")},
            "a sample holds images or one video, not both",
        ),
        (
            {"video": "a.mp4", "conversations": _turns("Which?", "<video> red")},
            "turn 1: `<video>` may only appear in a human turn",
        ),
    ],
)
def test_video_tags_must_match_the_video_naming_the_sample(record, message):
    with pytest.raises(QllavaError, match=re.escape(f"sample 'bad' (data.json[2]): {message}")):
        parse_sample({"id": "bad", **record}, 2, "data.json")


# --- decoding and sampling ---


@pytest.mark.parametrize("suffix", ["mp4", "mkv"])  # Matroska declares no frame count: it is counted from packets
def test_frames_are_sampled_uniformly_over_the_whole_clip(suffix, tmp_path):
    assert frame_indices(12, 4) == [0, 4, 7, 11]
    assert frame_indices(3, 5) == [0, 0, 1, 2, 2]  # a short clip repeats frames: every clip has as many
    path = write_clip(tmp_path / f"a.{suffix}")
    clip = read_clip(path, 4)
    assert clip.indices == [0, 4, 7, 11] and clip.frames.shape == (4, 32, 48, 3)
    # Frame i is red 220 - 15 i (mpeg4 is lossy: to a few levels).
    assert np.abs(clip.frames[..., 0].mean(axis=(1, 2)) - [220, 160, 115, 55]).max() < 6
    assert read_header(path) == Header(FRAMES, 32, 48, 10.0)
    assert decoded_frames(path) == FRAMES
    metadata = clip.metadata()
    assert (metadata.total_num_frames, metadata.fps, metadata.frames_indices) == (FRAMES, 10.0, [0, 4, 7, 11])


def _bad_videos(folder):
    """name -> what the check says about it: a missing file, a text file named .mp4, an mp4 cut short (its index is
    written last: no stream is left), two cut short behind an index written first (at 2/3 no frame is left to size
    the stream by; at 4/5 the header is whole but only 5 of its 12 frames decode) and an mp4 with no frames."""
    folder.mkdir(exist_ok=True)
    (folder / "text.mp4").write_text("not a video")
    whole = write_clip(folder / "whole.mp4").read_bytes()
    (folder / "cut.mp4").write_bytes(whole[: len(whole) // 2])
    faststart = write_clip(folder / "faststart.mp4", movflags="faststart").read_bytes()
    (folder / "cut-header.mp4").write_bytes(faststart[: len(faststart) * 2 // 3])
    (folder / "cut-frames.mp4").write_bytes(faststart[: len(faststart) * 4 // 5])
    write_clip(folder / "empty.mp4", frames=0)
    return {
        "missing.mp4": "not found",
        "text.mp4": "cannot be opened as a video (InvalidDataError",
        "cut.mp4": "holds no video frames (no video stream",
        "cut-header.mp4": f"declares {FRAMES} frames but 0 decode (a truncated file?)",
        "cut-frames.mp4": f"declares {FRAMES} frames but 5 decode (a truncated file?)",
        "empty.mp4": "holds no video frames",
    }


def test_each_bad_video_file_says_what_is_wrong(tmp_path):
    for name, problem in _bad_videos(tmp_path).items():
        assert problem in video_problem(tmp_path / name), name
    # What train's start-up check reads: the header (whole in cut-frames.mp4), and the frames when a clip is drawn.
    with pytest.raises(VideoError, match=f"declares {FRAMES} frames but no frame size"):
        read_header(tmp_path / "cut-header.mp4")
    assert read_header(tmp_path / "cut-frames.mp4") == Header(FRAMES, 32, 48, 10.0)
    with pytest.raises(VideoError, match=re.escape(f"declares {FRAMES} frames but 5 decode (a truncated file?)")):
        read_clip(tmp_path / "cut-frames.mp4", 8)


# --- families without video ---


@pytest.mark.parametrize("kind", kinds("llava", "llava_next", "gemma3", "internvl"))
def test_a_video_is_refused_for_a_family_without_video_input(kind, request, tmp_path):
    """`data check` and `train` (exit 1, one message, nothing written) name the sample and the architectures that
    take video."""

    base = tiny_of(kind, request)
    data = write_video_data(tmp_path / "data", 4)
    refused = (
        "sample 'v0' ({}[0]): video `0.mp4`: `{}` models take no video; architectures that take video: "
        "llava_onevision, qwen2_5_vl"
    )
    refused = refused.format(data / "train.json", kind)
    aspect = "resize" if kind == "gemma3" else "pad"  # Gemma 3 refuses `pad`
    recipe = make_recipe(base, data, tmp_path / "out", data={"template": template_of(kind), "image_aspect": aspect})
    assert refused in check_dataset(recipe).errors
    assert refused in train_is_refused(base, data, tmp_path, image_aspect=aspect)


def test_the_resume_digest_covers_the_video_and_keeps_its_form_without_one():
    image = parse_sample({"id": "a", "image": "x.mp4", "conversations": _turns("<image> Q", "A")}, 0, "m")
    text = parse_sample({"id": "b", "conversations": _turns("Q", "A")}, 1, "m")
    video = parse_sample({"id": "a", "video": "x.mp4", "conversations": _turns("<video> Q", "A")}, 0, "m")
    state = TrainState()
    record_samples(state, [image, text], None)
    # What the digest was before samples could hold a video: checkpoints written then still resume.
    assert state.samples_digest == hashlib.sha256(b"a\tx.mp4\nb\tNone").hexdigest()
    with pytest.raises(QllavaError, match="now holds others"):
        record_samples(state, [video, text], None)


# --- the torchvision tier: LLaVA-OneVision and Qwen2.5-VL ---


def _recipe(kind, base, data_dir, out, **sections):
    data = {"template": template_of(kind), "max_length": 512, "video_frames": 4, **sections.pop("data", {})}
    return make_recipe(base, data_dir, out, data=data, **sections)


@pytest.mark.parametrize("kind", VIDEO_KINDS)
def test_encoded_video_sample_equals_the_hf_processor(kind, request, tmp_path):
    """Token ids, labels, pixel_values_videos and the other video inputs of qllava's items equal what the model's own
    processor gives for the same chat text and the same frames, decoded by transformers' own PyAV reader at qllava's
    indices (with its metadata, which Qwen2.5-VL's second_per_grid_ts comes from); so do the model's logits."""
    from transformers.video_utils import load_video

    base = tiny_of(kind, request)
    family = family_named(kind)
    data = write_video_data(tmp_path / "data", 8)
    recipe = _recipe(kind, base, data, tmp_path / "out")
    processor = load_processor(base)
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32).eval()
    train_set, _ = datasets_from_recipe(recipe, processor, model.config, warn=lambda _: None)
    hf = AutoProcessor.from_pretrained(base)
    checked = 0
    for i, sample in enumerate(train_set.samples):
        if not sample.videos:
            continue
        item = train_set[i]
        turns = [(role, text.replace("<video>", family.video_text)) for role, text in sample.turns]
        text = render(turns, recipe.data.template, tokenizer=processor.tokenizer).text

        def indices(metadata, **_):
            return np.array(frame_indices(metadata.total_num_frames, 4))

        frames, metadata = load_video(str(data / "images" / sample.videos[0]), sample_indices_fn=indices)
        theirs = hf(text=text, videos=[frames], video_metadata=[metadata], do_sample_frames=False, return_tensors="pt")
        assert item["input_ids"] == theirs["input_ids"][0].tolist(), sample.id
        trained = processor.tokenizer.decode([t for t in item["labels"] if t != -100])
        assert trained == f"{sample.turns[1][1]}<|im_end|>", sample.id
        for key in ("pixel_values_videos",) + family.video_inputs:
            torch.testing.assert_close(item[key], theirs[key], rtol=0, atol=0, msg=f"{sample.id} {key}")
        batch = collate([item], processor.tokenizer.pad_token_id)
        ours = forward_image_inputs(batch, torch.device("cpu"), torch.float32, model.config)
        if family.token_types:
            assert torch.equal(ours[family.token_types], theirs[family.token_types]), sample.id
            assert (ours[family.token_types] == family.video_token_type).sum() > 0
        with torch.no_grad():
            reference = model(**theirs, use_cache=False).logits
            logits = model(input_ids=batch["input_ids"], **ours, use_cache=False).logits
        torch.testing.assert_close(logits, reference)
        checked += 1
    assert checked == 4


@pytest.mark.torchvision
def test_video_tokens_follow_a_pixel_cap_the_processor_applies(tiny_qwen2_5_vl, tmp_path):
    """A Qwen2.5-VL video processor with `cap_pixels_per_frame` (a whole-clip pixel budget; transformers announces it
    as the coming default) shrinks the frames in `__call__`, which transformers 5.24's `_get_num_multimodal_tokens`
    ignores: qllava counts what `__call__` makes, so the clip's tokens are its features and the forward takes it."""
    import shutil

    base = shutil.copytree(tiny_qwen2_5_vl, tmp_path / "capped")
    processor = AutoProcessor.from_pretrained(base)
    processor.video_processor.cap_pixels_per_frame = True
    processor.video_processor.max_video_tokens = 4
    processor.save_pretrained(base)
    data = write_video_data(tmp_path / "data", 1)
    recipe = _recipe("qwen2_5_vl", base, data, tmp_path / "out")
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32).eval()
    train_set, _ = datasets_from_recipe(recipe, load_processor(base), model.config, warn=lambda _: None)
    item = train_set[0]
    features = int(item["video_grid_thw"].prod()) // processor.video_processor.merge_size**2
    assert item["input_ids"].count(model.config.video_token_id) == features
    assert processor._get_num_multimodal_tokens(video_sizes=[list(item["video_size"])]).num_video_tokens[0] > features
    batch = collate([item], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        model(
            input_ids=batch["input_ids"],
            **forward_image_inputs(batch, torch.device("cpu"), torch.float32, model.config),
        )


@pytest.mark.parametrize("kind", VIDEO_KINDS)
def test_forward_accepts_a_batch_mixing_clips_images_and_text(kind, request, tmp_path):
    """A padded (and, where the family packs, a packed) batch of two clips of different sizes, an image and a
    text-only sample gives every sample the logits it gets alone."""
    base = tiny_of(kind, request)
    data = write_video_data(tmp_path / "data", 8)
    recipe = _recipe(kind, base, data, tmp_path / "out")
    processor = load_processor(base)
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32).eval()
    train_set, _ = datasets_from_recipe(recipe, processor, model.config, warn=lambda _: None)
    order = (0, 1, 3, 4)
    assert [train_set.samples[i].id for i in order] == ["v0", "s1", "t3", "v4"]
    items = [train_set[i] for i in order]
    assert items[0]["video_size"][1:] != items[3]["video_size"][1:]
    packed = family_named(kind).packing
    batch = assert_each_sample_computes_alone(model, items, processor.tokenizer.pad_token_id, packed=packed)
    assert batch["pixel_values_videos"].shape[0] == (
        2
        if kind == "llava_onevision"
        else items[0]["pixel_values_videos"].shape[0] + items[3]["pixel_values_videos"].shape[0]
    )
    if kind == "qwen2_5_vl":
        assert batch["video_grid_thw"].shape == (2, 3) and batch["second_per_grid_ts"].shape == (2,)


@pytest.mark.parametrize("kind", VIDEO_KINDS)
def test_check_show_truncation_and_length_grouping_count_the_clip(kind, request, tmp_path):
    base = tiny_of(kind, request)
    data = write_video_data(tmp_path / "data", 4)
    recipe = _recipe(kind, base, data, tmp_path / "out")
    processor = load_processor(base)
    config = AutoConfig.from_pretrained(base)
    train_set, _ = datasets_from_recipe(recipe, processor, config, warn=lambda _: None)
    ids = train_set[0]["input_ids"]
    positions = [i for i, tok in enumerate(ids) if tok == config.video_token_id]
    counted = processor._get_num_multimodal_tokens(video_sizes=[(4, 32, 48)]).num_video_tokens[0]
    assert len(positions) == counted == positions[-1] + 1 - positions[0]

    report = check_dataset(recipe)
    text = report.render()
    assert report.errors == [], text
    assert "4 samples: 4 valid (1 with an image, 2 with a video, 1 text-only), 0 broken" in text, text
    assert f"videos: 2, frames per clip min {FRAMES}, median {FRAMES}, max {FRAMES}; 4 taken from each" in text, text
    assert f"<video (0.mp4), 4 frames x{counted}>" in show_sample(recipe, 0)

    words = [sum(len(t.split()) for _, t in s.turns) for s in train_set.samples]
    typical = train_set.encoder.video_tokens
    assert train_set.modality_lengths() == [
        words[0] + typical,
        words[1] + train_set.encoder.image_tokens,
        words[2] + typical,
        -words[3],
    ]

    cut = _recipe(kind, base, data, tmp_path / "out", data={"max_length": positions[-1]})
    with pytest.raises(QllavaError, match=f"cuts the video tokens of sample 'v0'.*end at token {positions[-1] + 1}"):
        datasets_from_recipe(cut, processor, config, warn=lambda _: None)

    # `data show` reads a clip's header only: a clip whose frames stop early is shown, with a warning line.
    faststart = write_clip(tmp_path / "faststart.mp4", movflags="faststart").read_bytes()
    (data / "images" / "0.mp4").write_bytes(faststart[: len(faststart) * 4 // 5])
    shown = show_sample(recipe, 0).splitlines()
    assert shown[1].startswith("warning: video `0.mp4` declares 12 frames but 5 decode"), shown[:2]
    (data / "images" / "0.mp4").unlink()  # without its header a clip has no count: the sample cannot be shown
    with pytest.raises(QllavaError, match=r"sample 'v0' .*: video `0.mp4` not found in data.image_folder"):
        show_sample(recipe, 0)

    if family_named(kind).model_type == "qwen2_5_vl":  # frames go to its vision tower two at a time
        odd = _recipe(kind, base, data, tmp_path / "out", data={"video_frames": 5})
        with pytest.raises(QllavaError, match=r"data.video_frames=5 is not a multiple of 2, .* use 4 or 6"):
            datasets_from_recipe(odd, processor, config, warn=lambda _: None)


@pytest.mark.parametrize("kind", VIDEO_KINDS)
def test_bad_videos_are_named_by_check_and_train(kind, request, tmp_path):
    """Each bad file is one error naming the sample and file (`data check` decodes every frame; train's start-up reads
    the headers, exit 1, nothing written); a clip whose frames stop decoding, which the header check lets through, is
    named when it is drawn."""

    base = tiny_of(kind, request)
    data = write_video_data(tmp_path / "data", 4)
    problems = _bad_videos(data / "images")
    records = json.loads((data / "train.json").read_text())
    for name in problems:
        records.append({"id": name, "video": name, "conversations": _turns("<video> What color?", "red")})
    (data / "train.json").write_text(json.dumps(records))
    recipe = _recipe(kind, base, data, tmp_path / "out")
    errors = check_dataset(recipe).errors
    assert len(errors) == len(problems), errors
    for (name, problem), error in zip(problems.items(), errors):
        assert error.startswith(f"sample '{name}' ({data / 'train.json'}[") and f"video `{name}` {problem}" in error

    output = train_is_refused(base, data, tmp_path, template="chatml")
    assert "5 problem(s) in the data" in output, output
    assert all(f"sample '{name}'" in output for name in problems if name != "cut-frames.mp4")

    records = records[:4]
    (data / "train.json").write_text(json.dumps(records))
    train_set, _ = datasets_from_recipe(recipe, load_processor(base), AutoConfig.from_pretrained(base))
    (data / "images" / "0.mp4").write_bytes((data / "images" / "cut-frames.mp4").read_bytes())
    with pytest.raises(UnreadableImage, match="cannot read video") as caught:
        train_set[0]
    assert caught.value.sample_id == "v0" and caught.value.path == str(data / "images" / "0.mp4")
    # Drawn in a run (data.on_bad_sample=stop): the run stops at its first step, naming the clip.
    from qllava.train.loop import train

    with pytest.raises(QllavaError, match=re.escape(f"sample 'v0': cannot read video {data / 'images' / '0.mp4'}")):
        train(_recipe(kind, base, data, tmp_path / "run", train={"max_steps": 1}), progress=False)


@pytest.mark.parametrize("kind", VIDEO_KINDS)
def test_a_few_steps_on_clips_images_and_text_train_the_projector(kind, request, tmp_path):
    """qllava's train() on clips, images and text-only samples: every step has a loss, the last three steps' mean is
    below 0.95 of the first three's (measured: OneVision 5.86 -> 5.09, Qwen2.5-VL 5.90 -> 5.51), and the projector
    moves."""
    from qllava.train.loop import train
    from tests.conftest import adapter_tensors, run_metrics

    base = tiny_of(kind, request)
    data = write_video_data(tmp_path / "data", 12)
    recipe = _recipe(
        kind,
        base,
        data,
        tmp_path / "run",
        optim={"lr": 1e-2, "projector_lr": 1e-2, "schedule": "constant"},
        train={"max_steps": 8, "micro_batch_size": 4, "grad_accum": 1, "log_every": 1},
    )
    train(recipe, progress=False)
    losses = run_metrics(tmp_path / "run", "loss")
    assert len(losses) == 8 and None not in losses
    assert sum(losses[-3:]) < 0.95 * sum(losses[:3]), losses
    family = family_named(kind)
    untrained = AutoModelForImageTextToText.from_pretrained(base).state_dict()
    trained = {k: v for k, v in adapter_tensors(tmp_path / "run").items() if family.part_of(k) == "projector"}
    assert trained and all(
        (v - untrained[k.removeprefix("base_model.model.")]).abs().max() > 1e-4 for k, v in trained.items()
    )
