"""Video clips: decoding with PyAV, uniform frame sampling, and the model's processor's own video inputs.

A sample's clip becomes `data.video_frames` frames spread evenly from its first frame to its last (a clip with
fewer frames repeats some), so every clip of a run has the same frame count: LLaVA-OneVision's forward takes the
batch's clips as one (clips, frames, 3, H, W) tensor. The frames then go through the processor's `__call__` with
their sampling metadata, which is where Qwen2.5-VL's `second_per_grid_ts` comes from (without metadata
transformers 5.24 assumes 24 fps, silently).

transformers' `load_video(backend="pyav")` (5.24) is not used: it takes the frame count the container declares (none
in Matroska or WebM, which it then refuses), returns fewer frames than asked from a truncated file without a word,
refuses clips shorter than the frames asked, and its uniform indices never reach the last frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

VIDEO_TAG = "<video>"


class VideoError(Exception):
    """A file that is no usable video; the message says what is wrong with it ("holds no video frames")."""


def _av():
    try:
        import av
    except ImportError:
        raise VideoError("needs PyAV to be decoded: pip install 'qllava[video]' (the `av` package)") from None
    return av


@dataclass(frozen=True)
class Header:
    """What a clip's container declares, read without decoding: the frame count, (height, width) and frame rate."""

    frames: int
    height: int
    width: int
    fps: float | None


def _open(path: str | Path):
    av = _av()
    try:
        container = av.open(str(path))
    except av.FFmpegError as exc:
        raise VideoError(f"cannot be opened as a video ({type(exc).__name__}: {exc})") from None
    if not container.streams.video:
        container.close()
        # An mp4 cut short loses its index (written last) and with it every stream.
        raise VideoError("holds no video frames (no video stream: an empty, truncated or audio-only file?)")
    return container


def _header(container) -> Header:
    stream = container.streams.video[0]
    frames = stream.frames
    if not frames:
        # Some containers (Matroska, WebM) declare no count: the packets say it without decoding.
        frames = sum(1 for packet in container.demux(stream) if packet.size)
        container.seek(0)
    rate = stream.average_rate or stream.guessed_rate
    return Header(int(frames), stream.height, stream.width, float(rate) if rate else None)


def read_header(path: str | Path) -> Header:
    """The clip's declared frame count, size and frame rate; VideoError when it is no video or declares no frames.
    What train's start-up check affords (decoding every clip takes long) and what token counts depend on."""
    with _open(path) as container:
        header = _header(container)
    if header.frames == 0:
        raise VideoError("holds no video frames")
    if not (header.height and header.width):  # seen on an mp4 cut short behind its index: no frame to size it by
        raise VideoError(f"declares {header.frames} frames but no frame size (a truncated file?)")
    return header


def video_problem(path: str | Path) -> str | None:
    """Why `path` cannot be used as a clip, or None: every frame is decoded (a truncated file opens fine and fails, or
    ends early, only when its frames are read) and their count must be the declared one."""
    path = Path(path)
    if path.is_dir():
        return "is a directory, not a video file"
    if not path.is_file():
        return "not found"
    try:
        decoded_frames(path)
    except VideoError as exc:
        return str(exc)
    return None


def decoded_frames(path: str | Path) -> int:
    """How many frames of the clip decode, all of them checked; VideoError when that is not the declared count."""
    av = _av()
    with _open(path) as container:
        header = _header(container)
        decoded = 0
        try:
            for _ in container.decode(video=0):
                decoded += 1
        except av.FFmpegError as exc:
            raise VideoError(f"cannot be decoded after frame {decoded} ({type(exc).__name__}: {exc})") from None
    if decoded != header.frames:
        raise VideoError(f"declares {header.frames} frames but {decoded} decode (a truncated file?)")
    if decoded == 0:
        raise VideoError("holds no video frames")
    return decoded


def frame_indices(total: int, count: int) -> list[int]:
    """`count` frame indices spread evenly over a clip of `total` frames, its first and last included."""
    return np.linspace(0, total - 1, count).round().astype(int).tolist()


@dataclass
class Clip:
    """A clip's sampled frames (frames, height, width, 3) in RGB and how they were drawn from it."""

    frames: np.ndarray
    header: Header
    indices: list[int]

    def metadata(self):
        """The frames' `VideoMetadata`, from which the processor takes the sampled frame rate."""
        from transformers.video_utils import VideoMetadata

        return VideoMetadata(
            total_num_frames=self.header.frames,
            fps=self.header.fps,
            height=self.header.height,
            width=self.header.width,
            duration=self.header.frames / self.header.fps if self.header.fps else None,
            video_backend="pyav",
            frames_indices=self.indices,
        )


def read_clip(path: str | Path, count: int) -> Clip:
    """`count` frames sampled uniformly over the clip at `path` (`frame_indices`), decoded up to the last one."""
    av = _av()
    with _open(path) as container:
        header = _header(container)
        if header.frames == 0:
            raise VideoError("holds no video frames")
        indices = frame_indices(header.frames, count)
        wanted = set(indices)
        kept: dict[int, np.ndarray] = {}
        decoded = 0
        try:
            for frame in container.decode(video=0):
                if decoded in wanted:
                    kept[decoded] = frame.to_ndarray(format="rgb24")
                decoded += 1
                if decoded > indices[-1]:
                    break
        except av.FFmpegError as exc:
            raise VideoError(f"cannot be decoded after frame {decoded} ({type(exc).__name__}: {exc})") from None
    if len(kept) != len(wanted):
        raise VideoError(f"declares {header.frames} frames but {decoded} decode (a truncated file?)")
    return Clip(np.stack([kept[i] for i in indices]), header, indices)


def _processed(clip: Clip, processor):
    # The processor's own `__call__` on its video token alone: the clip's inputs and its expanded tokens.
    return processor(
        text=[processor.video_token],
        videos=[clip.frames],
        video_metadata=[clip.metadata()],
        do_sample_frames=False,  # sampled here already, over the whole clip
        return_tensors="pt",
    )


def clip_inputs(clip: Clip, processor) -> dict:
    """The clip as the model's inputs, made by the processor's own `__call__` on its video token: pixel_values_videos
    and the family's other video inputs (Qwen2.5-VL's `video_grid_thw`, `second_per_grid_ts`), each for one clip, and
    `video_size`, the (frames, height, width) its token count depends on."""
    out = _processed(clip, processor)
    text_keys = {"input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"}
    inputs = {key: value for key, value in out.items() if key not in text_keys}
    return inputs | {"video_size": (len(clip.frames), clip.header.height, clip.header.width)}


def video_tokens(processor, sizes: list[tuple[int, int, int]]) -> list[int]:
    """Video tokens the processor expands each clip of (frames, height, width) into, counted in what its `__call__`
    makes of a blank clip of that size. Not `_get_num_multimodal_tokens`: in transformers 5.24 it ignores Qwen2-VL's
    `cap_pixels_per_frame` (a per-frame share of a whole-video pixel budget), which `__call__` applies, so a processor
    with the cap on would get more video tokens than the clip has features."""
    token_id = processor.tokenizer.convert_tokens_to_ids(processor.video_token)
    counts = []
    for frames, height, width in sizes:
        header = Header(frames=frames, height=height, width=width, fps=1.0)
        blank = Clip(np.zeros((frames, height, width, 3), np.uint8), header, list(range(frames)))
        counts.append(int((_processed(blank, processor)["input_ids"] == token_id).sum()))
    return counts
