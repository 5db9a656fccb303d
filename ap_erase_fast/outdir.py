"""Output folders that never lose a finished result.

A run claims its output folder ``DIR`` up front and publishes it at the end:

* **Lock.** ``.DIR.lock`` beside the folder, created atomically and held with an OS file lock
  for the whole run; it records pid, host, start time and command. A second run aimed at the
  same folder fails at once with one line naming the first. The kernel drops the lock when its
  process dies, even on ``kill -9``, so a stale lock file is simply taken over. On a filesystem
  without file locks the lock file is created atomically (a hard link of a written file) and is
  stale when its pid is no longer alive on this host.
* **What may be replaced.** An existing folder must be empty, or ``overwrite`` must be set *and*
  the folder must be one this library wrote (it holds the marker file: ``run.json`` of a train
  run, ``report.json`` of an evaluation). The current folder, its parents, the home folder and
  ``/`` are never an output. What a replaced folder holds that the library did not write there
  (an ``eval/`` report, the user's notes) is moved to ``DIR.kept-<date-time>`` and named in one
  line, never deleted.
* **Commit.** Outputs are written into ``.DIR.tmp<pid>``; when complete that folder is renamed
  ``.DIR.ready<pid>``, the previous folder (if any) is moved aside to ``.DIR.old<pid>``, and the
  new one is renamed into place (``rename(2)``: atomic); only then is the previous one deleted.
  If the new folder cannot be put in place, the previous one is restored, the finished result is
  kept as ``DIR.result-<date-time>`` and :class:`CommitFailed` says where. Nothing is deleted.
* **Recovery.** A run killed before its commit leaves ``.DIR.tmp<pid>`` (incomplete: deleted by
  the next run that claims ``DIR``). One killed during its commit leaves ``.DIR.ready<pid>`` (a
  finished result: the next claim puts it in place, or keeps it as ``DIR.result-<date-time>``
  when ``DIR`` is taken) and possibly ``.DIR.old<pid>`` (restored, or deleted once superseded,
  what the library did not write in it kept as above).
* **Nothing left behind.** A run that fails before its commit removes its temporary folder, its
  lock file and the parent folders it created (the default ``outputs/`` included).
* **Modes.** Every file of a committed folder gets the mode the umask gives a new file (weights
  written through a temporary file would otherwise be 0600 while the other files are not).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import sys
import time
from pathlib import Path

from .errors import UserError
from .faults import fault_point


class FolderInUse(UserError):
    """Another live run holds the output folder's lock."""


class CommitFailed(UserError):
    """The run finished, but its result could not be put in place; it is kept elsewhere."""

    exit_code = 3


class AlreadyFinished(UserError):
    """``--resume auto`` on a run whose output is in place: nothing to do. Not a failure (exit
    code 0): the same command serves a first start and every restart, a re-queued job
    included; the command line prints the message as its one line."""

    exit_code = 0


# What a train run writes at the top of its output folder (every layout: full, LoRA, merged; the
# model card and its temporary file). Whatever else a folder that --overwrite replaces holds was
# put there by someone else (an `ap-erase eval` report, the user's notes) and is kept.
TRAIN_OUTPUT_NAMES = frozenset({
    "unet", "lora", "trained.safetensors", "lora_kohya.safetensors",
    "pytorch_lora_weights.safetensors", "run.json", "log.jsonl", "RANDOM_WEIGHTS.txt",
    "README.md", "README.md.tmp"})


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(folder: Path) -> None:
    """Give every regular file under ``folder`` the mode the umask gives a new file
    (``0o666 & ~umask``). Writers that create their file atomically through a temporary file
    (safetensors: the weights) leave it 0600, while every other file follows the umask."""
    mode = 0o666 & ~current_umask()
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
                if (stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != mode
                        and not st.st_mode & 0o111):
                    os.chmod(path, mode)
            except OSError:
                pass


def lock_file_for(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]}


def _describe(holder: dict) -> str:
    if not holder:
        return "another run"
    return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
            + (f": {holder['command']}" if holder.get("command") else ""))


class FolderLock:
    """An exclusive, non-blocking lock on ``path`` (a folder that may not exist yet)."""

    def __init__(self, path: Path):
        self.target = path
        self.file = lock_file_for(path)
        self.fd: int | None = None

    def acquire(self) -> "FolderLock":
        try:
            import fcntl
        except ImportError:  # no flock here (Windows)
            return self._acquire_by_link()
        for _ in range(20):
            try:
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError as exc:  # the parent was removed by a run that made it
                try:
                    self.file.parent.mkdir(parents=True, exist_ok=True)
                except OSError:
                    raise UserError(f"cannot write the output folder {self.target}: cannot "
                                    f"create the lock file {self.file}: "
                                    f"{exc.strerror or exc}") from None
                continue
            except OSError as exc:
                raise UserError(f"cannot write the output folder {self.target}: cannot create "
                                f"the lock file {self.file}: {exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read()
                os.close(fd)
                raise FolderInUse(
                    f"output folder {self.target} is in use by another run ({_describe(holder)}); "
                    f"wait for it to finish or choose another --output") from None
            except OSError:  # a filesystem without file locks (some network filesystems)
                os.close(fd)
                return self._acquire_by_link()
            try:  # the file may have been released (unlinked) between our open and flock
                same = os.fstat(fd).st_ino == os.stat(self.file).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(_holder()).encode())
            self.fd = fd
            return self
        raise FolderInUse(f"output folder {self.target}: could not take its lock {self.file}; "
                          f"another run keeps claiming it")

    def _acquire_by_link(self) -> "FolderLock":
        """The lock without OS file locks: a lock file that appears atomically with its content
        (a hard link of a written file); one whose pid is dead on this host is stale."""
        mine = self.file.with_name(f"{self.file.name}.{os.getpid()}")
        try:
            mine.write_text(json.dumps(_holder()))
            for _ in range(20):
                try:
                    os.link(mine, self.file)
                except FileExistsError:
                    holder = self._read()
                    pid = holder.get("pid")
                    local = holder.get("host") == socket.gethostname()
                    if not holder or (local and isinstance(pid, int) and not _pid_alive(pid)):
                        try:  # stale (its process is gone), or an empty file left by a probe
                            os.unlink(self.file)
                        except FileNotFoundError:
                            pass
                        continue
                    raise FolderInUse(
                        f"output folder {self.target} is in use by another run "
                        f"({_describe(holder)}); wait for it to finish, or delete {self.file} "
                        f"if that run no longer exists") from None
                except OSError as exc:
                    raise UserError(f"cannot write the output folder {self.target}: cannot "
                                    f"create the lock file {self.file}: "
                                    f"{exc.strerror or exc}") from None
                self.fd = -1  # held, without a descriptor
                return self
        finally:
            try:
                mine.unlink()
            except OSError:
                pass
        raise FolderInUse(f"output folder {self.target}: could not take its lock {self.file}")

    def _read(self) -> dict:
        try:
            data = json.loads(self.file.read_text() or "{}")
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.file)  # before closing: a waiter on the old file sees it is gone
        except OSError:
            pass
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = None


def _is_dangerous(path: Path) -> str | None:
    """Why ``path`` must never be an output folder (or None)."""
    real = Path(os.path.realpath(path))
    cwd = Path(os.path.realpath(os.getcwd()))
    home = Path(os.path.realpath(os.path.expanduser("~")))
    if real == Path(real.anchor):
        return "the filesystem root"
    if real == cwd or real in cwd.parents:
        return "the current folder" if real == cwd else "a parent of the current folder"
    if real == home or real in home.parents:
        return "your home folder" if real == home else "a parent of your home folder"
    return None


def written_by_library(folder: Path, marker: str) -> bool:
    """Whether ``folder`` holds this library's ``marker`` file (``run.json``, ``report.json``)."""
    try:
        data = json.loads((folder / marker).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and (data.get("library") == "ap_erase_fast" or
                                       str(data.get("format", "")).startswith("ap_erase_fast."))


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def keep_aside(src: Path, target: Path, kind: str = "result") -> Path:
    """Rename ``src`` (a finished result) to a visible sibling ``target.<kind>-<date-time>`` of
    ``target``; return where it is now (``src`` itself when even that rename fails)."""
    base = target.parent / f"{target.name}.{kind}-{_stamp()}"
    for k in range(100):
        dest = base if k == 0 else base.with_name(f"{base.name}-{k}")
        if dest.exists():
            continue
        try:
            os.rename(src, dest)
            return dest
        except OSError:
            return src
    return src


def _names(entries: list[Path]) -> str:
    shown = [e.name + ("/" if e.is_dir() and not e.is_symlink() else "") for e in entries[:6]]
    more = len(entries) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def discard_previous(old: Path, path: Path, owned=TRAIN_OUTPUT_NAMES) -> str | None:
    """Delete ``old``, a previous output folder of ``path`` that a new one has replaced, but
    keep what the library did not write there: entries named neither in ``owned`` nor in the
    new ``path`` move to ``DIR.kept-<date-time>``. Returns the note that says where (None when
    there was nothing to keep). When they cannot be moved, ``old`` is kept whole."""
    try:
        library = set(owned) | {e.name for e in path.iterdir()}
    except OSError:
        library = set(owned)
    try:
        foreign = sorted((e for e in old.iterdir() if e.name not in library), key=lambda e: e.name)
    except OSError:
        foreign = None  # cannot tell: keep it all
    if foreign:
        what = _names(foreign)
        kept = path.parent / f"{path.name}.kept-{_stamp()}"
        for k in range(1, 100):
            if not kept.exists():
                break
            kept = path.parent / f"{path.name}.kept-{_stamp()}-{k}"
        try:
            kept.mkdir()
            for entry in foreign:
                os.rename(entry, kept / entry.name)
        except OSError:
            whole = keep_aside(old, path, "previous")
            where = (f"the previous folder is kept whole in {whole}" if whole != old else
                     f"the previous folder is kept in {old}")
            return (f"--overwrite replaced {path}; it held files ap_erase_fast did not write "
                    f"({what}) that could not be moved aside, so {where}"
                    + (f" (some are in {kept})" if kept.is_dir() and any(kept.iterdir()) else ""))
        note = (f"--overwrite replaced {path}; what ap_erase_fast had not written there ({what}) "
                f"is kept in {kept}")
    elif foreign is None:
        whole = keep_aside(old, path, "previous")
        return f"--overwrite replaced {path}; the previous folder is kept in {whole}"
    else:
        note = None
    shutil.rmtree(old, ignore_errors=True)
    return note


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def recover_interrupted(path: Path, owned=TRAIN_OUTPUT_NAMES) -> tuple[list[str], bool]:
    """Clean up after runs that were killed while holding ``path`` (call with its lock held):
    delete their incomplete temporary folders, put a finished result whose commit was cut
    short in place (or keep it beside), restore a previous folder moved aside, or delete it
    (keeping what the library did not write there, see :func:`discard_previous`).
    Returns notes for the user, and whether a finished result was put in place (said by the
    caller)."""
    notes: list[str] = []
    placed = False
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(tmp|ready|old)(\d+)$")
    found: dict[str, list[Path]] = {"tmp": [], "ready": [], "old": []}
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return notes, placed
    for entry in entries:
        m = pattern.match(entry.name)
        if m and entry.is_dir() and int(m.group(2)) != os.getpid():
            found[m.group(1)].append(entry)
    for tmp in found["tmp"]:  # incomplete outputs of a killed run
        shutil.rmtree(tmp, ignore_errors=True)
    for ready in sorted(found["ready"], key=lambda p: p.stat().st_mtime, reverse=True):
        vacant = not path.exists() or (path.is_dir() and not any(path.iterdir()))
        try:
            if vacant:
                os.replace(ready, path)
                placed = True
                continue
        except OSError:
            pass
        kept = keep_aside(ready, path)
        notes.append(f"the finished result of an earlier, interrupted run is kept in {kept}")
    for old in found["old"]:
        if path.exists():  # superseded by the committed folder
            note = discard_previous(old, path, owned)
            if note:
                notes.append(note)
        else:
            try:
                os.replace(old, path)
            except OSError:
                notes.append(f"a previous output folder is kept in {keep_aside(old, path)}")
    return notes, placed


def checkpoint_root_for(output: str) -> str:
    """Checkpoints of a run go beside its output folder: ``<output>.checkpoints``."""
    path = Path(output).absolute()
    return str(path.parent / f"{path.name}.checkpoints")


class OutputDir:
    """Claims an output folder up front (lock, checks, temporary folder) and publishes it
    atomically on :meth:`commit`; :meth:`abort` removes the temporary folder."""

    def __init__(self, path: str, overwrite: bool = False, marker: str = "run.json",
                 flag: str = "--output", resuming: bool = False):
        self.path = Path(os.path.abspath(os.path.expanduser(str(path))))
        self.overwrite = overwrite
        self.marker = marker
        # the names this kind of folder holds that the library wrote (an eval folder: those of
        # the new result, see discard_previous)
        self.owned = TRAIN_OUTPUT_NAMES if marker == "run.json" else frozenset({marker})
        self.tmp: Path | None = None
        danger = _is_dangerous(self.path)
        if danger:
            raise UserError(f"{flag} {path} is {danger}; an output must be a folder of its own, "
                            f"e.g. {flag} out/run1")
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"output {self.path} exists and is not a folder")
        # the parent folders this run creates (removed again when it fails before its commit:
        # a failed run leaves nothing behind, not even an empty outputs/)
        self.made_parents: list[Path] = []
        parent = self.path.parent
        while not parent.exists() and parent != parent.parent:
            self.made_parents.append(parent)
            parent = parent.parent
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._remove_made_parents()
            raise UserError(f"cannot write the output folder {self.path}: "
                            f"{exc.strerror or exc}") from None
        try:
            self.lock = FolderLock(self.path).acquire()
        except BaseException:
            self._remove_made_parents()
            raise
        try:
            self.notes, placed = recover_interrupted(self.path, self.owned)
            for note in self.notes:
                print(f"note: {note}", file=sys.stderr)
            if placed and resuming and not overwrite:
                raise AlreadyFinished(
                    f"--resume auto: the run of {self.path} has finished already: an earlier run "
                    f"was stopped while putting its finished result in place, and that is now "
                    f"done (nothing was lost); its output is in {self.path}, nothing to resume "
                    f"(pass --overwrite to run it again)")
            if placed and not overwrite:
                raise UserError(f"output folder {self.path} already holds the finished result "
                                f"of an earlier run whose commit had been interrupted (now "
                                f"completed; nothing was lost); pass --overwrite to run again, "
                                f"or choose another {flag}")
            if placed:
                print(f"note: an earlier run was stopped while putting its finished result in "
                      f"place; it is now in {self.path}", file=sys.stderr)
            if resuming and not overwrite and written_by_library(self.path, marker):
                raise AlreadyFinished(
                    f"--resume auto: the run of {self.path} has finished already; its output is "
                    f"in {self.path}, nothing to resume (pass --overwrite to run it again)")
            self._check_existing(flag)
            self.tmp = self.path.parent / f".{self.path.name}.tmp{os.getpid()}"
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir()
        except OSError as exc:
            self._give_up()
            raise UserError(f"cannot write the output folder {self.path}: "
                            f"{exc.strerror or exc}") from None
        except BaseException:
            self._give_up()
            raise

    def _remove_made_parents(self) -> None:
        """Remove the parent folders this run created, where they are still empty."""
        for folder in self.made_parents:  # the deepest first
            try:
                os.rmdir(folder)
            except OSError:
                break
        self.made_parents = []

    def _give_up(self) -> None:
        self.lock.release()
        self._remove_made_parents()

    def _check_existing(self, flag: str) -> None:
        if not self.path.is_dir() or not any(self.path.iterdir()):
            return
        if not self.overwrite:
            raise UserError(f"output folder {self.path} is not empty; choose another {flag} "
                            f"or pass --overwrite")
        if not written_by_library(self.path, self.marker):
            raise UserError(f"--overwrite replaces only a folder ap_erase_fast wrote (one "
                            f"holding its {self.marker}); {self.path} holds other files: choose "
                            f"another {flag}, or empty or remove it yourself")

    @property
    def checkpoint_root(self) -> str:
        return checkpoint_root_for(str(self.path))

    def commit(self) -> str:
        """Put the finished temporary folder in place; on failure keep it and raise
        :class:`CommitFailed` (the temporary folder is never deleted from here on)."""
        if self.tmp is None:
            raise RuntimeError("commit() after commit() or abort()")
        parent, name, pid = self.path.parent, self.path.name, os.getpid()
        ready = parent / f".{name}.ready{pid}"
        follow_umask(self.tmp)
        try:
            os.replace(self.tmp, ready)  # from here on it is a finished result
        except OSError as exc:
            kept, self.tmp = self.tmp, None
            self.lock.release()
            raise CommitFailed(self._failed_message(exc, kept)) from None
        self.tmp = None
        fault_point("commit")
        aside = None
        try:
            if self.path.exists() or self.path.is_symlink():
                if self.path.is_dir() and not self.path.is_symlink() and not any(self.path.iterdir()):
                    os.rmdir(self.path)
                else:
                    aside = parent / f".{name}.old{pid}"
                    os.replace(self.path, aside)
            fault_point("commit-swap")
            os.replace(ready, self.path)
        except OSError as exc:
            if aside is not None and not self.path.exists():
                try:
                    os.replace(aside, self.path)
                except OSError:
                    pass
            kept = keep_aside(ready, self.path)
            self.lock.release()
            raise CommitFailed(self._failed_message(exc, kept)) from None
        self.made_parents = []
        if aside is not None:
            note = discard_previous(aside, self.path, self.owned)
            if note:
                print(f"note: {note}", file=sys.stderr)
        _fsync_dir(parent)
        self.lock.release()
        return str(self.path)

    def _failed_message(self, exc: OSError, kept: Path) -> str:
        return (f"the run finished, but its output could not be put in place at {self.path} "
                f"({exc.strerror or exc}); the finished result is kept in {kept}: move it "
                f"where you want it")

    def abort(self) -> None:
        """Remove the temporary folder (not a finished result), release the lock and remove the
        parent folders this run created, when nothing else is in them."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        self.lock.release()
        self._remove_made_parents()


def check_output_folder(path: str, marker: str = "run.json", flag: str = "--output") -> None:
    """Refuse, before anything is loaded, a non-empty output folder that this library did not
    write: neither a run nor --overwrite may replace it, so the advice names what works. A
    folder this library wrote, or one with siblings of a run (its lock, an interrupted commit),
    is left to :class:`~ap_erase_fast.outdir.OutputDir`, which knows those cases."""
    import glob

    folder = Path(os.path.abspath(os.path.expanduser(str(path))))
    if _is_dangerous(folder):
        return  # ".", "~", "/": OutputDir refuses them with their own reason
    try:
        if not folder.is_dir() or not any(folder.iterdir()):
            return
    except OSError:
        return  # unreadable: OutputDir reports it
    if written_by_library(folder, marker) or glob.glob(
            os.path.join(glob.escape(str(folder.parent)), f".{glob.escape(folder.name)}.*")):
        return
    raise UserError(f"output folder {folder} is not empty and ap_erase_fast did not write it "
                    f"(no {marker} of its own); --overwrite replaces only a folder ap_erase_fast "
                    f"wrote, so choose another {flag}, or empty or remove that folder yourself")


def default_output_dir(cfg) -> str:
    """outputs/<erased concepts>-<model>-seed<seed>-<time> for a config without --output."""
    slug = "-".join(re.sub(r"[^a-z0-9]+", "_", c.lower()).strip("_") for c in cfg.erase)[:60]
    model = Path(cfg.model).stem if cfg.model != "tiny" else "tiny"
    model = re.sub(r"[^A-Za-z0-9_.-]+", "_", model)[:40]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("outputs", f"{slug or 'erase'}-{model}-seed{cfg.seed}-{stamp}")
