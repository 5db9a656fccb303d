"""Data parallelism with the real deepspeed launcher: 2 CPU ranks over gloo, ZeRO-1 and ZeRO-2.

Each launch costs ~15 s (the first one also JIT-builds DeepSpeed's CPU communication op), so the
launches are few and each checks several things.
"""
import json
from pathlib import Path

import pytest
import torch
from _deepspeed import DEEPSPEED, free_port, run_two_ranks
from safetensors.torch import load_file

from ap_erase_fast import EraseConfig, erase

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[1]
if DEEPSPEED is None:
    pytest.skip("deepspeed is not installed (pip install 'ap_erase_fast[deepspeed]')",
                allow_module_level=True)


def launch(tmp_path, ds: dict, *flags):
    cfg = tmp_path / f"ds{free_port()}.json"
    cfg.write_text(json.dumps(ds))
    proc = run_two_ranks(cfg, *flags)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def common(vocab):
    return ["--erase", "garbage truck, church", "--vocab", vocab, "--k-closest", "60",
            "--num-centers", "12", "--ddim-steps", "10", "--seed", "5"]


def test_two_ranks_equal_one_process_with_their_samples_as_a_batch(tmp_path, small_vocab):
    out = tmp_path / "ddp"
    launch(tmp_path, {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1},
                      "ap_erase": {"steps": 2}},
           *common(small_vocab), "--output", str(out))
    info = json.loads((out / "run.json").read_text())
    assert info["world_size"] == 2 and info["global_batch"] == 2
    assert info["ranks_agree"] == {"trained": True, "pi": True}  # θ' and π identical on ranks
    assert sorted(p.name for p in out.iterdir()) == [
        "RANDOM_WEIGHTS.txt", "README.md", "log.jsonl", "run.json", "trained.safetensors", "unet"]
    ddp_log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]

    single = erase(EraseConfig(erase=["garbage truck", "church"], vocab=small_vocab, steps=2,
                               k_closest=60, num_centers=12, ddim_steps=10, seed=5,
                               batch_size=2, quiet=True), write=False)
    assert [r["samples"] for r in ddp_log] == [r["samples"] for r in single.log]
    assert [s["slot"] for s in ddp_log[0]["samples"]] == [0, 1]  # one draw per rank
    for a, b in zip(single.log, ddp_log):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-9)
    trained = load_file(str(out / "trained.safetensors"))
    for name, value in single.trained.items():
        err = (trained[name] - value).abs().max() / value.abs().max()
        assert err < 1e-5, (name, float(err))


def test_zero2_resume_equals_uninterrupted_run(tmp_path, small_vocab):
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}}
    full = tmp_path / "full"
    launch(tmp_path, ds, *common(small_vocab), "--steps", "3", "--output", str(full),
           "--checkpoint-every", "1", "--schedule", "shared", "--quiet")
    ckpt = tmp_path / "full.checkpoints" / "step-000001"
    assert (ckpt / "engine").is_dir() and (ckpt / "rng-rank1.safetensors").is_file()
    resumed = tmp_path / "resumed"
    launch(tmp_path, ds, *common(small_vocab), "--steps", "3", "--output", str(resumed),
           "--schedule", "shared", "--resume", str(ckpt), "--quiet")
    a = load_file(str(full / "trained.safetensors"))
    b = load_file(str(resumed / "trained.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (full / "log.jsonl").read_text() == (resumed / "log.jsonl").read_text()


def test_unsupported_deepspeed_settings_are_clear_errors(tmp_path, capsys):
    from ap_erase_fast.cli import main

    for ds, msg in [({"zero_optimization": {"stage": 3}}, "ZeRO stage 3"),
                    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps"),
                    ({"fp16": {"enabled": True}}, "fp16"),
                    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
                     "offload")]:
        from ap_erase_fast.distributed import prepare_deepspeed_config
        from ap_erase_fast.errors import UserError

        with pytest.raises(UserError, match=msg):
            prepare_deepspeed_config(ds, 1)
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 1}, "ap_erase": {"learning_rate": 1}}')
    assert main(["train", "--config", str(bad), "--erase", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: DeepSpeed config") and "learning_rate" in err


def test_lora_zero2_ranks_agree_and_resume(tmp_path, small_vocab):
    """LoRA under DeepSpeed ZeRO-2: both ranks end with the same adapters and π, the LoRA
    outputs are written, and a resumed run ends bit-identical."""
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}}
    flags = [*common(small_vocab), "--steps", "2", "--lora-rank", "4", "--quiet"]
    full = tmp_path / "lora"
    launch(tmp_path, ds, *flags, "--output", str(full), "--checkpoint-every", "1")
    info = json.loads((full / "run.json").read_text())
    assert info["ranks_agree"] == {"trained": True, "pi": True}
    assert (full / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (full / "lora_kohya.safetensors").is_file() and not (full / "unet").exists()
    assert all(".lora_" in n for n in load_file(str(full / "trained.safetensors")))
    resumed = tmp_path / "resumed"
    launch(tmp_path, ds, *flags, "--output", str(resumed),
           "--resume", str(tmp_path / "lora.checkpoints" / "step-000001"))
    a = load_file(str(full / "trained.safetensors"))
    b = load_file(str(resumed / "trained.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_score_estimator_two_ranks_equal_one_process_batch_two(tmp_path, small_vocab):
    """``--search-estimator score``: the ranks gather their draws and errors, so two ranks of
    batch 1 step π as one process of batch 2 does (one concept: each sample's baseline is the
    other rank's error). Mutation checked: without the gather each rank's lone sample uses the
    running mean, and π differs after the first step."""
    flags = ["--erase", "garbage truck", "--vocab", small_vocab, "--k-closest", "60",
             "--num-centers", "12", "--ddim-steps", "10", "--seed", "5", "--steps", "2",
             "--search-estimator", "score", "--search-lr", "1", "--checkpoint-every", "1", "--quiet"]
    out = tmp_path / "ddp"
    launch(tmp_path, {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1}},
           *flags, "--output", str(out))
    single = tmp_path / "single"
    erase(EraseConfig(erase=["garbage truck"], vocab=small_vocab, steps=2, k_closest=60,
                      num_centers=12, ddim_steps=10, seed=5, batch_size=2, quiet=True,
                      search_estimator="score", search_lr=1.0, checkpoint_every=1, output=str(single)))
    for step in ("step-000001", "step-000002"):
        a = load_file(str(tmp_path / "ddp.checkpoints" / step / "pi.safetensors"))["pi.0"]
        b = load_file(str(tmp_path / "single.checkpoints" / step / "pi.safetensors"))["pi.0"]
        da, db = a - 1.0 / len(a), b - 1.0 / len(b)  # updates from the uniform start
        moved = db.abs() > 1e-6
        assert moved.any(), "π never moved"
        # the errors of a batch-1 and a batch-2 UNet call differ in the last bits, and the
        # estimate is a difference of two close errors: same candidates, same signs, sizes
        # within 30 %
        assert torch.equal(da.abs() > 1e-6, moved), (step, da, db)
        assert torch.equal(da[moved].sign(), db[moved].sign()), (step, da, db)
        assert ((da[moved] - db[moved]).abs() <= 0.3 * db[moved].abs()).all(), (step, da, db)


def test_bank_ranks_share_the_build_and_equal_one_process(tmp_path, small_vocab):
    """--trajectories bank on 2 ranks: each rank builds every other chunk of the bank (rank 0's
    count is its chunks' share), the gathered bank is the one a single process builds, and the
    run equals one process with the ranks' samples as a batch. Mutation checked: every rank
    building every chunk gives rank 0 the whole build count and the test fails."""
    flags = ["--erase", "garbage truck", "--vocab", small_vocab, "--k-closest", "60",
             "--num-centers", "12", "--ddim-steps", "10", "--seed", "5", "--steps", "2",
             "--trajectories", "bank", "--bank-size", "2", "--bank-build-batch", "4", "--quiet"]
    out, bank = tmp_path / "ddp", tmp_path / "ddp-bank.safetensors"
    launch(tmp_path, {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1}},
           *flags, "--output", str(out), "--bank-file", str(bank))
    info = json.loads((out / "run.json").read_text())
    total = info["trajectories"]["unet_evals"]
    assert total == 2 * 2 * 13 * 9  # M·P trajectories of S − 1 guided steps (P = 1 + |R| = 13)
    # 26 trajectories in 7 chunks of at most 4: rank 0 builds chunks 0, 2, 4, 6 (14 trajectories)
    assert info["unet_evals"]["bank_build"] == 14 * 2 * 9
    assert info["ranks_agree"] == {"trained": True, "pi": True}
    single_bank = tmp_path / "single-bank.safetensors"
    single = erase(EraseConfig(erase=["garbage truck"], vocab=small_vocab, steps=2, k_closest=60,
                               num_centers=12, ddim_steps=10, seed=5, batch_size=2, quiet=True,
                               trajectories="bank", bank_size=2, bank_build_batch=4,
                               bank_file=str(single_bank)), write=False)
    a, b = load_file(str(bank))["states"], load_file(str(single_bank))["states"]
    assert torch.allclose(a, b, rtol=0, atol=1e-5)
    ddp_log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["samples"] for r in ddp_log] == [r["samples"] for r in single.log]
    trained = load_file(str(out / "trained.safetensors"))
    for name, value in single.trained.items():
        err = (trained[name] - value).abs().max() / value.abs().max()
        assert err < 1e-5, (name, float(err))
