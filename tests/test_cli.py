"""The ap-erase command line, as a user runs it: end to end on the tiny model, and bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from ap_erase_fast.cli import main

FAST = ["--steps", "1", "--k-closest", "60", "--num-centers", "12", "--ddim-steps", "10", "--quiet"]


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ap_erase_fast", *args], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_train_end_to_end_and_load_into_pipeline(tmp_path):
    """The quickstart path: default vocabulary, subprocess, output loads into diffusers."""
    out = tmp_path / "erased"
    proc = run_cli("train", "--erase", "garbage truck", "--steps", "2", "--seed", "3",
                   "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"output: {out}" in proc.stdout
    assert "RANDOM weights" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "RANDOM_WEIGHTS.txt", "README.md", "log.jsonl", "run.json", "trained.safetensors", "unet"]

    info = json.loads((out / "run.json").read_text())
    assert info["config"]["erase"] == ["garbage truck"] and info["model"]["random_weights"]
    assert 1 <= len(info["preservation_sets"]["garbage truck"]["words"]) <= 100
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and {"kind", "loss", "t_enc", "samples"} <= set(log[0])
    assert {"concept", "adv_word", "t_ddpm", "slot"} <= set(log[0]["samples"][0])

    with safe_open(str(out / "trained.safetensors"), "pt") as fh:
        meta = fh.metadata()
        names = list(fh.keys())
    assert meta["train_method"] == "xattn" and json.loads(meta["erased_concepts"]) == ["garbage truck"]
    assert meta["base_model"] == "tiny" and meta["seed"] == "3" and meta["random_weights"] == "true"
    assert names and all("attn2" in n for n in names)

    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from ap_erase_fast.models import load_components

    unet = UNet2DConditionModel.from_pretrained(str(out / "unet"))
    base = load_components("tiny")
    pipe = StableDiffusionPipeline.from_pretrained(base.pipeline_path, unet=unet,
                                                   safety_checker=None,
                                                   requires_safety_checker=False)
    image = pipe("a garbage truck", num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (32, 32, 3) and float(image.std()) > 0
    trained = dict(unet.named_parameters())
    with safe_open(str(out / "trained.safetensors"), "pt") as fh:
        for n in names:
            assert torch.equal(fh.get_tensor(n), trained[n].detach())


def _bad(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_bad_inputs_one_line_exit_2(capsys, tmp_path, small_vocab):
    out = str(tmp_path / "o")
    common = ["--vocab", small_vocab, "--output", out, *FAST]
    assert "nope" in _bad(capsys, "train", "--model", str(tmp_path / "nope"), "--erase", "x",
                          *common)
    assert "nothing to erase" in _bad(capsys, "train", "--erase", " , ", *common)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# just a comment\n")
    assert "no words" in _bad(capsys, "train", "--erase", "x", "--vocab", str(empty), "--output",
                              out, *FAST)
    assert "train-method" in _bad(capsys, "train", "--erase", "x", "--train-method", "attn3")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("erase: [x]\nlearning_rate: 0.1\n")
    assert "learning_rate" in _bad(capsys, "train", "--config", str(cfg))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "cannot write" in _bad(capsys, "train", "--erase", "x", "--output",
                                  str(blocker / "sub"), "--vocab", small_vocab, *FAST)
    assert not (tmp_path / "o").exists()


def test_concept_without_tokens_is_refused():
    from ap_erase_fast.concepts import check_concept_has_tokens
    from ap_erase_fast.errors import UserError
    from ap_erase_fast.models import build_clip_tokenizer

    with pytest.raises(UserError, match="tokenizes to nothing"):
        check_concept_has_tokens(build_clip_tokenizer(), "\t")


def test_config_file_and_flag_precedence(tmp_path, small_vocab):
    from ap_erase_fast.cli import build_parser
    from ap_erase_fast.config import config_from_args

    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"erase": "a, b", "train-method": "noxattn", "steps": 7,
                                    "lr": 0.5, "vocab": small_vocab}))
    args = build_parser().parse_args(["train", "--config", str(cfg_file), "--steps", "3"])
    cfg = config_from_args(args)
    assert cfg.erase == ["a", "b"] and cfg.train_method == "noxattn"
    assert cfg.steps == 3 and cfg.lr == 0.5


def test_non_finite_loss_stops_keeps_checkpoint(capsys, tmp_path, small_vocab, monkeypatch):
    import ap_erase_fast.steps as steps

    real, calls = steps.erasure_loss, []

    def poisoned(*args, **kwargs):  # the third outer update (iteration 4, step 2) turns NaN
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) > 2 else loss

    monkeypatch.setattr(steps, "erasure_loss", poisoned)
    out = tmp_path / "o"
    err = _bad(capsys, "train", "--erase", "garbage truck", "--vocab", small_vocab, "--output",
               str(out), "--steps", "6", "--k-closest", "60", "--num-centers", "12",
               "--checkpoint-every", "1", "--ddim-steps", "10", "--quiet")
    assert "the loss became nan at iteration 4" in err
    assert not out.exists()
    ckpts = tmp_path / "o.checkpoints"
    assert f"last checkpoint is {ckpts / 'step-000002'}" in err
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000001", "step-000002"]


def test_refuses_non_empty_output(capsys, tmp_path, small_vocab):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "--overwrite" in _bad(capsys, "train", "--erase", "x", "--vocab", small_vocab,
                                 "--output", str(out), *FAST)
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"],
                                  ["bench", "step", "--help"], ["--version"]])
def test_help_texts_render(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert ("usage:" in out) if argv != ["--version"] else out.startswith("ap_erase_fast ")
