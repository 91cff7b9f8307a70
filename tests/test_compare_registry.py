"""The comparison reads its per-method data from the PEFT registry: a method registered from outside the package, with
no title, no learning rates, no sweep grid, no 7B config and no closed form, is compared when --methods names it
(its name is its title; it comes after the built-in methods in every table; it is left out of the computed 7B
tables with a note), and what it lacks is asked for with a one-line error naming the flag (exit 2).

The toy method, "output_scale" (tests/plugins/output_scale_plugin.py): every attention.wo output is multiplied by a
trainable per-feature scale (init 1).
"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_plugin import output_scale_registered  # noqa: E402
from train_helpers import MAX_SEQ_LEN, make_workspace  # noqa: E402

from minipeft import compare  # noqa: E402


@pytest.fixture(scope="module")
def toy():
    with output_scale_registered():
        yield "output_scale"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"))


def left_out_note(text: str) -> str:
    """The 7B table's note line naming the methods it leaves out (QLoRA among the built-in ones, then the toy)."""
    return next(line for line in text.splitlines()
                if line.startswith("Not in this table (no 7B reference config in the PEFT registry): "))


def small_run(ws, out, *extra):
    return ["--base", ws["model"], "--data", ws["train"], "--val-data", ws["val"], "--max-seq-len", str(MAX_SEQ_LEN),
            "--max-train-examples", "16", "--epochs", "1", "--batch-size", "8", "--evals-per-epoch", "1",
            "--sweep-val-examples", "8", "--threads", "1", "--device", "cpu", "--no-plot", "--out", str(out), *extra]


def test_a_registered_method_is_compared_after_the_built_in_ones(toy, ws, tmp_path):
    # toy first on the command line, swept over a grid given by flag; LoRA at a given rate
    argv = small_run(ws, tmp_path / "out", "--methods", f"{toy},lora", "--lr", "lora=1e-2", "--sweep",
                     "--sweep-epochs", "0.5", "--sweep-extend", "0", "--sweep-lrs", f"{toy}=1e-2,1e-1")
    assert compare.main(argv) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["results"]) == [toy, "lora"] and set(results["sweep"]) == {toy}
    assert results["lr"][toy] == float(min(results["sweep"][toy], key=results["sweep"][toy].get))
    assert results["settings"]["method_hyper"][toy] == {"init": 1.0}
    n_layers = 2
    assert results["results"][toy]["trainable"] == n_layers * 32        # one scale per wo output feature (dim 32)
    table = results["table_7b"]
    assert toy not in table["rows"] and table["left_out"][-1] == toy          # after QLoRA's (no ZeRO-3 row)
    markdown = (tmp_path / "out" / "results.md").read_text()
    trained = markdown.split("## Computed")[0]
    rows = [line for line in trained.splitlines() if line.startswith(("| LoRA |", f"| {toy} |"))]
    assert [row.split(" | ")[0] for row in rows] == ["| LoRA", f"| {toy}"]      # built-in first, then the new one
    assert left_out_note(markdown).endswith(toy)


def test_what_a_method_lacks_is_asked_for_by_flag(toy, ws, tmp_path, capsys):
    def refused(*extra):
        assert compare.main(small_run(ws, tmp_path / "never", *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        return err

    assert "--lr" in refused("--methods", f"lora,{toy}") and f"{toy}=LR" in refused("--methods", f"lora,{toy}")
    assert "--sweep-lrs" in refused("--methods", f"lora,{toy}", "--sweep")
    assert "--methods" in refused("--methods", "lora,not_registered")
    assert "--plugin no_such_plugin_module" in refused("--plugin", "no_such_plugin_module")
    assert not (tmp_path / "never").exists()


def test_flags_and_7b_tables_know_the_registered_method(toy, capsys):
    assert toy in compare.parse_method_values(["all=1e-3"], "--lr")
    assert compare.method_order()[:6] == compare.REFERENCE_ORDER and compare.method_order()[-1] == toy
    assert compare.title(toy) == toy and compare.title("lora") == "LoRA"
    assert compare.main(["--only-7b-table"]) == 0
    assert left_out_note(capsys.readouterr().out).endswith(toy)
