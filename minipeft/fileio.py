"""Writing files so that a failure never leaves a half-written one, and reading JSON with errors that name
the file. The one home of these chores: every writer in the package and the tools uses them.

    write_atomic(path, write)         write(tmp) next to `path`, then rename it: the old file or the new one
    write_json_atomic(path, data)     the same for JSON text
    write_safetensors_atomic(path, tensors)
    atomic_folder(target, overwrite)  a temp folder that becomes `target` when the block ends without an error
    read_json(path, error)            a dict from a JSON file, or `error("<path>: what is wrong")`
    file_sha256(path)                 the SHA-256 of a file (a tokenizer's identity in a tokenized file)

Temporary names start with "." and contain ".tmp-<pid>": remove_stale_temporaries (which write_atomic and
atomic_folder call) removes those of processes that no longer run.

The output policy of every writer (reserve the target, refuse an existing one without --overwrite, never
replace what appeared meanwhile) is minipeft/reservation.py; atomic_folder applies it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Type

from .reservation import TMP_MARK, link_new, pid_running, refuse_existing, reserve_output  # noqa: F401 (refuse_existing: re-exported)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def default_file_mode() -> int:
    """The mode a plain open() would give a new file under the current umask (e.g. 0o644)."""
    return 0o666 & ~_umask()


def write_atomic(path, write: Callable[[Path], None], overwrite: Optional[bool] = None,
                 error: Type[Exception] = FileExistsError) -> Path:
    """Call write(tmp_path), then rename tmp_path to `path` (an existing file is replaced in one step).
    The file gets the umask's default mode, whatever `write` created it with. overwrite=None: a file of the
    writer's own (replaced); False: a file that exists by the time of the rename is left as it is (`error`)."""
    path = Path(path)
    remove_stale_temporaries(path.parent)
    tmp = _temp_name(path)
    try:
        write(tmp)
        os.chmod(tmp, default_file_mode())
        if overwrite is False:
            link_new(tmp, path, error)
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path, text: str) -> Path:
    """A UTF-8 text file, written whole or not at all."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path, data) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def write_safetensors_atomic(path, tensors: Dict, metadata: Optional[dict] = None) -> Path:
    from safetensors.torch import save_file
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return write_atomic(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata or {"format": "pt"}))


def _default_permissions(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; give the finished folder and its files the modes a plain
    mkdir / open would have given them under the current umask."""
    folder.chmod(0o777 & ~_umask())
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(default_file_mode())


@contextmanager
def atomic_folder(target, overwrite: bool = False, error: Type[Exception] = FileExistsError, inputs: Iterable = ()):
    """Yield a fresh temp folder next to `target`; when the block ends without an error it becomes `target`
    as a whole (replacing an existing one, and everything in it, only when `overwrite`), otherwise it is removed.
    The target is reserved for the block (reserve_output): an existing `target` without `overwrite`, or an input
    inside the `target` that `overwrite` would replace, raises `error` before anything is written, and so does a
    second writer of the same target; a folder that appears meanwhile is never replaced (Reservation.place).
    A kill at any point leaves either the old `target` or the new one, never a mixture."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise error(f"{target}: is a file; the output here is a folder")
    with reserve_output(target, overwrite, inputs=inputs, error=error) as reservation:
        remove_stale_temporaries(target.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_MARK}{os.getpid()}-", dir=target.parent))
        try:
            yield tmp
            _default_permissions(tmp)
            reservation.place(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def read_json(path, error: Type[Exception] = ValueError, what: str = "a JSON object"):
    """The parsed JSON object of `path`; `error` with a one-line message naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))     # -sig: a byte-order mark is accepted
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected {what}, got a JSON {type(data).__name__}")
    return data


def file_sha256(path) -> str:
    """The hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    import hashlib
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_stale_temporaries(folder) -> list:
    """Remove the temporaries (".<name>.tmp-<pid>...") in `folder` left by processes that no longer run.
    Returns the removed paths."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        name = entry.name
        if not name.startswith(".") or TMP_MARK not in name:
            continue
        digits = name.split(TMP_MARK, 1)[1].split("-", 1)[0].split(".", 1)[0]
        if not digits.isdigit() or pid_running(int(digits)):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
