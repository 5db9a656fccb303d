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
                                  ["bench", "--help"], ["bench", "step", "--help"],
                                  ["bench", "quality", "--help"], ["bench", "ablations", "--help"], ["--version"]])
def test_help_texts_render(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert ("usage:" in out) if argv != ["--version"] else out.startswith("ap_erase_fast ")


# ---- the one-line error promise, option by option --------------------------------------------
NAN, INF = "nan", "inf"
# Bad values of every option of 'ap-erase train' (a new option must be added here). None: every
# value is acceptable (documented why).
BAD_VALUES = {
    "config": ["{tmp}/missing.yaml", "{tmp}/broken.yaml"],
    "model": ["{tmp}/no-such-model", "{tmp}/broken.yaml"],
    "model_folder": ["{tmp}/no-folder"],
    "single_file_weights": ["both"],
    "resolution": ["0", "-64", "x", "33"],
    "device": ["tpu", "cuda:x"],
    "erase": ["", " , ", "concepts_missing.txt", "{tmp}/lists/", "./missing/c.list"],
    "train_method": ["attn3"],
    "lora_rank": ["-1", "x"],
    "lora_alpha": [NAN, INF, "0", "-1"],
    "merge": ["=1"],
    "base_quantization": ["int4", "nf4"],  # nf4: without --lora-rank
    "negative_guidance": [NAN, INF, "-1", "x"],
    "preserve_weight": [NAN, "-inf", "-0.5"],
    "preserve_draws": ["0", "-2", "x"],
    "loss_space": ["l1"],
    "vocab": ["{tmp}/missing.txt", "{tmp}/empty.txt"],
    "k_closest": ["0", "-3", "1.5", "x"],
    "num_centers": ["0"],
    "exclude_erased": ["=yes"],
    "preserve_set": ["prompts_missing.txt"],
    "search": ["greedy"],
    "search_score": ["relative"],
    "search_estimator": ["reinforce"],
    "tau": ["0", "-2", NAN, INF],
    "gumbel_mode": ["gumbel"],
    "gumbel_topk": ["0"],
    "search_lr": ["0", "-1e-2", NAN, INF],
    "embedding_cache": None,  # an unwritable cache folder is a warning: the cache is optional
    "steps": ["0", "-1", "x"],
    "pgd_steps": ["1", "0"],
    "schedule": ["alternating"],
    "profile": ["slow"],
    "batch_size": ["0"],
    "ddim_steps": ["1", "0", "100000"],
    "start_guidance": [NAN, INF, "-3"],
    "max_sequence_length": ["0", "513", "x"],
    "distilled_guidance": [NAN, INF, "-1", "x"],
    "seed": ["-1", "1.5", str(2 ** 64)],
    "trajectories": ["cache"],
    "bank_size": ["0", "1.5"],
    "bank_seed": ["-1", "1.5", "=3"],
    "bank_file": ["{tmp}/file"],
    "bank_build_batch": ["0", "x"],
    "bank_refresh": ["-1", "1.5"],
    "bank_refresh_share": ["0", "1.5", NAN],
    "bank_on_device": ["=1"],
    "lr": [NAN, INF, "-1", "0", "1e"],
    "optimizer": ["sgd"],
    "weight_decay": [NAN, "-0.1"],
    "mixed_precision": ["fp8"],
    "allow_tf32": ["=1"],
    "attention": ["flash", "xformers"],
    "gradient_checkpointing": ["=on"],
    "compile": ["=1"],
    "deepspeed": ["{tmp}/missing.json", "{tmp}/broken.yaml"],
    "output": [".", "{tmp}/file/sub", "{tmp}"],
    "overwrite": ["=yes"],
    "checkpoint_every": ["-1", "x"],
    "resume": ["{tmp}/no-checkpoints", "{tmp}/empty.txt"],
    "resume_fallback": ["=no"],
    "quiet": ["=yes"],
}


def test_every_option_with_bad_values_is_one_line_and_exit_2(capsys, tmp_path, small_vocab,
                                                              monkeypatch):
    """Each option of 'ap-erase train' with bad values (nan, inf, ≤ 0 where meaningless, wrong
    types, missing files, values only the loaded model can refuse): one 'error:' line, exit 2,
    and nothing written.

    Mutations checked: the finite-number check removed (--lr nan reaches the optimizer: fails),
    the concept-file check removed (--erase concepts_missing.txt trains: fails)."""
    import torch

    from ap_erase_fast.config import EraseConfig

    fields = [f.name for f in __import__("dataclasses").fields(EraseConfig)]
    assert sorted(BAD_VALUES) == sorted(fields + ["config"]), "add the new option to BAD_VALUES"
    (tmp_path / "empty.txt").write_text("# nothing\n")
    (tmp_path / "broken.yaml").write_text("erase: [x\n")
    (tmp_path / "file").write_text("")
    (tmp_path / "lists").mkdir()
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    for name, values in BAD_VALUES.items():
        for value in values or []:
            if name == "device" and value.startswith("cuda") and torch.cuda.is_available():
                continue
            value = value.replace("{tmp}", str(tmp_path))
            flag = "--" + name.replace("_", "-")
            arg = [flag + value] if value.startswith("=") else [flag, value]
            argv = ["train", "--erase", "x", "--vocab", small_vocab, "--output", str(out), *FAST]
            if name in ("erase", "vocab", "output"):  # replace the default given above
                i = argv.index(flag)
                del argv[i:i + 2]
            code = main(argv + arg)
            err = capsys.readouterr().err.strip()
            lines = [ln for ln in err.splitlines() if not ln.startswith(("note:", "warning:"))]
            assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (flag, value, err)
            assert not out.exists() and not list(tmp_path.glob(".out.*")), (flag, value)


def test_concept_file_typo_is_an_error_and_real_files_are_read(capsys, tmp_path, small_vocab):
    """'--erase concepts_missing.txt' (a typo in a file name) is refused; an existing file is
    read line by line; a concept with a slash that names no folder ("AC/DC") stays a concept."""
    from ap_erase_fast.config import parse_concepts

    assert "concepts_missing.txt: no such file" in _bad(
        capsys, "train", "--erase", "concepts_missing.txt", "--vocab", small_vocab, "--output",
        str(tmp_path / "o"), *FAST)
    listed = tmp_path / "c.list"
    listed.write_text("garbage truck\n# a comment\nchurch\n")
    assert parse_concepts(str(listed)) == ["garbage truck", "church"]
    assert parse_concepts("AC/DC, Van Gogh") == ["AC/DC", "Van Gogh"]


def test_overwrite_replaces_only_folders_this_library_wrote(capsys, tmp_path, small_vocab,
                                                             monkeypatch):
    """--overwrite refuses a folder without this library's run.json (its files stay), and the
    current folder, home and / whatever they hold; it replaces a finished run's folder.

    Mutation checked: the run.json check removed (the user's folder is replaced: fails)."""
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("years of work")
    args = ["--erase", "x", "--vocab", small_vocab, *FAST, "--overwrite"]
    assert "replaces only a folder ap_erase_fast wrote" in _bad(capsys, "train", "--output",
                                                                 str(mine), *args)
    assert (mine / "chapter1.tex").read_text() == "years of work"
    (mine / "run.json").write_text('{"library": "someone else"}')
    _bad(capsys, "train", "--output", str(mine), *args)
    monkeypatch.chdir(mine)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert "is the current folder" in _bad(capsys, "train", "--output", ".", *args)
    assert "is a parent of the current folder" in _bad(capsys, "train", "--output", "..", *args)
    assert "is your home folder" in _bad(capsys, "train", "--output", "~", *args)
    assert "is the filesystem root" in _bad(capsys, "train", "--output", "/", *args)
    assert sorted(p.name for p in mine.iterdir()) == ["chapter1.tex", "run.json"]
    run = tmp_path / "run"
    assert main(["train", "--output", str(run), *args[:-1]]) == 0
    first = (run / "run.json").read_text()
    assert main(["train", "--output", str(run), *args, "--seed", "1"]) == 0
    assert (run / "run.json").read_text() != first
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".run")) == []


def test_unexpected_exception_is_one_line_with_a_traceback_file(capsys, tmp_path, small_vocab,
                                                                 monkeypatch):
    """A bug (here: an injected ZeroDivisionError in the loss) prints one line, exits 1, writes
    the traceback beside the output folder, and leaves no temporary folder or lock."""
    import ap_erase_fast.steps as steps

    def broken(*args, **kwargs):
        return 1 / 0

    monkeypatch.setattr(steps, "erasure_loss", broken)
    out = tmp_path / "o"
    code = main(["train", "--erase", "x", "--vocab", small_vocab, "--output", str(out), *FAST])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err, err
    assert err.startswith("error: unexpected ZeroDivisionError: division by zero")
    log = tmp_path / "o.error.log"
    assert f"the traceback is in {log}" in err
    assert "Traceback" in log.read_text() and "ZeroDivisionError" in log.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.error.log"]


def test_long_concept_warns_that_it_is_cut(capsys):
    from ap_erase_fast.concepts import check_concept_has_tokens
    from ap_erase_fast.models import build_clip_tokenizer

    check_concept_has_tokens(build_clip_tokenizer(), "a cat")
    assert capsys.readouterr().err == ""
    check_concept_has_tokens(build_clip_tokenizer(), "a very long concept " * 25)
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning: the concept 'a very long concept a very long concept ...' "
                          "is 100 tokens long; the text encoder reads only its first 75")
    assert "\n" not in err


def test_quiet_means_quiet(capsys, tmp_path):
    """--quiet on the shipped shapes model (whose text encoder transformers loads with its own
    "Loading weights" bar): nothing at all on stdout or stderr."""
    code = main(["train", "--model", "shapes", "--erase", "circle", "--steps", "1",
                 "--ddim-steps", "4", "--k-closest", "20", "--num-centers", "5", "--quiet",
                 "--output", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert code == 0 and out == "" and err == "", (out, err)


EVAL_BAD_VALUES = {
    "run": ["{tmp}/no-run", "{tmp}/empty.txt"],
    "base_only": ["=1"],
    "model": ["{tmp}/no-such-model"],
    "erase": ["concepts_missing.txt", " , "],
    "single_file_weights": ["both"],
    "allow_model_mismatch": ["=1"],
    "output": [".", "{tmp}/empty.txt/sub"],
    "overwrite": ["=1"],
    "device": ["tpu", "cuda:x"],
    "quiet": ["=1"],
    "concepts": ["{tmp}/missing.txt", "{tmp}/empty.txt"],
    "eps_seeds": ["0", "x"],
    "eps_timesteps": ["0"],
    "eps_ddim_steps": ["0", "1", "100000"],
    "eps_guidance": [NAN, INF, "-1"],
    "negative_guidance": [NAN, "-1"],
    "eps_batch_size": ["0"],
    "no_images": ["=1"],
    "prompts": ["{tmp}/missing.csv", "{tmp}/empty.txt"],
    "images_per_prompt": ["0"],
    "detectors": ["fid", "resnet50"],  # resnet50: its weights are not in --weights
    "weights": None,  # only read by a detector that needs weights (covered above)
    "steps": ["0", "-5"],
    "guidance": [NAN, INF, "-7.5"],
    "scheduler": ["euler"],
    "resolution": ["0", "33"],
    "batch_size": ["0"],
    "no_save_images": ["=1"],
    "grid_size": ["-1"],
    "nudenet_classes": None,  # only read by the nudenet detector
    "nudenet_model": None,  # only read by the nudenet detector
}


def test_every_eval_option_with_bad_values_is_one_line_and_exit_2(capsys, tmp_path, small_vocab,
                                                                   monkeypatch):
    """The same promise for 'ap-erase eval': each option with bad values gives one 'error:'
    line and exit 2, and no report folder."""
    import torch

    from ap_erase_fast.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    dests = sorted(a.dest for a in sub.choices["eval"]._actions if a.dest != "help")
    assert sorted(EVAL_BAD_VALUES) == dests, "add the new eval option to EVAL_BAD_VALUES"
    run = tmp_path / "run"
    assert main(["train", "--erase", "x", "--vocab", small_vocab, "--output", str(run), *FAST]) == 0
    (tmp_path / "empty.txt").write_text("# nothing\n")
    monkeypatch.chdir(tmp_path)
    for name, values in EVAL_BAD_VALUES.items():
        for value in values or []:
            if name == "device" and value.startswith("cuda") and torch.cuda.is_available():
                continue
            value = value.replace("{tmp}", str(tmp_path))
            flag = "--" + name.replace("_", "-")
            arg = [flag + value] if value.startswith("=") else [flag, value]
            argv = ["eval", *(["--run", str(run)] if name != "run" else []), "--weights",
                    str(tmp_path / "no-weights"), *arg]
            code = main(argv)
            err = capsys.readouterr().err
            # what a terminal shows: the last \r-segment of each line (progress bars clear)
            shown = [ln.split("\r")[-1] for ln in err.split("\n")]
            lines = [ln for ln in shown if ln.strip() and not ln.startswith(("note:", "warning:"))]
            assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (flag, value, err)
            assert not (run / "eval").exists(), (flag, value)


class _RunsCode:
    """A pickle payload that would create a file when unpickled without weights_only."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_ckpt_is_refused_in_one_whole_sentence(capsys, tmp_path):
    """A .ckpt whose pickle would run code: nothing runs, and the refusal is one complete line
    that says why and what to do (not a message cut off mid-sentence, no warning lines)."""
    import pickle

    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": _RunsCode(str(tmp_path / "PWNED"))}, protocol=4))
    err = _bad(capsys, "train", "--model", str(evil), "--erase", "x", "--output",
               str(tmp_path / "o"), *FAST)
    assert not (tmp_path / "PWNED").exists()
    assert err.startswith(f"error: cannot read checkpoint '{evil}': the weights-only loader "
                          f"refused it (Unsupported operand 149)")  # protocol 4's FRAME
    assert err.endswith("convert it to .safetensors with a tool you trust")
