"""Inputs that used to crash or pass unchecked, help texts and docs that contradicted the
program, and stray output: each case is one 'error:' line, exit code 2 and nothing written, or
the text the program actually does."""
import json
import subprocess
import sys

import pytest

from ap_erase_fast.cli import main

FAST = ["--steps", "1", "--k-closest", "60", "--num-centers", "12", "--ddim-steps", "4",
        "--quiet"]


def _one_line_error(capsys, argv, cwd):
    """Run ``ap-erase argv`` in-process: exit code 2, one 'error:' line, nothing written in
    ``cwd`` (no output folder, no error log). Returns the line."""
    before = set(cwd.iterdir())
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    assert set(cwd.iterdir()) == before, sorted(set(cwd.iterdir()) - before)
    return err


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---- 1. inputs that crashed or passed unchecked ---------------------------------------------
def test_config_file_that_is_not_utf8_is_one_line(capsys, in_tmp, small_vocab):
    """A --config file in another encoding is a one-line error like --erase FILE and --vocab
    FILE (it was an 'unexpected UnicodeDecodeError', exit 1 and an error log)."""
    bad = in_tmp / "latin1.yaml"
    bad.write_bytes("steps: 2\n# caf\xe9\n".encode("latin-1"))
    err = _one_line_error(capsys, ["train", "--config", str(bad), "--erase", "x", "--vocab",
                                   small_vocab, "--output", "out", *FAST], in_tmp)
    assert "not UTF-8" in err and "latin1.yaml" in err


@pytest.mark.parametrize("suffix, text", [(".yaml", ""), (".yaml", "\n\n"),
                                          (".yaml", "# only a comment\n"), (".yaml", "{}\n"),
                                          (".json", ""), (".json", "\n"), (".json", "{}")])
def test_empty_config_file_is_refused(capsys, in_tmp, small_vocab, suffix, text):
    """A config file with no settings is refused (an empty YAML file was accepted silently)."""
    path = in_tmp / f"settings{suffix}"
    path.write_text(text)
    err = _one_line_error(capsys, ["train", "--config", str(path), "--erase", "x", "--vocab",
                                   small_vocab, "--output", "out", *FAST], in_tmp)
    assert "no settings" in err or "is empty" in err
    assert "leave --config out" in err


def test_resolution_far_beyond_the_model_is_refused_with_its_limit(capsys, in_tmp, small_vocab):
    """--resolution 100000 asked for a 40 GB allocation and crashed (exit 1); now it is refused
    before the model loads, with the limit derived from the model (4x its native size)."""
    err = _one_line_error(capsys, ["train", "--resolution", "100000", "--erase", "x", "--vocab",
                                   small_vocab, "--output", "out", *FAST], in_tmp)
    assert "--resolution 100000" in err and "16 px" in err and "64 px" in err
    err = _one_line_error(capsys, ["train", "--model", "shapes2", "--resolution", "1024",
                                   "--erase", "circle", "--output", "out", *FAST], in_tmp)
    assert "32 px" in err and "128 px" in err


def test_resolution_limit_of_models_read_only_at_load_time(capsys, in_tmp):
    """A model whose config cannot be read up front (a .ckpt) gets the generic limit."""
    from ap_erase_fast.config import EraseConfig, check_model_bounds
    from ap_erase_fast.errors import UserError

    ckpt = in_tmp / "model.ckpt"
    ckpt.write_bytes(b"not read")
    with pytest.raises(UserError, match="4096 px"):
        check_model_bounds(EraseConfig(model=str(ckpt), erase=["x"], resolution=100000))
    check_model_bounds(EraseConfig(model=str(ckpt), erase=["x"], resolution=1024))


def test_eval_resolution_far_beyond_the_model_is_refused(capsys, in_tmp):
    err = _one_line_error(capsys, ["eval", "--base-only", "--model", "tiny", "--erase", "x",
                                   "--no-images", "--output", "ev", "--resolution", "100000",
                                   "--quiet"], in_tmp)
    assert "--resolution 100000" in err and "64 px" in err


def test_lora_rank_larger_than_every_adapted_layer_is_refused(capsys, in_tmp, small_vocab):
    """The bound is the largest min(in, out) of the layers the train method adapts (64 on the
    tiny model), read from the model's config without loading it."""
    from ap_erase_fast.config import EraseConfig, check_model_bounds, lora_rank_bound, peek_model

    err = _one_line_error(capsys, ["train", "--lora-rank", "100000", "--erase", "x", "--vocab",
                                   small_vocab, "--output", "out", *FAST], in_tmp)
    assert "--lora-rank 100000" in err and "64" in err
    assert lora_rank_bound(peek_model("tiny").unet_config, "xattn") == (64, 16)
    check_model_bounds(EraseConfig(model="tiny", erase=["x"], lora_rank=64))  # the bound itself
    err = _one_line_error(capsys, ["train", "--model", "tiny-sdxl", "--lora-rank", "65",
                                   "--erase", "x", "--vocab", small_vocab, "--output", "out",
                                   *FAST], in_tmp)
    assert "--lora-rank 65" in err and "use --lora-rank 64 or less" in err


def test_lora_rank_bound_matches_the_loaded_model():
    """The bound read from the config names the same layers the engine adapts."""
    import torch

    from ap_erase_fast.backbones import make_backbone
    from ap_erase_fast.config import lora_rank_bound, peek_model
    from ap_erase_fast.models import load_components

    comps = load_components("tiny-sdxl")
    backbone = make_backbone(comps, torch.device("cpu"), 2)
    modules = dict(comps.unet.named_modules())
    for method in ("xattn", "noxattn"):
        targets = backbone.lora_targets(method)
        sizes = [min(m.in_features, m.out_features) if isinstance(m, torch.nn.Linear)
                 else min(m.in_channels * m.kernel_size[0] * m.kernel_size[1], m.out_channels)
                 for m in (modules[t] for t in targets)]
        assert lora_rank_bound(peek_model("tiny-sdxl").unet_config, method) == (max(sizes),
                                                                                len(targets))


def test_gumbel_topk_larger_than_R_is_refused(capsys, in_tmp, small_vocab):
    err = _one_line_error(capsys, ["train", "--gumbel-mode", "topk", "--gumbel-topk", "100000",
                                   "--erase", "x", "--vocab", small_vocab, "--output", "out",
                                   *FAST], in_tmp)
    assert "--gumbel-topk 100000" in err and "12" in err  # |R| <= --num-centers 12
    err = _one_line_error(capsys, ["train", "--gumbel-mode", "topk", "--gumbel-topk", "3",
                                   "--preserve-set", "a, b", "--erase", "x", "--output", "out",
                                   *FAST], in_tmp)
    assert "--gumbel-topk 3" in err and "(2:" in err
    # the default k of a mode that does not use it is not checked
    from ap_erase_fast.config import EraseConfig

    EraseConfig(erase=["x"], num_centers=3, gumbel_mode="hard").validate()


@pytest.mark.parametrize("argv, says", [
    (["--steps", "-1"], "--steps must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--timeout", "0"], "--timeout must be a positive number"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--ddim-steps", "1"], "--ddim-steps must be at least 2"),
    (["--memory-cap-gib", "nan"], "--memory-cap-gib must be a positive number"),
    (["--preset", "bogus"], "invalid choice: 'bogus'"),
])
def test_bench_step_bad_arguments_are_one_line(capsys, in_tmp, argv, says):
    """'bench step --steps -1' ran every configuration, wrote a folder of NaN rows and exited
    0; '--preset bogus' printed argparse's 8-line usage. Now: one line, exit 2, no folder."""
    err = _one_line_error(capsys, ["bench", "step", *argv], in_tmp)
    assert says in err


def test_bench_step_says_wrote_once(capsys, tmp_path, monkeypatch):
    """The rows are still written after every configuration, but 'wrote …' is said once."""
    from ap_erase_fast import bench

    real_run = subprocess.run

    def fake_run(cmd, **kwargs):
        if "--_child" not in cmd:
            return real_run(cmd, **kwargs)
        row = {"outer_steps_per_s": 1.5, "outer_steps_per_s_at_mean_length": 1.5, "peak_gib": 2.25}
        return subprocess.CompletedProcess(cmd, 0, stdout="RESULT " + json.dumps(row) + "\n",
                                           stderr="")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    assert bench.main(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path),
                       "--configs", "fast/faithful/xattn,fast/shared/xattn,"
                                    "fast/faithful/noxattn"]) == 0
    err = capsys.readouterr().err
    assert err.count("wrote ") == 1 and err.rstrip().splitlines()[-1].startswith("wrote "), err
