"""Bad input to every tool, part 2 (issue 23): cheap checks before expensive work, and one line instead of a
traceback. Each case asserts a non-zero exit (or the project's error), one line naming the file / key / flag /
field, and the SHA-256 of every input unchanged (bad_input_helpers.snapshot before and after).

    a config.json claiming 10**9 layers       refused from the weight files' headers before a model is built
    an int weight where a float is expected   convert_checkpoint / load_model name the tensor and the file
    ChatGLM2 group count != the weights'      one line naming the tensor and config.json
    --max-new-tokens 10**12, --temperature nan, a token id beyond the embedding rows     generate
    an adapter config with prompt_len 10**9 (or a size its tensors do not have)          load_adapter, before apply_peft
    a truncated model.safetensors / adapter.safetensors, a wrong-family tokenizer, --device cuda without one,
    --out under a file
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bad_input_helpers import assert_refused, run_tool, snapshot, tool_main  # noqa: E402
from helpers_bloom import train_tiny_bpe  # noqa: E402
from train_helpers import make_workspace  # noqa: E402

from minipeft.checkpoint import CheckpointError, convert_checkpoint, load_model  # noqa: E402
from minipeft.generate import GenerationError, generate  # noqa: E402
from minipeft.peft import (AdapterConfig, PeftConfigError, PromptConfig, apply_peft, load_adapter,  # noqa: E402
                           save_adapter)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("bad_tools2_ws"))


def copy_model(ws, tmp_path, name="model") -> Path:
    folder = tmp_path / name
    shutil.copytree(ws["model"], folder)
    return folder


def run_in_process(capsys, tool: str, *args):
    """(exit code, stderr) of the tool run in-process: its main(argv), or the package's run_command_line (a value
    a flag's type refuses ends in argparse's SystemExit: its status)."""
    module = tool_main(tool)
    entry = getattr(module, "main", None) or module.run_command_line
    try:
        code = entry([str(a) for a in args])
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


def refused(done: subprocess.CompletedProcess, before, roots, *fragments):
    return assert_refused(done.returncode, done.stderr, *fragments, before=before, roots=roots)


def test_a_config_claiming_a_billion_layers_is_refused_before_a_model_is_built(ws, tmp_path, capsys):
    folder = copy_model(ws, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_layers": 10**9}))
    roots = (folder, tmp_path)
    before = snapshot(*roots)
    done = run_tool("generate", folder, "--prompt", "hi", "--device", "cpu")      # would hang building 10**9 blocks
    refused(done, before, roots, f"{folder / 'config.json'}: n_layers is 1000000000", "2 layers")
    code, err = run_in_process(capsys, "convert_checkpoint", folder, tmp_path / "out")
    assert_refused(code, err, "n_layers is 1000000000", before=before, roots=roots)
    # the embedding claimed wider than the files could hold
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 10**9}))
    (folder / "tokenizer.model").unlink()              # (its own check would speak first)
    with pytest.raises(CheckpointError, match="vocab_size 1000000000 x dim 32"):
        load_model(folder)


def test_an_int_weight_is_refused_on_conversion_and_load(ws, tmp_path, capsys):
    folder = copy_model(ws, tmp_path)
    weights = load_file(str(folder / "model.safetensors"))
    weights["norm.weight"] = torch.ones_like(weights["norm.weight"], dtype=torch.int64)
    save_file(weights, str(folder / "model.safetensors"))
    roots = (folder, tmp_path)
    before = snapshot(*roots)
    code, err = run_in_process(capsys, "convert_checkpoint", folder, tmp_path / "converted")
    assert_refused(code, err, str(folder / "model.safetensors"), "'norm.weight' has dtype int64", "floating-point",
                   before=before, roots=roots)
    assert not (tmp_path / "converted").exists()
    with pytest.raises(CheckpointError, match="'norm.weight' has dtype int64"):
        load_model(folder)


def test_chatglm2_group_count_that_the_weights_do_not_have(tmp_path):
    from test_chatglm2 import chatglm2_folder
    folder, config, _ = chatglm2_folder(tmp_path)
    wrong = config["multi_query_group_num"] * 2 if config["num_attention_heads"] % (
        config["multi_query_group_num"] * 2) == 0 else 1
    assert wrong != config["multi_query_group_num"]
    (folder / "config.json").write_text(json.dumps({**config, "multi_query_group_num": wrong}))
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="query_key_value.*multi_query_group_num") as err:
        convert_checkpoint(folder, tmp_path / "out")
    assert "\n" not in str(err.value) and str(folder / "pytorch_model.bin") in str(err.value)
    assert snapshot(tmp_path) == before


def test_generate_limits_and_values(ws, tmp_path, capsys):
    roots = (Path(ws["model"]).parent,)
    before = snapshot(*roots)
    done = run_tool("generate", ws["model"], "--prompt", "hi", "--max-new-tokens", 10**12, "--device", "cpu")
    refused(done, before, roots, "--max-new-tokens", "1000000000000")          # past any model: the parser's type
    done = run_tool("generate", ws["model"], "--prompt", "hi", "--max-new-tokens", 100_000, "--device", "cpu")
    refused(done, before, roots, "max_new_tokens 100000", "limit of 512 new tokens", "max_seq_len 128")   # this model's
    code, err = run_in_process(capsys, "generate", ws["model"], "--prompt", "hi", "--temperature", "nan",
                               "--device", "cpu")
    assert_refused(code, err, "temperature", "nan", before=before, roots=roots)
    model = load_model(ws["model"])
    for kwargs, needle in (({"temperature": float("inf")}, "temperature"), ({"top_p": float("nan")}, "top_p"),
                           ({"max_new_tokens": 513}, "limit of 512")):
        with pytest.raises(GenerationError, match=needle):
            generate(model, [[1, 2]], **{"max_new_tokens": 2, **kwargs})
    with pytest.raises(GenerationError, match=r"prompts\[1\] holds token id 999999, but the model's embedding has"):
        generate(model, [[1, 2], [3, 999999]], max_new_tokens=2)
    assert len(generate(model, [[1, 2]], max_new_tokens=512)[0]) == 512          # the limit itself works


def test_adapter_sizes_are_checked_before_they_are_allocated(ws, tmp_path, capsys):
    base = load_model(ws["model"])
    prompt = tmp_path / "prompt"
    save_adapter(apply_peft(load_model(ws["model"]), PromptConfig(prompt_len=4, init="random")), prompt)
    described = json.loads((prompt / "adapter_config.json").read_text())
    described["config"]["prompt_len"] = 10**9
    (prompt / "adapter_config.json").write_text(json.dumps(described))
    roots = (Path(ws["model"]).parent, tmp_path)
    before = snapshot(*roots)
    code, err = run_in_process(capsys, "generate", ws["model"], "--prompt", "hi", "--adapter", prompt, "--device", "cpu")
    assert_refused(code, err, str(prompt / "adapter_config.json"), "config.prompt_len is 1000000000",
                   "max_seq_len 128", before=before, roots=roots)
    # a size within the limits that the saved tensors do not have: refused from the meta-device shapes
    adapter = tmp_path / "adapter"
    save_adapter(apply_peft(load_model(ws["model"]), AdapterConfig(bottleneck=4)), adapter)
    described = json.loads((adapter / "adapter_config.json").read_text())
    described["config"]["bottleneck"] = 4096
    (adapter / "adapter_config.json").write_text(json.dumps(described))
    with pytest.raises(PeftConfigError, match=r"adapter.safetensors: tensor .* has shape .*, expected .* \(from adapter_config.json"):
        load_adapter(base, adapter)


def test_truncated_weight_files(ws, tmp_path, capsys):
    folder = copy_model(ws, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])
    adapter = tmp_path / "adapter"
    save_adapter(apply_peft(load_model(ws["model"]), AdapterConfig(bottleneck=4)), adapter)
    data = (adapter / "adapter.safetensors").read_bytes()
    (adapter / "adapter.safetensors").write_bytes(data[:len(data) // 2])
    roots = (Path(ws["model"]).parent, tmp_path)
    before = snapshot(*roots)
    code, err = run_in_process(capsys, "generate", folder, "--prompt", "hi", "--device", "cpu")
    assert_refused(code, err, str(folder / "model.safetensors"), before=before, roots=roots)
    code, err = run_in_process(capsys, "convert_checkpoint", folder, tmp_path / "out")
    assert_refused(code, err, str(folder / "model.safetensors"), before=before, roots=roots)
    code, err = run_in_process(capsys, "generate", ws["model"], "--prompt", "hi", "--adapter", adapter,
                               "--device", "cpu")
    assert_refused(code, err, str(adapter / "adapter.safetensors"), before=before, roots=roots)


def test_wrong_family_tokenizer(ws, tmp_path, capsys):
    bpe = train_tiny_bpe(tmp_path, vocab_size=120)          # BLOOM's kind of tokenizer, for a LLaMA model
    roots = (Path(ws["model"]).parent, tmp_path)
    before = snapshot(*roots)
    code, err = run_in_process(capsys, "generate", ws["model"], "--prompt", "hi", "--tokenizer", bpe, "--device", "cpu")
    assert_refused(code, err, str(bpe), "a bloom tokenizer", "llama model", before=before, roots=roots)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("tool", ["finetune", "pretrain_tiny", "compare_methods", "generate"])
def test_device_cuda_without_one(ws, tmp_path, capsys, tool):
    args = {"finetune": ["--model", ws["model"], "--train-data", ws["train"], "--out", tmp_path / "run"],
            "pretrain_tiny": ["--corpus", ws["train"], "--out", tmp_path / "run", "--steps", "1"],
            "compare_methods": ["--base", ws["model"], "--data", ws["train"], "--out", tmp_path / "run"],
            "generate": [ws["model"], "--prompt", "hi"]}[tool]
    roots = (Path(ws["model"]).parent, tmp_path)
    before = snapshot(*roots)
    code, err = run_in_process(capsys, tool, *args, "--device", "cuda")
    assert_refused(code, err, "--device cuda", before=before, roots=roots)


@pytest.mark.parametrize("tool", ["finetune", "pretrain_tiny", "convert_checkpoint"])
def test_out_under_a_file(ws, tmp_path, capsys, tool):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    out = blocker / "run"
    args = {"finetune": ["--model", ws["model"], "--train-data", ws["train"], "--out", out, "--device", "cpu",
                         "--max-steps", "1"],
            "pretrain_tiny": ["--corpus", ws["train"], "--out", out, "--steps", "1"],
            "convert_checkpoint": [ws["model"], out]}[tool]
    roots = (Path(ws["model"]).parent, tmp_path)
    before = snapshot(*roots)
    code, err = run_in_process(capsys, tool, *args)
    assert_refused(code, err, str(blocker), before=before, roots=roots)
