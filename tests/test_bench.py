"""The step benchmark's bookkeeping: one t_enc sequence for every row, raw speed-ups per train
method."""
from ap_erase_fast.bench import CONFIGS, add_speedups, t_enc_sequence


def test_t_enc_sequence_is_fixed_and_spread():
    seq = t_enc_sequence(10, 50)
    assert seq == t_enc_sequence(10, 50) and sorted(seq) == [2, 7, 12, 17, 22, 27, 32, 37, 42, 47]
    assert sorted(t_enc_sequence(50, 50)) == list(range(50))


def test_plan_takes_the_fixed_sequence(tiny_cfg):
    from ap_erase_fast.engine import Eraser

    er = Eraser(tiny_cfg(steps=2, schedule="shared")).setup()
    er.plan.fix_t_enc([3, 7])
    er.train()
    assert [r["t_enc"] for r in er.log] == [3, 7]


def test_speedups_are_raw_and_per_train_method():
    rows = [{"config": name, "status": "ok", "outer_steps_per_s": s, "outer_steps_per_s_at_mean_length": m}
            for name, s, m in [("reference/faithful/xattn", 1.0, 2.0), ("fast/faithful/xattn", 3.0, 4.0),
                               ("reference/faithful/noxattn", 2.0, 1.0), ("fast/shared/noxattn", 5.0, 4.0)]]
    assert all(r["config"] in CONFIGS for r in rows)
    add_speedups(rows)
    assert [r["speedup_vs_first"] for r in rows] == [1.0, 3.0, 1.0, 2.5]
    assert [r["speedup_at_mean_length"] for r in rows] == [1.0, 2.0, 1.0, 4.0]


def test_results_go_to_a_new_folder_by_default(tmp_path, monkeypatch):
    """Without --out the step benchmark writes into a new bench-step-<date-time> folder under
    the current one (never into the package or over the committed reports)."""
    import argparse

    from ap_erase_fast.bench import write_results

    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(out=None, preset="tiny", tag="", steps=1)
    write_results([{"config": "fast/shared/xattn", "status": "ok"}], {"device": "cpu"}, args)
    write_results([{"config": "fast/shared/xattn", "status": "ok"}], {"device": "cpu"}, args)
    folders = sorted(tmp_path.glob("bench-step-*"))
    assert len(folders) == 2 and all((f / "step_tiny_cpu.md").is_file() for f in folders)


def test_rows_are_written_as_they_finish(tmp_path, monkeypatch):
    """A benchmark stopped after its first configuration keeps that row in both files.
    Mutation checked: the files written only once, after the last row."""
    import json
    import subprocess

    import pytest

    from ap_erase_fast import bench

    calls = []
    real_run = subprocess.run

    def fake_run(cmd, **kwargs):
        if "--_child" not in cmd:  # git, for the environment header
            return real_run(cmd, **kwargs)
        calls.append(cmd)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user stops the benchmark during the second row
        row = {"outer_steps_per_s": 1.5, "outer_steps_per_s_at_mean_length": 1.5, "peak_gib": 2.25}
        return subprocess.CompletedProcess(cmd, 0, stdout="RESULT " + json.dumps(row) + "\n", stderr="")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path), "--tag", "t",
                    "--configs", "fast/faithful/xattn,fast/shared/xattn"])
    (csv,) = tmp_path.glob("*.csv")
    assert "fast/faithful/xattn,ok,,1.5" in csv.read_text() and "fast/shared/xattn" not in csv.read_text()
    (md,) = tmp_path.glob("*.md")
    assert "| fast/faithful/xattn | ok |" in md.read_text()


def test_cpu_peak_is_the_timed_steps_not_the_set_up():
    """On CPU the step benchmark's peak is that of the timed steps: the peak RSS is reset after
    the warm-up, so memory the set-up held and freed (random-weight construction in fp32 before
    the cast) does not count. Mutation checked: the reset left out (the 300 MiB transient
    stays in the peak)."""
    import subprocess
    import sys

    code = (
        "import torch, ap_erase_fast.bench as b\n"
        "x = torch.ones(300 * 2**20 // 4); del x\n"  # a 300 MiB transient, freed
        "before = b._peak_rss_kib()\n"
        "assert b._reset_peak_rss()\n"
        "print(before, b._peak_rss_kib())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = map(int, out.stdout.split()[-2:])
    assert before - after > 250 * 1024, (before, after)


def test_cpu_row_names_its_peak():
    """A CPU row reports the timed steps' peak and the whole process's peak (which includes the
    set-up), the first never above the second."""
    import argparse

    from ap_erase_fast import bench

    args = argparse.Namespace(preset="tiny", device="cpu", threads=1, steps=1, memory_cap_gib=None,
                              overrides='{"profile": "fast", "train_method": "xattn", "ddim_steps": 4}')
    row = bench._run_one(args)
    assert row["peak_kind"] == "peak RSS of the timed steps"
    # VmHWM and ru_maxrss come from counters the kernel updates at different times: equal
    # within 10 MiB
    assert 0 < row["peak_gib"] <= row["process_peak_gib"] + 0.01
