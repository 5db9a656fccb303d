"""Inputs that used to crash or pass unchecked, help texts and docs that contradicted the
program, and stray output: each case is one 'error:' line, exit code 2 and nothing written, or
the text the program actually does."""
import json
import subprocess
from pathlib import Path

import pytest

from ap_erase_fast.cli import main

ROOT = Path(__file__).resolve().parents[1]
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
    from ap_erase_fast.config import EraseConfig
    from ap_erase_fast.errors import UserError
    from ap_erase_fast.model_bounds import check_model_bounds

    ckpt = in_tmp / "model.ckpt"
    ckpt.write_bytes(b"not read")
    with pytest.raises(UserError, match="4096 px"):
        check_model_bounds(EraseConfig(model=str(ckpt), erase=["x"], resolution=100000))
    check_model_bounds(EraseConfig(model=str(ckpt), erase=["x"], resolution=1024))


def test_model_bounds_leave_configs_they_cannot_read_to_the_loader(in_tmp, capsys):
    """A folder whose UNet config diffusers cannot build, or whose sample size is (h, w): the
    bounds are checked where they can be and never crash or print."""
    from ap_erase_fast.config import EraseConfig
    from ap_erase_fast.model_bounds import check_model_bounds, peek_model

    (in_tmp / "odd" / "unet").mkdir(parents=True)
    (in_tmp / "odd" / "unet" / "config.json").write_text(json.dumps(
        {"_class_name": "SomethingElse", "sample_size": [64, 96], "down_block_types": 3,
         "unknown_key": 1}))
    assert peek_model(str(in_tmp / "odd")).native_resolution == 768
    check_model_bounds(EraseConfig(model=str(in_tmp / "odd"), erase=["x"], lora_rank=4))
    assert capsys.readouterr() == ("", "")


def test_eval_resolution_far_beyond_the_model_is_refused(capsys, in_tmp):
    err = _one_line_error(capsys, ["eval", "--base-only", "--model", "tiny", "--erase", "x",
                                   "--no-images", "--output", "ev", "--resolution", "100000",
                                   "--quiet"], in_tmp)
    assert "--resolution 100000" in err and "64 px" in err


def test_lora_rank_larger_than_every_adapted_layer_is_refused(capsys, in_tmp, small_vocab):
    """The bound is the largest min(in, out) of the layers the train method adapts (64 on the
    tiny model), read from the model's config without loading it."""
    from ap_erase_fast.config import EraseConfig
    from ap_erase_fast.model_bounds import (
        check_model_bounds,
        lora_rank_bound,
        peek_model,
    )

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
    from ap_erase_fast.model_bounds import lora_rank_bound, peek_model
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


# ---- 4. help, docs and outputs that contradicted the program --------------------------------
def _help(command):
    from ap_erase_fast.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command].format_help()


def test_resolution_help_states_the_native_sizes_the_models_have():
    """The help (and docs/CONFIG.md, generated from it) said 32 for tiny; it is 16."""
    import re

    from ap_erase_fast.model_bounds import peek_model

    text = " ".join(_help("train").split())
    for model in ("tiny", "tiny-sdxl", "shapes", "shapes2"):
        size = peek_model(model).native_resolution
        assert re.search(rf"{size} for [a-z0-9 -]*\b{model}\b", text), (model, size)
    assert "32 for tiny" not in text
    config_doc = " ".join((ROOT / "docs" / "CONFIG.md").read_text().split())
    assert "16 for tiny" in config_doc and "32 for tiny" not in config_doc


def test_eval_help_says_each_default_once():
    text = " ".join(_help("eval").split())
    assert "(default: None)" not in text and "(default: False)" not in text
    for option in text.split("  --")[1:]:
        assert option.count("(default") <= 1, option
    assert "(default: 2)" in text and "(default: auto)" in text  # the real defaults stay


def test_non_empty_folder_advice_names_what_works(capsys, in_tmp, small_vocab):
    """A non-empty folder this library did not write advised '--overwrite', which was then
    refused; now the advice is what works (another --output, or empty it), with or without
    --overwrite, for train and eval."""
    foreign = in_tmp / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("my notes\n")
    for extra in ([], ["--overwrite"]):
        err = _one_line_error(capsys, ["train", "--erase", "x", "--vocab", small_vocab,
                                       "--output", str(foreign), *FAST, *extra], in_tmp)
        assert "pass --overwrite" not in err and "choose another --output" in err
        err = _one_line_error(capsys, ["eval", "--base-only", "--model", "tiny", "--erase", "x",
                                       "--no-images", "--output", str(foreign), "--quiet",
                                       *extra], in_tmp)
        assert "pass --overwrite" not in err and "choose another --output" in err
    assert (foreign / "mine.txt").read_text() == "my notes\n"


def test_unknown_vocabulary_name_lists_the_built_in_ones(capsys, in_tmp):
    """--vocab english was 'vocabulary file 'english' does not exist', after the model load."""
    from ap_erase_fast.errors import UserError
    from ap_erase_fast.models.vocab import load_vocabulary

    err = _one_line_error(capsys, ["train", "--erase", "x", "--vocab", "english", "--output",
                                   "out", *FAST], in_tmp)
    assert "'english'" in err and "en, shapes, shapes2" in err
    with pytest.raises(UserError, match="en, shapes, shapes2"):
        load_vocabulary("english")
    with pytest.raises(UserError, match="does not exist.*en, shapes, shapes2"):
        load_vocabulary(str(in_tmp / "words.txt"))


def test_sdxl_eval_records_the_pipeline_it_used(tmp_path):
    """report.json of an SDXL eval said StableDiffusionPipeline."""
    from ap_erase_fast.eval import EvalConfig, evaluate

    rep = evaluate(EvalConfig(base_only=True, model="tiny-sdxl", erase=["x"],
                              output=str(tmp_path / "ev"), eps_seeds=1, eps_timesteps=1,
                              eps_ddim_steps=4, steps=1, images_per_prompt=1, batch_size=8,
                              save_images=False, quiet=True, device="cpu"))
    assert rep["images"]["protocol"]["library"] == "diffusers.StableDiffusionXLPipeline"
    assert "StableDiffusionXLPipeline" in (tmp_path / "ev" / "report.md").read_text()



@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, small_vocab):
    """A finished one-step run on the built-in tiny model."""
    from ap_erase_fast import EraseConfig, erase

    out = tmp_path_factory.mktemp("card") / "run"
    erase(EraseConfig(model="tiny", erase=["garbage truck"], steps=1, ddim_steps=4,
                      k_closest=40, num_centers=6, vocab=small_vocab, quiet=True, device="cpu",
                      output=str(out)))
    return out


def _code_block(card: str) -> str:
    import re

    section = card.split("## How to use", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_model_card_of_a_built_in_model_loads_as_it_says(tiny_run):
    """The card told users of built-in models to call from_pretrained("<base model>"), which
    no hub has; its code now runs as written."""
    import torch

    card = (tiny_run / "README.md").read_text()
    assert "<base model>" not in card and "pypi.org" not in card
    code = _code_block(card).replace("<this folder>", str(tiny_run))
    scope: dict = {}
    exec(compile(code, "card", "exec"), scope)  # noqa: S102 - the card's own example
    pipe = scope["pipe"]
    from diffusers import UNet2DConditionModel

    saved = UNet2DConditionModel.from_pretrained(str(tiny_run / "unet"))
    assert all(torch.equal(p, saved.get_parameter(n)) for n, p in pipe.unet.named_parameters())


def test_model_card_names_the_base_model_it_was_trained_from():
    from ap_erase_fast.modelcard import model_card

    def info(fmt, model_id, path=None, lora=0, family="sd"):
        return {"config": {"erase": ["x"], "lora_rank": lora, "merge": False},
                "model": {"id": model_id, "sha256": "0" * 64,
                          "source": {"format": fmt, "path": path}},
                "backbone": {"family": family}, "library_version": "1.0", "outer_steps": 1}

    card = model_card(info("hub", "stabilityai/stable-diffusion-xl-base-1.0", family="sdxl"))
    assert ('StableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0"'
            in card)
    card = model_card(info("diffusers", "/models/sd15", path="/models/sd15", lora=8))
    assert 'StableDiffusionPipeline.from_pretrained("/models/sd15"' in card
    assert 'load_lora_weights("<this folder>/lora")' in card
    card = model_card(info("single_file", "v1-5.safetensors", path="/m/v1-5.safetensors"))
    assert 'StableDiffusionPipeline.from_single_file("/m/v1-5.safetensors"' in card
    for card in (model_card(info(f, "m", path="/m")) for f in ("hub", "diffusers", "builtin")):
        assert "<base model>" not in card and "pypi.org" not in card and "https://" not in card


def test_model_card_gives_the_image_scores_of_an_eval():
    """A shapes2 eval was summarised as 'shapes2: see eval/report.md'; the card now gives ESR
    and PSR of the base and the erased model."""
    from ap_erase_fast.modelcard import model_card

    info = {"config": {"erase": ["circle"]}, "library_version": "1.0", "outer_steps": 40,
            "model": {"id": "shapes2", "sha256": "0" * 64, "source": {"format": "builtin"}}}
    results = {"base": {"erased": {"images": 48, "ESR": 0.02, "became": {"ring": 1}},
                        "preserved": {"images": 336, "PSR": 0.985}},
               "erased": {"erased": {"images": 48, "ESR": 0.979, "became": {"square": 47}},
                          "preserved": {"images": 336, "PSR": 0.912}}}
    report = {"eps_space": {}, "images": {
        "protocol": {"steps": 25, "guidance_scale": 5.0, "resolution": 32},
        "detectors": {"shapes2": {"results": results}}}}
    card = model_card(info, report)
    assert "see `eval/report.md`" not in card.replace("Full report: `eval/report.md`", "")
    assert "| erased | 48 | ESR | 2.0 % | 97.9 % |" in card
    assert "| preserved | 336 | PSR | 98.5 % | 91.2 % |" in card


# ---- 5. stray output ----------------------------------------------------------------------
def test_plain_sdxl_run_prints_no_deepspeed_accelerator_warning(tmp_path):
    """With DeepSpeed installed, building the tiny-sdxl model imported it, and its accelerator
    probe printed '[WARNING] [real_accelerator.py:…] Setting accelerator to CPU' on stdout of a
    plain --quiet run (the library's logger setting was reset by DeepSpeed's import)."""
    import os
    import sys

    pytest.importorskip("deepspeed")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["AP_ERASE_CACHE"] = str(tmp_path / "cache")  # a fresh cache: the model is built
    proc = subprocess.run([sys.executable, "-m", "ap_erase_fast", "train", "--model", "tiny-sdxl",
                           "--erase", "x", "--preserve-set", "a, b", "--steps", "1",
                           "--ddim-steps", "2", "--output", str(tmp_path / "out"), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "" and proc.stderr == "", (proc.stdout, proc.stderr)


def test_unusable_embedding_cache_is_one_warning_line_or_nothing_under_quiet(capsys, in_tmp,
                                                                               small_vocab):
    """An --embedding-cache that cannot be written printed a raw 'UserWarning' with the source
    line that raised it, even under --quiet. The cache is optional: one 'warning:' line, and
    nothing under --quiet."""
    (in_tmp / "afile").write_text("a file, not a folder\n")
    argv = ["train", "--erase", "x", "--vocab", small_vocab, *FAST[:-1],
            "--embedding-cache", str(in_tmp / "afile" / "sub")]
    assert main([*argv, "--output", "a"]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.replace("\r", "\n").splitlines()
             if ln.strip() and "step/s" not in ln and "erasing" not in ln]
    assert lines == [ln for ln in lines if ln.startswith("warning: could not write the embedding")]
    assert len(lines) == 1 and "UserWarning" not in err and "vocabulary_embeddings(" not in err
    assert main([*argv, "--output", "b", "--quiet"]) == 0
    assert capsys.readouterr().err == ""


# ---- 2, 3. threads: the reproducibility condition, --threads, the first line ---------------
def test_thread_count_is_part_of_the_reproducibility_promise():
    """Default threads and OMP_NUM_THREADS=1 give different tensors on the same machine; the
    README and the --seed help promised bit-identical results on the same machine only."""
    import re

    readme = " ".join((ROOT / "README.md").read_text().split())
    promises = [s for s in re.split(r"(?<=\.)\s", readme) if "bit-identical outputs" in s]
    assert promises and all("thread" in s for s in promises), promises
    assert "same number of CPU threads" in " ".join(_help("train").split())


def test_threads_flag_sets_the_count_and_the_first_line_says_it(capsys, in_tmp, small_vocab):
    import torch

    before = torch.get_num_threads()
    argv = ["train", "--erase", "x", "--vocab", small_vocab, *FAST[:-1]]
    try:
        assert main([*argv, "--output", "a", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        first = capsys.readouterr().out.splitlines()[0]
        assert first.startswith("threads: 1 CPU thread (--threads)") and "OMP_NUM_THREADS" in first
        (in_tmp / "run.yaml").write_text("threads: 2\n")
        assert main([*argv, "--output", "b", "--config", "run.yaml"]) == 0
        assert torch.get_num_threads() == 2
        assert capsys.readouterr().out.startswith("threads: 2 CPU threads")
        assert main([*argv, "--output", "c", "--config", "run.yaml", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1  # the flag overrides the file
        capsys.readouterr()
        assert main([*argv, "--output", "d", "--quiet"]) == 0
        assert capsys.readouterr().out == ""  # --quiet: no first line either
    finally:
        torch.set_num_threads(before)
    for bad in (["--threads", "0"], ["--threads", "x"], ["--threads", "-1"]):
        err = _one_line_error(capsys, [*argv, "--output", "e", *bad], in_tmp)
        assert "threads" in err
    (in_tmp / "bad.yaml").write_text("threads: 0.5\n")
    assert "threads must be a whole number" in _one_line_error(
        capsys, [*argv, "--output", "e", "--config", "bad.yaml"], in_tmp)


def test_quickstart_documents_threads_next_to_it():
    text = (ROOT / "README.md").read_text()
    quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    prose = quickstart.split("```", 2)[2]  # after the two commands
    assert "--threads" in prose and "OMP_NUM_THREADS" in prose


def test_python_api_checks_the_model_bounds_and_the_real_r(tmp_path):
    """``erase()`` refuses what the command line refuses (a --resolution far beyond the model), and
    a --gumbel-topk larger than the R actually selected (a vocabulary smaller than --num-centers)
    is one clear error, not a silent clamp."""
    import pytest

    from ap_erase_fast import EraseConfig, erase
    from ap_erase_fast.errors import UserError

    with pytest.raises(UserError, match="resolution"):
        erase(EraseConfig(model="tiny", erase=["garbage truck"], steps=1, resolution=100000,
                          quiet=True), write=False)
    vocab = tmp_path / "words.txt"
    vocab.write_text("apple\nriver\nchair\nlamp\ncloud\n")  # R can hold at most 5 words
    with pytest.raises(UserError, match="--gumbel-topk 8 is larger than the preservation set"):
        erase(EraseConfig(model="tiny", erase=["garbage truck"], steps=1, vocab=str(vocab),
                          k_closest=60, num_centers=12, gumbel_mode="topk", gumbel_topk=8,
                          quiet=True), write=False)


def test_run_json_records_the_thread_count(tmp_path, small_vocab):
    import json

    import torch

    from ap_erase_fast import EraseConfig, erase

    out = tmp_path / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # a count no default gives here: the record must read it, not assume it
    try:
        erase(EraseConfig(model="tiny", erase=["garbage truck"], steps=1, vocab=small_vocab, k_closest=60,
                          num_centers=12, ddim_steps=4, quiet=True, output=str(out)))
    finally:
        torch.set_num_threads(before)
    assert json.loads((out / "run.json").read_text())["torch_threads"] == 3
