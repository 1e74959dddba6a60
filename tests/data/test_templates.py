"""Every template renders a multi-turn sample to a recorded string with recorded loss spans."""

import pytest
from PIL import Image
from transformers import AutoConfig, LlavaProcessor

from qllava.data.dataset import Encoder, num_image_tokens, parse_sample
from qllava.data.templates import VICUNA_SYSTEM, chat_template, render
from qllava.model.load import load_processor

TURNS = [("user", "<image>\nWhat is it?"), ("assistant", "A cat."), ("user", "Color?"), ("assistant", "Black.")]

# Recorded renderings (LLaVA conversation.py conventions); the [[ ]] mark the spans that carry loss.
GOLDEN = {
    "vicuna_v1": f"{VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT:[[ A cat.</s>]]USER: Color? ASSISTANT:"
    "[[ Black.</s>]]",
    "llava_llama_2": "[INST] <<SYS>>\nYou are a helpful language and vision assistant. You are able to understand "
    "the visual content that the user provides, and assist the user with a variety of tasks using "
    "natural language.\n<</SYS>>\n\n<image>\nWhat is it? [/INST][[ A cat. </s>]]<s>[INST] Color? "
    "[/INST][[ Black. </s>]]",
    # LLaVA's conv_mistral_instruct joins rounds with sep "" (llava_llama_2's sep is "<s>").
    "mistral_instruct": "[INST] <image>\nWhat is it? [/INST][[ A cat. </s>]][INST] Color? [/INST][[ Black. </s>]]",
    "chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is it?"
    "<|im_end|>\n<|im_start|>assistant\n[[A cat.<|im_end|>]]\n<|im_start|>user\nColor?<|im_end|>\n"
    "<|im_start|>assistant\n[[Black.<|im_end|>]]\n",
    # Gemma 3's chat template (no system turn of its own; <bos> comes from the tokenizer).
    "gemma": "<start_of_turn>user\n<image>\nWhat is it?<end_of_turn>\n<start_of_turn>model\n[[A cat.<end_of_turn>]]\n"
    "<start_of_turn>user\nColor?<end_of_turn>\n<start_of_turn>model\n[[Black.<end_of_turn>]]\n",
}


def marked(rendered) -> str:
    out, last = [], 0
    for start, end in rendered.targets:
        out += [rendered.text[last:start], "[[", rendered.text[start:end], "]]"]
        last = end
    return "".join(out + [rendered.text[last:]])


@pytest.mark.parametrize("template", sorted(GOLDEN))
def test_template_renders_recorded_string_and_spans(template):
    assert marked(render(TURNS, template)) == GOLDEN[template]


def test_plain_template_is_image_then_caption():
    rendered = render([("user", "<image>\nignored"), ("assistant", "a cat on a mat")], "plain")
    assert marked(rendered) == "<image>[[a cat on a mat\n]]"


def test_tokenizer_template_spans_from_its_own_chat_template(tiny_base):
    tokenizer = load_processor(tiny_base).tokenizer
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    rendered = render(TURNS, "tokenizer", tokenizer=tokenizer)
    assert marked(rendered) == (
        "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
        "[[A cat.<|im_end|>]]\n<|im_start|>user\nColor?<|im_end|>\n<|im_start|>assistant\n"
        "[[Black.<|im_end|>]]\n"
    )


def test_generation_prompt_ends_where_the_reply_begins():
    assert render(TURNS[:1], "vicuna_v1", add_generation_prompt=True).text.endswith("What is it? ASSISTANT:")
    assert render(TURNS[:1], "chatml", add_generation_prompt=True).text.endswith("<|im_start|>assistant\n")


# Three rounds in haotian-liu/LLaVA's conv_mistral_instruct (llava/conversation.py, SeparatorStyle.LLAMA_2 with
# sep "", sep2 "</s>", system ""): each user turn is "[INST] {text} [/INST]" preceded by sep, each reply
# " {text} </s>", an empty system adds no <<SYS>> block. Only llava_llama_2 (sep "<s>") opens later rounds
# with <s>. Mistral's own v1 tokenizer (mistral-common) agrees: one BOS for the whole chat.
MISTRAL_THREE_ROUNDS = (
    "[INST] <image>\nWhat is it? [/INST] A cat. </s>[INST] Color? [/INST] Black. </s>[INST] Size? [/INST]"
)


def test_mistral_instruct_opens_no_later_round_with_bos(tiny_base):
    """Training text, generation prompt, exported chat template and token ids all keep one BOS."""
    turns = [*TURNS, ("user", "Size?")]
    assert render(turns, "mistral_instruct", add_generation_prompt=True).text == MISTRAL_THREE_ROUNDS
    processor = load_processor(tiny_base)
    processor.chat_template = chat_template("mistral_instruct")
    messages = [{"role": role, "content": text} for role, text in turns]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == MISTRAL_THREE_ROUNDS

    config = AutoConfig.from_pretrained(tiny_base)
    tokenizer = processor.tokenizer
    sample = parse_sample(
        {
            "id": "m",
            "image": "a.png",
            "conversations": [
                {"from": "human" if role == "user" else "gpt", "value": text}
                for role, text in [*turns, ("assistant", "Small.")]
            ],
        },
        0,
        "mem",
    )
    bos_counts = {}
    for template in ("mistral_instruct", "llava_llama_2"):
        encoder = Encoder(tokenizer, template, image_token_id=config.image_token_id, image_tokens=4, max_length=512)
        item = encoder.encode(sample)
        bos_counts[template] = item["input_ids"].count(tokenizer.bos_token_id)
        assert encoder.prompt_ids(turns, images=1).count(tokenizer.bos_token_id) == bos_counts[template]
        trained = [t for t, lab in zip(item["input_ids"], item["labels"]) if lab != -100]
        assert tokenizer.decode(trained) == " A cat. </s> Black. </s> Small. </s>"
    assert bos_counts == {"mistral_instruct": 1, "llava_llama_2": 3}


@pytest.fixture()
def encoder(tiny_base):
    processor = load_processor(tiny_base)
    config = AutoConfig.from_pretrained(tiny_base)
    return Encoder(
        processor.tokenizer,
        "vicuna_v1",
        image_token_id=config.image_token_id,
        image_tokens=num_image_tokens(config),
        max_length=512,
    )


def test_labels_are_exactly_the_replies_and_end_of_turn(encoder):
    sample = parse_sample(
        {
            "id": "x",
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "What is it?\n<image>"},
                {"from": "gpt", "value": "A cat."},
                {"from": "human", "value": "Color?"},
                {"from": "gpt", "value": "Black."},
            ],
        },
        0,
        "mem",
    )
    item = encoder.encode(sample)
    trained = [t for t, lab in zip(item["input_ids"], item["labels"]) if lab != -100]
    assert encoder.tokenizer.decode(trained) == " A cat.</s> Black.</s>"
    assert trained.count(encoder.tokenizer.eos_token_id) == 2


def test_image_moves_to_first_turn_and_expands_like_llava_processor(tiny_base, encoder):
    sample = parse_sample(
        {
            "id": "x",
            "image": "a.png",
            "conversations": [{"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A cat."}],
        },
        0,
        "mem",
    )
    assert sample.turns[0][1] == "<image>\nWhat is it?"
    config = AutoConfig.from_pretrained(tiny_base)
    item = encoder.encode(sample)
    ours = item["input_ids"].count(config.image_token_id)
    assert ours == num_image_tokens(config) == 16
    processor = LlavaProcessor.from_pretrained(tiny_base)
    theirs = processor(text="<image>\nWhat is it?", images=Image.new("RGB", (32, 32)))["input_ids"][0]
    assert theirs.count(config.image_token_id) == ours


def test_clip_and_siglip_token_counts():
    clip = AutoConfig.for_model(
        "llava", vision_config={"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14}
    )
    assert num_image_tokens(clip) == 576
    clip.vision_feature_select_strategy = "full"
    assert num_image_tokens(clip) == 577
    siglip = AutoConfig.for_model(
        "llava",
        vision_config={"model_type": "siglip_vision_model", "image_size": 384, "patch_size": 14},
        vision_feature_select_strategy="full",
    )
    assert num_image_tokens(siglip) == 729


def test_truncation_never_cuts_the_image_block(encoder):
    sample = parse_sample(
        {
            "id": "long",
            "image": "a.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "word " * 200}],
        },
        0,
        "mem",
    )
    encoder.max_length = 60
    item = encoder.encode(sample)
    assert item["truncated"] and len(item["input_ids"]) == 60
    assert item["input_ids"].count(encoder.image_token_id) == 16
    encoder.max_length = 20
    with pytest.raises(Exception, match="cuts the image tokens of sample 'long'"):
        encoder.encode(sample)


def test_sample_without_image_keeps_text_only(encoder):
    sample = parse_sample(
        {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}, 0, "mem"
    )
    item = encoder.encode(sample)
    assert encoder.image_token_id not in item["input_ids"]
    assert sample.images == []


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_llama_2", "mistral_instruct", "chatml", "gemma", "plain"])
@pytest.mark.parametrize("system", [None, "Answer in one word."])
def test_exported_chat_template_reproduces_the_training_prompt(tiny_base, template, system):
    """The Jinja written into merged exports renders through transformers exactly as `render` does."""
    processor = load_processor(tiny_base)
    processor.chat_template = chat_template(template, system)
    three_rounds = [*TURNS, ("user", "Size?"), ("assistant", "Small.")]
    conversations = [TURNS[:2], TURNS, TURNS[:3], three_rounds, three_rounds[:5]]
    if template == "plain":
        conversations = [TURNS[:2], TURNS[:1]]
    for turns in conversations:
        generation = len(turns) % 2 == 1
        expected = render(turns, template, system=system, add_generation_prompt=generation).text
        messages = [
            {
                "role": role,
                "content": [{"type": "image"}, {"type": "text", "text": text.removeprefix("<image>\n")}]
                if "<image>" in text
                else [{"type": "text", "text": text}],
            }
            for role, text in turns
        ]
        assert processor.apply_chat_template(messages, add_generation_prompt=generation) == expected
        # String content with the tag inline, and a system message, as other tools send them.
        plain = [{"role": role, "content": text} for role, text in turns]
        assert processor.apply_chat_template(plain, add_generation_prompt=generation) == expected
        with_system = [{"role": "system", "content": "Be kind."}, *plain]
        assert (
            processor.apply_chat_template(with_system, add_generation_prompt=generation)
            == render(turns, template, system="Be kind.", add_generation_prompt=generation).text
        )


def test_a_chat_template_written_by_qllava_names_its_template():
    from qllava.data.templates import template_named_by

    for name in ("vicuna_v1", "llava_llama_2", "mistral_instruct", "chatml", "gemma", "plain"):
        assert template_named_by(chat_template(name)) == name
    assert template_named_by(chat_template("chatml", "You are terse.")) is None  # another system prompt
    assert template_named_by("{{ messages }}") is None and template_named_by(None) is None


def test_gemma_system_prompt_opens_the_first_user_turn():
    rendered = render(TURNS[:1], "gemma", system="Be brief.", add_generation_prompt=True)
    expected = "<start_of_turn>user\nBe brief.\n\n<image>\nWhat is it?<end_of_turn>\n<start_of_turn>model\n"
    assert rendered.text == expected
