"""Conversation templates: a conversation -> prompt text plus the character spans that carry loss.

Loss masks come from spans of the rendered text (each assistant reply and its end-of-turn token),
never from per-round token-length arithmetic, which silently masks whole samples when a tokenizer
merges across a boundary. Renderings follow haotian-liu/LLaVA's `conversation.py`. A reply span
starts with the space that separates it from the prompt: SentencePiece tokenizers merge that space
into the reply's first token, and generation prompts end just before it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from qllava.errors import QllavaError

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using "
    "natural language."
)
CHATML_SYSTEM = "You are a helpful assistant."
TEMPLATES = ("vicuna_v1", "llava_llama_2", "mistral_instruct", "chatml", "gemma", "plain", "tokenizer")
# Fixed text of the templates; the tiny demo tokenizer is trained on it so prompts stay short.
TEMPLATE_TEXTS = (
    VICUNA_SYSTEM,
    LLAMA_2_SYSTEM,
    CHATML_SYSTEM,
    "USER: ASSISTANT:",
    "[INST] [/INST]",
    "<<SYS>>\n\n<</SYS>>\n\n",
    "system\n user\n assistant\n",
)


@dataclass
class Rendered:
    text: str
    targets: list[tuple[int, int]]
    """[start, end) character spans of `text` whose tokens carry loss."""


class _Builder:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.targets: list[tuple[int, int]] = []
        self.length = 0

    def add(self, text: str, target: bool = False) -> None:
        if target and text:
            self.targets.append((self.length, self.length + len(text)))
        self.parts.append(text)
        self.length += len(text)

    def done(self) -> Rendered:
        return Rendered("".join(self.parts), self.targets)


def _pairs(turns: list[tuple[str, str]]):
    """Yield (user, assistant-or-None) pairs; the roles must alternate starting with the user."""
    for i, (role, _) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise QllavaError(f"turn {i} is from `{role}`, expected `{expected}` (turns must alternate, user first)")
    for i in range(0, len(turns), 2):
        yield turns[i][1], (turns[i + 1][1] if i + 1 < len(turns) else None)


def _vicuna(turns, system, b: _Builder) -> None:
    b.add((VICUNA_SYSTEM if system is None else system) + " ")
    for user, answer in _pairs(turns):
        b.add(f"USER: {user} ASSISTANT:")
        if answer is not None:
            b.add(f" {answer}</s>", target=True)


def _llama_2(default_system: str, round_sep: str):
    """LLaVA's LLAMA_2 separator style; `round_sep` opens every round after the first (its `sep`)."""

    def render(turns, system, b: _Builder) -> None:
        system = default_system if system is None else system
        for i, (user, answer) in enumerate(_pairs(turns)):
            if i == 0 and system:
                user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
            b.add(("" if i == 0 else round_sep) + f"[INST] {user} [/INST]")
            if answer is not None:
                b.add(f" {answer} </s>", target=True)

    return render


def _chatml(turns, system, b: _Builder) -> None:
    b.add(f"<|im_start|>system\n{CHATML_SYSTEM if system is None else system}<|im_end|>\n")
    for user, answer in _pairs(turns):
        b.add(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
        if answer is not None:
            b.add(f"{answer}<|im_end|>", target=True)
            b.add("\n")


def _gemma(turns, system, b: _Builder) -> None:
    # Gemma 3's chat format: no system role (a system prompt opens the first user turn), the reply's role is
    # `model`, and the tokenizer adds <bos>.
    for i, (user, answer) in enumerate(_pairs(turns)):
        if i == 0 and system:
            user = f"{system}\n\n{user}"
        b.add(f"<start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n")
        if answer is not None:
            b.add(f"{answer}<end_of_turn>", target=True)
            b.add("\n")


def _plain(turns, system, b: _Builder) -> None:
    # Stage-1 alignment: the user text is replaced by the image; the caption is the target.
    pairs = list(_pairs(turns))
    if len(pairs) != 1:
        raise QllavaError("the `plain` template takes exactly one user turn and one reply (image -> caption)")
    b.add("<image>")
    if pairs[0][1] is not None:
        b.add(f"{pairs[0][1]}\n", target=True)


_RENDERERS = {
    "vicuna_v1": _vicuna,
    # LLaVA's conv_llava_llama_2 repeats <s> before each later round; conv_mistral_instruct does not
    # (sep ""), as Mistral's own format keeps one BOS for the whole chat.
    "llava_llama_2": _llama_2(LLAMA_2_SYSTEM, "<s>"),
    "mistral_instruct": _llama_2("", ""),
    "chatml": _chatml,
    "gemma": _gemma,
    "plain": _plain,
}


def _tokenizer_template(turns, system, tokenizer, add_generation_prompt: bool) -> Rendered:
    """Use the tokenizer's chat_template; target spans come from rendering growing prefixes."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise QllavaError("template `tokenizer` needs a tokenizer with a chat_template; pick another data.template")
    messages = [{"role": "system", "content": system}] if system else []

    def apply(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    targets, renders = [], []
    for role, text in turns:
        if role == "assistant":
            prefix = apply(messages, True)
            messages.append({"role": role, "content": text})
            full = apply(messages, False)
            if not full.startswith(prefix):
                raise QllavaError(
                    "the tokenizer's chat_template does not render conversations prefix by prefix, "
                    "so reply spans cannot be found; use one of the built-in templates"
                )
            targets.append((len(prefix), len(full.rstrip())))
            renders.append(full)
        else:
            messages.append({"role": role, "content": text})
    text = apply(messages, add_generation_prompt)
    if not all(text.startswith(full) for full in renders):
        raise QllavaError(
            "the tokenizer's chat_template changes earlier turns when later ones are added, "
            "so reply spans cannot be found; use one of the built-in templates"
        )
    return Rendered(text, targets)


def render(
    turns: list[tuple[str, str]],
    template: str,
    *,
    system: str | None = None,
    tokenizer=None,
    add_generation_prompt: bool = False,
) -> Rendered:
    """Render (role, text) turns, roles `user` / `assistant`, alternating from the user.

    With `add_generation_prompt` the turns end with a user turn and the text ends where the
    assistant's reply would begin (for generation).
    """
    if template not in TEMPLATES:
        raise QllavaError(f"unknown template `{template}`; choose one of {', '.join(TEMPLATES)}")
    if add_generation_prompt != (len(turns) % 2 == 1):
        raise QllavaError("a prompt for generation ends with a user turn; a training sample with a reply")
    if template == "tokenizer":
        return _tokenizer_template(turns, system, tokenizer, add_generation_prompt)
    b = _Builder()
    _RENDERERS[template](turns, system, b)
    return b.done()


def end_of_turn(template: str, tokenizer) -> list[int]:
    """Token ids that end an assistant reply, for stopping generation."""
    ids = [tokenizer.eos_token_id]
    for name, token in (("chatml", "<|im_end|>"), ("gemma", "<end_of_turn>")):
        if template == name or (template == "tokenizer" and token in tokenizer.get_vocab()):
            ids.append(tokenizer.convert_tokens_to_ids(token))
    return [i for i in ids if i is not None]


# Jinja versions of the built-in templates, written into merged exports so that
# `processor.apply_chat_template` reproduces the training prompt outside qllava. Message content
# may be a string (with `<image>` inline) or a list of {"type": "image"} / {"type": "text"} parts;
# images go first in the turn, as LLaVA moves them. tests/data/test_templates.py holds each one
# equal to `render`.
_JINJA_CONTENT = (
    "{%- macro content(m) -%}"
    "{%- if m['content'] is string -%}{{ m['content'] }}"
    "{%- else -%}"
    "{%- for part in m['content'] if part['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{{ m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set ns = namespace(system=default_system, turn=0) -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}{%- set ns.system = content(messages[0]) -%}{%- endif -%}"
)


def _llama_2_jinja(round_sep: str) -> str:
    opener = f"('' if ns.turn == 0 else '{round_sep}') ~ " if round_sep else ""
    return (
        "{%- for m in messages if m['role'] != 'system' -%}"
        "{%- if m['role'] == 'user' -%}"
        "{%- set text = content(m) -%}"
        "{%- if ns.turn == 0 and ns.system -%}"
        "{%- set text = '<<SYS>>\\n' ~ ns.system ~ '\\n<</SYS>>\\n\\n' ~ text -%}{%- endif -%}"
        f"{{{{ {opener}'[INST] ' ~ text ~ ' [/INST]' }}}}"
        "{%- set ns.turn = ns.turn + 1 -%}"
        "{%- else -%}{{ ' ' ~ content(m) ~ ' </s>' }}{%- endif -%}"
        "{%- endfor -%}"
    )


_JINJA_BODIES = {
    "vicuna_v1": (
        "{{ ns.system ~ ' ' }}"
        "{%- for m in messages if m['role'] != 'system' -%}"
        "{%- if m['role'] == 'user' -%}{{ 'USER: ' ~ content(m) ~ ' ASSISTANT:' }}"
        "{%- else -%}{{ ' ' ~ content(m) ~ '</s>' }}{%- endif -%}"
        "{%- endfor -%}"
    ),
    "llava_llama_2": _llama_2_jinja("<s>"),
    "mistral_instruct": _llama_2_jinja(""),
    "chatml": (
        "{{ '<|im_start|>system\\n' ~ ns.system ~ '<|im_end|>\\n' }}"
        "{%- for m in messages if m['role'] != 'system' -%}"
        "{%- if m['role'] == 'user' -%}"
        "{{ '<|im_start|>user\\n' ~ content(m) ~ '<|im_end|>\\n<|im_start|>assistant\\n' }}"
        "{%- else -%}{{ content(m) ~ '<|im_end|>\\n' }}{%- endif -%}"
        "{%- endfor -%}"
    ),
    "gemma": (
        "{%- for m in messages if m['role'] != 'system' -%}"
        "{%- if m['role'] == 'user' -%}"
        "{%- set text = content(m) -%}"
        "{%- if ns.turn == 0 and ns.system -%}{%- set text = ns.system ~ '\\n\\n' ~ text -%}{%- endif -%}"
        "{{ '<start_of_turn>user\\n' ~ text ~ '<end_of_turn>\\n<start_of_turn>model\\n' }}"
        "{%- set ns.turn = ns.turn + 1 -%}"
        "{%- else -%}{{ content(m) ~ '<end_of_turn>\\n' }}{%- endif -%}"
        "{%- endfor -%}"
    ),
    "plain": (
        "{{ '<image>' }}{%- for m in messages if m['role'] == 'assistant' -%}{{ content(m) ~ '\\n' }}{%- endfor -%}"
    ),
}
_DEFAULT_SYSTEMS = {
    "vicuna_v1": VICUNA_SYSTEM,
    "llava_llama_2": LLAMA_2_SYSTEM,
    "mistral_instruct": "",
    "chatml": CHATML_SYSTEM,
    "gemma": "",
    "plain": "",
}


def chat_template(template: str, system: str | None = None, image: str = "<image>") -> str | None:
    """The Jinja chat template equal to `render` for a built-in template (None for `tokenizer`); an image part of a
    message becomes `image` (the model's processor's image text, `Family.image_prompt`) and a newline."""
    if template == "tokenizer":
        return None
    if template not in _JINJA_BODIES:
        raise QllavaError(f"unknown template `{template}`; choose one of {', '.join(TEMPLATES)}")
    default = _DEFAULT_SYSTEMS[template] if system is None else system
    content = _JINJA_CONTENT
    if image != "<image>":
        content = content.replace("'<image>\\n'", json.dumps(f"{image}\n"))
    return f"{{%- set default_system = {json.dumps(default)} -%}}" + content + _JINJA_BODIES[template]


def template_named_by(jinja: str | None) -> str | None:
    """The qllava template whose chat template (default system prompt) is exactly `jinja`, if any.

    `qllava compose` and `qllava merge` write these, so a base that carries one says which
    template it was built or trained for.
    """
    if not jinja:
        return None
    return next((name for name in TEMPLATES if name != "tokenizer" and chat_template(name, None) == jinja), None)
