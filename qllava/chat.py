"""`qllava chat`: talk to a model about an image, one question or an interactive multi-turn session."""

from __future__ import annotations

from pathlib import Path

from transformers import TextStreamer

from qllava.data.dataset import encoder_from_recipe
from qllava.data.images import image_problem
from qllava.errors import QllavaError
from qllava.generate import Sampling, generate_batch

HELP = (
    "commands: /image PATH (new conversation about another image), /reset (forget the conversation, keep the "
    "image), /exit"
)


def check_image(path: Path | None) -> Path | None:
    """`path` when it is an image that decodes (or None); otherwise a QllavaError saying what it is."""
    if path is None:
        return None
    problem = image_problem(path)
    if problem:
        raise QllavaError(f"image `{path}` {problem}")
    return Path(path)


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
    """One conversation about at most one image (LLaVA places it in the first user turn)."""

    def __init__(self, model, processor, recipe, sampling: Sampling, image: Path | None = None) -> None:
        self.model, self.processor, self.recipe, self.sampling = model, processor, recipe, sampling
        self.encoder = encoder_from_recipe(recipe, processor, model.config)
        self.image = check_image(image)
        self.turns: list[tuple[str, str]] = []

    def ask(self, question: str) -> str:
        """Answer `question` given the conversation so far; tokens are printed as they are generated."""
        turns = [*self.turns, ("user", question)]
        streamer = _ReplyStreamer(self.processor.tokenizer)
        answer = generate_batch(
            self.model, self.processor, self.encoder, self.recipe, [(self.image, turns)], self.sampling, streamer
        )[0]
        self.turns = [*turns, ("assistant", answer)]
        return answer

    def reset(self, image: Path | None = None) -> None:
        """Forget the conversation; talk about `image` from now on, or about the same image without one."""
        self.image = check_image(image) if image is not None else self.image
        self.turns = []

    def about(self) -> str:
        return f"about {self.image}" if self.image else "without an image"


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
        elif line.startswith("/image "):  # without a PATH: the help below
            try:
                session.reset(Path(line.removeprefix("/image").strip()))
                print(f"(new conversation {session.about()})")
            except QllavaError as exc:  # the session stays as it was
                print(f"(error: {exc}; still {session.about()})")
        elif line.startswith("/"):
            print(f"(unknown command) {HELP}")
        else:
            print("assistant> ", end="", flush=True)
            session.ask(line)
