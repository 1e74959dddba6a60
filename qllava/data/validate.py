"""One validation of a recipe's data files, shared by `qllava data check` and `qllava train`.

`train` runs it before any weights load and only checks that images exist and reads each video's header (decoding
every image of a 665k-sample dataset at start would take long); `data check` also decodes them and prints statistics.
Samples that lose every trained token to `data.max_length` are errors for `data check` and a start-up
warning for `train`; duplicate ids are a warning for both.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from qllava.data.dataset import IGNORE_INDEX, LlavaDataset, Sample, encoder_from_recipe, parse_sample, read_records
from qllava.data.images import image_missing, image_size
from qllava.data.video import VideoError, decoded_frames, read_header
from qllava.errors import QllavaError, problem_list
from qllava.model.families import family_of

# Samples tokenized per tokenizer call: the fast tokenizer runs a batch in parallel.
_BATCH = 1024


@dataclass(frozen=True)
class DataFile:
    """A data file and the image folder its samples' `image` paths are relative to, with their recipe keys."""

    key: str
    path: str
    folder_key: str
    folder: str


def eval_image_folder(recipe) -> str:
    """Where data.eval's images are: data.eval_image_folder, by default data.image_folder."""
    return recipe.data.eval_image_folder or recipe.data.image_folder


def data_files(recipe) -> list[DataFile]:
    """data.train, then data.eval when it is set."""
    files = [DataFile("data.train", recipe.data.train, "data.image_folder", recipe.data.image_folder)]
    if recipe.data.eval:
        key = "data.eval_image_folder" if recipe.data.eval_image_folder else "data.image_folder"  # the one set
        files.append(DataFile("data.eval", recipe.data.eval, key, eval_image_folder(recipe)))
    return files


@dataclass
class Scan:
    """What validating one data file found."""

    data: DataFile
    records: int = 0
    samples: list[Sample] = field(default_factory=list)
    """The samples that can be trained on (parsed, images found, encoded)."""
    errors: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    """Untruncated token count of each of `samples`, image tokens included."""
    image_tokens: list[int] = field(default_factory=list)
    """Sized (AnyRes) encoders: the image-token count of each image of `samples`, as its size (and, for
    OneVision, the sample's number of images) makes it."""
    video_frames: list[int] = field(default_factory=list)
    """The frame count of the clip of each of `samples` that has one."""
    video_tokens: list[int] = field(default_factory=list)
    """The video-token count of each of those clips."""
    kept_tokens: int = 0
    kept_trained: int = 0
    over: int = 0
    """Samples longer than data.max_length."""
    lost_all: list[str] = field(default_factory=list)
    """One message per sample whose every trained token lies beyond data.max_length."""
    lost_all_with_image: int = 0
    """How many of `lost_all` have an image."""
    lost_all_with_video: int = 0
    """How many of `lost_all` have a video."""
    lost_part: int = 0
    """Samples that keep some trained tokens within data.max_length but not all."""
    duplicates: dict[str, int] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)
    """Image problems kept as samples (data.on_bad_sample=skip): the run skips them when they are drawn."""
    """Sample id -> how often it occurs, for ids that occur more than once."""

    def unreadable_warning(self) -> str | None:
        if not self.unreadable:
            return None
        return (
            f"{len(self.unreadable)} sample(s) of {self.data.path} have no readable image, such as "
            f"{self.unreadable[0]}; data.on_bad_sample=skip leaves them out when they are drawn (bad_samples.jsonl)"
        )

    def duplicate_warning(self) -> str | None:
        if not self.duplicates:
            return None
        shown = ", ".join(f"{sid!r} x{n}" for sid, n in list(self.duplicates.items())[:5])
        more = ", ..." if len(self.duplicates) > 5 else ""
        return (
            f"{self.data.path}: {len(self.duplicates)} sample id(s) occur more than once ({shown}{more}); "
            "duplicated samples train more often than the others"
        )

    def truncation_warning(self, max_length: int) -> str | None:
        if not (self.lost_all or self.lost_part):
            return None
        return (
            f"{self.data.path}: at data.max_length={max_length}, {len(self.lost_all)} of {len(self.samples)} "
            f"samples lose every trained token (they train nothing) and {self.lost_part} lose part of their "
            "replies; raise data.max_length (`qllava data check` names them)"
        )


def scan_file(
    data: DataFile,
    recipe,
    encoder,
    image_problem: Callable[[Path], str | None] = image_missing,
    keep_unreadable: bool = False,
    decode_videos: bool = False,
) -> Scan:
    """Validate every sample of `data`; every problem is collected, each naming the sample and file.

    `image_problem(path)` says what is wrong with an image file (None: nothing). `keep_unreadable`: a sample
    whose image has a problem stays in (a warning, not an error), for a run that skips it when drawn; the
    epoch's order, drawn over all samples, stays that of the run's checkpoints. A clip's header is always read (its
    token count depends on its size); `decode_videos` decodes every frame of it too.
    """
    scan = Scan(data)
    records = read_records(data.path)
    scan.records = len(records)
    if not records:
        scan.errors.append(f"{data.key} `{data.path}` holds no samples")
        return scan
    parsed = []
    for i, record in enumerate(records):
        try:
            parsed.append(parse_sample(record, i, data.path))
        except QllavaError as exc:
            scan.errors.append(str(exc))
    # Only ids written in the data: a sample without one is named by its position, which is no duplicate.
    counts = collections.Counter(str(r["id"]) for r in records if isinstance(r, dict) and "id" in r)
    scan.duplicates = {sid: n for sid, n in counts.items() if n > 1}

    with_image = [sample for sample in parsed if sample.images or sample.videos]
    media = "an image or a video" if any(sample.videos for sample in with_image) else "an image"
    folder = Path(data.folder) if data.folder else None
    if with_image and folder is None:
        scan.errors.append(f"{len(with_image)} sample(s) of {data.path} have {media} but {data.folder_key} is not set")
    elif with_image and not folder.is_dir():
        # The same words for train and eval when they share the folder: one error after deduplication.
        scan.errors.append(f"{data.folder_key} `{data.folder}` is not a folder (samples with {media} need it)")
    text_only = [sample for sample in parsed if not (sample.images or sample.videos)]
    if text_only and not recipe.lora.enabled:
        # Stage 1 trains only the projector: a text-only batch would have nothing to train at all.
        scan.errors.append(
            f"{data.path}: {len(text_only)} text-only sample(s) (such as {text_only[0].id!r}), but "
            "lora.enabled=false trains only the projector, which they never reach; stage-1 data is images with captions"
        )
        parsed = with_image

    folder_found = folder is not None and folder.is_dir()
    bar = tqdm(total=len(parsed), desc=f"check {Path(data.path).name}", unit="sample", disable=None, leave=False)
    for start in range(0, len(parsed), _BATCH):
        usable, sizes, clip_sizes, clip_frames = [], [], [], []
        for sample in parsed[start : start + _BATCH]:
            if sample.videos and encoder.no_video:
                label = f"sample {sample.id!r} ({sample.where})"
                scan.errors.append(f"{label}: video `{sample.videos[0]}`: {encoder.no_video}")
                continue
            if (sample.images and encoder.sized or sample.videos) and not folder_found:
                continue  # its tokens cannot be counted without its images; the folder's error is reported
            problems, sample_sizes = [], []
            for name in sample.images if folder_found else ():
                problem = image_problem(folder / name)
                if not problem and encoder.sized:
                    # The token count of an AnyRes image depends on its size: read from the header, not decoded.
                    try:
                        sample_sizes.append(image_size(folder / name))
                    except Exception as exc:  # PIL raises many types for files that are no image
                        problem = f"cannot be read ({type(exc).__name__}: {exc})"
                if problem:
                    problems.append(f"image `{name}` {problem}")
            video_sizes, frames = [], []
            for name in sample.videos if folder_found else ():
                problem = image_missing(folder / name)
                if not problem:
                    try:
                        # Decoded first where asked: what the frames say is more precise than the header's lack.
                        count = decoded_frames(folder / name) if decode_videos else None
                        # The clip's token count depends on its size, read from its header.
                        header = read_header(folder / name)
                        frames.append(count or header.frames)
                        video_sizes.append((encoder.video_frames, header.height, header.width))
                    except VideoError as exc:
                        problem = str(exc)
                if problem:
                    problems.append(f"video `{name}` {problem}")
            # A clip's token count needs its header, and AnyRes images their sizes: those samples cannot be kept.
            if problems and keep_unreadable and not encoder.sized and not sample.videos:
                scan.unreadable.append(f"{sample.id!r} ({sample.where}): {'; '.join(problems)}")
                usable.append(sample)
                sizes.append(None)
                clip_sizes.append(None)
                clip_frames.append(frames)
            elif problems:
                scan.errors += [
                    f"sample {sample.id!r} ({sample.where}): {problem} in {data.folder_key} `{data.folder}`"
                    for problem in problems
                ]
            else:
                usable.append(sample)
                sizes.append(sample_sizes if encoder.sized else None)
                clip_sizes.append(video_sizes or None)
                clip_frames.append(frames)
        encoded_all = encoder.encode_full_batch(usable, sizes, clip_sizes)
        for sample, sample_sizes, video_sizes, frames, encoded in zip(
            usable, sizes, clip_sizes, clip_frames, encoded_all
        ):
            if isinstance(encoded, QllavaError):
                scan.errors.append(str(encoded))
                continue
            _count(scan, sample, *encoded, encoder.max_length)
            if not (scan.samples and scan.samples[-1] is sample):  # not counted as trainable
                continue
            if sample_sizes:
                scan.image_tokens += encoder.image_counts(len(sample.images), sample_sizes, sample.id)
            if video_sizes:
                scan.video_frames += frames
                scan.video_tokens += encoder.video_counts(len(sample.videos), video_sizes, sample.id)
        bar.update(min(_BATCH, len(parsed) - start))
    bar.close()
    return scan


def _count(scan: Scan, sample: Sample, ids: list[int], labels: list[int], max_length: int) -> None:
    label = f"sample {sample.id!r} ({sample.where})"
    # list.count runs in C: this is per token of every sample of the dataset.
    trained = len(labels) - labels.count(IGNORE_INDEX)
    if trained == 0:
        scan.errors.append(f"{label}: no token carries loss after templating")
        return
    kept_labels = labels[:max_length]
    kept = len(kept_labels) - kept_labels.count(IGNORE_INDEX)
    scan.samples.append(sample)
    scan.lengths.append(len(ids))
    scan.kept_tokens += min(len(ids), max_length)
    scan.kept_trained += kept
    scan.over += len(ids) > max_length
    if kept == 0:
        scan.lost_all_with_image += bool(sample.images)
        scan.lost_all_with_video += bool(sample.videos)
        scan.lost_all.append(
            f"{label}: all {trained} trained tokens lie beyond data.max_length={max_length} (the sample has "
            f"{len(ids)} tokens), so it trains nothing; raise data.max_length or shorten the sample"
        )
    elif kept < trained:
        scan.lost_part += 1


def _datasets(files: list[DataFile], recipe, processor, config, warn: Callable[[str], None]) -> list[LlavaDataset]:
    encoder = encoder_from_recipe(recipe, processor, config)
    skip = recipe.data.on_bad_sample == "skip"
    scans = [scan_file(data, recipe, encoder, keep_unreadable=skip and data.key == "data.train") for data in files]
    errors = list(dict.fromkeys(error for scan in scans for error in scan.errors))  # a shared folder: once
    if errors:
        raise QllavaError(
            f"{len(errors)} problem(s) in the data (run `qllava data check` for a full report):\n"
            + problem_list(errors)
        )
    for scan in scans:
        warnings = (
            scan.unreadable_warning(),
            scan.duplicate_warning(),
            scan.truncation_warning(recipe.data.max_length),
        )
        for warning in warnings:
            if warning:
                warn(f"qllava: warning: {warning}")
    family = family_of(config)
    return [
        LlavaDataset(
            scan.samples,
            encoder,
            scan.data.folder,
            processor.image_processor,
            recipe.data.image_aspect,
            tiles=family.tiles,
            sample_inputs=family.sample_inputs,
            processor=processor,
        )
        for scan in scans
    ]


def datasets_from_recipe(
    recipe, processor, config, warn: Callable[[str], None] = print
) -> tuple[LlavaDataset, LlavaDataset | None]:
    """(train, eval or None) datasets of a recipe, validated together; `warn` prints start-up warnings."""
    datasets = _datasets(data_files(recipe), recipe, processor, config, warn)
    return datasets[0], (datasets[1] if len(datasets) > 1 else None)


def dataset_from_recipe(recipe, path: str, processor, config, warn: Callable[[str], None] = print) -> LlavaDataset:
    """The validated dataset of a file whose images are in data.image_folder, as the recipe's template,
    length limit and image handling say."""
    data = DataFile("data.train", path, "data.image_folder", recipe.data.image_folder)
    return _datasets([data], recipe, processor, config, warn)[0]
