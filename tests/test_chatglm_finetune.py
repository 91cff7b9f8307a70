"""tools/finetune.py --model <a ChatGLM-6B folder in the original's layout, with its ice_text.model>: the trainer
picks the family's tokenizer and prompt format ("[Round 0]\\n问：...\\n答：" [gMASK] <sop> ... <eop>, the prompt
masked), trains LoRA on the fused wqkv, evaluates by cached generation, and the adapter reloads onto the folder
to the validation loss the run printed."""

import json
import shutil
import sys
from pathlib import Path

import sentencepiece as spm
import torch

from helpers_chatglm import chatglm_v1_folder, train_chatglm_sentencepiece
from minipeft.checkpoint import load_model
from minipeft.data import IGNORE_INDEX, AlpacaEncoder, read_records
from minipeft.families import get_family
from minipeft.families import tokenizer_for
from minipeft.peft import load_adapter
from minipeft.train import TrainConfig, evaluate_loss, prepare_run

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["你好", "我很好", "hello", "good", "day", "time"]


def records(n, offset=0):
    return [{"instruction": f"说 {WORDS[i % 6]}", "input": "", "output": f"{WORDS[(i + 1) % 6]} {WORDS[i % 6]}"}
            for i in range(offset, offset + n)]


def chatglm_folder_with_ice_text(tmp_path):
    sp_path = train_chatglm_sentencepiece(tmp_path / "sp", version=1)
    sp = spm.SentencePieceProcessor(model_file=sp_path)
    ids = {p: sp.piece_to_id(p) for p in ("[MASK]", "[gMASK]", "<sop>", "<eop>", "<pad>")}
    folder, config, _ = chatglm_v1_folder(tmp_path, vocab_size=sp.vocab_size() + 8)
    config.update(mask_token_id=ids["[MASK]"], gmask_token_id=ids["[gMASK]"], bos_token_id=ids["<sop>"],
                  eos_token_id=ids["<eop>"], pad_token_id=ids["<pad>"])
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copyfile(sp_path, folder / "ice_text.model")
    return folder, ids


def test_finetune_cli_trains_lora_on_a_chatglm_folder(tmp_path, capsys):
    folder, ids = chatglm_folder_with_ice_text(tmp_path)
    (tmp_path / "train.json").write_text(json.dumps(records(16)), encoding="utf-8")
    (tmp_path / "val.json").write_text(json.dumps(records(4, offset=16)), encoding="utf-8")
    common = dict(model=str(folder), train_data=str(tmp_path / "train.json"), val_data=str(tmp_path / "val.json"),
                  max_seq_len=48)

    _, _, _, tokenizer, data = prepare_run(TrainConfig(**common, out=str(tmp_path / "unused")))
    assert type(tokenizer).__name__ == "ChatGLMTokenizer"
    example = data.train[0]
    prompt = tokenizer.encode(get_family("chatglm").prompt_format.render(records(1)[0]["instruction"]), bos=True)
    assert prompt[-2:] == [ids["[gMASK]"], ids["<sop>"]]
    assert example.input_ids[:len(prompt)] == prompt and example.input_ids[-1] == ids["<eop>"]
    assert set(example.labels[:len(prompt)]) == {IGNORE_INDEX} and example.labels[-1] == ids["<eop>"]

    sys.path.insert(0, str(ROOT / "tools"))
    import finetune
    out = tmp_path / "run"
    assert finetune.main(["--model", str(folder), "--train-data", common["train_data"], "--val-data",
                          common["val_data"], "--max-seq-len", "48", "--max-steps", "4", "--batch-size", "4",
                          "--method", "lora", "--lora-targets", "wqkv,wo", "--lora-rank", "4", "--lr", "5e-2",
                          "--no-progress", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "exact match" in printed
    before = float(next(line for line in printed.splitlines() if line.startswith("before")).split()[1])
    after = float(next(line for line in printed.splitlines() if line.startswith("after")).split()[1])
    assert after < before

    model = load_adapter(load_model(folder, dtype=torch.float32), out / "adapter", method="lora")
    tokenizer = tokenizer_for("chatglm", folder / "ice_text.model")
    val_records, _ = read_records(tmp_path / "val.json")
    examples, _ = AlpacaEncoder(tokenizer, 48).encode_all(val_records)
    loss = evaluate_loss(model, examples, batch_size=16, pad_id=tokenizer.pad_id, device="cpu")
    assert abs(loss - after) < 1e-4


def test_exact_match_prompts_in_the_chatglm_format(tmp_path, monkeypatch):
    """Greedy exact match generates from the prompt the model was trained on: ChatGLM-6B's "[Round 0]\\n问：...\\n答："
    with [gMASK] <sop> behind, not the Alpaca template."""
    from minipeft.data import Record
    from minipeft.train.evaluate import exact_match
    folder, ids = chatglm_folder_with_ice_text(tmp_path)
    tokenizer = tokenizer_for("chatglm", folder / "ice_text.model")
    seen = []

    def fake_generate(model, prompts, max_new_tokens, eos_id, pad_id):
        seen.extend(prompts)
        return [[eos_id] for _ in prompts]

    monkeypatch.setattr("minipeft.generate.generate", fake_generate)
    records = [Record(instruction="你好", output="x"), Record(instruction="说", input="早上", output="y")]
    exact_match(torch.nn.Linear(1, 1), tokenizer, records)
    assert seen == [tokenizer.encode("[Round 0]\n问：你好\n答：", bos=True),
                    tokenizer.encode("[Round 0]\n问：说\n早上\n答：", bos=True)]
    assert seen[0][-2:] == [ids["[gMASK]"], ids["<sop>"]]
