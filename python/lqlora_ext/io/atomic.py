"""Writing an output directory without ever losing a user's files.

Every lqlora save (``save_quantized``, ``save_pretrained_atomic``, ``lqlora quantize/finetune
--out``) goes through :func:`atomic_dir`:

- The target is checked first (:func:`check_output_dir`): a non-empty directory that is not
  an lqlora output is refused unless ``overwrite=True``; so are a file in the way, the input
  model or a directory containing it (``protect``), and an unwritable location.
- The new files are written to a hidden temporary directory next to the target (inside it
  when the parent is read-only), fsynced, and only then committed.
- Commit. When the target is absent, empty, or holds nothing but the files of a previous
  lqlora save, the temporary directory takes its place atomically (``rename``, or
  ``renameat2(RENAME_EXCHANGE)`` on Linux: there is no moment without a complete target).
  Otherwise (files that are not ours, an lqlora output from before the file list existed,
  a filesystem without the exchange, or the current directory inside the target) the new
  files are moved in one by one with ``os.replace``, and only the previous save's own files
  that the new save does not rewrite are removed: nothing else is touched.
- Our own files are listed in ``.lqlora-output.json`` (written last), which is how the next
  save knows what it may replace.
- Beside the temporary directory, a lock file holds an advisory lock (``flock``) for as
  long as its process lives; a later save of the same target removes temporary
  directories whose lock is free (their process died, e.g. ``kill -9``) and leaves every
  other directory alone.
- New directories get the usual mode (0777 minus the umask, not 0700); an existing target
  keeps its mode.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import stat
from typing import Iterable, List, Optional, Set

try:
    import fcntl
except ImportError:  # not POSIX: no stale-directory detection
    fcntl = None

OUTPUT_MARKER = ".lqlora-output.json"
OUTPUT_FORMAT = "lqlora-output"
_TMP_TAG = ".lqlora-tmp-"
_LOCK_SUFFIX = ".lock"
# Files that identify an lqlora output written before the file list existed.
_MANIFEST = "lqlora.json"


class OutputDirError(ValueError):
    """The output location cannot be used (named in the message)."""


# ------------------------------------------------------------------------- inspection
def _read_marker(path: str) -> Optional[Set[str]]:
    try:
        with open(os.path.join(path, OUTPUT_MARKER)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != OUTPUT_FORMAT or \
            not isinstance(data.get("files"), list) or \
            not all(isinstance(x, str) for x in data["files"]):
        return None
    # Only plain relative names below the directory: a hand-edited list must never point
    # a later save's clean-up outside it.
    return {os.path.normpath(x) for x in data["files"]
            if x and not os.path.isabs(x) and not os.path.normpath(x).startswith("..")}


def is_lqlora_output(path: str) -> bool:
    """Whether directory ``path`` was written by lqlora: it lists its files in
    ``.lqlora-output.json``, or it is an lqlora checkpoint (``lqlora.json``) or Hugging Face
    model with ``quant_method "lqlora"`` written before that list existed."""
    if _read_marker(path) is not None:
        return True
    try:
        with open(os.path.join(path, _MANIFEST)) as f:
            if json.load(f).get("format") == "lqlora-checkpoint":
                return True
    except (OSError, ValueError, AttributeError):
        pass
    try:
        with open(os.path.join(path, "config.json")) as f:
            qc = json.load(f).get("quantization_config")
        return isinstance(qc, dict) and qc.get("quant_method") == "lqlora"
    except (OSError, ValueError, AttributeError):
        return False


def _files_below(path: str) -> Optional[Set[str]]:
    """Relative paths of every regular file below ``path``; None if anything else (a
    symlink, a socket, an unreadable directory) is there."""
    out = set()
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            mode = os.lstat(full).st_mode
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                return None
            out.add(os.path.relpath(full, path))
    return out


def _is_within(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        up = os.path.dirname(path)
        if up == path:
            break
        path = up
    return path


def check_output_dir(path: str, *, overwrite: bool = False, protect: Iterable[str] = (),
                     who: str = "save") -> str:
    """Validate an output directory before any work is done; returns its real path.

    Raises :class:`OutputDirError` (a ValueError naming ``who`` and the path) when ``path``
    is a file, is or contains one of ``protect`` (e.g. the input model), cannot be created
    or written, or is a non-empty directory that is not an lqlora output and ``overwrite``
    is false.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise OutputDirError(f"{who}: the output directory must be a non-empty path, got "
                             f"{path!r}")
    real = os.path.realpath(os.fspath(path))
    for p in protect:
        if p and os.path.exists(p) and _is_within(p, real):
            what = "is" if os.path.realpath(p) == real else "contains"
            raise OutputDirError(f"{who}: output directory {path} {what} the input model "
                                 f"{p}; choose another directory")
    if os.path.exists(real) and not os.path.isdir(real):
        raise OutputDirError(f"{who}: output path {path} exists and is not a directory")
    base = _nearest_existing(real)
    if not os.path.isdir(base):
        raise OutputDirError(f"{who}: cannot create output directory {path}: {base} is not "
                             f"a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputDirError(f"{who}: output directory {path} is not writable (no write "
                             f"permission on {base})")
    if os.path.isdir(real) and not overwrite:
        try:
            entries = sorted(os.listdir(real))
        except OSError as e:
            raise OutputDirError(f"{who}: cannot read output directory {path}: {e}") from None
        entries = [e for e in entries if not e.startswith(_TMP_TAG)]
        if entries and not is_lqlora_output(real):
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise OutputDirError(f"{who}: output directory {path} is not empty ({shown}) and "
                                 f"is not an lqlora output; refusing to write into it "
                                 f"(choose an empty or new directory, or pass overwrite=True "
                                 f"/ --overwrite: only files of the same names are replaced)")
    return real


# ----------------------------------------------------------------------- file system
def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            _fsync_path(os.path.join(root, name))
        _fsync_path(root)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two directory entries (Linux renameat2); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem cannot
        return False
    raise OSError(err, os.strerror(err), b)


def _clean_stale(dirpath: str, prefix: str) -> None:
    """Remove the temporary directories ``prefix*`` in ``dirpath`` whose lock file
    (``<dir>.lock``, beside it) no live process holds, and those lock files. A directory
    without a lock file is never removed: nothing proves it ours."""
    if fcntl is None or not os.path.isdir(dirpath):
        return
    try:
        names = os.listdir(dirpath)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(_LOCK_SUFFIX)):
            continue
        lock = os.path.join(dirpath, name)
        d = lock[:-len(_LOCK_SUFFIX)]
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a live save holds it
        try:
            if os.path.isdir(d) and not os.path.islink(d):
                shutil.rmtree(d, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.unlink(lock)
        finally:
            os.close(fd)


def _new_tmp(parent: str, prefix: str):
    """A fresh temporary directory and its held lock file ``(dir, lock path, fd)``. The
    lock exists (and is held) before the directory does, so a concurrent clean-up never
    sees a live directory without one."""
    for _ in range(100):
        d = os.path.join(parent, prefix + secrets.token_hex(4))
        lock = d + _LOCK_SUFFIX
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
        except FileExistsError:
            continue
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.mkdir(d, 0o777)  # the umask applies, as for any new directory
        except BaseException:
            os.close(fd)
            os.unlink(lock)
            raise
        return d, lock, fd
    raise OutputDirError(f"save: cannot create a temporary directory in {parent}")


def _write_marker(dirpath: str, files: List[str]) -> None:
    with open(os.path.join(dirpath, OUTPUT_MARKER), "w") as f:
        json.dump({"format": OUTPUT_FORMAT, "files": sorted(files)}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _commit_order(rel: str) -> tuple:
    # Data first, then what describes it (configs, manifests, shard indexes): a reader that
    # sees a new description finds the data it describes already in place.
    name = os.path.basename(rel)
    late = name.endswith(".json") and (name in ("config.json", _MANIFEST) or
                                       name.endswith(".index.json"))
    return (late, rel)


def _merge_into(tmp: str, target: str, new_files: List[str], old_own: Set[str]) -> None:
    for rel in new_files:
        dst = os.path.join(target, rel)
        if os.path.isdir(dst) and not os.path.islink(dst):
            raise OutputDirError(f"save: cannot write {dst}: a directory of that name exists")
    _write_marker(tmp, new_files)
    touched = {target}
    for rel in sorted(new_files, key=_commit_order):
        dst = os.path.join(target, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(os.path.join(tmp, rel), dst)
        touched.add(os.path.dirname(dst))
    for rel in sorted(old_own - set(new_files)):
        p = os.path.join(target, rel)
        if os.path.isfile(p) and not os.path.islink(p):
            os.unlink(p)
            touched.add(os.path.dirname(p))
    os.replace(os.path.join(tmp, OUTPUT_MARKER), os.path.join(target, OUTPUT_MARKER))
    for d in touched:
        _fsync_path(d)


def _only_own(target: str, own: Set[str]) -> bool:
    """Whether every entry below ``target`` is a regular file listed in ``own`` (or the
    marker itself); stops at the first that is not, so a large foreign tree costs little."""
    for root, dirs, files in os.walk(target):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, target)
            if rel != OUTPUT_MARKER and (rel not in own or not stat.S_ISREG(os.lstat(full).st_mode)):
                return False
    return True


@contextlib.contextmanager
def atomic_dir(path: str, *, overwrite: bool = False, protect: Iterable[str] = (),
               who: str = "save"):
    """Yield a temporary directory to fill; on success its files become ``path``'s (see
    the module docstring for the guarantees), on failure it is removed and ``path`` is
    untouched. ``overwrite``/``protect``/``who``: as in :func:`check_output_dir`."""
    target = check_output_dir(path, overwrite=overwrite, protect=protect, who=who)
    parent = os.path.dirname(target)
    base = os.path.basename(target)
    os.makedirs(parent, exist_ok=True)
    inside = not os.access(parent, os.W_OK | os.X_OK)  # e.g. a mount point's parent
    if inside:
        os.makedirs(target, exist_ok=True)
        tmp_parent, prefix = target, _TMP_TAG
    else:
        tmp_parent, prefix = parent, f".{base}{_TMP_TAG}"
    _clean_stale(tmp_parent, prefix)
    if os.path.isdir(target):
        _clean_stale(target, _TMP_TAG)
    tmp, lock, lock_fd = _new_tmp(tmp_parent, prefix)
    try:
        yield tmp
        new_files = _files_below(tmp)
        if new_files is None:
            raise OutputDirError(f"{who}: the save produced something other than regular "
                                 f"files and directories in {tmp}")
        new_files.discard(OUTPUT_MARKER)
        new_files = sorted(new_files)
        _fsync_tree(tmp)
        _commit(tmp, target, new_files, inside)
    finally:
        # On success tmp is gone or holds the previous save; on failure the partial new
        # one. Either way it is ours: remove it, then the lock that marked it.
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(lock_fd)


def _commit(tmp: str, target: str, new_files: List[str], inside: bool) -> None:
    exists = os.path.isdir(target)
    old_own = (_read_marker(target) or set()) if exists else set()
    try:
        cwd_inside = _is_within(os.getcwd(), target)  # swapping would orphan the cwd
    except OSError:
        cwd_inside = False
    swappable = not inside and not cwd_inside and (not exists or _only_own(target, old_own))
    if swappable:
        _write_marker(tmp, new_files)
        if exists:
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
        _fsync_path(tmp)
        try:
            os.rename(tmp, target)  # onto nothing or an empty directory: atomic
            _fsync_path(os.path.dirname(target))
            return
        except OSError:
            pass  # the target has entries
        if _exchange(tmp, target):  # tmp now holds the previous save: removed by the caller
            _fsync_path(os.path.dirname(target))
            return
        os.unlink(os.path.join(tmp, OUTPUT_MARKER))
    _merge_into(tmp, target, new_files, old_own)


def commit_prepared(prepared: str, path: str, *, overwrite: bool = False,
                    protect: Iterable[str] = (), who: str = "save") -> None:
    """Commit a directory a long-running writer filled itself (e.g. a resumable job's
    ``final/``, on ``path``'s filesystem) as :func:`atomic_dir` commits its own: the same
    checks, fsync, atomic swap or merge, file list. ``prepared`` is consumed (moved, or
    left holding the previous save, which the caller removes)."""
    target = check_output_dir(path, overwrite=overwrite, protect=protect, who=who)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    new_files = _files_below(prepared)
    if new_files is None:
        raise OutputDirError(f"{who}: {prepared} holds something other than regular files")
    new_files.discard(OUTPUT_MARKER)
    _fsync_tree(prepared)
    _commit(prepared, target, sorted(new_files), inside=False)
