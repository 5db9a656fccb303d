"""A run folder and its checkpoints in the hands of a user: what ``--overwrite`` keeps, damage a
checkpoint's manifest cannot see, what a failed run leaves behind, ``--resume auto`` on a
finished run, Ctrl-C with checkpoints, the modes of the weights and the lock's unlink race.

Each test fails on the code before its fix (named in its docstring).
"""
import errno
import json
import multiprocessing
import os
import shutil
import signal
import stat
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ap_erase_fast import erase
from ap_erase_fast.cli import main

from test_faults import STEPS, config  # the fault suite's run settings


def argv(vocab, out, *extra, steps=STEPS):
    return ["train", "--erase", "garbage truck", "--vocab", vocab, "--steps", str(steps),
            "--k-closest", "60", "--num-centers", "12", "--ddim-steps", "10", "--quiet",
            "--output", str(out), *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_vocab):
    """An uninterrupted run with a checkpoint at every step."""
    out = tmp_path_factory.mktemp("ref") / "run"
    erase(config(small_vocab, out))
    return out


def same_result(out: Path, ref: Path) -> bool:
    a, b = load_file(str(out / "trained.safetensors")), load_file(str(ref / "trained.safetensors"))
    return (a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            and (out / "log.jsonl").read_text() == (ref / "log.jsonl").read_text())


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


# ---- 1. --overwrite keeps what the library did not write -------------------------------------
def test_overwrite_keeps_what_the_library_did_not_write(small_vocab, tmp_path, capsys):
    """A finished run folder with the user's notes and an ``ap-erase eval`` report in it,
    replaced with --overwrite: the new run is in place, the notes and eval/ are moved to
    ``DIR.kept-<date-time>`` (named in one line), nothing of the old run's own files is kept.

    Before the fix: exit 0 and notes.txt and eval/ were deleted (fails)."""
    out = tmp_path / "run"
    erase(config(small_vocab, out, steps=1, checkpoint_every=0))
    (out / "notes.txt").write_text("notes\n")
    (out / "eval").mkdir()
    (out / "eval" / "report.json").write_text(json.dumps({"library": "ap_erase_fast"}))
    capsys.readouterr()
    assert main(argv(small_vocab, out, "--overwrite", steps=2)) == 0
    err = capsys.readouterr().err
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("run.kept-")]
    assert len(kept) == 1, sorted(p.name for p in tmp_path.iterdir())
    assert (kept[0] / "notes.txt").read_text() == "notes\n"
    report = json.loads((kept[0] / "eval" / "report.json").read_text())
    assert report == {"library": "ap_erase_fast"}
    assert sorted(p.name for p in kept[0].iterdir()) == ["eval", "notes.txt"]
    lines = [line for line in err.splitlines() if str(kept[0]) in line]
    assert len(lines) == 1 and "eval/" in lines[0] and "notes.txt" in lines[0], err
    assert len((out / "log.jsonl").read_text().splitlines()) == 4  # the new 2-step run
    assert not (out / "notes.txt").exists() and not (out / "eval").exists()
    assert leftovers(out) == []


def test_recovery_after_a_killed_overwrite_keeps_the_users_files(tmp_path):
    """A run killed between putting its result in place and deleting the previous folder
    (``.DIR.old<pid>``): the next claim deletes the previous folder's own files but keeps the
    user's. Before the fix: the whole previous folder was deleted (fails)."""
    from ap_erase_fast.outdir import recover_interrupted

    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"library": "ap_erase_fast"}))
    old = tmp_path / ".run.old999999"
    (old / "unet").mkdir(parents=True)
    (old / "run.json").write_text("{}")
    (old / "trained.safetensors").write_bytes(b"x")
    (old / "eval").mkdir()
    (old / "eval" / "report.md").write_text("my report")
    (old / "notes.txt").write_text("mine")
    notes, placed = recover_interrupted(out)
    assert not placed and not old.exists()
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("run.kept-")]
    assert len(kept) == 1 and sorted(p.name for p in kept[0].iterdir()) == ["eval", "notes.txt"]
    assert (kept[0] / "eval" / "report.md").read_text() == "my report"
    assert len(notes) == 1 and str(kept[0]) in notes[0]


def test_overwrite_of_an_eval_folder_keeps_the_users_files(tmp_path, capsys):
    """An evaluation folder replaced with --overwrite: what the new report writes replaces the
    old report's files, anything else is kept beside. Before the fix: deleted (fails)."""
    from ap_erase_fast.outdir import OutputDir

    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "report.json").write_text(json.dumps({"library": "ap_erase_fast"}))
    (ev / "report.md").write_text("old")
    (ev / "mine.txt").write_text("mine")
    out = OutputDir(str(ev), overwrite=True, marker="report.json")
    (out.tmp / "report.json").write_text(json.dumps({"library": "ap_erase_fast"}))
    (out.tmp / "report.md").write_text("new")
    out.commit()
    assert (ev / "report.md").read_text() == "new" and not (ev / "mine.txt").exists()
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("eval.kept-")]
    assert len(kept) == 1 and sorted(p.name for p in kept[0].iterdir()) == ["mine.txt"]
    assert str(kept[0]) in capsys.readouterr().err


# ---- 2. damage the manifest cannot see -------------------------------------------------------
def _damage_behind_the_manifest(step: Path, name: str, how: str) -> None:
    from ap_erase_fast.checkpoint import MANIFEST, _write_manifest

    p = step / name
    data = p.read_bytes()
    if how == "truncate":
        p.write_bytes(data[: len(data) // 2])
    elif how == "append":
        p.write_bytes(data + b"\x00garbage\n")
    else:  # garbage, or garbage in a file the manifest no longer lists
        p.write_bytes(os.urandom(len(data)))
    if how == "unlisted":
        manifest = json.loads((step / MANIFEST).read_text())
        del manifest["files"][name]
        (step / MANIFEST).write_text(json.dumps(manifest))
    else:
        _write_manifest(step)  # the manifest now vouches for the damaged file


@pytest.mark.parametrize("name, how", [("trained.safetensors", "truncate"),
                                       ("log.jsonl", "append"), ("state.pt", "garbage"),
                                       ("state.pt", "unlisted")])
def test_damage_behind_a_valid_manifest_falls_back(name, how, reference, small_vocab, tmp_path,
                                                   capsys):
    """The newest checkpoint damaged where its manifest cannot see it (the entry rewritten to
    match, or the file dropped from the manifest): ``--resume auto`` says so in one whole note,
    resumes from the newest intact checkpoint and ends bit-identical; no warning leaks.

    Before the fix: exit 2 with "is damaged ... resume from an earlier checkpoint", the torch
    error cut mid-sentence, no fallback (fails)."""
    out = tmp_path / "run"
    shutil.copytree(reference.parent / "run.checkpoints", tmp_path / "run.checkpoints")
    _damage_behind_the_manifest(tmp_path / "run.checkpoints" / "step-000003", name, how)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(argv(small_vocab, out, "--checkpoint-every", "1", "--resume", "auto"))
    err = capsys.readouterr().err
    assert code == 0, err
    notes = [line for line in err.splitlines() if "step-000003" in line]
    assert len(notes) == 1 and notes[0].startswith("note: checkpoint ") and name in notes[0], err
    assert "step-000002, the newest intact checkpoint" in err, err
    assert "Re-running" not in err and "resume from an earlier" not in err
    leaked = [str(w.message) for w in caught if "serialization" in w.filename
              or "weights_only" in str(w.message) or "safetensors" in w.filename]
    assert leaked == []
    assert same_result(out, reference)


def test_load_time_damage_with_no_fallback_is_one_line(reference, small_vocab, tmp_path, capsys):
    """Damage found when the checkpoint is read, with --no-resume-fallback: one whole line that
    names the file and how to go on, exit 2, nothing written."""
    shutil.copytree(reference.parent / "run.checkpoints", tmp_path / "run.checkpoints")
    _damage_behind_the_manifest(tmp_path / "run.checkpoints" / "step-000003", "state.pt", "garbage")
    code = main(argv(small_vocab, tmp_path / "run", "--resume", "auto", "--no-resume-fallback"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert err.startswith("error: the newest checkpoint ") and "state.pt cannot be read" in err
    assert err.endswith("step-NNNNNN") and not (tmp_path / "run").exists()


def test_manifest_must_list_every_file_a_resume_reads(reference, tmp_path):
    """A checkpoint whose manifest does not list a file a resume reads is not intact, whatever
    the file holds. Before the fix: verified as intact (fails)."""
    from ap_erase_fast.checkpoint import MANIFEST, choose_checkpoint, verify_checkpoint

    root = tmp_path / "run.checkpoints"
    shutil.copytree(reference.parent / "run.checkpoints", root)
    for name in ["state.pt", "trained.safetensors", "pi.safetensors", "rng-rank0.safetensors",
                 "log.jsonl"]:
        step = root / "step-000003"
        manifest = json.loads((step / MANIFEST).read_text())
        rec = manifest["files"].pop(name)
        (step / MANIFEST).write_text(json.dumps(manifest))
        assert verify_checkpoint(step) == f"{name} is not listed in its manifest.json"
        chosen, notes = choose_checkpoint(str(root), None)
        assert chosen == root / "step-000002" and name in notes[0]
        manifest["files"][name] = rec
        (step / MANIFEST).write_text(json.dumps(manifest))
        assert verify_checkpoint(step) is None


# ---- 3. a failed run leaves nothing behind ---------------------------------------------------
@pytest.mark.parametrize("extra", [["--model", "/nonexistent/model"],
                                   ["--vocab", "/nonexistent/words.txt"],
                                   ["--resolution", "17"],
                                   ["--lr", "1e30", "--output", "deep/er/run"]],  # a NaN loss
                         ids=["model", "vocab", "resolution", "nan-loss"])
def test_a_failed_run_leaves_no_folder(extra, small_vocab, tmp_path, monkeypatch, capsys):
    """Errors caught after the output folder was claimed (a model or vocabulary that does not
    exist, a resolution the model cannot take, a NaN loss): one error line, exit 2, and the
    current folder stays empty: no output, no empty outputs/ (or deep/er/) parent.

    Before the fix: an empty outputs/ (deep/er/) was left (fails)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    args = ["train", "--erase", "garbage truck", "--vocab", small_vocab, "--steps", "1",
            "--k-closest", "60", "--num-centers", "12", "--ddim-steps", "10", "--quiet", *extra]
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.splitlines()[-1].startswith("error: "), err
    assert sorted(p.name for p in cwd.iterdir()) == []


# ---- 4. --resume auto on a finished run; Ctrl-C with checkpoints ------------------------------
def test_resume_auto_on_a_finished_run_exits_0(reference, small_vocab, capsys):
    """The same ``--resume auto`` command once the run has finished: exit 0 and one line saying
    it is finished and where; the folder is untouched. Before the fix: exit 2 (fails)."""
    before = (reference / "log.jsonl").read_text()
    capsys.readouterr()
    code = main(argv(small_vocab, reference, "--checkpoint-every", "1", "--resume", "auto"))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "error" not in err
    lines = out.strip().splitlines()
    assert len(lines) == 1 and "has finished already" in lines[0] and str(reference) in lines[0]
    assert (reference / "log.jsonl").read_text() == before and leftovers(reference) == []


def _main_child(args: list[str], err_path: str) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    import sys

    sys.stderr = os.fdopen(2, "w", buffering=1)
    os._exit(main(args))


def test_ctrl_c_names_the_checkpoints_to_resume_from(small_vocab, tmp_path):
    """Ctrl-C after checkpoints were written: exit 130, one line that says no output was
    written, that the checkpoints are kept (the newest named) and that --resume auto continues.
    Before the fix: "no output was written" alone (fails)."""
    out = tmp_path / "run"
    err_path = tmp_path / "stderr.txt"
    args = argv(small_vocab, out, "--checkpoint-every", "1", steps=200)
    proc = multiprocessing.get_context("fork").Process(target=_main_child,
                                                       args=(args, str(err_path)))
    proc.start()
    deadline = time.time() + 120
    while not (tmp_path / "run.checkpoints" / "step-000001").is_dir() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    proc.join(60)
    assert proc.exitcode == 130
    lines = [line for line in err_path.read_text().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err_path.read_text()
    assert lines[0].startswith("error: interrupted; no output was written")
    assert "--resume auto" in lines[0] and str(tmp_path / "run.checkpoints" / "step-") in lines[0]
    assert not out.exists() and leftovers(out) == []


# ---- 5. weights follow the umask -------------------------------------------------------------
def test_weights_follow_the_umask(small_vocab, tmp_path):
    """Under umask 022 every file of the output and of its checkpoints is 0644, the weights
    (trained.safetensors, the UNet's, the checkpoint's safetensors) included. Before the fix:
    the weights were 0600 (fails)."""
    previous = os.umask(0o022)
    try:
        out = tmp_path / "run"
        erase(config(small_vocab, out, steps=1))
    finally:
        os.umask(previous)
    files = [p for folder in (out, tmp_path / "run.checkpoints") for p in folder.rglob("*")
             if p.is_file()]
    assert {"trained.safetensors", "diffusion_pytorch_model.safetensors", "pi.safetensors",
            "rng-rank0.safetensors", "run.json", "state.pt"} <= {p.name for p in files}
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes


def test_follow_umask_gives_the_umasks_mode(tmp_path):
    """Files created 0600 (as an atomic writer does) get ``0o666 & ~umask``; executables are
    left alone."""
    from ap_erase_fast.outdir import current_umask, follow_umask

    previous = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        (tmp_path / "a").mkdir()
        for name in ("w.safetensors", "a/x.bin"):
            fd = os.open(tmp_path / name, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
        follow_umask(tmp_path)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "a" / "x.bin").stat().st_mode) == 0o640


# ---- 7. the lock's unlink race ---------------------------------------------------------------
def test_lock_released_between_open_and_flock_is_not_taken(tmp_path, monkeypatch):
    """The lock file is released (unlinked) by its holder between this run's open and its
    flock, and another run creates and locks a new one: this run must see that it locked an
    orphaned file and refuse (the other run holds the folder). Unlinked and not replaced: this
    run's lock must be the file on disk.

    Before the check (removed): the run believes it holds the folder while the other run does,
    or holds a lock on a file nobody else can see (fails)."""
    import fcntl

    from ap_erase_fast.outdir import FolderInUse, FolderLock

    target = tmp_path / "run"
    lock_file = tmp_path / ".run.lock"
    real_flock = fcntl.flock
    state = {"race": "replace", "other": None}

    def racing_flock(fd, op):
        race, state["race"] = state["race"], None
        if race:  # between our open and our flock another process releases the lock ...
            os.unlink(lock_file)
            if race == "replace":  # ... and a third run creates and takes a new one
                state["other"] = FolderLock(target).acquire()
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", racing_flock)
    with pytest.raises(FolderInUse, match="is in use by another run"):
        FolderLock(target).acquire()
    assert os.fstat(state["other"].fd).st_ino == os.stat(lock_file).st_ino
    state["other"].release()

    state["race"] = "unlink"
    mine = FolderLock(target).acquire()
    try:
        assert os.fstat(mine.fd).st_ino == os.stat(lock_file).st_ino
        with pytest.raises(FolderInUse):  # and it really excludes the next run
            FolderLock(target).acquire()
    finally:
        mine.release()
    assert not lock_file.exists()


def test_lock_recreates_a_parent_removed_under_it(tmp_path, monkeypatch):
    """A parent folder removed between its creation and the lock file's (another run that had
    created it gave up): the lock is still taken."""
    from ap_erase_fast.outdir import FolderLock

    target = tmp_path / "new" / "run"
    real_open = os.open
    calls = {"n": 0}

    def open_once_missing(path, flags, mode=0o777):
        calls["n"] += 1
        if calls["n"] == 1:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", open_once_missing)
    lock = FolderLock(target).acquire()
    monkeypatch.setattr(os, "open", real_open)
    assert (tmp_path / "new" / ".run.lock").is_file()
    lock.release()
