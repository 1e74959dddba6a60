"""What a user watching the console sees: evaluation, its loss, and truncation as they happen."""

from qllava.train.loop import train
from tests.conftest import make_recipe


def test_the_console_shows_evaluation_and_truncation(tiny_base, tiny_data, tmp_path, capsys):
    """max_length 64 cuts the two-turn image samples (a quarter of the data)."""
    recipe = make_recipe(
        tiny_base,
        tiny_data,
        tmp_path / "run",
        data={"max_length": 64, "eval": str(tiny_data / "train.json")},
        train={"max_steps": 2, "eval_every": 1},
    )
    train(recipe)
    out, err = capsys.readouterr()
    assert out.count("eval_loss") == 2  # one line per evaluation: steps 1 and 2, none repeated at the end
    assert "qllava: step 1: eval_loss " in out and "qllava: step 2: eval_loss " in out
    # Its own progress bar (6 batches of 2), drawn when it starts; it is cleared when done (leave=False), so its
    # 100% state shows only when a refresh happened to fall on the last batch.
    assert "eval:   0%" in err
    assert "eval_loss=" in err and "trunc=" in err  # in the training bar's postfix
