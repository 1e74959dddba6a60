"""LLaVA-format datasets: read the index at start, tokenize and decode images lazily per sample.

Data format (haotian-liu/LLaVA): a JSON list (or JSONL) of
``{"id": ..., "image": "rel/path.jpg" (optional), "conversations": [{"from": "human", "value":
"<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}``. Several images (LLaVA-OneVision / LLaVA-Interleave):
``"image": ["a.jpg", "b.jpg"]`` with one `<image>` per image in the human turns, where the text places them. A video
(LLaVA-OneVision, Qwen2.5-VL): ``"video": "clip.mp4"`` (relative to the same folder) with one `<video>` in the human
turns, placed at the start of the first as a single image is.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from qllava.data.images import images_inputs, open_rgb, sizes_of, typical_size
from qllava.data.jsonl import parse_jsonl
from qllava.data.templates import render
from qllava.data.video import VIDEO_TAG, VideoError, clip_inputs, read_clip, video_tokens
from qllava.errors import QllavaError
from qllava.model.families import family_of, image_batch, several_image_tokens, video_refusal
from qllava.model.families import image_tokens as processor_image_tokens

IMAGE_TAG = "<image>"
IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Sample:
    id: str
    where: str
    """File and position, for error messages."""
    images: list[str]
    """Image paths (relative to the image folder), in the order of the `<image>` tags; empty: text-only."""
    turns: list[tuple[str, str]]
    system: str | None
    videos: list[str] = field(default_factory=list)
    """The video path (relative to the image folder) of a sample with one; empty: none."""


def read_records(path: str | Path) -> list[dict]:
    """A JSON list or a JSONL file -> raw records (dicts are not validated here)."""
    p = Path(path)
    if not p.is_file():
        raise QllavaError(f"data file `{p}` not found")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".jsonl" or not text.lstrip().startswith("["):
        return [record for _, record in parse_jsonl(text, p)]
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise QllavaError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(records, list):
        raise QllavaError(f"{p}: expected a JSON list of samples")
    return records


def parse_sample(record, index: int, source: str) -> Sample:
    """Validate one record and place `<image>` as LLaVA does; raise a QllavaError naming the sample."""
    where = f"{source}[{index}]"
    if not isinstance(record, dict):
        raise QllavaError(f"{where}: a sample must be an object with `conversations`")
    sid = str(record.get("id", index))
    label = f"sample {sid!r} ({where})"
    image = record.get("image")
    images = image if isinstance(image, list) else [] if image is None else [image]
    if not all(isinstance(path, str) and path for path in images):
        raise QllavaError(f"{label}: `image` must be a relative path string or a list of them")
    video = record.get("video")
    if video is not None and not (isinstance(video, str) and video):
        raise QllavaError(f"{label}: `video` must be one relative path string (one clip per sample)")
    videos = [video] if video else []
    if videos and images:
        raise QllavaError(f"{label}: a sample holds images or one video, not both")
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise QllavaError(f"{label}: `conversations` must be a non-empty list")
    turns: list[tuple[str, str]] = []
    system = None
    tags = video_tags = 0
    for t, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise QllavaError(f"{label}: turn {t} must be an object with `from` and a string `value`")
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise QllavaError(
                f"{label}: turn {t} has unknown role {turn.get('from')!r} (use one of {', '.join(sorted(ROLES))})"
            )
        value = turn["value"]
        # `<image>` alone is a question (LLaVA's stage-1 caption data); any other empty turn is a mistake.
        tagged = IMAGE_TAG in value or VIDEO_TAG in value
        if not value.replace(IMAGE_TAG, "").replace(VIDEO_TAG, "").strip() and not (role == "user" and tagged):
            raise QllavaError(f"{label}: turn {t} ({turn.get('from')}) has empty text")
        if role == "system":
            if t != 0:
                raise QllavaError(f"{label}: a system turn may only come first")
            system = value
            continue
        if IMAGE_TAG in value:
            if role != "user":
                raise QllavaError(f"{label}: turn {t}: `<image>` may only appear in a human turn")
            tags += value.count(IMAGE_TAG)
        if VIDEO_TAG in value:
            if role != "user":
                raise QllavaError(f"{label}: turn {t}: `<video>` may only appear in a human turn")
            video_tags += value.count(VIDEO_TAG)
        turns.append((role, value))
    # One image may go without its tag (LLaVA places it); several need theirs, which say where each goes.
    if tags > len(images) or (len(images) > 1 and tags != len(images)):
        raise QllavaError(
            f"{label}: {tags} `<image>` tag(s) but {len(images)} image(s); each image needs one `<image>` "
            "in the human turns, where it belongs in the text"
        )
    if video_tags != len(videos):
        raise QllavaError(
            f"{label}: {video_tags} `<video>` tag(s) but {len(videos)} video(s); a sample's `video` needs one "
            "`<video>` in the human turns (it is moved to the start of the first)"
        )
    if not any(role == "assistant" for role, _ in turns):
        raise QllavaError(f"{label}: no assistant (gpt) turn, so nothing would be trained")
    for t, (role, _) in enumerate(turns):
        expected = "user" if t % 2 == 0 else "assistant"
        if role != expected:
            raise QllavaError(f"{label}: turns must alternate human/gpt starting with human; turn {t} is `{role}`")
    if turns[-1][0] != "assistant":
        raise QllavaError(f"{label}: the last human turn has no gpt reply")
    # LLaVA moves a single image to the start of the first human turn (a video likewise); several stay where the
    # text puts them.
    for tag in ([IMAGE_TAG] if len(images) == 1 else []) + [VIDEO_TAG] * len(videos):
        turns = [(role, text.replace(tag, "").strip()) for role, text in turns]
        turns[0] = ("user", f"{tag}\n{turns[0][1]}")
    return Sample(sid, where, images, turns, system, videos)


def num_image_tokens(config) -> int:
    """Image tokens per image implied by a LlavaConfig (as LlavaProcessor expands them), for the planner, which
    runs before a base (and its processor) is downloaded. Everything else asks the processor
    (`encoder_from_recipe`)."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    has_cls = vision.model_type.startswith("clip")
    if config.vision_feature_select_strategy == "default":
        return patches + int(has_cls) - 1
    return patches + int(has_cls)


Size = tuple[int, int]
VideoSize = tuple[int, int, int]
"""A clip's (frames, height, width): what its video-token count depends on."""


class Encoder:
    """Sample -> token ids and labels: loss only on reply spans, each `<image>` expanded, cut to max_length.

    `image_tokens`: what one image becomes when that does not depend on its size (LLaVA-1.5), else a typical
    count (for length grouping); `tokens_for_images(sizes)`, when given, is the count of each image of a sample
    whose images have these (height, width) sizes (AnyRes), and the sizes must then be passed with each sample.
    `tokens_for_video(size)`, for a family that takes video, is the count of a clip of (frames, height, width); each
    clip's size is then passed with its sample, and `video_tokens` is a typical count (for length grouping).
    `no_video`: why a video cannot be trained, for a family that takes none.
    """

    def __init__(
        self,
        tokenizer,
        template: str,
        *,
        image_token_id: int,
        image_tokens: int,
        max_length: int,
        system: str | None = None,
        tokens_for_images: Callable[[tuple[Size, ...]], list[int]] | None = None,
        image_text: str = IMAGE_TAG,
        video_token_id: int | None = None,
        video_text: str = VIDEO_TAG,
        tokens_for_video: Callable[[VideoSize], int] | None = None,
        video_tokens: int = 0,
        video_frames: int = 8,
        no_video: str | None = None,
    ) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise QllavaError("a fast tokenizer (tokenizer.json) is needed to map reply spans to tokens")
        self.tokenizer = tokenizer
        self.template = template
        self.image_token_id = image_token_id
        self.image_tokens = image_tokens
        self.max_length = max_length
        self.system = system
        self.tokens_for_images = tokens_for_images
        self.image_text = image_text
        self.video_token_id = video_token_id
        self.video_text = video_text
        self.tokens_for_video = tokens_for_video
        self.video_tokens = video_tokens
        self.video_frames = video_frames
        self.no_video = no_video

    @property
    def sized(self) -> bool:
        """Whether an image's token count depends on its size (then pass the images' sizes with each sample)."""
        return self.tokens_for_images is not None

    def image_counts(self, images: int, sizes: list[Size] | None, label: str) -> list[int]:
        """Tokens of each of a sample's `images` images, whose (height, width) are `sizes` when `sized`."""
        if self.tokens_for_images is None or not images:
            return [self.image_tokens] * images
        if sizes is None or len(sizes) != images:
            raise QllavaError(f"{label}: internal error: the size of each image is needed to count its tokens")
        return self.tokens_for_images(tuple(tuple(size) for size in sizes))

    def video_counts(self, videos: int, sizes: list[VideoSize] | None, label: str) -> list[int]:
        """Tokens of each of a sample's `videos` clips, whose (frames, height, width) are `sizes`."""
        if not videos:
            return []
        if self.tokens_for_video is None:
            raise QllavaError(f"{label}: {self.no_video}")
        if sizes is None or len(sizes) != videos:
            raise QllavaError(f"{label}: internal error: the size of each clip is needed to count its tokens")
        return [self.tokens_for_video(tuple(size)) for size in sizes]

    def _with_image_text(self, turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Turns with each `<image>` (`<video>`) tag as the text the family's processor puts there
        (`Family.image_text`, `Family.video_text`)."""
        if self.image_text == IMAGE_TAG and self.video_text == VIDEO_TAG:
            return turns
        return [
            (role, text.replace(IMAGE_TAG, self.image_text).replace(VIDEO_TAG, self.video_text)) for role, text in turns
        ]

    def _render(self, sample: Sample):
        turns = self._with_image_text(sample.turns)
        return render(turns, self.template, system=sample.system or self.system, tokenizer=self.tokenizer)

    def _tokenize(self, rendered, label: str, counts: list[int]) -> tuple[list[int], list[int], int]:
        enc = self.tokenizer(rendered.text, return_offsets_mapping=True, add_special_tokens=True)
        return self._expand(rendered, enc["input_ids"], enc["offset_mapping"], label, counts)

    def _expand(
        self, rendered, token_ids, offsets, label: str, counts: list[int], video_counts: list[int] = ()
    ) -> tuple[list[int], list[int], int]:
        """Token ids with the i-th image tag expanded to `counts[i]` tokens (the i-th video tag to
        `video_counts[i]`), labels (reply spans only) and where the last image or video block ends."""
        ids, labels = [], []
        images_seen = videos_seen = 0
        image_end = 0
        # Reply spans are in text order and do not overlap, so one sweep marks every token. This loop runs over
        # every token of the dataset in train's start-up check: it keeps to cheap operations.
        targets, t, last = rendered.targets, 0, len(rendered.targets)
        for tok, (start, end) in zip(token_ids, offsets):
            if tok == self.image_token_id:
                per_image = counts[images_seen] if images_seen < len(counts) else 1  # too many: refused below
                images_seen += 1
                ids += [tok] * per_image
                labels += [IGNORE_INDEX] * per_image
                image_end = len(ids)
                continue
            if tok == self.video_token_id:
                per_video = video_counts[videos_seen] if videos_seen < len(video_counts) else 1  # refused below
                videos_seen += 1
                ids += [tok] * per_video
                labels += [IGNORE_INDEX] * per_video
                image_end = len(ids)
                continue
            while t < last and targets[t][1] <= start:
                t += 1
            ids.append(tok)
            labels.append(tok if end > start and t < last and targets[t][0] < end else IGNORE_INDEX)
        if images_seen != len(counts):
            raise QllavaError(
                f"{label}: the prompt holds {images_seen} image token(s) for {len(counts)} image(s); does the "
                "template keep every `<image>` (`plain` takes one image) and the tokenizer know `<image>` as a "
                "special token?"
            )
        if videos_seen != len(video_counts):
            raise QllavaError(
                f"{label}: the prompt holds {videos_seen} video token(s) for {len(video_counts)} video(s); does the "
                "template keep the `<video>` tag?"
            )
        return ids, labels, image_end

    def _cut_check(
        self, label: str, ids: list[int], labels: list[int], image_end: int, kind: str = "image"
    ) -> tuple[list[int], list[int]]:
        # Cutting inside any image (or video) block leaves the model more tokens than features (or fewer images).
        if len(ids) > self.max_length and image_end > self.max_length:
            raise QllavaError(
                f"data.max_length={self.max_length} cuts the {kind} tokens of {label}, "
                f"which end at token {image_end}; raise data.max_length"
            )
        return ids, labels

    def encode_full(
        self, sample: Sample, image_sizes: list[Size] | None = None, video_sizes: list[VideoSize] | None = None
    ) -> tuple[list[int], list[int]]:
        """Untruncated token ids and labels; raises if data.max_length would cut an image block.
        `image_sizes`: (height, width) of each of the sample's images, needed when the encoder is `sized`;
        `video_sizes`: (frames, height, width) of its clip, needed when it has one."""
        result = self.encode_full_batch([sample], [image_sizes], [video_sizes])[0]
        if isinstance(result, QllavaError):
            raise result
        return result

    def encode_full_batch(
        self,
        samples: list[Sample],
        image_sizes: list[list[Size] | None] | None = None,
        video_sizes: list[list[VideoSize] | None] | None = None,
    ) -> list[tuple[list[int], list[int]] | QllavaError]:
        """`encode_full` of each sample, or the error naming it; one tokenizer call for all of them, which the
        fast tokenizer can spread over cores (train's start-up scan of a whole dataset; a training item is a
        batch of one, so both encode alike). `image_sizes`: each sample's images' (height, width), or None;
        `video_sizes`: each sample's clip's (frames, height, width) in a list, or None."""
        image_sizes = image_sizes or [None] * len(samples)
        video_sizes = video_sizes or [None] * len(samples)
        results: list = [None] * len(samples)
        labels = [f"sample {sample.id!r} ({sample.where})" for sample in samples]
        rendered = {}
        for i, sample in enumerate(samples):
            try:
                rendered[i] = self._render(sample)
            except QllavaError as exc:  # a template's rule (the `plain` one's single turn) knows no sample
                results[i] = QllavaError(f"{labels[i]}: {exc}")
        order = list(rendered)
        if not order:
            return results
        enc = self.tokenizer([rendered[i].text for i in order], return_offsets_mapping=True, add_special_tokens=True)
        for i, token_ids, offsets in zip(order, enc["input_ids"], enc["offset_mapping"]):
            try:
                counts = self.image_counts(len(samples[i].images), image_sizes[i], labels[i])
                clips = self.video_counts(len(samples[i].videos), video_sizes[i], labels[i])
                expanded = self._expand(rendered[i], token_ids, offsets, labels[i], counts, clips)
                results[i] = self._cut_check(labels[i], *expanded, "video" if samples[i].videos else "image")
            except QllavaError as exc:
                results[i] = exc
        return results

    def encode(
        self, sample: Sample, image_sizes: list[Size] | None = None, video_sizes: list[VideoSize] | None = None
    ) -> dict:
        ids, labels = self.encode_full(sample, image_sizes, video_sizes)
        truncated = len(ids) > self.max_length
        return {"input_ids": ids[: self.max_length], "labels": labels[: self.max_length], "truncated": truncated}

    def prompt_ids(
        self, turns: list[tuple[str, str]], images: int = 0, image_sizes: list[Size] | None = None
    ) -> list[int]:
        """Token ids of a generation prompt (turns end with the user's) about `images` images, image tokens
        expanded (`image_sizes`: each image's (height, width), as `sizes_of` gives them, needed when the encoder
        is `sized`). Images the text has no `<image>` tags for go at the start of the first user turn, one per
        line (where LLaVA puts a lone image); tags in the text place them there, one tag per image."""
        tags = sum(text.count(IMAGE_TAG) for role, text in turns if role == "user")
        if images and not tags:
            turns = [("user", f"{IMAGE_TAG}\n" * images + turns[0][1])] + list(turns[1:])
        elif tags != images:
            raise QllavaError(
                f"the prompt has {tags} `<image>` tag(s) but {images} image(s) were given: put one `<image>` "
                "where each image belongs, or none to have the images placed before the question"
            )
        rendered = render(
            self._with_image_text(turns),
            self.template,
            system=self.system,
            tokenizer=self.tokenizer,
            add_generation_prompt=True,
        )
        counts = self.image_counts(images, image_sizes, "prompt")
        return self._tokenize(rendered, "prompt", counts)[0]


class LlavaDataset(Dataset):
    """Index in memory; each item is tokenized and its image decoded when it is fetched."""

    def __init__(
        self,
        samples: list[Sample],
        encoder: Encoder,
        image_folder: str | Path | None,
        image_processor,
        image_aspect: str,
        *,
        tiles: bool = False,
        sample_inputs: tuple[str, ...] = (),
        processor=None,
    ) -> None:
        """`tiles`: images become AnyRes tile stacks (`Family.tiles`), `image_aspect` does not apply;
        `sample_inputs`: the family's per-sample image inputs (`Family.sample_inputs`); `processor`: the model's
        processor, whose `__call__` makes a clip's inputs (families that take video)."""
        self.samples = samples
        self.encoder = encoder
        self.image_folder = Path(image_folder) if image_folder else None
        self.image_processor = image_processor
        self.image_aspect = image_aspect
        self.tiles = tiles
        self.sample_inputs = sample_inputs
        self.processor = processor

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        inputs = {"pixel_values": None}
        if sample.images:
            paths = [self.image_folder / name for name in sample.images]
            images = []
            for path in paths:
                try:
                    images.append(open_rgb(path))
                except Exception as exc:  # PIL raises many types for corrupt files
                    raise _unreadable(sample, path, exc) from None
            try:
                inputs = images_inputs(
                    images, self.image_aspect, self.image_processor, tiles=self.tiles, sample_inputs=self.sample_inputs
                )
            except Exception as exc:  # decoded, but the processor refuses it: which image is not known
                raise _unreadable(sample, paths[0] if len(paths) == 1 else ", ".join(map(str, paths)), exc) from None
        video_sizes = None
        if sample.videos:
            path = self.image_folder / sample.videos[0]
            try:
                inputs |= clip_inputs(read_clip(path, self.encoder.video_frames), self.processor)
            except VideoError as exc:
                raise _unreadable(sample, path, exc, "video") from None
            video_sizes = [inputs["video_size"]]
        # The images' own sizes, as the processor saw them: what their token counts depend on (AnyRes).
        return self.encoder.encode(sample, sizes_of(inputs), video_sizes) | inputs

    def modality_lengths(self) -> list[int]:
        """Approximate lengths as LLaVA computes them: words plus image tokens of every image (and video tokens of
        a clip), negative for text-only."""
        lengths = []
        for s in self.samples:
            words = sum(len(text.split()) for _, text in s.turns)
            media = len(s.images) * self.encoder.image_tokens + len(s.videos) * self.encoder.video_tokens
            lengths.append(words + media if s.images or s.videos else -words)
        return lengths


def _unreadable(sample: Sample, path, exc: Exception, kind: str = "image") -> UnreadableImage:
    return UnreadableImage(
        f"sample {sample.id!r} ({sample.where}): cannot read {kind} {path}: {exc}",
        sample.id,
        path,
        f"{type(exc).__name__}: {exc}",
        kind,
    )


class UnreadableImage(QllavaError):
    """A sample's image (or video) could not be read when the sample was drawn (it passed the start-up check).

    Constructible from the message alone: a dataloader worker's exception is re-raised in the
    training process as `type(exc)(message)`.
    """

    def __init__(
        self, message: str, sample_id=None, path: Path | None = None, cause: str = "", kind: str = "image"
    ) -> None:
        super().__init__(message)
        self.sample_id, self.path, self.cause, self.kind = sample_id, str(path), cause, kind


def collate(items: list[dict], pad_token_id: int) -> dict:
    """Right-pad a micro-batch; images and clips of the samples that have them are batched in order
    (`image_batch`)."""
    longest = max(len(it["input_ids"]) for it in items)
    input_ids = torch.full((len(items), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        input_ids[row, :n] = torch.tensor(it["input_ids"])
        labels[row, :n] = torch.tensor(it["labels"])
        attention_mask[row, :n] = 1
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        **image_batch(items),
        "truncated": sum(int(it["truncated"]) for it in items),
    }


def encoder_from_recipe(recipe, processor, config) -> Encoder:
    """The tokenizer + template + image-token expansion a recipe implies, checked against the model.

    Image-token counts are the processor's own (`_get_num_multimodal_tokens`): one count for every image when
    the family's images are one tile, else one per image size (asked once per size), or, for an image among
    several where the family's processor counts those alike (`several_image_tokens`), one per image count. A clip's
    count is asked once per (frames, height, width).
    """
    tokenizer = processor.tokenizer
    image_token_id = config.image_token_id
    family = family_of(config)
    if recipe.data.packing and not family.packing:
        # Refused where `qllava data check` and train's start-up check meet, before any weights are loaded.
        raise QllavaError(
            f"data.packing=true cannot train `{family.model_type}` models: packed samples would get wrong positions "
            "(3-D M-RoPE) or see each other (an image-block attention mask); set data.packing=false"
        )
    if recipe.data.image_aspect == "pad" and not (family.pad or family.tiles):
        raise QllavaError(
            f"data.image_aspect=pad cannot be used with `{family.model_type}` models: their processor cannot pad as "
            "training did, so a merged export would see other pixels; set data.image_aspect=resize"
        )
    placed = tokenizer(family.image_text, add_special_tokens=False)["input_ids"].count(image_token_id)
    if placed != 1:
        raise QllavaError(
            f"the tokenizer turns `{family.image_text}` (what `{IMAGE_TAG}` becomes for {family.model_type} models) "
            f"into {placed} image tokens (id {image_token_id}) instead of one; is model.base a {family.model_type} "
            "checkpoint with its own processor files?"
        )
    # `_get_num_multimodal_tokens` counts every token of the processor's `image_token_ids` in an image's expansion:
    # InternVL's includes the `<img>` and `</img>` around its context tokens, which `image_text` already holds once.
    wrapping = set(processor.image_token_ids) - {image_token_id}
    wrappers = sum(token in wrapping for token in tokenizer(family.image_text, add_special_tokens=False)["input_ids"])
    counts: dict[Size, int] = {}
    among: dict[int, int | None] = {}

    def tokens_for_size(size: Size) -> int:
        if size not in counts:
            counts[size] = processor_image_tokens(processor, [size])[0] - wrappers
        return counts[size]

    def tokens_for_images(sizes: tuple[Size, ...]) -> list[int]:
        if len(sizes) > 1:
            if len(sizes) not in among:
                among[len(sizes)] = several_image_tokens(processor, family, len(sizes))
            if among[len(sizes)] is not None:
                return [among[len(sizes)]] * len(sizes)
        return [tokens_for_size(size) for size in sizes]

    # The count of a one-tile family, a typical image's otherwise (`typical_size`); a typical clip has as many frames.
    typical = tokens_for_size(typical_size(processor.image_processor))
    video = {}
    if family.video_text is not None:
        video_token_id = config.video_token_id
        placed = tokenizer(family.video_text, add_special_tokens=False)["input_ids"].count(video_token_id)
        if placed != 1:
            raise QllavaError(
                f"the tokenizer turns `{family.video_text}` (what `{VIDEO_TAG}` becomes for {family.model_type} "
                f"models) into {placed} video tokens (id {video_token_id}) instead of one; is model.base a "
                f"{family.model_type} checkpoint with its own processor files?"
            )
        clips: dict[VideoSize, int] = {}

        def tokens_for_video(size: VideoSize) -> int:
            if size not in clips:
                clips[size] = video_tokens(processor, [size])[0]
            return clips[size]

        frames = recipe.data.video_frames
        step = getattr(processor.video_processor, "temporal_patch_size", 1)
        if frames % step:
            # The processor would pad the clip with copies of its last frame to whole temporal patches, spending
            # tokens on a repeated frame; Qwen's own tools sample an even count for the same reason.
            raise QllavaError(
                f"data.video_frames={frames} is not a multiple of {step}, the frames {family.model_type}'s vision "
                f"tower takes together (temporal_patch_size); use {frames - frames % step or step} or "
                f"{frames - frames % step + step}"
            )
        video = dict(
            video_token_id=video_token_id,
            video_text=family.video_text,
            tokens_for_video=tokens_for_video,
            video_tokens=tokens_for_video((frames, *typical_size(processor.image_processor))),
        )
    return Encoder(
        tokenizer,
        recipe.data.template,
        image_token_id=image_token_id,
        image_tokens=typical,
        max_length=recipe.data.max_length,
        system=recipe.data.system_prompt,
        tokens_for_images=tokens_for_images if family.tiles else None,
        image_text=family.image_text,
        video_frames=recipe.data.video_frames,
        no_video=video_refusal(family),
        **video,
    )
