"""Where a build goes: refuse outputs that would lose data, lock against concurrent builds, publish
atomically and recover from a publish that was interrupted.

Rules (checked before any expensive work, each a one-line `OutputError`, exit 2):

- OUT must be absent, an empty directory, or an m3export build whose every file the build wrote
  (listed in its manifest, or the manifest, its seal and signature, the timing cache); a directory
  holding anything else, a regular file or a symbolic link at OUT is refused and left untouched;
- OUT must not lie inside another build (that would corrupt it), and `OUT.failed`, where a failed
  build is published, obeys the same rules;
- the parent must be a writable directory on a file system with room for the new build (the old one
  stays until the new one is published).

Concurrency: a build holds an exclusive `flock` on `.OUT.lock` beside OUT from its first check to
its publish; a second build of the same OUT is refused naming the holder's pid. Publishing swaps the
staging directory and OUT with one `renameat2(RENAME_EXCHANGE)` where the kernel and file system
support it, so OUT is never missing; elsewhere it renames OUT to `.OUT.old` first, and every later
build (under the lock) restores `.OUT.old` when OUT is missing, so the previous build is never lost.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from m3export.artifacts.layout import MANIFEST_FILES, SEAL, TIMING_CACHE
from m3export.artifacts.manifest import MANIFEST, listed_files
from m3export.errors import OutputError

STAGING_INFIX = ".staging-"
_NAME_MAX = 255
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def backup_path(out: Path) -> Path:
    return out.parent / f".{out.name}.old"


def failed_path(out: Path) -> Path:
    return out.with_name(out.name + ".failed")


def is_build(path: Path) -> bool:
    """A directory holding an m3export manifest and its seal."""
    return (path / MANIFEST).is_file() and (path / SEAL).is_file()


def _foreign_entry(out: Path) -> str | None:
    """The first entry of an existing directory that a build of OUT did not write, or None."""
    try:
        entries = sorted(os.listdir(out))
    except OSError as err:
        return f"(unreadable: {err.strerror})"
    if not entries:
        return None
    if not is_build(out):
        return ", ".join(entries[:3]) + (f", ... {len(entries) - 3} more" if len(entries) > 3 else "")
    files = listed_files(out)
    if files is None:
        return MANIFEST + " (not a readable m3export manifest)"
    listed = files | set(MANIFEST_FILES) | {TIMING_CACHE}
    dirs = {rel.split("/", 1)[0] for rel in listed if "/" in rel}
    for dirpath, dirnames, filenames in os.walk(out):
        rel_dir = Path(dirpath).relative_to(out).as_posix()
        for name in sorted(dirnames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if (Path(dirpath) / name).is_symlink() or (rel_dir == "." and name not in dirs):
                return rel
        for name in sorted(filenames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if rel not in listed:
                return rel
    return None


def _check_target(path: Path, flag: str) -> None:
    """`path` (OUT or OUT.failed) may be replaced by a build: absent, empty, or a build of ours."""
    if path.is_symlink():
        raise OutputError(f"{flag} {path}: is a symbolic link; give the directory itself")
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputError(f"{flag} {path}: exists and is not a directory; remove it or choose another --out")
    foreign = _foreign_entry(path)
    if foreign is not None:
        what = "is not an m3export build" if not is_build(path) else "holds files the build did not write"
        raise OutputError(
            f"{flag} {path}: {what} ({foreign}); refusing to replace it: choose an empty or new directory"
        )


def check_out(out: str | os.PathLike[str], need_bytes: int = 0) -> Path:
    """Validate OUT as the module docstring says; returns its absolute path (symlinks in parents kept)."""
    given = Path(out)
    path = Path(os.path.abspath(given))
    flag = "--out"
    if path.parent == path:
        raise OutputError(f"{flag} {given}: the file system root cannot be an artifact directory")
    longest = len(path.name) + len(STAGING_INFIX) + 12
    if longest > _NAME_MAX:
        raise OutputError(
            f"{flag} {given}: the name {path.name[:40]}... is too long ({len(path.name)} characters; "
            f"at most {_NAME_MAX - len(STAGING_INFIX) - 12} leave room for the staging directory)"
        )
    for anc in path.parents:
        if anc.is_dir() and is_build(anc):
            raise OutputError(
                f"{flag} {given}: lies inside the m3export build {anc}; writing there would corrupt it"
            )
        if anc.exists() and not anc.is_dir():
            raise OutputError(f"{flag} {given}: {anc} is not a directory")
    _check_target(path, flag)
    _check_target(failed_path(path), f"{flag} (failed builds go to)")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{flag} {given}: cannot create {parent}: {err.strerror}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {given}: {parent} is not writable")
    free = shutil.disk_usage(parent).free
    if need_bytes and free < need_bytes:
        raise OutputError(
            f"{flag} {given}: the build needs about {need_bytes / 2**30:.2f} GiB on {parent}, "
            f"only {free / 2**30:.2f} GiB are free"
        )
    return path


@contextlib.contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """Hold the exclusive lock of OUT (see the module docstring) for the duration of a build."""
    path = lock_path(out)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise OutputError(f"--out {out}: cannot create the lock file {path}: {err.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputError(
                f"--out {out}: another m3export build (pid {holder}) is writing it; wait for it to finish"
            ) from None
        try:  # a finishing build unlinks the lock file: make sure ours is the one at `path`
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        recover_publish(out)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def remove_stale_staging(out: Path) -> None:
    """Remove staging directories of killed builds of OUT (call only while holding its lock)."""
    for stale in out.parent.glob(f".{out.name}{STAGING_INFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def new_staging_dir(out: Path) -> Path:
    """A fresh staging directory beside OUT (call only while holding its lock)."""
    remove_stale_staging(out)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}{STAGING_INFIX}"))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the published build private
    return staging


def recover_publish(out: Path) -> None:
    """Undo a publish interrupted between its two renames: restore `.OUT.old` when OUT is missing,
    else drop the leftover backup (the publish had completed)."""
    backup = backup_path(out)
    if not backup.exists():
        return
    if not out.exists():
        os.replace(backup, out)
    else:
        shutil.rmtree(backup, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish(staging: Path, out: Path, *, exchange: bool = True) -> None:
    """Replace OUT by `staging` (call only while holding OUT's lock); OUT is never lost."""
    if out.exists():
        if exchange and _exchange(staging, out):
            shutil.rmtree(staging, ignore_errors=True)  # now holds the previous build
            return
        backup = backup_path(out)
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(out, backup)
        os.replace(staging, out)  # a kill here leaves `.OUT.old`, which recover_publish restores
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(staging, out)


def interrupted_publish_hint(root: Path) -> str:
    """For a missing artifact directory: where an interrupted publish left the previous build, if so."""
    backup = backup_path(Path(os.path.abspath(root)))
    if backup.is_dir():
        return (
            f"; an interrupted publish left the previous build at {backup}: "
            "run `m3export build` again (it restores it) or rename it back"
        )
    return ""


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A fresh staging directory beside OUT for the block (call only while holding OUT's lock): removed
    unless the block published it; a write failure (disk full, read-only, permissions) becomes one
    OutputError line saying nothing was published."""
    staging = new_staging_dir(out)
    try:
        yield staging
    except OSError as err:
        where = err.filename or staging
        raise OutputError(
            f"--out {out}: writing the build failed ({err.strerror}: {where}); nothing was published"
        ) from None
    finally:
        if staging.exists():  # not published: an exception or an interrupt
            shutil.rmtree(staging, ignore_errors=True)
