"""Writing files so that a failure never leaves a half-written one, and reading JSON with errors that name
the file. The one home of these chores: every writer in the package and the tools uses them.

    write_atomic(path, write)         write(tmp) next to `path`, then rename it: the old file or the new one
    write_json_atomic(path, data)     the same for JSON text
    write_safetensors_atomic(path, tensors)
    atomic_folder(target, overwrite)  a temp folder that becomes `target` when the block ends without an error
    refuse_existing(path, overwrite)  an existing file or folder is replaced only with overwrite (--overwrite)
    read_json(path, error)            a dict from a JSON file, or `error("<path>: what is wrong")`
    file_sha256(path)                 the SHA-256 of a file (a tokenizer's identity in a tokenized file)

Temporary names start with "." and contain ".tmp-<pid>": remove_stale_temporaries (which write_atomic and
atomic_folder call) removes those of processes that no longer run.

The output policy of every writer (library functions and tools), in one place:
    reserve_output(target, overwrite, inputs=...)   the target reserved for the block (claim_output: until
        released); under it an existing target needs `overwrite`, which may not remove an input.
        Reservation.place(tmp) is the final rename: never over what appeared since.
    plain_name(name, flag)   a name for an entry inside --out: no separators, not "." or "..".
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Type

TMP_MARK = ".tmp-"
RESERVED_MARK = ".minipeft-reserved"


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def default_file_mode() -> int:
    """The mode a plain open() would give a new file under the current umask (e.g. 0o644)."""
    return 0o666 & ~_umask()


def refuse_existing(path, overwrite: bool, error: Type[Exception] = FileExistsError, what: str = "output") -> None:
    """Raise `error` (naming `path` and --overwrite) when `path` exists (a file or a folder, even an empty
    one) and not `overwrite`."""
    path = Path(path)
    if overwrite or not path.exists():
        return
    kind = "folder" if path.is_dir() else "file"
    raise error(f"{path}: {what} {kind} already exists; choose a new path, remove it, or pass --overwrite "
                f"(overwrite=True) to replace it")


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
            _link_new(tmp, path, error)
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


# ---- the output policy: reserve, check, place ---------------------------------------------------------------
def plain_name(name: str, flag: str, error: Type[Exception] = ValueError) -> str:
    """`name` when it names an entry inside a folder (no path separator, not "." or ".."); `error` otherwise."""
    if not name or name in (".", "..") or "/" in name or (os.altsep or "/") in name or os.sep in name or "\0" in name:
        raise error(f"{flag} {name!r}: expected a plain name (no '/', not '.' or '..') of an entry in the output")
    return name


def _inside(path, folder) -> bool:
    path, folder = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return path == folder or folder in path.parents


def refuse_inputs_inside(removed: Iterable, inputs: Iterable, error: Type[Exception] = ValueError) -> None:
    """`error` when an input (file or folder) lies in or at an existing path of `removed` (what --overwrite removes)."""
    for gone, given in ((g, i) for g in removed if os.path.lexists(g) for i in inputs if i is not None):
        if _inside(given, gone):
            raise error(f"{given}: is an input of this run, and --overwrite would remove it with {gone}; "
                        f"move it out first, or write to another output")


def _identity(path) -> Optional[tuple]:
    st = os.lstat(path) if os.path.lexists(path) else None
    return (st.st_dev, st.st_ino) if st else None


def _link_new(tmp: Path, path: Path, error: Type[Exception]) -> None:
    """tmp becomes `path` only if no `path` exists (a hard link cannot replace; then tmp goes)."""
    try:
        os.link(tmp, path)
    except OSError as err:                            # (a file system without hard links: check, then rename)
        if isinstance(err, FileExistsError) or os.path.lexists(path):
            raise error(f"{path}: appeared while this output was being written; left as it is") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _process_start(pid: int) -> Optional[str]:
    """The start time of process `pid` (/proc/<pid>/stat field 22), to tell a reused pid; None if unknown."""
    with contextlib.suppress(OSError, IndexError), open(f"/proc/{pid}/stat", errors="replace") as f:
        return f.read().rsplit(")", 1)[1].split()[19]
    return None


_HELD: Dict[str, "Reservation"] = {}                  # marker path -> the reservation this process holds


class Reservation:
    """A claim on one output path, until release() or the process's exit; nested in this process's own claim."""

    def __init__(self, target: Path, marker: Path, token: str, error: Type[Exception], outer=None):
        self.target, self.marker, self.token, self.error, self.outer = target, marker, token, error, outer
        self.found = _identity(target)                # what the target is when reserved (None: absent)
        if outer is None:
            _HELD[str(marker)] = self
            atexit.register(self.release)

    def release(self, outer_too: bool = False) -> None:
        """Remove the marker (a nested claim: nothing, or with outer_too the claim it is nested in)."""
        if self.outer is not None:
            return self.outer.release() if outer_too else None
        if _HELD.get(str(self.marker)) is not self:
            return None
        del _HELD[str(self.marker)]
        atexit.unregister(self.release)
        if (_read_marker(self.marker) or {}).get("token") == self.token:
            self.marker.unlink(missing_ok=True)

    def place(self, tmp: Path) -> None:
        """The final rename: tmp becomes the target, over what the target was when reserved and nothing else."""
        target, error = self.target, self.error
        if _identity(target) != self.found:
            raise error(f"{target}: appeared or changed while this output was being written (by another "
                        f"program?); left as it is, the new output was not kept")
        if self.found is None and not tmp.is_dir():
            _link_new(tmp, target, error)
        elif self.found is None:
            try:
                os.replace(tmp, target)               # onto a folder that appeared since: fails unless it is empty
            except OSError:
                raise error(f"{target}: appeared while this output was being written; left as it is") from None
        elif not tmp.is_dir():
            os.replace(tmp, target)
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_MARK}{os.getpid()}-old-", dir=target.parent))
            os.replace(target, old / "previous")
            os.replace(tmp, target)
            shutil.rmtree(old)
        self.found = _identity(target)


def _read_marker(marker: Path) -> Optional[dict]:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(marker.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else None
    return None


def _marker_is_live(holder: Optional[dict], marker: Path) -> bool:
    if holder is None:                                # being written this instant (or cut short by a kill)
        return os.path.lexists(marker) and os.path.getmtime(marker) > time.time() - 10
    if holder.get("host") != socket.gethostname():   # another machine's process: cannot tell; assume it runs
        return True
    pid = holder.get("pid")                           # (this process's own claims never get here)
    return (isinstance(pid, int) and pid != os.getpid() and _pid_running(pid)
            and holder.get("started") in (None, _process_start(pid)))


def _take_over(marker: Path, holder: Optional[dict]) -> None:
    """Remove a stale marker, unless another process replaced it by a live one meanwhile."""
    aside = marker.with_name(f"{marker.name}.stale-{os.getpid()}")
    try:
        os.rename(marker, aside)
    except FileNotFoundError:
        return
    if _read_marker(aside) != holder and holder is not None:   # a fresh one: put it back
        with contextlib.suppress(OSError):
            os.link(aside, marker)
    aside.unlink(missing_ok=True)


def claim_output(target, overwrite: bool = False, *, inputs: Iterable = (), error: Type[Exception] = FileExistsError,
                 what: str = "output", refuse: Optional[Callable[[Path], None]] = None,
                 removes: Optional[Iterable] = None) -> Reservation:
    """Reserve `target` (see reserve_output) and return the Reservation; the caller releases it."""
    target, marker = Path(target), _marker_of(target)
    if marker.name in (f".{RESERVED_MARK}", RESERVED_MARK):
        raise error(f"{target}: cannot be an output (it has no name in a parent folder)")
    marker.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_start(os.getpid()),
              "token": token, "target": os.path.abspath(target), "command": " ".join(sys.argv)}
    outer = _HELD.get(str(marker))
    for _ in range(0 if outer else 5):
        try:
            with os.fdopen(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "w") as f:
                json.dump(record, f)
            break
        except FileExistsError:
            holder = _read_marker(marker)
            if _marker_is_live(holder, marker):
                who = f"process {holder.get('pid')} on {holder.get('host')}" if holder else "another process"
                raise error(f"{target}: in use by {who}, which is writing it now; wait for it to finish or "
                            f"choose another output (if no such run exists, remove {marker})") from None
            _take_over(marker, holder)
            if holder is not None:
                print(f"note: {target}: taking over the reservation left by process {holder.get('pid')}, which "
                      f"no longer runs", file=sys.stderr)
    else:
        if outer is None:
            raise error(f"{target}: could not be reserved ({marker} keeps reappearing)")
    reservation = Reservation(target, marker, outer.token if outer else token, error, outer)
    try:
        (refuse or (lambda t: refuse_existing(t, overwrite, error, what)))(target)
        if overwrite:
            refuse_inputs_inside([target] if removes is None else removes, inputs, error)
        reservation.found = _identity(target)
    except BaseException:
        reservation.release()
        raise
    return reservation


def _marker_of(target) -> Path:
    absolute = Path(os.path.abspath(target))
    return absolute.with_name(f".{absolute.name}{RESERVED_MARK}") if absolute.name else absolute / RESERVED_MARK


def release_output(target) -> None:
    """Drop the claim this process holds on `target` (claim_output), if it holds one."""
    held = _HELD.get(str(_marker_of(target)))
    if held is not None:
        held.release()


@contextmanager
def reserve_output(target, overwrite: bool = False, **options):
    """Hold `target` (a file or folder this writer makes) for the block: a marker ".<name>.minipeft-reserved"
    beside it is created with O_EXCL (a live holder: `error` in one line; a killed one's, whose pid no longer
    runs: taken over, with a note), then refuse(target) runs under it (default: an existing target needs
    `overwrite`), and `overwrite` may not remove an input (`inputs` in `removes`, default the target)."""
    reservation = claim_output(target, overwrite, **options)
    try:
        yield reservation
    finally:
        reservation.release()


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


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        if not digits.isdigit() or _pid_running(int(digits)):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
