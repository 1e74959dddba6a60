"""`qllava answer`, `chat` and `score` on the trained tiny model: batching, resume, the REPL, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import bitsandbytes as bnb
import pytest
import torch
from peft import set_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file, save_file

from qllava.errors import QllavaError
from qllava.generate import load_for_inference
from qllava.model.load import load_for_training, load_processor
from tests.conftest import make_recipe
from tests.test_cli import qllava_here

QUESTIONS = [
    "What color is the shape?",
    "Describe the image.",
    "What color is the shape? Answer with one word, please.",
    "red blue green",
]


def write_questions(path, count: int, with_images: bool = True) -> list[dict]:
    """Questions of different lengths, some text-only, so left padding differs across each batch."""
    rows = []
    for i in range(count):
        row = {"question_id": i, "text": QUESTIONS[i % len(QUESTIONS)]}
        if with_images and i % 5 != 4:
            row["image"] = f"{i % 12}.png"
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def read_answers(path) -> dict:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    ids = [line["question_id"] for line in lines]
    assert len(ids) == len(set(ids)), "duplicated answers"
    return {line["question_id"]: line["text"] for line in lines}


def answer(base, adapter, data, questions, out, *extra):
    args = [base, questions, "--adapter", adapter, "--image-folder", data / "images", "--out", out]
    return qllava_here("answer", *args, "--max-new-tokens", "12", *extra)


TWO_IMAGES = "The first image: <image>. The second: <image>. What colors are the shapes?"


def check_answer_and_chat(base, adapter, image_folder, tmp_path) -> None:
    """`qllava answer` and `qllava chat --prompt` through the CLI on images 0-2.png, two questions about two images
    each (placed by their tags, and before the question without tags) and a text-only question: one answer per
    question, and chat's answers, each alone, are the ones `answer` wrote in one left-padded batch."""
    rows = [{"question_id": i, "text": "What color is the shape?", "image": f"{i}.png"} for i in range(3)]
    rows.append({"question_id": 3, "text": "Say a color."})
    rows.append({"question_id": 4, "text": TWO_IMAGES, "image": ["1.png", "2.png"]})
    rows.append({"question_id": 5, "text": "What colors are the shapes?", "image": ["2.png", "0.png"]})
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--adapter", adapter, "--max-new-tokens", "8"]
    args = [tmp_path / "q.jsonl", *common, "--image-folder", image_folder, "--out", tmp_path / "a.jsonl"]
    result = qllava_here("answer", base, *args)
    assert result.exit_code == 0, result.output
    answers = read_answers(tmp_path / "a.jsonl")
    assert sorted(answers) == list(range(6))
    for row in (rows[0], rows[4], rows[5]):
        images = [row["image"]] if isinstance(row["image"], str) else row["image"]
        flags = [arg for name in images for arg in ("--image", image_folder / name)]
        chat = qllava_here("chat", base, *common, *flags, "--temperature", "0", "--prompt", row["text"])
        assert chat.exit_code == 0, chat.output
        assert chat.stdout == answers[row["question_id"]] + "\n", row


@pytest.fixture(scope="module")
def batch_one_answers(trained_adapter, tmp_path_factory):
    base, adapter, data = trained_adapter
    root = tmp_path_factory.mktemp("answers")
    write_questions(root / "q.jsonl", 40)
    result = answer(base, adapter, data, root / "q.jsonl", root / "bs1.jsonl", "--batch-size", "1")
    assert result.exit_code == 0, result.output
    return read_answers(root / "bs1.jsonl")


def test_batch_of_8_answers_as_batch_of_1(trained_adapter, batch_one_answers, tmp_path):
    base, adapter, data = trained_adapter
    write_questions(tmp_path / "q.jsonl", 40)
    result = answer(base, adapter, data, tmp_path / "q.jsonl", tmp_path / "bs8.jsonl", "--batch-size", "8")
    assert result.exit_code == 0, result.output
    assert "40 answered" in result.stdout
    assert read_answers(tmp_path / "bs8.jsonl") == batch_one_answers
    assert len(set(batch_one_answers.values())) > 1, "answers should differ across prompts"
    line = json.loads((tmp_path / "bs8.jsonl").read_text().splitlines()[0])
    assert set(line) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert line["prompt"] == QUESTIONS[0] and line["model_id"] == "run/final"


def test_killed_run_resumes_without_duplicates_or_losses(trained_adapter, batch_one_answers, tmp_path):
    base, adapter, data = trained_adapter
    write_questions(tmp_path / "q.jsonl", 40)
    out = tmp_path / "a.jsonl"
    args = [str(base), str(tmp_path / "q.jsonl"), "--adapter", str(adapter), "--image-folder", str(data / "images")]
    cmd = [sys.executable, "-m", "qllava", "answer", *args, "--out", str(out), "--batch-size", "1"]
    proc = subprocess.Popen([*cmd, "--max-new-tokens", "12"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out.is_file() and out.read_text().count("\n") >= 3) and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = out.read_text().count("\n")
    assert 3 <= done_before < 40, done_before
    with out.open("a") as f:  # a line cut off mid-write, as a kill during the write leaves it
        f.write('{"question_id": 39, "prompt": "What col')
    result = answer(base, adapter, data, tmp_path / "q.jsonl", out, "--batch-size", "4")
    assert result.exit_code == 0, result.output
    assert f"{40 - done_before} answered, {done_before} already" in result.stdout
    assert read_answers(out) == batch_one_answers


def test_bad_question_files_are_one_message_and_keep_earlier_answers(trained_adapter, tmp_path):
    base, adapter, data = trained_adapter
    out = tmp_path / "a.jsonl"
    out.write_text('{"question_id": 0, "text": "kept"}\n')
    rows = write_questions(tmp_path / "q.jsonl", 6)
    with (tmp_path / "q.jsonl").open("a") as f:
        f.write('{"question_id": 6, "text": \n{"question_id": 7, "text": "x", "image": "missing.png"}\n')
    result = answer(base, adapter, data, tmp_path / "q.jsonl", out)
    # A line that is not JSON does not hide the other problems.
    assert result.exit_code == 1 and "q.jsonl:7: not valid JSON" in result.stderr
    assert "q.jsonl:8 (question_id '7'): image `missing.png` not found" in result.stderr, result.stderr

    rows[1]["image"] = "missing.png"
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = answer(base, adapter, data, tmp_path / "q.jsonl", out)
    assert result.exit_code == 1
    assert "question_id '1'" in result.stderr and "image `missing.png` not found" in result.stderr
    assert out.read_text() == '{"question_id": 0, "text": "kept"}\n'


def test_answers_of_files_that_are_not_images_are_refused_before_anything_is_written(trained_adapter, tmp_path):
    base, adapter, data = trained_adapter
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "5.png").write_bytes((data / "images" / "5.png").read_bytes())
    (folder / "notanimage.jpg").write_text("a text file with an image's name")
    (folder / "cut.png").write_bytes((folder / "5.png").read_bytes()[:60])  # a download cut short
    (folder / "a-folder").mkdir()
    rows = write_questions(tmp_path / "q.jsonl", 6)
    for i, name in enumerate(["notanimage.jpg", "cut.png", "a-folder", "gone.png"]):
        rows[i]["image"] = name
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "a.jsonl"
    out.write_text("earlier answers\n")
    args = [base, tmp_path / "q.jsonl", "--adapter", adapter, "--image-folder", folder, "--out", out]
    result = qllava_here("answer", *args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert "4 problem(s) in the questions, nothing was generated" in result.stderr
    assert "question_id '0'): image `notanimage.jpg` cannot be decoded (UnidentifiedImageError" in result.stderr
    assert "question_id '1'): image `cut.png` cannot be decoded" in result.stderr
    assert f"question_id '2'): image `a-folder` is a directory, not an image file (--image-folder `{folder}`)" in (
        result.stderr
    )
    assert "question_id '3'): image `gone.png` not found" in result.stderr
    assert out.read_text() == "earlier answers\n"


def test_answers_resume_only_what_the_same_model_and_settings_wrote(trained_adapter, tmp_path):
    base, adapter, data = trained_adapter
    write_questions(tmp_path / "q.jsonl", 6)
    out = tmp_path / "a.jsonl"
    first = answer(base, adapter, data, tmp_path / "q.jsonl", out)
    assert first.exit_code == 0, first.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    metadata = lines[0]["metadata"]
    assert all(line["metadata"] == metadata for line in lines)
    assert metadata["model"] == str(base.resolve()) and metadata["adapter"] == str(adapter.resolve())
    assert metadata["bits"] == 4 and metadata["max_new_tokens"] == 12 and metadata["do_sample"] is False
    assert len(metadata["settings_fingerprint"]) == 16

    # The batch size does not change the answers: a rerun with another resumes.
    again = answer(base, adapter, data, tmp_path / "q.jsonl", out, "--batch-size", "2")
    assert again.exit_code == 0 and "0 answered, 6 already in" in again.stdout

    with out.open("a") as f:  # a line cut off by a killed run: a refusal must leave it too
        f.write('{"question_id": 5, "prompt": "What col')
    written = out.read_text()
    questions = tmp_path / "q.jsonl"
    other_run = shutil.copytree(adapter, tmp_path / "other-run" / "final")  # another run's adapter, as far as paths go
    other_model = answer(base, other_run, data, questions, out)
    assert other_model.exit_code == 1 and isinstance(other_model.exception, SystemExit), other_model.exception
    message = other_model.stderr
    assert f"{out} holds answers of another model or other settings ({out}:1: model_id 'run/final' there, " in message
    assert f"'other-run/final' here; adapter '{adapter.resolve()}' there, '{other_run.resolve()}' here)" in message
    assert f"pass another --out, or delete {out} to answer every question" in message

    other_settings = answer(base, adapter, data, questions, out, "--max-new-tokens", "8")
    assert other_settings.exit_code == 1 and f"({out}:1: max_new_tokens 12 there, 8 here)" in other_settings.stderr

    # An adapter trained again into the same directory is another model, though its path is the same.
    retrained_out = tmp_path / "retrained.jsonl"
    assert answer(base, other_run, data, questions, retrained_out).exit_code == 0
    weights = load_file(other_run / "adapter_model.safetensors")
    save_file({k: v * 1.5 for k, v in weights.items()}, other_run / "adapter_model.safetensors")
    retrained = answer(base, other_run, data, questions, retrained_out)
    assert retrained.exit_code == 1 and "adapter_weights '" in retrained.stderr

    # Lines of an older qllava (no fingerprint) are not resumed either.
    older = [{**line, "metadata": {"temperature": 0.0, "top_p": 1.0, "template": "vicuna_v1"}} for line in lines]
    (tmp_path / "old.jsonl").write_text("".join(json.dumps(line) + "\n" for line in older))
    old = answer(base, adapter, data, questions, tmp_path / "old.jsonl")
    assert old.exit_code == 1 and f"{tmp_path / 'old.jsonl'}:1 has no settings fingerprint" in old.stderr
    assert out.read_text() == written


def test_chat_session_streams_answers_and_follows_commands(trained_adapter, batch_one_answers):
    base, adapter, data = trained_adapter
    images = data / "images"
    session = "\n".join(
        [
            QUESTIONS[0],
            f"/image {images / '4.png'}",
            QUESTIONS[0],
            "/image /no/such.png",
            "/reset",
            QUESTIONS[0],
            "/exit",
        ]
    )
    args = ["--adapter", adapter, "--image", images / "0.png", "--temperature", "0", "--max-new-tokens", "12"]
    result = qllava_here("chat", base, *args, input=session + "\n")
    assert result.exit_code == 0, result.output
    replies = [line.split("assistant>", 1)[1].strip() for line in result.stdout.splitlines() if "assistant>" in line]
    # The same prompts in the batch-1 answers: question 0 is QUESTIONS[0] about 0.png, question 16 about 4.png.
    assert replies == [batch_one_answers[0], batch_one_answers[16], batch_one_answers[16]]
    assert f"(new conversation about {images / '4.png'})" in result.stdout
    assert f"image `/no/such.png` not found; still about {images / '4.png'})" in result.stdout
    assert f"(conversation cleared; the next question starts a new one about {images / '4.png'})" in result.stdout

    one = qllava_here(
        "chat", base, *args[:2], "--image", images / "4.png", "--temperature", "0", "--prompt", QUESTIONS[0]
    )
    # Exactly the answer, as `answer` writes it: no space before it (the template's separator).
    assert one.exit_code == 0 and one.stdout == batch_one_answers[16] + "\n"


def test_chat_refuses_files_that_are_not_images_and_the_session_goes_on(trained_adapter, batch_one_answers, tmp_path):
    base, adapter, data = trained_adapter
    images = data / "images"
    (tmp_path / "notanimage.jpg").write_text("a text file with an image's name")
    ask = ["--adapter", adapter, "--temperature", "0", "--max-new-tokens", "12", "--prompt", QUESTIONS[0]]
    for image, problem in [
        (tmp_path / "notanimage.jpg", "cannot be decoded (UnidentifiedImageError"),
        (tmp_path, "is a directory, not an image file"),
    ]:
        result = qllava_here("chat", base, *ask, "--image", image)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
        assert f"qllava: error: image `{image}` {problem}" in result.stderr
    # Checked before the model loads (minutes for a 7B one): here the model directory does not even exist.
    result = qllava_here("chat", tmp_path / "no-model", "--image", tmp_path / "notanimage.jpg", "--prompt", "hi")
    assert result.exit_code == 1 and f"image `{tmp_path / 'notanimage.jpg'}` cannot be decoded" in result.stderr

    session = f"/image {tmp_path / 'notanimage.jpg'}\n{QUESTIONS[0]}\n"
    result = qllava_here("chat", base, *ask[:6], "--image", images / "0.png", input=session)
    assert result.exit_code == 0, result.exception
    assert f"(error: image `{tmp_path / 'notanimage.jpg'}` cannot be decoded" in result.stdout
    assert f"still about {images / '0.png'})" in result.stdout
    replies = [line.split("assistant>", 1)[1].strip() for line in result.stdout.splitlines() if "assistant>" in line]
    assert replies == [batch_one_answers[0]]


def test_answer_and_chat_on_several_images(trained_adapter, tmp_path):
    base, adapter, data = trained_adapter
    check_answer_and_chat(base, adapter, data / "images", tmp_path)


def test_several_images_with_the_wrong_tags_are_refused_before_the_model_loads(trained_adapter, tmp_path):
    base, adapter, data = trained_adapter
    images = data / "images"
    rows = [
        {"question_id": 0, "text": "<image> and <image>?", "image": ["0.png", "1.png", "2.png"]},
        {"question_id": 1, "text": "What is in <image>?"},
        {"question_id": 2, "text": "Which?", "image": ["0.png", 3]},
        {"question_id": 3, "text": "Which?", "image": ["0.png", "gone.png"]},
    ]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = answer(base, adapter, data, tmp_path / "q.jsonl", tmp_path / "a.jsonl")
    assert result.exit_code == 1 and "4 problem(s) in the questions, nothing was generated" in result.stderr
    assert "question_id '0'): 2 `<image>` tag(s) but 3 image(s)" in result.stderr
    assert "question_id '1'): `<image>` in the text but no `image`" in result.stderr
    assert "question_id '2'): `image` must be a path string or a list of them" in result.stderr
    assert "question_id '3'): image `gone.png` not found" in result.stderr
    assert not (tmp_path / "a.jsonl").exists()

    two = ["--image", images / "0.png", "--image", images / "1.png"]
    result = qllava_here("chat", tmp_path / "no-model", *two, "--prompt", "Is <image> red?")
    assert result.exit_code == 1
    assert "--prompt has 1 `<image>` tag(s) but 2 --image" in result.stderr

    # In a session: /image takes several paths (quoted where they hold spaces); a bad one keeps the images.
    spaced = tmp_path / "an image.png"
    spaced.write_bytes((images / "2.png").read_bytes())
    # Tags that cannot place the images are an error line, and the conversation goes on.
    lines = [
        f"/image {images / '1.png'} '{spaced}'",
        f"/image {images / '1.png'} {tmp_path / 'gone.png'}",
        "Is <image> red?",
        "What colors?",
        "And <image>?",
        "/image",
        "/exit",
    ]
    args = ["--adapter", adapter, *two, "--temperature", "0", "--max-new-tokens", "4"]
    result = qllava_here("chat", base, *args, input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    assert f"(new conversation about {images / '1.png'}, {spaced})" in result.stdout
    assert f"image `{tmp_path / 'gone.png'}` not found; still about {images / '1.png'}, {spaced})" in result.stdout
    assert "(error: the question has 1 `<image>` tag(s) but the conversation is about 2 image(s)" in result.stdout
    assert "(error: the images are placed by the conversation's first question" in result.stdout
    assert result.stdout.count("assistant>") == 1  # only "What colors?" was asked
    assert "(/image needs one or more paths)" in result.stdout


def test_score_reports_both_accuracies(tmp_path):
    answers = [
        {"question_id": 1, "text": "Two"},
        {"question_id": 2, "text": "a red circle"},
        {"question_id": 3, "text": "x"},
    ]
    truth = [
        {"question_id": 1, "answer": "2"},
        {"question_id": 2, "answer": "red circle"},
        {"question_id": 3, "answer": "x"},
    ]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in answers))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in truth))
    result = qllava_here(
        "score", tmp_path / "a.jsonl", "--truth", tmp_path / "t.jsonl", "--per-question", tmp_path / "p"
    )
    assert result.exit_code == 0, result.output
    assert "exact match  0.333 (1/3)" in result.stdout and "normalized   1.000" in result.stdout
    rows = [json.loads(line) for line in (tmp_path / "p").read_text().splitlines()]
    assert [r["exact"] for r in rows] == [0, 0, 1] and [r["normalized"] for r in rows] == [1.0, 1.0, 1.0]


def _quantized_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def test_adapter_runs_on_the_base_it_was_trained_on(tiny_base, tiny_data, tmp_path):
    """An adapter trained on a 16-bit base loads on that base (its recipe's model.bits), not a 4-bit one."""
    from qllava.train.loop import train

    recipe = make_recipe(
        tiny_base, tiny_data, tmp_path / "run", model={"bits": 16}, train={"max_steps": 2, "grad_accum": 1}
    )
    final = train(recipe, progress=False)
    cpu = torch.device("cpu")
    model, _ = load_for_inference(tiny_base, final, device=cpu)
    assert not _quantized_layers(model)

    # The model as trained: the training loader's base and LoRA layers holding the saved weights.
    trained, _ = load_for_training(recipe, cpu)
    set_peft_model_state_dict(trained, load_file(final / "adapter_model.safetensors"))
    trained.eval()
    image = Image.open(tiny_data / "images" / "0.png").convert("RGB")
    inputs = load_processor(tiny_base)(images=image, text="<image>\nWhat color is the shape?", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, trained(**inputs).logits)

    # An explicit choice wins over the recipe's; a width bitsandbytes has not is one message.
    assert _quantized_layers(load_for_inference(tiny_base, final, bits=4, device=cpu)[0])
    with pytest.raises(QllavaError, match="bits 3: choose 4, 8 or 16"):
        load_for_inference(tiny_base, final, bits=3, device=cpu)


def test_chat_and_answer_run_on_a_base_without_adapter(tiny_base, tiny_data, tmp_path):
    """The README's `qllava chat BASE`: a base qllava never trained has no recipe beside it."""
    one = qllava_here(
        "chat", tiny_base, "--image", tiny_data / "images" / "0.png", "--max-new-tokens", "4", "--prompt", "Hi"
    )
    assert one.exit_code == 0, one.output
    write_questions(tmp_path / "q.jsonl", 3)
    args = [tiny_base, tmp_path / "q.jsonl", "--image-folder", tiny_data / "images", "--out", tmp_path / "a.jsonl"]
    result = qllava_here("answer", *args, "--max-new-tokens", "4", "--template", "vicuna_v1")
    assert result.exit_code == 0, result.output
    assert len(read_answers(tmp_path / "a.jsonl")) == 3
    wrong = qllava_here("answer", *args, "--template", "vicuna")
    assert wrong.exit_code == 1 and "--template vicuna: choose one of vicuna_v1" in wrong.output
