"""tools/bench.py --tiny end to end on the CPU, qllava and the TRL baseline, and the baseline's samples."""

from __future__ import annotations

import json
import math

from tools.bench import COLUMNS, build_base, main, write_data


def test_bench_tiny(tmp_path, capsys):
    out = tmp_path / "bench"
    main(["--tiny", "--steps", "2", "--warmup", "1", "--micro-batch", "2", "--seq-len", "128", "--out", str(out)])
    result = json.loads((out / "bench.json").read_text())
    qllava, baseline = result["rows"]
    assert qllava["variant"] == "qllava" and baseline["variant"].startswith("baseline: TRL ")
    for row in (qllava, baseline):
        assert set(COLUMNS) <= set(row)
        assert row["steps"] == 2 and row["micro_batch"] == 2
        assert row["tokens_per_s"] > 0 and row["samples_per_s"] > 0
        assert 0 <= row["padding"] < 1
        assert 0 < row["mfu"] <= 1
        assert row["peak_mem_mib"] > 1  # live tensors of the memory step: weights and optimizer states at least
        assert math.isfinite(row["loss"]) and 0 < row["loss"] < 2 * math.log(512)
    # The same samples (qllava's sorted, the baseline's in file order): the baseline's sequences lack
    # only the BOS token (TRL tokenizes the chat template's text with add_special_tokens=False).
    assert 0 <= qllava["real_tokens"] - baseline["real_tokens"] <= 2 * 2
    ratios = result["meta"]["vs_baseline"]["qllava"]
    assert ratios["tokens_per_s"] == qllava["tokens_per_s"] / baseline["tokens_per_s"]
    table = (out / "bench.md").read_text()
    assert "| qllava |" in table and f"| {baseline['variant']} |" in table and "| vs the baseline |" in table
    assert capsys.readouterr().out.rstrip().endswith(table.rstrip().splitlines()[-1])


def test_baseline_tokenizes_the_samples_as_qllava(tmp_path):
    """TRL's collator on `messages_dataset` gives qllava's Encoder ids (minus BOS), image tokens included."""
    from transformers import AutoConfig
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from qllava.data.validate import dataset_from_recipe
    from qllava.model.load import load_processor
    from qllava.recipe import build_recipe
    from tools.trl_baseline import TEMPLATE, baseline_processor, messages_dataset

    base = build_base(tmp_path / "model", tiny=True)
    config = AutoConfig.from_pretrained(base)
    data = write_data(tmp_path / "data", 12, config.vision_config.image_size)
    raw = {"model": {"base": str(base)}, "data": {"train": str(data / "train.json"), "max_length": 512}}
    raw["data"]["image_folder"] = str(data / "images")
    recipe = build_recipe(raw)
    assert recipe.data.template == TEMPLATE
    processor = load_processor(base)
    ours = dataset_from_recipe(recipe, recipe.data.train, processor, config)
    collator = DataCollatorForVisionLanguageModeling(baseline_processor(base), max_length=512)
    records = json.loads((data / "train.json").read_text())
    theirs = messages_dataset(records, data / "images")
    kinds = set()
    for i, record in enumerate(records):
        batch = collator([dict(theirs[i])])
        ids = ours[i]["input_ids"]
        assert ids[0] == processor.tokenizer.bos_token_id
        # Both cut at max_length keeping the start, so a cut sample of theirs has one token more at the end.
        assert batch["input_ids"][0].tolist()[: len(ids) - 1] == ids[1:]
        assert ("pixel_values" in batch) == ("image" in record)
        kinds.add("image" in record)
    assert kinds == {True, False}


def test_bench_tiny_next(tmp_path):
    """--arch llava_next: a tiny LLaVA-NeXT, every image the plan's worst (5 tiles), qllava and the TRL baseline."""
    out = tmp_path / "bench"
    argv = ["--tiny", "--arch", "llava_next", "--steps", "1", "--warmup", "1", "--micro-batch", "2", "--full-length"]
    result = main([*argv, "--seq-len", "384", "--out", str(out)])
    assert result["meta"]["arch"] == "llava_next" and "llava_next" in result["meta"]["model"]
    qllava, baseline = result["rows"]
    assert baseline["variant"].startswith("baseline: TRL ")
    for row in (qllava, baseline):
        assert row["tokens_per_s"] > 0 and math.isfinite(row["loss"]) and 0 < row["loss"] < 2 * math.log(512)
    assert 0 <= qllava["real_tokens"] - baseline["real_tokens"] <= 2
    # The same model FLOPs: both count every tile through the vision tower (TRL batches them per image, 5-D).
    assert abs(qllava["model_tflop_per_step"] / baseline["model_tflop_per_step"] - 1) < 0.01
    # --full-length: every sample the plan's shape (its worst image, seq-len tokens, trained answers after it).
    assert qllava["real_tokens"] == 2 * 384 and qllava["loss"] > 0
    assert abs(qllava["plan_peak_mib"] / qllava["peak_mem_mib"] - 1) < 0.05, qllava
