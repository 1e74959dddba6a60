"""`qllava chat`: talk to a model about images, one question or an interactive multi-turn session."""

from __future__ import annotations

import shlex
from pathlib import Path

from transformers import TextStreamer

from qllava.data.dataset import IMAGE_TAG, encoder_from_recipe
from qllava.data.images import image_problem
from qllava.errors import QllavaError
from qllava.generate import Sampling, generate_batch

HELP = (
    "commands: /image PATH [PATH ...] (new conversation about other images; quote a path with spaces), /reset "
    "(forget the conversation, keep the images), /exit"
)


def check_images(paths: list[Path]) -> list[Path]:
    """`paths` when each is an image that decodes; otherwise a QllavaError saying what the first bad one is."""
    for path in paths:
        problem = image_problem(path)
        if problem:
            raise QllavaError(f"image `{path}` {problem}")
    return [Path(path) for path in paths]


class _ReplyStreamer(TextStreamer):
    """Streams the reply as `generate_batch` returns it: without the space that separates it from the prompt."""

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.started = False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        super().on_finalized_text(text, stream_end)


class ChatSession:
    """One conversation about a set of images, none or several: the first question places them with its `<image>`
    tags, one per image, or, without tags, they go before it (where LLaVA puts a lone image)."""

    def __init__(self, model, processor, recipe, sampling: Sampling, images: list[Path] = ()) -> None:
        self.model, self.processor, self.recipe, self.sampling = model, processor, recipe, sampling
        self.encoder = encoder_from_recipe(recipe, processor, model.config)
        self.images = check_images(list(images))
        self.turns: list[tuple[str, str]] = []

    def check_question(self, question: str) -> None:
        """A QllavaError when `question`'s `<image>` tags cannot place the images: the first question places them
        all (one tag each, or none), later ones find them placed."""
        tags = question.count(IMAGE_TAG)
        if self.turns and tags:
            raise QllavaError(
                "the images are placed by the conversation's first question; ask without `<image>`, or start a new "
                "conversation with /image or /reset"
            )
        if tags and tags != len(self.images):
            raise QllavaError(
                f"the question has {tags} `<image>` tag(s) but the conversation is about {len(self.images)} "
                "image(s): put one `<image>` where each image belongs, or none to have them placed before it"
            )

    def ask(self, question: str) -> str:
        """Answer `question` given the conversation so far; tokens are printed as they are generated."""
        self.check_question(question)
        turns = [*self.turns, ("user", question)]
        streamer = _ReplyStreamer(self.processor.tokenizer)
        answer = generate_batch(
            self.model, self.processor, self.encoder, self.recipe, [(self.images, turns)], self.sampling, streamer
        )[0]
        self.turns = [*turns, ("assistant", answer)]
        return answer

    def reset(self, images: list[Path] | None = None) -> None:
        """Forget the conversation; talk about `images` from now on, or about the same images without them."""
        self.images = check_images(images) if images is not None else self.images
        self.turns = []

    def about(self) -> str:
        return f"about {', '.join(map(str, self.images))}" if self.images else "without an image"


def _split_paths(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as exc:  # an unclosed quote
        raise QllavaError(f"cannot read the paths: {exc}") from None


def repl(session: ChatSession) -> None:
    """Read questions and commands from stdin until /exit or end of input; answers stream to stdout."""
    print(f"(conversation {session.about()}) {HELP}")
    while True:
        try:
            line = input("user> ").strip()
        except EOFError:
            print()
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            session.reset()
            print(f"(conversation cleared; the next question starts a new one {session.about()})")
        elif line == "/image":
            print(f"(/image needs one or more paths) {HELP}")
        elif line.startswith("/image "):
            try:
                session.reset([Path(p) for p in _split_paths(line.removeprefix("/image"))])
                print(f"(new conversation {session.about()})")
            except QllavaError as exc:  # the session stays as it was
                print(f"(error: {exc}; still {session.about()})")
        elif line.startswith("/"):
            print(f"(unknown command) {HELP}")
        else:
            try:
                session.check_question(line)
            except QllavaError as exc:  # nothing was asked: the conversation goes on as it was
                print(f"(error: {exc})")
                continue
            print("assistant> ", end="", flush=True)
            session.ask(line)
