"""tools/export.py end to end on the shipped tiny LLaMA (in-process): a LoRA run's adapter merged into a
transformers folder gives the LoRA model's logits and greedy tokens; the same adapter exported for peft and
imported back as our folder gives them too; bad requests are one line and write nothing."""

import pytest
import torch

from bad_input_helpers import snapshot, tool_main
from helpers_hf_export import greedy_pair
from minipeft.checkpoint import load_model
from minipeft.cli_errors import run_main
from minipeft.peft import LoRAConfig, LoRALinear, PromptConfig, apply_peft, load_adapter, save_adapter

transformers = pytest.importorskip("transformers")
BASE = "minipeft/assets/tiny-llama"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """The tiny LLaMA with a LoRA whose B is non-zero (as after training), saved as a run's adapter folder."""
    tmp = tmp_path_factory.mktemp("export_tool")
    model = apply_peft(load_model(BASE, dtype=torch.float32), LoRAConfig(rank=4, alpha=8, targets=("wq", "wk", "wv", "w2"))).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.copy_(0.05 * torch.randn(module.lora_B.shape, generator=generator))
    save_adapter(model, tmp / "adapter")
    return tmp, model


def export(*argv) -> int:
    return run_main(tool_main("export").main, "export.py", [str(a) for a in argv])


def test_merged_export_loads_in_transformers_with_the_lora_logits(lora_run, capsys):
    tmp, lora = lora_run
    # float32: the merged weights W + s B A as computed (the default keeps the shipped base's float16)
    assert export(BASE, "--adapter", tmp / "adapter", "--merge", "--dtype", "float32", "--out", tmp / "merged") == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp / "merged")).eval()
    tokenizer = transformers.LlamaTokenizer.from_pretrained(str(tmp / "merged"))
    x = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        assert (lora(x) - theirs(x).logits).abs().max().item() < 1e-5
    mine, peer = greedy_pair(lora, theirs, x[0])
    assert mine == peer


def test_adapter_export_and_import_round_trip(lora_run, capsys):
    tmp, lora = lora_run
    assert export(BASE, "--adapter", tmp / "adapter", "--out", tmp / "peft") == 0
    assert (tmp / "peft" / "adapter_model.safetensors").is_file()
    assert export(BASE, "--import-peft", tmp / "peft", "--out", tmp / "ours") == 0
    back = load_adapter(load_model(BASE, dtype=torch.float32), tmp / "ours")
    x = torch.randint(0, 4096, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (back(x) - lora(x)).abs().max().item() < 1e-6


def test_bad_requests_are_one_line_and_write_nothing(lora_run, tmp_path, capsys):
    tmp, lora = lora_run
    prompt = apply_peft(load_model(BASE), PromptConfig(prompt_len=2, init="random"))
    save_adapter(prompt, tmp_path / "prompt")
    (tmp_path / "taken").mkdir()
    before = snapshot(tmp_path)
    for argv, needle in (((BASE, "--adapter", tmp_path / "prompt", "--merge", "--out", tmp_path / "o"), "only LoRA merges"),
                         ((BASE, "--merge", "--out", tmp_path / "o"), "--merge needs --adapter"),
                         ((BASE, "--out", tmp_path / "taken"), "--overwrite")):
        capsys.readouterr()
        assert export(*argv) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and needle in lines[0], lines
    assert snapshot(tmp_path) == before
    assert export(BASE, "--out", tmp_path / "taken", "--overwrite") == 0         # the stored float16 kept
    assert '"torch_dtype": "float16"' in (tmp_path / "taken" / "config.json").read_text()
