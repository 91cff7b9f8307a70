"""Crash safety, as a user would meet it: `kill -9` at a random step of a plain run and of a 2-rank DeepSpeed
run (LoRA with dropout, so the RNG state matters), then `--resume`: the final adapter is bit-identical to the one
of an uninterrupted run and metrics.jsonl holds every step once. And a kill at each write step of save_adapter,
save_model, convert_checkpoint and tools/extend_vocab.py never leaves a folder that loads as complete but is not.

The writers are killed from inside (a forked child SIGKILLs itself just before its k-th file-system step:
a file write, a copy, a chmod, a rename), for every k, since a timed kill would almost always land outside
a save of a tiny model. A kill in the middle of writing a file is the same case as a kill before its rename:
the bytes are under a temporary name.

The runs are stopped at their step deterministically, not by a timed race: MINIPEFT_STOP_AT_STEP=k:SIGSTOP
(minipeft/train/stopping.py) freezes each training process right after step k and its checkpoint, and the test
then kills -9 the launcher and every process it started.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_helpers import MAX_SEQ_LEN, make_workspace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("crash_ws"))


def tool_env(**extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "DEEPSPEED_TIMEOUT": "2", "HF_HUB_OFFLINE": "1"}
    env.update(extra)
    return env


def run_flags(ws, out, steps):
    return ["--model", ws["model"], "--train-data", ws["train"], "--val-data", ws["val"], "--max-seq-len",
            str(MAX_SEQ_LEN), "--lora-dropout", "0.1", "--lora-rank", "4", "--lr", "1e-2", "--batch-size", "2",
            "--grad-accum", "2", "--max-steps", str(steps), "--save-every", "1", "--keep-checkpoints", "2",
            "--no-exact-match", "--no-progress", "--samples", "0", "--out", str(out)]


def adapter_tensors(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter.safetensors"))


def training_steps(run_dir: Path) -> list:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if "eval" not in row]


def descendants(pid: int) -> list:
    """Every process below `pid` (from /proc), children first."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def is_stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except OSError:
        return False


def kill_after_checkpoint(command, run_dir: Path, checkpoints: Path, steps: int, seed: int,
                          complete: str = "step-{k:06d}.pt", ranks: int = 1) -> int:
    """Start `command` with MINIPEFT_STOP_AT_STEP=k:SIGSTOP (k random): each of its `ranks` training processes
    freezes itself right after step k and its checkpoint (`complete`: its file, or a DeepSpeed tag's mark); then
    kill -9 it and every process it started; returns k. Fails when the run ended before the kill."""
    rng = random.Random(seed)
    k = rng.randint(1, steps // 3)
    log = run_dir.parent / f"{run_dir.name}.stderr"           # a file, not a pipe nobody reads (it would fill)
    with open(log, "w") as stderr:
        proc = subprocess.Popen(command, cwd=ROOT, env=tool_env(MINIPEFT_STOP_AT_STEP=f"{k}:SIGSTOP"),
                                stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if sum(map(is_stopped, [proc.pid] + descendants(proc.pid))) >= ranks:
            break
        time.sleep(0.05)
    family = [proc.pid] + descendants(proc.pid)      # torchrun's ranks are not in its process group
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:                   # a helper process that had already ended by itself
            pass
    proc.wait()
    while any(Path(f"/proc/{pid}").exists() and not is_zombie(pid) for pid in family[1:]):
        time.sleep(0.01)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    assert not (run_dir / "adapter").exists(), "the run finished before the kill: the test would prove nothing"
    assert (checkpoints / complete.format(k=k)).exists(), f"step {k}'s checkpoint is not complete"
    newest = max(int(p.name[5:11]) for p in checkpoints.glob("step-*"))
    assert newest < steps - 1, f"killed only at step {newest} of {steps}: too late to test much"
    return k


def assert_same_as_uninterrupted(full: Path, resumed: Path, steps: int):
    a, b = adapter_tensors(full), adapter_tensors(resumed)
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert training_steps(resumed) == list(range(1, steps + 1))      # no replayed step repeated


def test_plain_run_killed_and_resumed_is_bit_identical(ws, tmp_path):
    steps = 14
    finetune = [sys.executable, str(ROOT / "tools" / "finetune.py"), "--device", "cpu"]
    subprocess.run(finetune + run_flags(ws, tmp_path / "full", steps), cwd=ROOT, env=tool_env(), check=True,
                   capture_output=True)
    run_dir = tmp_path / "killed"
    kill_after_checkpoint(finetune + run_flags(ws, run_dir, steps), run_dir, run_dir / "checkpoints", steps, seed=1)
    done = subprocess.run(finetune + run_flags(ws, run_dir, steps) + ["--resume", str(run_dir)], cwd=ROOT,
                          env=tool_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_as_uninterrupted(tmp_path / "full", run_dir, steps)
    assert len(list((run_dir / "checkpoints").glob("step-*.pt"))) == 2         # --keep-checkpoints 2
    assert not list((run_dir / "checkpoints").glob(".*tmp-*"))                 # a killed write is cleaned up


def test_deepspeed_two_ranks_killed_and_resumed_is_bit_identical(ws, tmp_path):
    pytest.importorskip("deepspeed")
    steps = 24

    def launch_on_a_free_port():                     # a fresh port per launch: the killed one may linger
        import socket
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                str(ROOT / "tools" / "finetune.py"), "--deepspeed", str(ROOT / "tools" / "ds_configs" / "zero2.json")]
    launch = launch_on_a_free_port()
    full = subprocess.run(launch + run_flags(ws, tmp_path / "full", steps), cwd=ROOT, env=tool_env(),
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]
    run_dir = tmp_path / "killed"
    kill_after_checkpoint(launch_on_a_free_port() + run_flags(ws, run_dir, steps), run_dir,
                          run_dir / "checkpoints" / "deepspeed", steps, seed=2,
                          complete="step-{k:06d}/minipeft_complete.json", ranks=2)
    done = subprocess.run(launch_on_a_free_port() + run_flags(ws, run_dir, steps) + ["--resume", str(run_dir)], cwd=ROOT,
                          env=tool_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_as_uninterrupted(tmp_path / "full", run_dir, steps)
    assert len(list((run_dir / "checkpoints" / "deepspeed").glob("step-*"))) == 2    # --keep-checkpoints 2


# ---- kills inside the writers -----------------------------------------------------------------------
STEPS = [(os, "replace"), (os, "chmod"), (shutil, "copyfile"), (Path, "write_text"), (Path, "write_bytes"),
         (torch, "save")]


def count_or_kill_steps(kill_at):
    """Wrap the file-system steps the writers use: count them, and SIGKILL this process before step kill_at."""
    import safetensors.torch as st
    calls = [0]

    def wrap(owner, name):
        original = getattr(owner, name)

        def step(*args, **kwargs):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)
        setattr(owner, name, step)
    for owner, name in STEPS + [(st, "save_file")]:
        wrap(owner, name)
    return calls


def kill_at_every_step(operation, check, reset=lambda: None):
    """Run operation() in a forked child once to count its steps, then once per step with a kill before it;
    after each, check(k) looks at what is on disk, then reset() puts back the state before the operation."""
    def in_child(kill_at):
        pid = os.fork()
        if pid == 0:                      # the child: count (or die), then report the count in its exit code
            code = 0
            try:
                calls = count_or_kill_steps(kill_at)
                operation()
                code = min(calls[0], 250)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        return status
    status = in_child(kill_at=0)
    total = os.waitstatus_to_exitcode(status)
    assert 2 < total < 250, f"the operation made {total} steps, or failed"
    reset()
    results = []
    for k in range(1, total + 1):
        assert os.waitstatus_to_exitcode(in_child(kill_at=k)) == -signal.SIGKILL
        results.append(check(k))
        reset()
    return results


def loads_complete_or_absent(folder: Path, load, expected):
    """`folder` is absent, or loads and equals `expected` (one of the allowed complete states)."""
    if not folder.exists():
        return "absent"
    got = load(folder)
    assert any(got == e for e in expected), f"{folder} is there but holds neither the old nor the new content"
    return "complete"


def test_killed_save_adapter_never_leaves_a_mixed_adapter(tmp_path):
    from minipeft.model import Transformer
    from minipeft.config import ModelConfig
    from minipeft.peft import LoRAConfig, apply_peft, load_adapter, save_adapter
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=32)
    torch.manual_seed(0)
    old = apply_peft(Transformer(cfg), LoRAConfig(rank=2, targets=("wq",)))
    new = apply_peft(Transformer(cfg), LoRAConfig(rank=4, targets=("wq", "wv")))
    with torch.no_grad():
        for p in new.parameters():
            if p.requires_grad:
                p.add_(1.0)
    folder = tmp_path / "adapter"
    save_adapter(old, folder)

    def state(path):
        model = load_adapter(Transformer(cfg), path)
        return {k: v.clone() for k, v in model.adapter_state_dict().items()}
    expected = [state(folder)]
    save_adapter(new, tmp_path / "new")
    expected.append(state(tmp_path / "new"))

    def check(k):
        return loads_complete_or_absent(folder, lambda p: tensors_key(state(p)), list(map(tensors_key, expected)))

    def put_back_old():
        shutil.rmtree(folder, ignore_errors=True)
        save_adapter(old, folder)
    results = kill_at_every_step(lambda: save_adapter(new, folder, overwrite=True), check, put_back_old)
    assert results.count("absent") <= 1          # only between moving the old folder aside and the new one in
    fresh = tmp_path / "fresh"
    kill_at_every_step(lambda: save_adapter(new, fresh),
                       lambda k: loads_complete_or_absent(fresh, lambda p: tensors_key(state(p)),
                                                          [tensors_key(expected[1])]),
                       lambda: shutil.rmtree(fresh, ignore_errors=True))


def tensors_key(state: dict):
    return tuple(sorted((k, tuple(v.shape), float(v.double().sum())) for k, v in state.items()))


def test_killed_save_model_convert_and_extend_vocab_leave_nothing_half_written(ws, tmp_path):
    from minipeft.checkpoint import convert_checkpoint, load_model, save_model
    from minipeft.tokenizer import Tokenizer
    sys.path.insert(0, str(ROOT / "tools"))
    import extend_vocab
    model = load_model(ws["model"])

    def weights(path):
        return tensors_key(load_model(path).state_dict())
    expected = [weights(ws["model"])]
    out = tmp_path / "saved"
    kill_at_every_step(lambda: save_model(model, model.config, out, tokenizer_path=ws["tokenizer"], max_shard_size="20KB"),
                       lambda k: loads_complete_or_absent(out, weights, expected),
                       lambda: shutil.rmtree(out, ignore_errors=True))
    converted = tmp_path / "converted"
    kill_at_every_step(lambda: convert_checkpoint(ws["model"], converted, max_shard_size="20KB"),
                       lambda k: loads_complete_or_absent(converted, weights, expected),
                       lambda: shutil.rmtree(converted, ignore_errors=True))

    # extend_vocab: a tokenizer extended with itself re-trained on a corpus, and the checkpoint resized
    corpus = tmp_path / "zh.txt"
    corpus.write_text("\n".join(["今天天气很好", "我们去公园散步", "猫在垫子上睡觉", "狗在树下"] * 30), encoding="utf-8")
    token_out, ckpt_out = tmp_path / "ext" / "tokenizer.model", tmp_path / "ext_ckpt"
    argv = ["--base-tokenizer", ws["tokenizer"], "--corpus", str(corpus), "--vocab-size", "320",
            "--out", str(token_out), "--checkpoint", ws["model"], "--checkpoint-out", str(ckpt_out)]
    assert extend_vocab.main(argv) == 0
    grown = [weights(ckpt_out)]
    pieces = Tokenizer(token_out).vocab_size
    shutil.rmtree(ckpt_out)
    token_out.unlink()

    def check(k):
        if token_out.exists():
            assert Tokenizer(token_out).vocab_size == pieces
        return loads_complete_or_absent(ckpt_out, weights, grown)

    def reset():
        shutil.rmtree(ckpt_out, ignore_errors=True)
        token_out.unlink(missing_ok=True)
    kill_at_every_step(lambda: extend_vocab.main(argv), check, reset)
