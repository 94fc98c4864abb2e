"""Write output files atomically: a temporary file beside the target, then a rename.

An interrupted command therefore never leaves a truncated file under the final name; the label
file is the deliverable and must be either whole or absent.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from faceattr.errors import FaceAttrError

FLOATS = (float, np.floating)  # numpy's float32 is no float: str() would give its own digits
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk, a quota, a size limit


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` only if the block succeeds."""
    target = Path(target)
    check_replaceable(target)
    # Part of the name only: a name near the file system's 255 bytes must still have its own.
    tmp_path = target.parent / f".{target.name[:40]}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    check_writable(target.parent)  # a file where a folder should be is named as such
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # os.open with 0o666 lets the umask decide, as for any file the user writes (mkstemp
        # would leave the final file readable by its owner only).
        os.close(os.open(tmp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        mode = tmp_path.stat().st_mode & 0o777
    except OSError as e:
        raise FaceAttrError(f"cannot write {target}: {e.strerror or e}") from None
    try:
        yield tmp_path
        if tmp_path.stat().st_mode & 0o777 != mode:  # a writer that made the file anew, 0600
            os.chmod(tmp_path, mode)  # (safetensors' save_file): the umask's choice still holds
        os.replace(tmp_path, target)
    except OSError as e:
        if e.errno in NO_ROOM and e.filename is None:  # a write's, which names no file
            raise FaceAttrError(f"cannot write {target}: {e.strerror}") from None
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


def check_replaceable(target: Path) -> None:
    """Refuse a `target` that exists and is no regular file (a folder, /dev/null, a pipe): not
    ours to replace. `atomic_path` asks; a command may ask first, before its long work."""
    if target.exists() and not target.is_file():
        raise FaceAttrError(f"cannot write {target}: it exists and is not a regular file")


def stale_temporaries(folder: str | Path) -> list[Path]:
    """The temporary files `atomic_path` left under `folder` in processes that no longer run
    (killed while they wrote: SIGKILL, a power cut), which nothing else would remove."""
    stale = []
    for path in Path(folder).rglob(".*.tmp"):
        parts = path.name.rsplit(".", 3)  # .NAME, PID, HEX, tmp
        if len(parts) == 4 and parts[1].isdecimal() and not _running(int(parts[1])):
            stale.append(path)
    return stale


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process, say: running
        pass
    return True


def write_text(target: str | Path, text: str) -> Path:
    """Atomically write `text` to `target`."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace")  # a Latin-1 path
    return Path(target)


def write_json(target: str | Path, data: Any) -> Path:
    """Atomically write `data` as indented JSON."""
    return write_text(target, json.dumps(data, indent=2, default=_jsonable) + "\n")


def write_together(texts: dict[Path, str]) -> None:
    """Write files that go together, as the label file and its table: every one is written to
    its temporary file before any is renamed into place, in the order given. A failure while
    writing (a full disk, Ctrl-C) or at the first rename leaves all of them as they were; one
    between two renames, a moment's window, leaves the first new and the rest old."""
    with contextlib.ExitStack() as stack:
        for target, text in reversed(texts.items()):  # contexts exit last first
            stack.enter_context(atomic_path(target)).write_text(text, encoding="utf-8")


def csv_text(header: list[str], rows: list[list[Any]]) -> str:
    """A small CSV. Floats are written in full (the shortest text that reads back as the same
    number): rounded, a score just under a threshold could read back on it, and confident
    scores near 1 would collapse into ties."""
    lines = [",".join(header)]
    for row in rows:
        lines.append(",".join(repr(float(v)) if isinstance(v, FLOATS) else str(v) for v in row))
    return "\n".join(lines) + "\n"


def write_csv(target: str | Path, header: list[str], rows: list[list[Any]]) -> Path:
    """Atomically write a small CSV (`csv_text`)."""
    return write_text(target, csv_text(header, rows))


def ensure_writable_dir(path: str | Path) -> Path:
    """Create `path` if needed and check we can write into it, before any long work starts."""
    path = Path(path)
    check_writable(path)  # a file in the way is named as such, not as "File exists"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe."):
            pass
    except OSError as e:
        raise FaceAttrError(f"cannot write to {path}: {e.strerror or e}") from None
    return path


def check_writable(path: str | Path) -> None:
    """Fail now, not after an hour, if `path` (a folder, existing or not) cannot be written."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        what = "it" if existing == path else existing
        raise FaceAttrError(f"cannot write to {path}: {what} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FaceAttrError(f"cannot write to {path}: permission denied")


def within(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies inside it, links followed."""
    return path.resolve().is_relative_to(folder.resolve())


def refuse_inside(out: str | Path, image_folders: list[Path], option: str) -> None:
    """Refuse an output folder in an image folder: the pictures written there would join the
    dataset's images, and every later command on it stop at "image name is not a number"."""
    for folder in image_folders:
        if within(Path(out), folder):
            raise FaceAttrError(
                f"{option} {out} is inside the image folder {folder}; choose another {option}"
            )


def _jsonable(obj: Any) -> Any:
    """Let numpy scalars and paths pass through json.dumps."""
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
