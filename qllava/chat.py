"""`qllava chat`: talk to a model about an image, one question or an interactive multi-turn session."""

from __future__ import annotations

from pathlib import Path

from transformers import TextStreamer

from qllava.data.dataset import encoder_from_recipe
from qllava.errors import QllavaError
from qllava.generate import Sampling, generate_batch

HELP = "commands: /image PATH (new conversation about another image), /reset (forget the conversation), /exit"


def _check_image(path: Path | None) -> Path | None:
    if path is not None and not Path(path).is_file():
        raise QllavaError(f"image `{path}` not found")
    return Path(path) if path is not None else None


class ChatSession:
    """One conversation about at most one image (LLaVA places it in the first user turn)."""

    def __init__(self, model, processor, recipe, sampling: Sampling, image: Path | None = None) -> None:
        self.model, self.processor, self.recipe, self.sampling = model, processor, recipe, sampling
        self.encoder = encoder_from_recipe(recipe, processor, model.config)
        self.image = _check_image(image)
        self.turns: list[tuple[str, str]] = []

    def ask(self, question: str) -> str:
        """Answer `question` given the conversation so far; tokens are printed as they are generated."""
        turns = [*self.turns, ("user", question)]
        streamer = TextStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        answer = generate_batch(
            self.model, self.processor, self.encoder, self.recipe, [(self.image, turns)], self.sampling, streamer
        )[0]
        self.turns = [*turns, ("assistant", answer)]
        return answer

    def reset(self, image: Path | None = None) -> None:
        self.image = _check_image(image) if image is not None else self.image
        self.turns = []


def repl(session: ChatSession) -> None:
    """Read questions and commands from stdin until /exit or end of input; answers stream to stdout."""
    print(f"image: {session.image or 'none'}; {HELP}")
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
            print("(conversation cleared)")
        elif line.startswith("/image"):
            try:
                session.reset(Path(line.removeprefix("/image").strip()))
                print(f"(new conversation about {session.image})")
            except QllavaError as exc:
                print(f"(error: {exc})")
        elif line.startswith("/"):
            print(f"(unknown command) {HELP}")
        else:
            print("assistant>", end="", flush=True)
            session.ask(line)
