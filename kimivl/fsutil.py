"""Publishing folders and files so that a crash at any instant leaves the old or the new version, never neither,
and copying a checkpoint's files without following links out of it."""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import secrets
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2  # renameat2 flag (Linux >= 3.15): swap two paths atomically
_AT_FDCWD = -100


@functools.cache
def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc / not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Swap the entries at a and b in one atomic step; False where the system or file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def staging_name(dst: Path, kind: str = "partial") -> Path:
    """A hidden sibling of dst for building (`partial`) or retiring (`old`) a version of it."""
    return dst.parent / f".{dst.name}.{kind}-{secrets.token_hex(4)}"


def remove(path: Path) -> None:
    if path.is_symlink() or (os.path.lexists(path) and not path.is_dir()):
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def clean_stale(dst: Path) -> None:
    """Remove what a killed publish of dst left beside it (staged or retired versions: a full copy each). Where
    dst itself is missing (a kill between the two renames of the fallback), its retired version is put back."""
    retired = sorted(dst.parent.glob(f".{dst.name}.old-*"), key=os.path.getmtime)
    if retired and not os.path.lexists(dst):
        log.warning("restoring %s from %s, left by an interrupted save", dst, retired[-1])
        os.rename(retired[-1], dst)
    for kind in ("partial", "old"):
        for stale in dst.parent.glob(f".{dst.name}.{kind}-*"):
            log.info("removing %s, left by an interrupted save", stale)
            remove(stale)


def publish_dir(stage: Path, dst: Path) -> None:
    """Make the finished folder `stage` appear at dst, replacing what was there (a symlink: the link, not its
    target). Where dst exists, both are swapped in one atomic step (renameat2), so dst is the old or the new
    version at every instant; elsewhere the old one is moved aside first and restored on failure."""
    if not os.path.lexists(dst):
        os.rename(stage, dst)
        return
    if exchange(stage, dst):
        remove(stage)  # now holds the old version
        return
    old = staging_name(dst, "old")
    os.replace(dst, old)
    try:
        os.replace(stage, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    remove(old)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small file through a temporary sibling and one rename: readers see the old or the new content."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def inside(root: Path, file: Path) -> bool:
    """Whether `file` (a link is followed) lies inside the folder root, or is the Hugging Face cache's blob of a
    snapshot folder (`.../snapshots/REV/name` -> `.../blobs/HASH`, how the hub cache lays out every file)."""
    root, target = root.resolve(), file.resolve()
    if target.is_relative_to(root):
        return True
    return root.parent.name == "snapshots" and target.is_relative_to(root.parent.parent / "blobs")


def copy_checkpoint_files(src: Path, dst: Path, names: list[str]) -> list[str]:
    """Copy src/name -> dst/name for regular files only; a link whose target lies outside src (other than the hub
    cache's own blobs) is skipped with a warning, never copied as its target's content. Returns the skipped names."""
    skipped = []
    for name in names:
        f = src / name
        if not f.is_file():
            continue
        if f.is_symlink() and not inside(src, f):
            skipped.append(name)
            continue
        shutil.copyfile(f, dst / name)
    if skipped:
        log.warning("not copied from %s: %s (symlinks to files outside the checkpoint)", src, ", ".join(skipped))
    return skipped
