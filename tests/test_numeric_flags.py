"""Every numeric flag of every tool, found by walking the tools' own parsers (tools/*.py build_parser()), so a
flag added later is covered without editing this file.

For each flag whose type is a numeric minipeft.cli_types type, the values 0, -1, nan, inf and 1e12 (and
1000000000000 for an integer or byte-size flag) are parsed in-process, with the arguments the tool requires,
and each must
  * stop the parser: exit status 2, one line on stderr naming the flag, no traceback; or
  * pass the parser and be refused by the tool's cheap check (CHECKS: finetune's check_config, compare's
    check_args) in one line naming the flag; or
  * pass both and be listed in ACCEPTED with the reason it is a valid setting.
A flag with a plain type=int / type=float (int takes -1 and 10**12, float takes nan and inf), any other type
not from minipeft/cli_types.py, or a numeric default without a type, fails the test; so does an ACCEPTED entry
the tools no longer accept. test_the_walk_catches_a_planted_flag shows the walk can fail.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from minipeft import cli_types  # noqa: E402
from minipeft.cli_errors import is_project_error, run_main  # noqa: E402

TOOLS = sorted(p.stem for p in (ROOT / "tools").glob("*.py"))
VALUES = ("0", "-1", "nan", "inf", "1e12")
BIG_INT = "1000000000000"
NUMERIC = ("int", "float", "size")          # the ArgType kinds that read a number (size: bytes, "5GB")

# The positional / required arguments a tool needs before one flag can be parsed (nothing is read).
REQUIRED = {
    "generate": ["ckpt", "--prompt", "hi"],
    "convert_checkpoint": ["src", "out"],
    "prepare_data": ["data.json"],
    "extend_vocab": ["--base-tokenizer", "t.model", "--corpus", "zh.txt", "--out", "x.model"],
    "pretrain_tiny": ["--corpus", "c.txt", "--out", "o"],
    "export": ["ckpt", "--out", "o"],
}


def finetune_required(flag: str) -> list:
    """A method's flag is read only for its method: give that method, so its config checks the value."""
    from minipeft.peft import METHODS
    owner = [m.name for m in METHODS.values() if any(f.name == flag for f in m.flags)]
    return ["--method", owner[0]] if owner else []


def finetune_check(args):
    from minipeft.train import check_config, config_from_args
    check_config(config_from_args(args))


def compare_check(args):
    from minipeft.compare import check_args
    check_args(args)


CHECKS = {"finetune": finetune_check, "compare_methods": compare_check}

# (tool, flag, value) the parser and the cheap check accept -> why that is a valid setting.
ACCEPTED = {
    **{(tool, "--seed", "0"): "seeds start at 0" for tool in
       ("finetune", "compare_methods", "pretrain_tiny", "prepare_data", "make_demo_data", "vocab_experiment",
        "generate")},
    **{(tool, flag, "0"): "the deepspeed launcher numbers the first rank 0" for tool in ("finetune", "compare_methods")
       for flag in ("--local_rank",)},
    ("finetune", "--val-fraction", "0"): "no held-out split: --val-data (or the demo's) is validated on, else "
                                         "there are no validation numbers (Trainer.evaluate skips an empty set)",
    ("finetune", "--weight-decay", "0"): "AdamW without decay (the default)",
    ("finetune", "--warmup-ratio", "0"): "no warm-up",
    ("finetune", "--warmup-steps", "0"): "no warm-up",
    ("finetune", "--min-lr-ratio", "0"): "cosine down to 0 (the default)",
    ("finetune", "--eval-every", "0"): "evaluate at the end only (documented)",
    ("finetune", "--save-every", "0"): "no periodic checkpoints (documented)",
    ("finetune", "--samples", "0"): "show no generations",
    ("finetune", "--lora-dropout", "0"): "no dropout (the default)",
    ("finetune", "--prefix-hidden", "0"): "train the prefix directly, no reparameterisation MLP (documented)",
    ("finetune", "--epochs", "1e12"): "a run that long is what was asked; each step is logged, Ctrl-C stops it",
    ("finetune", "--lr", "1e12"): "finite; a diverging run stops at the first non-finite loss with one line",
    ("finetune", "--lora-alpha", "1e12"): "finite scale; a diverging run stops at the first non-finite loss",
    ("finetune", "--max-grad-norm", "1e12"): "finite: clipping that never clips",
    ("finetune", "--weight-decay", "1e12"): "finite; a diverging run stops at the first non-finite loss",
    ("finetune", "--max-steps", BIG_INT): "a long run is what was asked; each step is logged, Ctrl-C stops it",
    ("finetune", "--warmup-steps", BIG_INT): "warm-up longer than the run: the rate rises all run long",
    ("finetune", "--eval-every", BIG_INT): "evaluate at the end only",
    ("finetune", "--save-every", BIG_INT): "no periodic checkpoint comes due",
    ("finetune", "--samples", BIG_INT): "shows at most the held-out records there are",
    ("finetune", "--keep-checkpoints", BIG_INT): "keep every checkpoint written",
    ("compare_methods", "--max-train-examples", "0"): "all training records (documented)",
    ("compare_methods", "--max-val-examples", "0"): "all held-out records (documented)",
    ("compare_methods", "--sweep-val-examples", "0"): "the sweep validates on the held-out set (it says so)",
    ("compare_methods", "--sweep-extend", "0"): "never extend the grid",
    ("compare_methods", "--val-fraction", "0"): "no held-out split: --val-data (or the demo's) is the held-out set",
    ("compare_methods", "--warmup-ratio", "0"): "no warm-up",
    ("compare_methods", "--max-train-examples", BIG_INT): "at most the records there are",
    ("compare_methods", "--max-val-examples", BIG_INT): "at most the records there are",
    ("compare_methods", "--sweep-val-examples", BIG_INT): "at most the records outside the training subset",
    ("compare_methods", "--sweep-extend", BIG_INT): "extends only while the best rate sits at the grid's edge",
    ("compare_methods", "--evals-per-epoch", BIG_INT): "at most one evaluation per step",
    ("compare_methods", "--epochs", "1e12"): "a run that long is what was asked",
    ("compare_methods", "--sweep-epochs", "1e12"): "a sweep that long is what was asked",
    ("generate", "--temperature", "0"): "greedy decoding (the default)",
    ("generate", "--temperature", "1e12"): "finite: sampling from a near-uniform distribution",
    ("generate", "--top-k", BIG_INT): "k above the vocabulary keeps every token",
    ("pretrain_tiny", "--warmup", "0"): "no warm-up",
    ("pretrain_tiny", "--min-lr-ratio", "0"): "cosine down to 0",
    ("pretrain_tiny", "--weight-decay", "0"): "AdamW without decay",
    ("pretrain_tiny", "--tokenizer-min-share", "0"): "never repeat a small corpus file",
    ("pretrain_tiny", "--val-text-chars", "0"): "the first line of each file only",
    ("pretrain_tiny", "--steps", BIG_INT): "a long run is what was asked; --max-minutes / Ctrl-C stop it",
    ("pretrain_tiny", "--warmup", BIG_INT): "warm-up longer than the run: the rate rises all run long",
    ("pretrain_tiny", "--eval-every", BIG_INT): "evaluate at the last step only",
    ("pretrain_tiny", "--save-every", BIG_INT): "no periodic save comes due (the end still saves)",
    ("pretrain_tiny", "--val-windows", BIG_INT): "at most the windows each file holds",
    ("pretrain_tiny", "--val-text-chars", BIG_INT): "at most the file's text",
    ("pretrain_tiny", "--stop-at-step", BIG_INT): "a stop beyond --steps never comes",
    ("pretrain_tiny", "--lr", "1e12"): "finite; a diverging run is reported by its loss",
    ("pretrain_tiny", "--weight-decay", "1e12"): "finite; a diverging run is reported by its loss",
    ("pretrain_tiny", "--max-minutes", "1e12"): "no time limit in practice",
    ("prepare_data", "--val-fraction", "0"): "no validation split (the default)",
    ("vocab_experiment", "--max-records", BIG_INT): "at most the records there are",
    ("vocab_experiment", "--steps", BIG_INT): "a long run is what was asked",
    ("vocab_experiment", "--log-every", BIG_INT): "log the first step only",
    ("vocab_experiment", "--lr", "1e12"): "finite; a diverging run is reported by its loss",
    ("convert_checkpoint", "--max-shard-size", BIG_INT): "shards of up to a terabyte: one file in practice",
    ("export", "--max-shard-size", BIG_INT): "shards of up to a terabyte: one file in practice",
    ("bench", "--masked", "0"): "no position masked: the LoRA step labels every position",
    ("gpu_lora_bench", "--fp16-steps", "0"): "skip the fp16 phase (documented)",
    ("gpu_lora_bench", "--warmup", "0"): "no untimed steps",
    ("gpu_lora_bench", "--steps", BIG_INT): "a long benchmark is what was asked",
    ("gpu_lora_bench", "--fp16-steps", BIG_INT): "a long benchmark is what was asked",
    ("gpu_lora_bench", "--warmup", BIG_INT): "a long warm-up is what was asked",
    ("gpu_lora_bench", "--lr", "1e12"): "finite; the loss is printed (a bf16 non-finite loss exits 1)",
    ("gpu_lora_bench", "--peak-tflops", "1e12"): "finite: only divides the measured throughput",
}


def tool_parser(tool: str) -> argparse.ArgumentParser:
    module = importlib.import_module(tool)
    assert hasattr(module, "build_parser"), f"tools/{tool}.py: no build_parser() (every tool exposes its flags)"
    return module.build_parser()


def parse(parser, argv):
    """(namespace or None, exit status or None, stderr) of parser.parse_args(argv), in-process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return parser.parse_args(argv), None, err.getvalue()
        except SystemExit as stop:
            return None, stop.code, err.getvalue()


def option(action) -> str:
    return action.option_strings[0] if action.option_strings else action.dest


def walk(tool: str, parser, required=lambda flag: [], check=None) -> tuple:
    """-> (problems, accepted): what breaks the rules of the module docstring, and the (tool, flag, value)
    that the parser and the check both accept."""
    problems, accepted = [], {}
    for action in parser._actions:
        flag, kind = option(action), getattr(action.type, "kind", None)
        if action.type in (int, float):
            problems.append(f"{tool} {flag}: type={action.type.__name__} takes -1 / 10**12 / nan; use a "
                            f"minipeft.cli_types type")
            continue
        if action.type not in (None, str, Path) and not isinstance(action.type, cli_types.ArgType):
            problems.append(f"{tool} {flag}: type={action.type!r} is not a minipeft.cli_types type")
            continue
        if action.type is None and action.nargs != 0 and isinstance(action.default, (int, float)) \
                and not isinstance(action.default, bool):
            problems.append(f"{tool} {flag}: numeric default {action.default!r} without a validated type")
            continue
        if kind not in NUMERIC or not action.option_strings:
            continue
        for value in VALUES + ((BIG_INT,) if kind != "float" else ()):
            argv = [*REQUIRED.get(tool, []), *required(flag), flag, value]
            args, code, err = parse(parser, argv)
            where = f"{tool} {flag} {value}"
            if args is None:
                lines = [line for line in err.splitlines() if line.strip()]
                if code != 2 or "Traceback" in err or len(lines) != 1 or flag not in lines[0]:
                    problems.append(f"{where}: expected exit 2 and one line naming {flag}, got {code}: {lines}")
                continue
            try:
                if check is not None:
                    check(args)
            except ValueError as error:
                message = str(error)
                if not is_project_error(error) or "\n" in message.strip() or flag not in message:
                    problems.append(f"{where}: the check's error is not one line naming {flag}: {message!r}")
                continue
            accepted[(tool, flag, value)] = argv
    return problems, accepted


@pytest.fixture(scope="module")
def results():
    problems, accepted = [], {}
    for tool in TOOLS:
        p, a = walk(tool, tool_parser(tool), finetune_required if tool == "finetune" else (lambda flag: []),
                    CHECKS.get(tool))
        problems += p
        accepted.update(a)
    return problems, accepted


def test_every_tool_has_its_flags_walked(results):
    """Each tool exposes build_parser() and has numeric flags the walk found (a tool never silently skipped)."""
    _, accepted = results
    counted = {tool: sum(1 for a in tool_parser(tool)._actions if getattr(a.type, "kind", None) in NUMERIC)
               for tool in TOOLS}
    assert len(TOOLS) >= 11 and all(counted.values()), counted


def test_every_numeric_flag_refuses_or_documents_each_value(results):
    problems, accepted = results
    assert not problems, "\n".join(problems)
    undocumented = [" ".join([tool, *argv]) for (tool, flag, value), argv in accepted.items()
                    if (tool, flag, value) not in ACCEPTED]
    assert not undocumented, ("accepted with no check and no reason in ACCEPTED (refuse the value with a "
                              "minipeft.cli_types type, or say why it is valid):\n" + "\n".join(undocumented))
    stale = [key for key in ACCEPTED if key not in accepted]
    assert not stale, f"ACCEPTED lists values the tools now refuse (remove them): {stale}"


def test_the_walk_catches_a_planted_flag():
    planted = cli_types.ArgumentParser(prog="planted.py")
    planted.add_argument("--plain-int", type=int, default=1)
    planted.add_argument("--plain-float", type=float)
    planted.add_argument("--untyped", default=3)
    planted.add_argument("--counted", type=cli_types.non_negative_int, default=0)
    problems, accepted = walk("planted", planted)
    assert [p.split(":")[0] for p in problems] == ["planted --plain-int", "planted --plain-float", "planted --untyped"]
    assert set(accepted) == {("planted", "--counted", "0"), ("planted", "--counted", BIG_INT)}   # not in ACCEPTED
    _, code, err = parse(planted, ["--counted", "-1"])
    assert code == 2 and err == "planted.py: error: argument --counted: expected an integer >= 0, got '-1'\n"


@pytest.mark.parametrize("kind, text, message", [
    (cli_types.positive_float, "nan", "expected a finite number > 0, got 'nan'"),
    (cli_types.non_negative_float, "inf", "expected a finite number >= 0, got 'inf'"),
    (cli_types.fraction, "1", "expected a number in [0, 1), got '1'"),
    (cli_types.probability_mass, "0", "expected a number in (0, 1], got '0'"),
    (cli_types.seed, "-1", "expected an integer in [0, 4294967295], got '-1'"),
    (cli_types.dim, BIG_INT, "expected an integer in [1, 65536], got '1000000000000'"),
    (cli_types.names, "wq,,wv", "expected comma-separated names (wq,wv), got 'wq,,wv'"),
    (cli_types.byte_size, "lots", "expected a size in bytes > 0, e.g. 5GB, 200MB, 1000000, got 'lots'"),
])
def test_types_say_what_they_expected(kind, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as err:
        kind(text)
    assert str(err.value) == message
    assert cli_types.byte_size("5GB") == 5 * 2**30 and cli_types.names(" wq, wv ") == ("wq", "wv")


def test_every_tool_runs_under_run_main():
    for tool in TOOLS:
        main_block = (ROOT / "tools" / f"{tool}.py").read_text().split('if __name__ == "__main__":')[-1]
        assert "run_main(" in main_block, f"tools/{tool}.py: call main through minipeft.cli_errors.run_main"


def test_run_main_turns_errors_into_one_line(capsys):
    from minipeft.config import ConfigError

    def raising(err):
        def main(argv):
            raise err
        return main
    assert run_main(raising(ConfigError("x/config.json: dim\n  must be positive")), "t.py") == 2
    assert capsys.readouterr().err == "t.py: error: x/config.json: dim must be positive\n"
    assert run_main(raising(FileNotFoundError(2, "No such file or directory", "/nope/a.json")), "t.py") == 2
    assert capsys.readouterr().err == "t.py: error: /nope/a.json: No such file or directory\n"
    assert run_main(raising(OSError(28, "No space left on device")), "t.py") == 2
    assert capsys.readouterr().err == "t.py: error: No space left on device\n"
    assert run_main(raising(KeyboardInterrupt()), "t.py") == 130
    assert capsys.readouterr().err.strip() == "t.py: interrupted"
    assert run_main(lambda argv: None, "t.py") == 0 and run_main(lambda argv: 3, "t.py") == 3
    with pytest.raises(ValueError):                  # a library's own error is a bug: it keeps its traceback
        run_main(raising(ValueError("deep inside a library")), "t.py")


def test_a_bad_number_from_the_shell_is_one_line():
    from bad_input_helpers import assert_refused, run_tool
    done = run_tool("generate", "no-such-folder", "--prompt", "hi", "--temperature", "nan")
    assert done.returncode == 2
    assert_refused(done.returncode, done.stderr, "generate.py: error: argument --temperature:",
                   "expected a finite number >= 0, got 'nan'")
