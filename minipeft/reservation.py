"""The output policy of every writer (library functions and tools), in one place.

    reserve_output(target, overwrite, inputs=...)   the target reserved for the block (claim_output: until
        released); under it an existing target needs `overwrite`, which may not remove an input.
        Reservation.place(tmp) is the final rename: never over what appeared since.
    refuse_existing(path, overwrite)  an existing file or folder is replaced only with overwrite (--overwrite)
    plain_name(name, flag)   a name for an entry inside --out: no separators, not "." or "..".

A reservation is a marker file ".<name>.minipeft-reserved" beside the target, created with O_EXCL and holding
the owner's pid, host and process start time: a second writer of the same target is refused in one line while
the owner runs; a marker whose process is gone (killed) is taken over with a note. fileio.py's atomic writers
(atomic_folder, write_atomic) build on it.
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

TMP_MARK = ".tmp-"                                    # temporaries: ".<name>.tmp-<pid>..." (fileio cleans them up)
RESERVED_MARK = ".minipeft-reserved"


def refuse_existing(path, overwrite: bool, error: Type[Exception] = FileExistsError, what: str = "output") -> None:
    """Raise `error` (naming `path` and --overwrite) when `path` exists (a file or a folder, even an empty
    one) and not `overwrite`."""
    path = Path(path)
    if overwrite or not path.exists():
        return
    kind = "folder" if path.is_dir() else "file"
    raise error(f"{path}: {what} {kind} already exists; choose a new path, remove it, or pass --overwrite "
                f"(overwrite=True) to replace it")


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


def link_new(tmp: Path, path: Path, error: Type[Exception]) -> None:
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
            link_new(tmp, target, error)
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
    return (isinstance(pid, int) and pid != os.getpid() and pid_running(pid)
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


def pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
