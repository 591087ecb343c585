"""Folder primitives shared by every phrasefuse output (stores, indexes, heads, reports).

A file appears whole or not at all (`write_atomic`: a hidden temporary, fsync'ed, renamed); a
folder output likewise (`atomic_folder`: built in a hidden sibling, swapped in by rename, the
earlier folder put back on failure). `recover_folder` / `recover_leftovers` undo what a killed
writer left; `readable_folder` lets a reader read a swap's old copy in place; `read_meta_json`
reads and checks a folder's meta.json; `library_versions` is what every meta.json records. The
fault points (`fault_point(...)`, tests only) name the steps.

Leftovers (what a SIGKILL can leave next to an output NAME), the only names phrasefuse ever
deletes or renames on its own::

    .NAME.phrasefuse-TOKEN.tmp-PID    a temporary file (`write_atomic`) or half-built folder (`atomic_folder`)
    .NAME.phrasefuse-TOKEN.old-PID    the previous folder, moved aside between the two renames of a swap
    .NAME.phrasefuse-TOKEN.del-PID    a folder being deleted (`remove_folder`)

TOKEN is 16 random hex digits drawn per write, PID the writer's process id. A leftover FOLDER
holds the file `.phrasefuse-owner` whose content is its TOKEN, written before the folder gets
its leftover name (a temporary folder: right after mkdir); recovery touches a folder only when
that file matches the name's TOKEN (or, for a `.tmp-` name, when the folder is empty: killed
between mkdir and the marker). A leftover FILE is removed only inside a folder that is
phrasefuse's: a meta.json of a phrasefuse format, a run work folder (run-state.json), or one
the caller vouches for (`owned=True`). Leftovers of live processes are kept. Any other name
(`.vimrc.old-2021`, the `.NAME.tmp-N` names of phrasefuse before 0.9) is never touched.

Writers recover (`recover_folder`, `recover_leftovers`): a swap killed between its renames gets
its old folder renamed back. Readers never delete or rename anything: `readable_folder` points
them at the old copy in place until the next writer puts it back.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
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
    tmp = path.with_name(leftover_name(path.name, "tmp", new_token()))
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
        code = None if isinstance(e, BadInput) else environment_errno(e, path.parent)
        if code is not None:
            raise environment_error(path, code) from None
        if isinstance(e, OSError) and e.errno in OCCUPIED_ERRNOS:
            raise BadInput(f"{path}: cannot write there ({os.strerror(e.errno)}: a folder, or a file where a "
                           f"folder should be); choose another output path") from None
        raise
    fsync_dir(path.parent)


def environment_error(path: Path, code: int, unchanged: Path | None = None) -> BadInput:
    """The one line for a write the user's environment refused (`ENVIRONMENT_ERRNOS`); `unchanged`:
    the folder output that stays as it was (its temporary copy was removed)."""
    fix = "free space" if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "make the folder writable"
    kept = f"{unchanged} is unchanged" if unchanged is not None else "files already written are kept"
    error = BadInput(f"{path}: cannot write ({os.strerror(code)}); {fix} or choose another output folder, "
                     f"then re-run ({kept})")
    error.environment = (Path(path), code)  # atomic_folder names the file under its output's own name
    return error


# How libraries that write files themselves report an errno without raising an OSError that
# carries it: safetensors "IoError(Os { code: 28, ...", FAISS "... (No space left on device)".
_ERRNO_TEXT = re.compile(r"(?:os error|code:)\s*(\d+)", re.IGNORECASE)


def environment_errno(e: BaseException, folder: Path) -> int | None:
    """The errno in `ENVIRONMENT_ERRNOS` behind a failed write, or None (a bug: reported as such).
    An OSError says it; safetensors, FAISS and NumPy's `tofile` ("N requested and M written") do
    not always, so their text is read, and a failure on a full file system counts as ENOSPC."""
    if not isinstance(e, Exception):
        return None  # Ctrl-C, SIGTERM: not the environment
    for err in (e, e.__cause__, e.__context__):
        if isinstance(err, OSError) and err.errno is not None:
            return err.errno if err.errno in ENVIRONMENT_ERRNOS else None
    text = str(e)
    for m in _ERRNO_TEXT.finditer(text):
        if int(m.group(1)) in ENVIRONMENT_ERRNOS:
            return int(m.group(1))
    for code in ENVIRONMENT_ERRNOS:
        if os.strerror(code) in text:
            return code
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    if isinstance(e, (OSError, RuntimeError)) or type(e).__module__.split(".")[0] in ("safetensors", "faiss"):
        if st.f_bavail * st.f_frsize < (1 << 20):  # under 1 MiB left: the write ran out of space
            return errno.ENOSPC
    return None


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

    Yields a hidden sibling folder to fill (it holds only the leftover marker `.phrasefuse-owner`);
    write its meta.json last. On success the folder is renamed to `out` (an earlier folder of the
    same format, or an empty folder, is replaced, and put back if the rename fails); on any error
    the temporary folder is removed and `out` is untouched. Anything else at `out` is refused.
    """
    out = Path(out)
    recover_folder(out)  # a swap or delete killed half-way: the old folder back, our leftovers gone
    if os.path.lexists(out) and not (is_folder_of(out, fmt) or _empty_folder(out)):
        raise BadInput(f"{out}: exists and is not a phrasefuse {what}; choose another --out (or remove it)")
    token = new_token()
    tmp = out.with_name(leftover_name(out.name, "tmp", token))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        _mark(tmp, token)  # first thing in it: from now on recovery can prove the folder is ours
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.rmdir()
        if e.errno not in ENVIRONMENT_ERRNOS and e.errno not in (errno.ENOTDIR, errno.EEXIST):
            raise
        raise BadInput(f"{out.parent}: cannot create the folder ({e.strerror}); make it writable or choose "
                       f"another --out") from None
    try:
        yield tmp
        fault_point("folder-built")
        _swap_in(tmp, out, token)
    except BaseException as e:
        _remove_marked(tmp, token)
        if isinstance(e, BadInput) and getattr(e, "environment", None):  # a file of it (write_atomic)
            path, code = e.environment
            where = out / path.relative_to(tmp) if path.is_relative_to(tmp) else path
            raise environment_error(where, code, unchanged=out) from None
        code = None if isinstance(e, BadInput) else environment_errno(e, out.parent)
        if code is not None:  # a full disk while filling it (a mkdir, a library's own writer)
            raise environment_error(out, code, unchanged=out) from None
        raise


def _empty_folder(path: Path) -> bool:
    try:
        return path.is_dir() and not path.is_symlink() and not any(os.scandir(path))
    except OSError:
        return False


def is_folder_of(path: str | os.PathLike, fmt: str) -> bool:
    """Whether `path` holds a meta.json of format `fmt` (read in place: see `readable_folder`)."""
    try:
        meta = json.loads((readable_folder(path) / META).read_text(encoding="utf-8"))
        return isinstance(meta, dict) and meta.get("format") == fmt
    except (OSError, ValueError):
        return False


def _swap_in(tmp: Path, out: Path, token: str) -> None:
    """Rename the finished folder over `out`; the previous one is put back on failure. The previous
    folder is marked with the swap's token before it moves aside, so that a kill between the two
    renames leaves a copy recovery can prove is ours."""
    old = None
    if os.path.lexists(out):
        old = out.with_name(leftover_name(out.name, "old", token))
        try:
            _mark(out, token)  # `out` is ours (atomic_folder checked it): a phrasefuse folder or empty
        except BaseException:
            _unmark(out)  # a full disk: no empty marker left in the output
            raise
        os.rename(out, old)
        fault_point("folder-old-moved")
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
            _unmark(out)
        raise
    fault_point("folder-renamed")
    _unmark(out)  # the output itself carries no leftover marker
    fsync_dir(out.parent)  # the rename itself is durable
    if old is not None:
        _remove_marked(old, token)


# Hidden siblings of an output NAME that `write_atomic`, `atomic_folder`, `_swap_in` and
# `remove_folder` make (module docstring): an unmistakable marker, a random token, the writer's pid.
LEFTOVER_RE = re.compile(r"^\.(?P<name>.+)\.phrasefuse-(?P<token>[0-9a-f]{16})\.(?P<kind>tmp|old|del)-(?P<pid>\d+)$")
# In a leftover folder: the token of its name (the proof that phrasefuse made it).
OWNER_FILE = ".phrasefuse-owner"
RUN_STATE = "run-state.json"  # a run's work folder holds it (run/pipeline.py RunState)
RUN_STATE_FORMAT = "phrasefuse-run-state"


def mark_run_folder(work: Path) -> None:
    """Write an empty run-state.json in `work` unless it has one: the first write of a run (or the
    demo), so that a run killed at any later point left a folder that is provably a run's."""
    if not (Path(work) / RUN_STATE).is_file():
        write_json_atomic(Path(work) / RUN_STATE, {"format": RUN_STATE_FORMAT, "stages": {}})


def new_token() -> str:
    return secrets.token_hex(8)


def leftover_name(name: str, kind: str, token: str) -> str:
    """The hidden name of a temporary (`tmp`), moved-aside (`old`) or being-deleted (`del`) copy of `name`."""
    return f".{name}.phrasefuse-{token}.{kind}-{os.getpid()}"


def _mark(folder: Path, token: str) -> None:
    marker = folder / OWNER_FILE
    with open(marker, "w", encoding="ascii") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())  # durable before the rename that gives the folder its leftover name


def _unmark(folder: Path) -> None:
    with contextlib.suppress(OSError):
        (folder / OWNER_FILE).unlink()


def _marked(folder: Path, token: str) -> bool:
    """Whether `folder` (a real folder, not a link) holds the owner marker with `token`."""
    try:
        if folder.is_symlink() or not folder.is_dir():
            return False
        marker = folder / OWNER_FILE
        if marker.is_symlink() or not marker.is_file() or marker.stat().st_size > 64:
            return False
        return marker.read_text(encoding="ascii").strip() == token
    except (OSError, ValueError):
        return False


def _remove_marked(folder: Path, token: str) -> None:
    """Delete a leftover folder we made, the marker last: a kill meanwhile leaves it provable."""
    if not _marked(folder, token):
        return
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if entry.name == OWNER_FILE:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
    with contextlib.suppress(OSError):
        (folder / OWNER_FILE).unlink()
        folder.rmdir()


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


def is_phrasefuse_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` is one phrasefuse made: a meta.json of a phrasefuse format, or a run's work
    folder (run-state.json of the run-state format)."""
    for name in (META, RUN_STATE):
        try:
            meta = json.loads((Path(folder) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and str(meta.get("format", "")).startswith("phrasefuse-"):
            return True
    return False


def _leftovers(folder: Path, only: str | None, kinds: tuple[str, ...], dead_only: bool = True
               ) -> list[tuple[re.Match, Path, bool]]:
    """(match, path, is_folder) of the entries of `folder` named like our leftovers (of `only`)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    found = []
    for entry in entries:
        m = LEFTOVER_RE.match(entry.name)
        if not m or m["kind"] not in kinds or (only is not None and m["name"] != only):
            continue
        if dead_only and _alive(int(m["pid"])):
            continue  # a live writer's: it removes it itself
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            continue
        found.append((m, Path(entry.path), is_dir))
    return sorted(found, key=lambda f: f[1].name)


def readable_folder(path: str | os.PathLike) -> Path:
    """Where a reader reads the folder `path`: `path` itself, or, when a writer was killed between
    the two renames of a swap (nothing at `path`), the proven old copy in place. Never renames or
    deletes: putting the copy back is the next writer's job."""
    path = Path(path)
    if os.path.lexists(path) or not path.name:
        return path
    for m, p, is_dir in _leftovers(path.parent, path.name, ("old",)):
        if is_dir and _marked(p, m["token"]) and (p / META).is_file():
            return p
    return path


def recover_folder(out: Path) -> None:
    """Undo what a killed writer left around the folder `out` (a write: writers call it, readers
    use `readable_folder`): when `out` is missing and a proven `.old` copy of it remains (killed
    between the two renames of `_swap_in`), the old folder is renamed back; other proven leftovers
    of dead processes are removed (module docstring: which). Leftovers of live processes are left."""
    out = Path(out)
    if out.name:
        recover_leftovers(out.parent, only=out.name)


def recover_leftovers(folder: Path, only: str | None = None, owned: bool = False) -> None:
    """`recover_folder` for every output in `folder` (or only the one named `only`): one listing.
    Leftover files are removed only when `folder` is phrasefuse's (`is_phrasefuse_folder`, or
    `owned`: the caller checked it, e.g. a run's work folder); leftover folders when they hold
    their owner marker."""
    folder = Path(folder)
    found = _leftovers(folder, only, ("tmp", "old", "del"))
    if not found:
        return
    files_ours = owned or is_phrasefuse_folder(folder)
    try:
        # the .old copies first: a missing output comes back
        for m, p, is_dir in sorted(found, key=lambda f: (f[0]["kind"] != "old", f[1].name)):
            out = folder / m["name"]
            if not is_dir:
                if files_ours and m["kind"] == "tmp":
                    p.unlink(missing_ok=True)
            elif _marked(p, m["token"]):
                if m["kind"] == "old" and not os.path.lexists(out) and (p / META).is_file():
                    os.rename(p, out)
                    _unmark(out)
                    fsync_dir(out.parent)
                else:
                    _remove_marked(p, m["token"])
            elif m["kind"] == "tmp" and _empty_folder(p):
                p.rmdir()  # killed between mkdir and its marker: empty, nothing to lose
    except OSError:
        pass  # a read-only place: nothing to undo here


def remove_folder(path: str | os.PathLike) -> None:
    """Delete a folder phrasefuse made (derived data) crash-safely: it is marked, one rename takes it
    away whole to `.NAME.phrasefuse-TOKEN.del-PID`, then that copy is deleted; a kill meanwhile
    leaves no half-deleted folder at `path` (the next writer's `recover_folder` removes the copy)."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    token = new_token()
    trash = path.with_name(leftover_name(path.name, "del", token))
    _mark(path, token)
    os.rename(path, trash)
    fsync_dir(path.parent)
    _remove_marked(trash, token)


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
    meta_path = readable_folder(folder) / META  # killed mid-swap: the previous folder, read in place
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
