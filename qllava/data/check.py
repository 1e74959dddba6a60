"""`qllava data check` (scan a dataset for every problem) and `qllava data show` (the label audit)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig

from qllava.data.dataset import IGNORE_INDEX, encoder_from_recipe, parse_sample, read_records
from qllava.data.images import image_problem, image_size
from qllava.data.validate import Scan, data_files, scan_file
from qllava.data.video import VideoError, read_header, video_problem
from qllava.errors import QllavaError, problem_list
from qllava.model.load import check_base, load_processor
from qllava.recipe import Recipe


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def render(self) -> str:
        out = list(self.lines)
        if self.errors:
            out.append(f"{len(self.errors)} error(s):")
            out.append(problem_list(self.errors))
        else:
            out.append("no errors")
        return "\n".join(out)


def _load(recipe: Recipe):
    from qllava.demo import resolve_demo_paths

    recipe = resolve_demo_paths(recipe)
    base = check_base(recipe.model.base)
    config = AutoConfig.from_pretrained(base)
    processor = load_processor(base)
    return recipe, encoder_from_recipe(recipe, processor, config)


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (0-100), interpolated between the two nearest ranks: numpy's default and
    `statistics.quantiles(method="inclusive")`. It always lies within [min, max] and needs only one
    value; the "exclusive" method extrapolates past the ends on few samples (p95 120 with max 115)."""
    data = sorted(values)
    if not data:
        raise ValueError("percentile of no values")
    pos = (len(data) - 1) * p / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def _describe(scan: Scan, encoder, report: Report) -> None:
    """A scanned file's problems and statistics; samples that would train nothing are errors here."""
    report.errors = list(dict.fromkeys(report.errors + scan.errors + scan.lost_all))  # a shared folder: once
    # A sample cut to nothing trains nothing: counted as broken here, as listed among the errors.
    valid = len(scan.samples) - len(scan.lost_all)
    images = sum(bool(sample.images) for sample in scan.samples) - scan.lost_all_with_image
    videos = sum(bool(sample.videos) for sample in scan.samples) - scan.lost_all_with_video
    with_video = f"{videos} with a video, " if videos else ""
    report.lines.append(
        f"{scan.data.path}: {scan.records} sample{'' if scan.records == 1 else 's'}: {valid} valid ({images} with an "
        f"image, {with_video}{valid - images - videos} text-only), {scan.records - valid} broken"
    )
    several = [len(sample.images) for sample in scan.samples if len(sample.images) > 1]
    if several:
        report.lines.append(f"  {len(several)} sample(s) with several images (up to {max(several)})")
    if scan.duplicates:
        report.lines.append(f"  warning: {scan.duplicate_warning()}")
    if scan.lengths:
        lengths = scan.lengths
        per_image = "by image size" if encoder.sized else f"{encoder.image_tokens} per image"
        report.lines.append(
            f"  tokens per sample (image tokens included, {per_image}): min {min(lengths)}, "
            f"mean {statistics.fmean(lengths):.0f}, median {statistics.median(lengths):.0f}, "
            f"p95 {percentile(lengths, 95):.0f}, max {max(lengths)}"
        )
        if scan.image_tokens:
            # AnyRes: what sizes the images have decides how much of data.max_length they take.
            counts = scan.image_tokens
            report.lines.append(
                f"  image tokens per image (by its size): min {min(counts)}, median {statistics.median(counts):.0f}, "
                f"max {max(counts)} over {len(counts)} image{'' if len(counts) == 1 else 's'}"
            )
        if scan.video_frames:
            frames, tokens = scan.video_frames, scan.video_tokens
            report.lines.append(
                f"  videos: {len(frames)}, frames per clip min {min(frames)}, median {statistics.median(frames):.0f}, "
                f"max {max(frames)}; {encoder.video_frames} taken from each (data.video_frames), video tokens per "
                f"clip min {min(tokens)}, max {max(tokens)}"
            )
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        sample = scan.samples[longest]
        report.lines.append(f"  longest sample: {sample.id!r} ({sample.where}), {lengths[longest]} tokens")
        report.lines.append(
            f"  over data.max_length={encoder.max_length}: {scan.over} sample(s), cut on the right "
            f"({len(scan.lost_all)} of them lose every trained token, {scan.lost_part} part of their replies)"
        )
        report.lines.append(
            f"  trained tokens: {scan.kept_trained} of {scan.kept_tokens} "
            f"({scan.kept_trained / max(scan.kept_tokens, 1):.1%})"
        )


def check_dataset(recipe: Recipe) -> Report:
    """Scan data.train (and data.eval) as `train` validates them, decoding every image and every video frame too."""
    recipe, encoder = _load(recipe)
    report = Report(lines=[f"template {recipe.data.template}, max_length {recipe.data.max_length}"])
    for data in data_files(recipe):
        scan = scan_file(data, recipe, encoder, image_problem=image_problem, decode_videos=True)
        _describe(scan, encoder, report)
        step = recipe.train.micro_batch_size * recipe.train.grad_accum
        if data.key == "data.train" and len(scan.samples) < step:
            # What `train` refuses at start-up (for one process; more processes need more samples). A warning here:
            # the data itself is sound, and a check of a few samples is a common first try.
            report.lines.append(
                f"warning: {len(scan.samples)} training samples are fewer than one optimizer step needs "
                f"({recipe.train.micro_batch_size} x {recipe.train.grad_accum} on one process): `qllava train` "
                "refuses this; lower train.micro_batch_size or train.grad_accum, or add samples"
            )
    return report


def show_sample(recipe: Recipe, index: int) -> str:
    """One training sample as the model sees it; tokens that carry loss are wrapped in [[ ]]."""
    recipe, encoder = _load(recipe)
    records = read_records(recipe.data.train)
    if not records:
        raise QllavaError(f"{recipe.data.train} holds no samples")
    if not -len(records) <= index < len(records):
        raise QllavaError(
            f"--index {index} is out of range: {recipe.data.train} has {len(records)} samples "
            f"(0 to {len(records) - 1}, or -1 for the last)"
        )
    index %= len(records)  # Python-style: -1 is the last sample
    sample = parse_sample(records[index], index, recipe.data.train)
    sizes = None
    if encoder.sized and sample.images:
        # AnyRes: each image's token count depends on its size, read from its file's header.
        if not recipe.data.image_folder:
            raise QllavaError(f"sample {sample.id!r} ({sample.where}) has images but data.image_folder is not set")
        folder = Path(recipe.data.image_folder)
        try:
            sizes = [image_size(folder / name) for name in sample.images]
        except Exception as exc:  # PIL raises many types for files that are no image
            raise QllavaError(
                f"sample {sample.id!r} ({sample.where}): cannot read the size of its images in data.image_folder "
                f"`{folder}` ({type(exc).__name__}: {exc}); `qllava data check` names the file"
            ) from None
    video_sizes = None
    if sample.videos:
        # A clip's token count depends on its size, read from its header.
        label = f"sample {sample.id!r} ({sample.where})"
        if encoder.no_video:
            raise QllavaError(f"{label}: video `{sample.videos[0]}`: {encoder.no_video}")
        if not recipe.data.image_folder:
            raise QllavaError(f"{label} has a video but data.image_folder is not set")
        folder = Path(recipe.data.image_folder)
        try:
            header = read_header(folder / sample.videos[0])
        except (VideoError, OSError) as exc:
            # Unlike an image of a fixed count, a clip cannot be shown without its header: its size sets its count.
            problem = video_problem(folder / sample.videos[0]) or str(exc)
            raise QllavaError(
                f"{label}: video `{sample.videos[0]}` {problem} in data.image_folder `{folder}`; a clip's size, "
                "read from its header, sets its token count, so the sample cannot be shown without it"
            ) from None
        video_sizes = [(encoder.video_frames, header.height, header.width)]
    item = encoder.encode(sample, sizes, video_sizes)
    counts = encoder.image_counts(len(sample.images), sizes, sample.id)
    clip_tokens = encoder.video_counts(len(sample.videos), video_sizes, sample.id)
    tok = encoder.tokenizer
    pieces, run, trained_run = [], [], False
    ids, labels = item["input_ids"], item["labels"]

    def flush():
        if run:
            text = tok.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            pieces.append(f"[[{text}]]" if trained_run else text)

    i = image = 0
    while i < len(ids):
        if ids[i] == encoder.image_token_id:
            flush()
            run = []
            # Each image's own block, by its count: two images' blocks may touch ("<image><image>").
            n = min(counts[image], len(ids) - i)
            name = f" {image + 1} ({sample.images[image]})" if len(sample.images) > 1 else ""
            pieces.append(f"<image{name} x{n}>")
            i += n
            image += 1
            continue
        if ids[i] == encoder.video_token_id:
            flush()
            run = []
            n = min(clip_tokens[0], len(ids) - i)
            pieces.append(f"<video ({sample.videos[0]}), {encoder.video_frames} frames x{n}>")
            i += n
            continue
        trained = labels[i] != IGNORE_INDEX
        if trained != trained_run:
            flush()
            run, trained_run = [], trained
        run.append(ids[i])
        i += 1
    flush()
    n_trained = sum(lab != IGNORE_INDEX for lab in labels)
    header = (
        f"sample {sample.id!r} ({sample.where}), template {recipe.data.template}: {len(ids)} tokens, "
        f"{n_trained} carry loss (marked [[ ]]){', truncated' if item['truncated'] else ''}"
    )
    warnings = "".join(f"\nwarning: {problem}" for problem in _media_problems(recipe, sample))
    return header + warnings + "\n\n" + "".join(pieces)


def _media_problems(recipe: Recipe, sample) -> list[str]:
    """What is wrong with a shown sample's image and video files: its blocks are shown from counts that need no
    decoding (an image's from its size or none, a clip's from its header), so a missing, broken or cut-short file
    would otherwise go unnoticed until training draws it."""
    if not sample.images and not sample.videos:
        return []
    if not recipe.data.image_folder:
        return ["the sample has images or a video but data.image_folder is not set"]
    folder = Path(recipe.data.image_folder)
    found = [("image", name, image_problem(folder / name)) for name in sample.images]
    found += [("video", name, video_problem(folder / name)) for name in sample.videos]
    return [f"{kind} `{name}` {problem} in data.image_folder `{folder}`" for kind, name, problem in found if problem]
