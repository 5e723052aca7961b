"""Writing a job's files whole or not at all.

A file is written under a temporary name beside its final one (`.<name>.<random>.tmp`) and moved
into place when complete (`os.replace`, atomic on one file system). A write that fails — a full
disk, a quota, a killed job — leaves nothing under the final name and removes the temporary file;
a full disk or quota is one `OutputError` naming the file and what to do, not a traceback from
the Parquet writer (which reports "os error 28" and no path).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from reasonlab import ReasonlabError


class OutputError(ReasonlabError):
    """An output file could not be written (no space left, quota)."""


def disk_full(e: BaseException) -> bool:
    """Whether an exception (OSError, or a writer's own error wrapping one) means no space."""
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return any(s in text for s in ("No space left on device", "os error 28",
                                   "Disk quota exceeded", "os error 122"))  # fmt: skip


def _free(directory: Path) -> str:
    with contextlib.suppress(OSError):
        return f"{shutil.disk_usage(directory).free / 2**20:.1f} MiB free there"
    return "free space unknown"


@contextlib.contextmanager
def atomic(path: str | os.PathLike) -> Iterator[Path]:
    """`with atomic(path) as tmp:` write `tmp`; on leaving it is moved to `path`. On an error the
    temporary file is removed and `path` left as it was; no space left is an OutputError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, Exception) and disk_full(e):
            raise OutputError(
                f"{path}: no space left on the device while writing it ({_free(path.parent)}); "
                "nothing was written under that name. Free space there, or run the workflow "
                "where results/ has room, then run the same command again."
            ) from e
        raise


def write_parquet(df, path: str | os.PathLike) -> Path:
    """A polars DataFrame to Parquet at `path`, whole or not at all."""
    with atomic(path) as tmp:
        df.write_parquet(tmp)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_texts(texts: dict) -> None:
    """Several text files (path -> text): all written under temporary names first, then moved
    into place; an error leaves none of them."""
    with contextlib.ExitStack() as stack:
        for path, text in texts.items():
            stack.enter_context(atomic(path)).write_text(text, encoding="utf-8")


def write_all(tables: dict, paths: dict) -> None:
    """Several DataFrames (key -> DataFrame, key -> path): all written under temporary names
    first, then moved into place; an error leaves none of them."""
    with contextlib.ExitStack() as stack:
        for key, df in tables.items():
            df.write_parquet(stack.enter_context(atomic(paths[key])))
