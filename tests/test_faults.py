"""Faults that must never lose finished work: kill -9 at named and random points (a checkpoint
write and the commit included) followed by ``--resume auto``, a full disk while checkpointing and
while writing the outputs, damaged checkpoints, two runs aimed at one folder, a folder that
cannot be replaced, and a rank killed under DeepSpeed.

Every scenario ends the same way: the result equals an uninterrupted run's bit for bit (trained
tensors, UNet weights file, loss log, and in the last checkpoint π, the search's logits, and every
optimizer state, π's included), or the finished result is kept and named. Kills use
forked copies of the test process (a real SIGKILL, no interpreter start-up); only the DeepSpeed
test launches processes.
"""
import errno
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ap_erase_fast import EraseConfig, erase
from ap_erase_fast.cli import main
from ap_erase_fast.errors import UserError

STEPS = 3


def config(vocab, out, **kw):
    base = dict(model="tiny", erase=["garbage truck"], steps=STEPS, seed=0, vocab=vocab,
                k_closest=60, num_centers=12, ddim_steps=10, quiet=True, device="cpu",
                checkpoint_every=1, output=str(out))
    base.update(kw)
    return EraseConfig(**base)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_vocab):
    """An uninterrupted run (checkpoints every step) to compare every faulted run with."""
    out = tmp_path_factory.mktemp("ref") / "run"
    erase(config(small_vocab, out))
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes (NaN equals itself: the score baseline starts as NaN)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _same_state(a, b) -> bool:
    """Nested optimizer / scaler states equal bit for bit (tensors by value, dtype and shape)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(_bits(a), _bits(b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)  # NaN equals NaN here


def assert_same_result(out: Path, ref: Path):
    a, b = load_file(str(out / "trained.safetensors")), load_file(str(ref / "trained.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (out / unet).read_bytes() == (ref / unet).read_bytes()
    assert (out / "log.jsonl").read_text() == (ref / "log.jsonl").read_text()
    # π (the search's logits) and the optimizer states, π's included, are in the checkpoint of
    # the last step (always written): a resume that lost any of them differs there
    last = f"step-{STEPS:06d}"
    mine, theirs = (p.parent / f"{p.name}.checkpoints" / last for p in (out, ref))
    pa, pb = load_file(str(mine / "pi.safetensors")), load_file(str(theirs / "pi.safetensors"))
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa), "π differs"
    sa, sb = (torch.load(p / "state.pt", map_location="cpu", weights_only=True)
              for p in (mine, theirs))
    assert sa.keys() == sb.keys()
    for key in sa:  # pi_optimizer, optimizer, scalers, the score baseline, skipped steps
        assert _same_state(sa[key], sb[key]), f"{key} differs"


def leftovers(out: Path) -> list[str]:
    """Hidden temporary folders or lock files of ``out`` (none may remain after a run)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _child(cfg: dict, fault: str) -> None:
    os.environ["AP_ERASE_FAULT"] = fault
    try:
        erase(EraseConfig(**cfg))
    finally:
        os._exit(0)


def killed_run(cfg: EraseConfig, fault: str = "", after_s: float | None = None) -> int:
    """Run ``cfg`` in a forked process killed with SIGKILL at the fault point ``fault``, or
    ``after_s`` seconds after it started; returns its exit code."""
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(cfg.to_dict(), fault))
    proc.start()
    if after_s is not None:
        proc.join(after_s)
        if proc.exitcode is None:
            os.kill(proc.pid, signal.SIGKILL)
    proc.join(120)
    assert proc.exitcode is not None, "the child hung"
    return proc.exitcode


def resume_auto(cfg: EraseConfig):
    return erase(EraseConfig(**{**cfg.to_dict(), "resume": "auto"}))


# ---- kill -9 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["checkpoint-write:2", "checkpoint-publish:3", "outputs-write"])
def test_kill_then_resume_auto_is_bit_identical(fault, reference, small_vocab, tmp_path):
    """Killed while writing a checkpoint (a half-written folder), with a complete but unpublished
    checkpoint, and while writing the outputs; ``--resume auto`` then ends bit-identical and
    nothing temporary is left.

    Mutations checked: a checkpoint renamed into place before its files are written (resume from
    a half checkpoint: fails), resume without restoring the generator states (fails), the stale
    temporary folders not swept (fails)."""
    cfg = config(small_vocab, tmp_path / "run")
    assert killed_run(cfg, fault) == -signal.SIGKILL
    assert not (tmp_path / "run").exists()
    resume_auto(cfg)
    assert_same_result(tmp_path / "run", reference)
    assert leftovers(tmp_path / "run") == []
    assert not list((tmp_path / "run.checkpoints").glob(".*"))


@pytest.mark.parametrize("fault", ["commit", "commit-swap"])
def test_kill_during_commit_loses_nothing(fault, reference, small_vocab, tmp_path, capsys):
    """Killed between the finished output and its rename into place (commit-swap: with a
    previous output moved aside by --overwrite): the next claim of the folder completes the
    commit, the ``--resume auto`` rerun says in one line that the run is finished (exit 0), and
    the folder holds the finished result.

    Mutations checked: recovery deleting ``.NAME.ready*`` like the other temporary folders
    (fails), recovery restoring the previous folder over a finished result (fails)."""
    out = tmp_path / "run"
    cfg = config(small_vocab, out)
    if fault == "commit-swap":
        erase(config(small_vocab, out, steps=1, checkpoint_every=0))  # a previous result
        cfg = config(small_vocab, out, overwrite=True)
    assert killed_run(cfg, fault) == -signal.SIGKILL
    assert not out.exists()
    code = main(["train", "--erase", "garbage truck", "--vocab", small_vocab, "--steps", str(STEPS),
                 "--k-closest", "60", "--num-centers", "12", "--ddim-steps", "10", "--quiet",
                 "--checkpoint-every", "1", "--output", str(out), "--resume", "auto"])
    captured = capsys.readouterr()
    out_lines = captured.out.strip().splitlines()
    assert code == 0 and "error" not in captured.err, captured.err
    assert len(out_lines) == 1 and "has finished already" in out_lines[0], out_lines
    assert "now done (nothing was lost)" in out_lines[0]
    assert_same_result(out, reference)
    assert leftovers(out) == []


def test_kill_at_a_random_moment_then_resume(reference, small_vocab, tmp_path):
    """SIGKILL at a random time (setup, a step, a checkpoint, the outputs or the commit): after
    ``--resume auto`` (or at once, when the run had finished) the folder holds the
    uninterrupted run's result."""
    delay = random.Random().uniform(0.1, 2.5)
    cfg = config(small_vocab, tmp_path / "run")
    killed_run(cfg, after_s=delay)
    try:
        resume_auto(cfg)
    except UserError as exc:  # the run had finished (or its commit was completed on claim)
        assert ("already holds the finished result" in str(exc)
                or "has finished already" in str(exc)), (delay, exc)
    assert_same_result(tmp_path / "run", reference)
    assert leftovers(tmp_path / "run") == [], delay


def test_next_run_sweeps_what_a_killed_run_left(small_vocab, tmp_path):
    """kill -9 mid-run leaves its hidden temporary folder; the next run aimed at the same
    folder removes it (and the stale lock), whatever it does itself."""
    out = tmp_path / "run"
    cfg = config(small_vocab, out, steps=200, checkpoint_every=0)
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(cfg.to_dict(), ""))
    proc.start()
    deadline = time.time() + 60
    while not list(tmp_path.glob(".run.tmp*")) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(60)
    assert (tmp_path / f".run.tmp{proc.pid}").is_dir()
    erase(config(small_vocab, out, steps=1, checkpoint_every=0))
    assert (out / "run.json").is_file() and leftovers(out) == []


def _main_child(argv: list[str]) -> None:
    # the child is a run started from a terminal: Python's own Ctrl-C handler and the signal not
    # blocked, whatever a library loaded by an earlier test left in the pytest process (an
    # inherited SIG_IGN or blocked mask would make the run ignore Ctrl-C and finish normally)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    os._exit(main(argv))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_terminate_or_interrupt_removes_temporary_files(sig, code, small_vocab, tmp_path):
    """SIGTERM (what schedulers and the DeepSpeed launcher send) and Ctrl-C mid-run: exit 143 /
    130 with one line, no output, no temporary folder, no lock left behind.

    Mutation checked: no SIGTERM handler (the process dies at once: the temporary folder and
    the lock file stay)."""
    out = tmp_path / "run"
    argv = ["train", "--erase", "garbage truck", "--vocab", small_vocab, "--steps", "200",
            "--k-closest", "60", "--num-centers", "12", "--ddim-steps", "10", "--quiet",
            "--output", str(out)]
    proc = multiprocessing.get_context("fork").Process(target=_main_child, args=(argv,))
    proc.start()
    deadline = time.time() + 60
    while not list(tmp_path.glob(".run.tmp*")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(proc.pid, sig)
    proc.join(60)
    assert proc.exitcode == code, f"exit {proc.exitcode}; SIGINT in the test process: {signal.getsignal(signal.SIGINT)}"
    assert not out.exists() and leftovers(out) == []


class _SignalInDel:
    """Sends a signal to its own process from ``__del__``: the handler's exception is raised
    there, and Python swallows it ("Exception ignored in ...")."""

    def __init__(self, sig):
        self.sig = sig

    def __del__(self):
        os.kill(os.getpid(), self.sig)


def _main_child_swallowing(argv: list[str], sig: int) -> None:
    from ap_erase_fast.engine import Eraser

    plain = Eraser.run_outer_step

    def run_outer_step(self):
        if self.iteration == 2 * self.cfg.pgd_steps:
            _SignalInDel(sig)  # deleted at once: the signal arrives inside __del__
        return plain(self)

    Eraser.run_outer_step = run_outer_step
    _main_child(argv)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_swallowed_by_a_del_method_still_stops_the_run(sig, code, small_vocab, tmp_path):
    """A signal that arrives while a ``__del__`` (or a garbage-collector callback) runs raises
    there and is swallowed by Python; the run must still stop at its next step (a flaky CI
    failure: Ctrl-C mid-run, the run finished and exited 0).

    Mutation checked: without the training loop's ``interrupts.check()`` the child finishes its
    steps and exits 0."""
    out = tmp_path / "run"
    argv = ["train", "--erase", "garbage truck", "--vocab", small_vocab, "--steps", "6",
            "--k-closest", "60", "--num-centers", "12", "--ddim-steps", "4", "--quiet",
            "--output", str(out)]
    proc = multiprocessing.get_context("fork").Process(target=_main_child_swallowing,
                                                       args=(argv, sig))
    proc.start()
    proc.join(120)
    assert proc.exitcode == code, f"exit {proc.exitcode}"
    assert not out.exists() and leftovers(out) == []


# ---- a full disk -----------------------------------------------------------------------------
@pytest.fixture(params=["injected", "tmpfs"])
def small_disk(request, tmp_path, monkeypatch):
    """A folder on a nearly full filesystem: ``fill(free_bytes)`` leaves that much space,
    ``free()`` gives it back. "tmpfs": a real 16 MiB tmpfs (root and mount needed, else
    skipped); "injected": ENOSPC raised by the writes once the simulated free space is used."""
    root = tmp_path / "disk"
    root.mkdir()
    if request.param == "tmpfs":
        if shutil.which("mount") is None or subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(root)],
                capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(root)]))
        filler = root / "filler"

        def fill(free):
            st = os.statvfs(root)
            filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - free))

        def free():
            filler.unlink()
        return root, fill, free
    budget = {"left": None}
    import safetensors.torch as st_mod

    real_save_file, real_torch_save = st_mod.save_file, torch.save

    def charge(path, nbytes):
        if budget["left"] is not None and str(path).startswith(str(root)):
            if nbytes > budget["left"]:
                raise OSError(errno.ENOSPC, "No space left on device")
            budget["left"] -= nbytes

    def save_file(tensors, filename, metadata=None):
        charge(filename, sum(t.numel() * t.element_size() for t in tensors.values()))
        return real_save_file(tensors, filename, metadata=metadata)

    def torch_save(obj, f, *a, **kw):
        charge(f, 200_000)
        return real_torch_save(obj, f, *a, **kw)

    monkeypatch.setattr(st_mod, "save_file", save_file)
    monkeypatch.setattr(torch, "save", torch_save)
    from diffusers import ModelMixin

    real_save_pretrained = ModelMixin.save_pretrained

    def save_pretrained(self, directory, *a, **kw):
        charge(directory, sum(p.numel() * p.element_size() for p in self.parameters()))
        return real_save_pretrained(self, directory, *a, **kw)

    monkeypatch.setattr(ModelMixin, "save_pretrained", save_pretrained)
    return root, lambda free: budget.update(left=free), lambda: budget.update(left=None)


def test_disk_full_while_checkpointing(small_disk, reference, small_vocab):
    """The second checkpoint does not fit: one line naming the last checkpoint, no half-written
    checkpoint or output; after freeing space ``--resume auto`` ends bit-identical.

    Mutations checked: the half-written checkpoint folder kept (fails: a damaged step-000002
    appears), the write error left as a raw exception (fails: not a UserError)."""
    root, fill, free = small_disk
    cfg = config(small_vocab, root / "run")
    fill(500_000)  # one checkpoint (~0.33 MB) fits, two do not
    with pytest.raises(UserError, match=r"cannot write checkpoint .*step-000002: No space left on "
                                        r"device; stopped, the last checkpoint is .*step-000001"):
        erase(cfg)
    assert sorted(p.name for p in (root / "run.checkpoints").iterdir()) == ["step-000001"]
    assert not (root / "run").exists() and leftovers(root / "run") == []
    free()
    resume_auto(cfg)
    assert_same_result(root / "run", reference)


def test_disk_full_while_writing_the_outputs(small_disk, reference, small_vocab):
    """Every checkpoint fits, the outputs (~3.3 MB) do not: one line saying the finished
    training is in the last checkpoint; ``--resume auto`` then only writes the outputs.

    Mutation checked: the last step not checkpointed when it is no multiple of
    --checkpoint-every (fails: the finished training is lost)."""
    root, fill, free = small_disk
    cfg = config(small_vocab, root / "run", checkpoint_every=2)
    fill(2_000_000)
    with pytest.raises(UserError, match=r"cannot write the output .*No space left on device; the "
                                        r"finished training is in the checkpoint .*step-000003"):
        erase(cfg)
    assert not (root / "run").exists() and leftovers(root / "run") == []
    free()
    resume_auto(cfg)
    assert_same_result(root / "run", reference)
    with pytest.raises(UserError, match="--resume auto: the run of .* has finished already"):
        resume_auto(cfg)  # the same command once more: nothing to do, said in one line


# ---- damaged checkpoints ---------------------------------------------------------------------
CHECKPOINT_FILES = ["checkpoint.json", "trained.safetensors", "state.pt", "pi.safetensors",
                    "rng-rank0.safetensors", "log.jsonl", "manifest.json"]


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncate" else os.urandom(len(data)))


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_every_damaged_checkpoint_file_is_detected(how, reference, tmp_path):
    """Each file of the newest checkpoint, truncated or overwritten with garbage of the same
    size: the verification names the file, falls back to the previous checkpoint saying so in
    one note (or refuses with --no-resume-fallback, or when the damaged step is named by hand),
    one line each.

    Mutation checked: the sha256 comparison removed (the same-size garbage passes: fails)."""
    from ap_erase_fast.checkpoint import choose_checkpoint

    for name in CHECKPOINT_FILES:
        root = tmp_path / name / "run.checkpoints"
        shutil.copytree(reference.parent / "run.checkpoints", root)
        _damage(root / "step-000003" / name, how)
        chosen, notes = choose_checkpoint(str(root), None)
        assert chosen == root / "step-000002", name
        assert len(notes) == 1 and "step-000003 is damaged" in notes[0], notes
        assert notes[0].endswith("resuming from " + str(root / "step-000002") + ", the newest "
                                 "intact checkpoint"), notes
        assert name in notes[0] or "manifest.json" in notes[0], notes
        with pytest.raises(UserError, match="newest checkpoint .*step-000003 is damaged"):
            choose_checkpoint(str(root), None, fallback=False)
        with pytest.raises(UserError, match=r"is damaged .*resume from an intact one \(step-000001, "
                                            r"step-000002\)"):
            choose_checkpoint(str(root / "step-000003"), None)


def test_damaged_content_behind_a_valid_manifest_is_one_line(reference, small_vocab, tmp_path,
                                                              capsys):
    """Garbage in a checkpoint whose manifest was rewritten to match (or a checkpoint of the
    format before manifests): reading it is still a one-line error, never a raw exception."""
    from ap_erase_fast.checkpoint import _write_manifest

    for name in ["checkpoint.json", "trained.safetensors", "state.pt", "pi.safetensors",
                 "rng-rank0.safetensors", "log.jsonl"]:
        step = tmp_path / name / "run.checkpoints" / "step-000002"
        shutil.copytree(reference.parent / "run.checkpoints" / "step-000002", step)
        _damage(step / name, "truncate")
        _write_manifest(step)
        code = main(["train", "--erase", "garbage truck", "--vocab", small_vocab, "--steps", "3",
                     "--k-closest", "60", "--num-centers", "12", "--ddim-steps", "10", "--quiet",
                     "--output", str(tmp_path / name / "out"), "--resume", str(step)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: ") and "\n" not in err, (name, err)
        assert f"{name} cannot be read" in err or "lacks its settings" in err, err


def test_fallback_resume_is_bit_identical(reference, small_vocab, tmp_path, capsys):
    """A damaged newest checkpoint: the CLI says so in one note and resumes from the previous
    one, bit-identical to the uninterrupted run."""
    out = tmp_path / "run"
    shutil.copytree(reference.parent / "run.checkpoints", tmp_path / "run.checkpoints")
    shutil.rmtree(tmp_path / "run.checkpoints" / "step-000003")
    _damage(tmp_path / "run.checkpoints" / "step-000002" / "state.pt", "garbage")
    code = main(["train", "--erase", "garbage truck", "--vocab", small_vocab, "--steps", "3",
                 "--k-closest", "60", "--num-centers", "12", "--ddim-steps", "10", "--quiet",
                 "--checkpoint-every", "1", "--output", str(out), "--resume", "auto"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "step-000002 is damaged (state.pt does not match its sha256)" in err
    assert "resuming from" in err and "step-000001" in err
    assert_same_result(out, reference)


# ---- one folder, two runs; a folder that cannot be replaced ----------------------------------
def _hold(path: str, ready, release) -> None:
    from ap_erase_fast.export import OutputDir

    OutputDir(path)
    ready.set()
    release.wait(60)
    os._exit(0)


def test_two_runs_one_folder_and_a_stale_lock(small_vocab, tmp_path, capsys):
    """A live run holds the folder: a second run fails at once with one line naming it. The
    holder is killed (-9): its lock is stale, the next run takes it over and sweeps the dead
    run's temporary folder.

    Mutations checked: no lock (the second run is not refused: fails), a lock file that is never
    taken over (the run after the kill is refused: fails)."""
    out = tmp_path / "run"
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(out), ready, release))
    holder.start()
    assert ready.wait(60)
    argv = ["train", "--erase", "garbage truck", "--vocab", small_vocab, "--steps", "1",
            "--k-closest", "60", "--num-centers", "12", "--ddim-steps", "10", "--quiet",
            "--output", str(out)]
    t0 = time.perf_counter()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"is in use by another run (pid {holder.pid} on " in err
    assert time.perf_counter() - t0 < 30
    assert (tmp_path / f".run.tmp{holder.pid}").is_dir()
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / "run.json").is_file() and leftovers(out) == []


@pytest.mark.parametrize("how", ["injected", "immutable"])
def test_commit_that_cannot_replace_keeps_the_result(how, small_vocab, tmp_path, monkeypatch, capsys,
                                                     request):
    """The existing folder cannot be moved (an immutable or busy folder; "immutable": a real
    ``chattr +i``, root and ext4 needed, else skipped): the run exits 3 with one line naming
    where the finished result is kept; the previous folder is untouched.

    Mutation checked: the temporary folder deleted on a failed commit (fails)."""
    out = tmp_path / "run"
    erase(config(small_vocab, out, steps=1, checkpoint_every=0))
    before = (out / "log.jsonl").read_text()
    if how == "immutable":
        if shutil.which("chattr") is None or subprocess.run(
                ["chattr", "+i", str(out)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available here (needs root and ext4)")
        request.addfinalizer(lambda: subprocess.run(["chattr", "-i", str(out)]))
    else:
        real = os.replace

        def replace(src, dst):
            if Path(src) == out:
                raise PermissionError(errno.EPERM, "Operation not permitted", str(src))
            return real(src, dst)

        monkeypatch.setattr(os, "replace", replace)
    capsys.readouterr()
    code = main(["train", "--erase", "garbage truck", "--vocab", small_vocab, "--steps", "2",
                 "--k-closest", "60", "--num-centers", "12", "--ddim-steps", "10", "--quiet",
                 "--output", str(out), "--overwrite"])
    err = capsys.readouterr().err.strip()
    assert code == 3 and "\n" not in err and "Operation not permitted" in err, err
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("run.result-")]
    assert len(kept) == 1 and str(kept[0]) in err
    assert len((kept[0] / "log.jsonl").read_text().splitlines()) == 4  # the 2-step run
    assert (out / "log.jsonl").read_text() == before
    assert leftovers(out) == []


# ---- DeepSpeed -------------------------------------------------------------------------------
@pytest.mark.distributed
def test_killed_rank_stops_the_run_without_hanging(small_vocab, tmp_path):
    """Rank 1 is killed (-9) while writing the second checkpoint: the launcher ends the run
    with an error well within the timeout, no output is committed, and the first checkpoint
    stays intact (verified against its manifest)."""
    from _deepspeed import DEEPSPEED, run_two_ranks

    from ap_erase_fast.checkpoint import verify_checkpoint

    if DEEPSPEED is None:
        pytest.skip("deepspeed is not installed")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1,
                              "zero_optimization": {"stage": 1}}))
    out = tmp_path / "run"
    proc = run_two_ranks(ds, "--erase", "garbage truck", "--vocab", small_vocab, "--k-closest", "60",
                         "--num-centers", "12", "--ddim-steps", "10", "--steps", "3", "--checkpoint-every", "1",
                         "--output", str(out), "--quiet",
                         env={"AP_ERASE_FAULT": "checkpoint-write:2", "AP_ERASE_FAULT_RANK": "1"})
    ended = time.time()
    assert proc.returncode != 0, proc.stderr[-2000:]
    killed = [float(line.rsplit(" ", 1)[1]) for line in (proc.stdout + proc.stderr).splitlines()
              if line.startswith("fault point checkpoint-write: SIGKILL at")]
    assert len(killed) == 1, proc.stdout[-2000:]
    assert ended - killed[0] < 60, ended - killed[0]  # gloo's own timeout would be 30 minutes
    assert "another process of this distributed run stopped" in proc.stdout + proc.stderr
    assert not out.exists()
    assert verify_checkpoint(tmp_path / "run.checkpoints" / "step-000001") is None
    assert not (tmp_path / "run.checkpoints" / "step-000002").exists()


def test_lock_without_os_file_locks_detects_a_dead_holder(tmp_path, monkeypatch):
    """Where the filesystem has no file locks, the lock file's pid decides: a live holder
    refuses, a dead one on this host is taken over, one on another host is reported with the
    file to delete."""
    import fcntl
    import socket

    from ap_erase_fast.outdir import FolderInUse, FolderLock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    target = tmp_path / "run"
    held = FolderLock(target).acquire()
    with pytest.raises(FolderInUse, match=f"in use by another run \\(pid {os.getpid()} "):
        FolderLock(target).acquire()
    held.release()
    child = multiprocessing.get_context("fork").Process(target=os._exit, args=(0,))
    child.start()
    child.join()
    lock = tmp_path / ".run.lock"
    lock.write_text(json.dumps({"pid": child.pid, "host": socket.gethostname()}))
    FolderLock(target).acquire().release()  # stale: taken over
    lock.write_text(json.dumps({"pid": child.pid, "host": "another-host"}))
    with pytest.raises(FolderInUse, match="delete .*run.lock if that run no longer exists"):
        FolderLock(target).acquire()
