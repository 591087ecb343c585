"""Folder primitives shared by every phrasefuse output (stores, indexes, heads, reports).

A file appears whole or not at all (`write_atomic`: a hidden temporary, fsync'ed, renamed); a
folder output likewise (`atomic_folder`: built in a hidden sibling, swapped in by rename, the
earlier folder put back on failure). `recover_folder` / `recover_leftovers` undo what a killed
process left; `read_meta_json` reads and checks a folder's meta.json; `library_versions` is
what every meta.json records. The fault points (`fault_point(...)`, tests only) name the steps.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from phrasefuse import __version__
from phrasefuse.errors import BadInput
from phrasefuse.faultpoints import fault_point

META = "meta.json"
# A store's shard names; `write_atomic` names their fault points "shard-..." (tests only).
SHARD_RE = re.compile(r"^part-(\d{5,})\.parquet$")

# Write failures that are the user's environment, not a bug: full disk, quota, file-size
# limit, read-only or forbidden folder (BadInput, exit 2).
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})
# An output path taken by something else: a folder where a file goes, a file where a folder goes.
OCCUPIED_ERRNOS = frozenset({errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY})


# ---------------------------------------------------------------- atomic files


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write `path` whole or not at all: `write(tmp)` fills a hidden temporary file,
    which is fsync'ed and renamed over `path`; the folder is fsync'ed after."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    kind = "shard" if SHARD_RE.match(path.name) else path.name  # names the fault points (tests only)
    try:
        write(str(tmp))
        fault_point(f"{kind}-tmp-written")
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fault_point(f"{kind}-synced")
        os.replace(tmp, path)
        fault_point(f"{kind}-renamed")
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS:
            fix = ("free space" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "make the folder writable")
            raise BadInput(f"{path}: cannot write ({os.strerror(e.errno)}); {fix} or choose another output folder, "
                           f"then re-run (files already written are kept)") from None
        if isinstance(e, OSError) and e.errno in OCCUPIED_ERRNOS:
            raise BadInput(f"{path}: cannot write there ({os.strerror(e.errno)}: a folder, or a file where a "
                           f"folder should be); choose another output path") from None
        raise
    fsync_dir(path.parent)


def make_folder(folder: str | os.PathLike, what: str = "--out") -> Path:
    """mkdir -p `folder`; a read-only place, a full disk or a file in the way is a BadInput naming it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS | OCCUPIED_ERRNOS:
            raise
        raise BadInput(f"{what} {folder}: cannot create the folder ({e.strerror}); make the place writable or "
                       f"choose another {what}") from None
    return folder


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")

    write_atomic(path, write)


def write_parquet_atomic(path: str | os.PathLike, table: pa.Table) -> None:
    # Embeddings barely compress; ids and keys do.
    compression = {name: ("none" if name == "emb" else "zstd") for name in table.column_names}
    write_atomic(path, lambda tmp: pq.write_table(table, tmp, compression=compression))


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike, fmt: str, what: str) -> Iterator[Path]:
    """Build a folder output (index, head) whole or not at all.

    Yields an empty hidden sibling folder to fill; write its meta.json last. On success the
    folder is renamed to `out` (an earlier folder of the same format is replaced, and put back
    if the rename fails); on any error the temporary folder is removed and `out` is untouched.
    """
    out = Path(out)
    recover_folder(out)  # a swap or delete killed half-way: the old folder back, leftovers gone
    if out.exists() and not (is_folder_of(out, fmt) or (out.is_dir() and not any(out.iterdir()))):
        raise BadInput(f"{out}: exists and is not a phrasefuse {what}; choose another --out (or remove it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS and e.errno not in (errno.ENOTDIR, errno.EEXIST):
            raise
        raise BadInput(f"{out.parent}: cannot create the folder ({e.strerror}); make it writable or choose "
                       f"another --out") from None
    try:
        yield tmp
        fault_point("folder-built")
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_folder_of(path: str | os.PathLike, fmt: str) -> bool:
    """Whether `path` holds a meta.json of format `fmt`."""
    recover_folder(Path(path))
    try:
        return json.loads((Path(path) / META).read_text(encoding="utf-8")).get("format") == fmt
    except (OSError, ValueError, AttributeError):
        return False


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished folder over `out`; the previous one is put back on failure."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
        fault_point("folder-old-moved")
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    fault_point("folder-renamed")
    fsync_dir(out.parent)  # the rename itself is durable
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# Hidden siblings of a folder `out` that `atomic_folder`, `_swap_in` and `remove_folder` make,
# each named with the pid of the process that made it.
LEFTOVER_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|del)-(?P<pid>\d+)$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's live process
    return True


def recover_folder(out: Path) -> None:
    """Undo what a killed process left around the folder `out`: when `out` is missing and an
    `.old-PID` copy of it remains (killed between the two renames of `_swap_in`), the old folder
    is renamed back; other leftovers of dead processes (`.tmp-PID` half-built folders or files,
    `.old-PID` and `.del-PID` folders being deleted) are removed. Leftovers of live processes are
    left alone."""
    out = Path(out)
    if out.name:
        recover_leftovers(out.parent, only=out.name)


def recover_leftovers(folder: Path, only: str | None = None) -> None:
    """`recover_folder` for every output in `folder` (or only the one named `only`): one listing."""
    try:
        entries = list(os.scandir(folder)) if Path(folder).is_dir() else []
    except OSError:
        return
    leftovers = []
    for entry in entries:
        m = LEFTOVER_RE.match(entry.name)
        if m and (only is None or m["name"] == only) and not _alive(int(m["pid"])):
            leftovers.append((m["kind"] != "old", m["name"], Path(entry.path)))
    try:
        for _, name, p in sorted(leftovers):  # the .old copies first: a missing output comes back
            out = Path(folder) / name
            if p.name.startswith(f".{name}.old-") and not os.path.lexists(out) and (p / META).is_file():
                os.rename(p, out)
                fsync_dir(out.parent)
            elif p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only place: readers still read what is there


def remove_folder(path: str | os.PathLike) -> None:
    """Delete a folder (derived data) crash-safely: one rename takes it away whole, then the hidden
    `.NAME.del-PID` copy is deleted; a kill meanwhile leaves no half-deleted folder at `path`
    (`recover_folder` removes the copy later)."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    trash = path.with_name(f".{path.name}.del-{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)



# ---------------------------------------------------------------- meta


def read_meta_json(folder: str | os.PathLike, *, fmt: str, version: int, what: str, not_a: str, missing: str,
                   unreadable: str) -> dict:
    """The meta.json of a phrasefuse folder (store, index, head), checked for its format and version."""
    meta_path = Path(folder) / META
    if not meta_path.is_file():
        recover_folder(Path(folder))  # killed mid-swap: the previous folder is put back
    if not meta_path.is_file():
        raise BadInput(f"{folder}: not {not_a} (no {META}); {missing}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadInput(f"{meta_path}: unreadable ({e}); {unreadable}") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise BadInput(f"{meta_path}: not a phrasefuse {what} meta (format != {fmt!r})")
    if meta.get("format_version", 0) > version:
        raise BadInput(f"{meta_path}: {what} format {meta['format_version']} is newer than this phrasefuse "
                       f"reads ({version}); upgrade phrasefuse")
    return meta


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape an embedding (recorded in meta.json)."""
    from importlib import metadata

    versions = {"phrasefuse": __version__}
    for dist in ("torch", "torchvision", "open_clip_torch", "timm", "sentence-transformers",
                 "transformers", "pillow", "simplejpeg", "pyarrow", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions
