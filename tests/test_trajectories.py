"""--trajectories student | base | bank: the bank holds the base model's trajectories, state for
state; a run that reads it trains as a base run from the same starting noises does; a bank built
for anything else is refused; resume is bit-identical; the UNet evaluations follow the cost model
(ALGORITHM.md §7)."""
import json

import pytest
import torch

from ap_erase_fast import erase
from ap_erase_fast.engine import Eraser
from ap_erase_fast.errors import UserError
from ap_erase_fast.randomness import RandomnessPlan
from ap_erase_fast.trajectories import _bank_noise

S = 10  # the tiny runs' DDIM steps


def _setup(tiny_cfg, **kw):
    return Eraser(tiny_cfg(**kw)).setup()


def _steps(t_enc):  # DDIM steps of a trajectory until t_enc (ALGORITHM.md §4)
    return S - 1 if t_enc == 0 else S - t_enc


def test_bank_states_are_the_base_trajectories_bit_for_bit(tiny_cfg):
    """Built one trajectory per call, the bank's state for (prompt, m, t_enc) is bit for bit what
    --trajectories base samples from x_T^(m) with that prompt until t_enc, for the erased concept
    and for members of R (conditioned as the hard draw conditions them), at every t_enc."""
    er = _setup(tiny_cfg, trajectories="bank", bank_size=2, bank_build_batch=1,
                erase=["garbage truck", "church"])
    bank, models = er.trajectories, er.models
    assert bank.states.shape[:3] == (2, bank.info()["prompts"], S - 1)
    for c in range(2):
        for j in (0, len(er.search.sets[c].words) - 1):
            gumbel = torch.full((len(er.search.sets[c].words),), -1e4)
            gumbel[j] = 1e4  # the hard draw picks candidate j
            c_a, index = er.search.draw(c, gumbel, with_grad=False)
            assert index == j
            for m in range(2):
                for t_enc in (range(S) if j == 0 else (0, 1, 5)):
                    want_a = models.sample(bank.x_T[m:m + 1], c_a, t_enc, which="frozen")
                    got_a = bank.sample(None, None, t_enc, [bank.member_prompts[c][j]], [m])
                    assert torch.equal(got_a, want_a), (c, j, m, t_enc)
        for m in range(2):
            for t_enc in (0, 1, 4, S - 1):
                want = models.sample(bank.x_T[m:m + 1], models.concepts[c], t_enc, which="frozen")
                assert torch.equal(bank.sample(None, None, t_enc, [bank.concept_prompts[c]], [m]), want)
    # built in batches of 16 trajectories, only the last bits differ (CPU kernels block by batch)
    batched = _setup(tiny_cfg, trajectories="bank", bank_size=2, erase=["garbage truck", "church"])
    assert torch.allclose(batched.trajectories.states, bank.states, rtol=0, atol=1e-4)
    # ... and the student's trajectories are another thing: θ′ ≠ θ after training
    assert torch.equal(bank.x_T, _bank_noise(0, 2, er.latent_shape))


def _base_run_from_bank_noise(tiny_cfg, **kw):
    """A --trajectories base run whose every sample starts from the bank noise x_T^(m) of the
    trajectory m a bank run with the same seed draws for it."""
    er = _setup(tiny_cfg, trajectories="base", **kw)
    cfg = er.cfg
    plan = RandomnessPlan(cfg.seed, list(er.plan.slot_generators), 2)
    noise = _bank_noise(cfg.seed, 2, er.latent_shape)
    original = plan.draw

    def draw(*args):
        d = original(*args)
        for s in d.samples:
            s.x_T = noise[s.bank_index:s.bank_index + 1].clone()
        return d

    plan.draw = draw
    er.plan = plan
    return er


@pytest.mark.parametrize("schedule,batch", [("faithful", 1), ("shared", 2)])
def test_a_bank_run_trains_as_the_base_run_on_the_same_noises(tiny_cfg, schedule, batch):
    """The whole loop on a bank (M = 2, one trajectory per build call) against --trajectories
    base started from the same noises: the same draws and losses and the same updates
    θ′ − θ₀, π − π₀: bit for bit at batch 1 (faithful), up to the rounding of differently
    batched sampling calls at batch 2 (shared; measured: θ 1.4e-4, π 8e-4 relative L2).
    Mutations (relative L2 of θ's update, faithful / shared), each fails: the state one DDIM
    step late 0.13 / 0.55, one early 0.19 / 0.15, t_enc mapped to its own index 0.19 / 0.15,
    z_r read from c_e's trajectory 2e-4 / 2.4e-3, every sample reading trajectory 0 0.25 / 0.78."""
    from _updates import relative_l2

    kw = dict(steps=3, schedule=schedule, batch_size=batch, mixed_precision="no")
    bank = _setup(tiny_cfg, trajectories="bank", bank_size=2, bank_build_batch=1, **kw)
    base = _base_run_from_bank_noise(tiny_cfg, **kw)
    runs = []
    for er in (bank, base):
        theta0 = {n: p.detach().clone() for n, p in er.trained}
        pi0 = er.search.pi[0].detach().clone()
        er.train()
        runs.append(({n: p.detach() - theta0[n] for n, p in er.trained},
                     [er.search.pi[0].detach() - pi0], er.log))
    (t_bank, p_bank, log_bank), (t_base, p_base, log_base) = runs
    assert [(a["t_enc"], a["samples"]) for a in log_bank] == [(b["t_enc"], b["samples"]) for b in log_base]
    if batch == 1:
        assert log_bank == log_base
        for name in t_bank:
            assert torch.equal(t_bank[name], t_base[name]), name
        assert torch.equal(p_bank[0], p_base[0])
    else:
        for a, b in zip(log_bank, log_base):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-3, abs=1e-9)
        assert relative_l2(t_bank, t_base) < 1e-3
        assert relative_l2(p_bank, p_base) < 3e-3


def test_bank_run_samples_nothing_and_counts_follow_the_cost_model(tiny_cfg):
    """Per outer step a bank run makes only the loss's queries: faithful 3 frozen + 2 grad
    (outer) and 1 + 1 (search) per sample; shared 3 + 2. The build costs 2·M·P·(S − 1)
    sample-evaluations (P prompts), counted apart and amortised in run.json."""
    for schedule, frozen, grad in (("faithful", 4, 3), ("shared", 3, 2)):
        r = erase(tiny_cfg(steps=3, schedule=schedule, trajectories="bank", bank_size=3,
                           batch_size=2), write=False)
        info = r.run_info
        prompts = info["trajectories"]["prompts"]
        assert prompts == 1 + len(info["preservation_sets"]["garbage truck"]["words"])
        build = 2 * 3 * prompts * (S - 1)
        assert info["unet_calls_per_outer_step"] == {"frozen": 2 * frozen, "grad": 2 * grad}
        assert info["unet_evals"] == {"per_outer_step": 2 * (frozen + grad), "bank_build": build,
                                      "amortised_per_outer_step": pytest.approx(
                                          2 * (frozen + grad) + build / 3, abs=1e-3),
                                      "outer_steps": 3}
        assert info["trajectories"]["unet_evals"] == build
        assert info["trajectories"]["bytes"] == 3 * prompts * (S - 1) * 4 * 8 * 8 * 4
    # base samples every iteration as the student does: the same counts as the student's
    base = erase(tiny_cfg(steps=3, trajectories="base"), write=False)
    log = base.log
    sampling = sum((4 if r["kind"] == "outer" else 2) * _steps(r["t_enc"]) for r in log) / 3
    assert base.run_info["unet_calls_per_outer_step"] == {
        "frozen": 4.0, "grad": 3.0, "sampling": pytest.approx(sampling)}
    assert base.run_info["trajectories"] == {"source": "base"}


def test_base_samples_with_the_frozen_model_and_student_with_the_trained_one(tiny_cfg):
    """After one outer step θ′ ≠ θ: base's z must be θ's trajectory, student's θ′'s."""
    for source, which in (("base", "frozen"), ("student", "trained")):
        er = _setup(tiny_cfg, trajectories=source, lr=1e-2)
        er.run_outer_step()
        x = torch.randn(er.latent_shape, generator=torch.Generator().manual_seed(3))
        got = er.trajectories.sample(x, er.models.concepts[0], 2)
        want = er.models.sample(x, er.models.concepts[0], 2, which=which)
        other = er.models.sample(x, er.models.concepts[0], 2,
                                 which="trained" if which == "frozen" else "frozen")
        assert torch.equal(got, want) and not torch.equal(got, other)


def test_reference_profile_reads_the_same_bank(tiny_cfg):
    """The reference profile (per-sample calls) and the fast one on the same bank: the same
    draws, the same bank states, updates within the fast-vs-reference tolerance."""
    from _updates import relative_l2, run_updates

    kw = dict(steps=2, trajectories="bank", bank_size=2, mixed_precision="no", attention="classic")
    ref_theta, ref_pi, ref = run_updates(tiny_cfg(profile="reference", **kw))
    fast_theta, fast_pi, fast = run_updates(tiny_cfg(**kw))
    assert [r["samples"] for r in ref.log] == [r["samples"] for r in fast.log]
    assert torch.equal(ref.trajectories.states, fast.trajectories.states)
    assert relative_l2(fast_theta, ref_theta) < 2e-3 and relative_l2(fast_pi, ref_pi) < 5e-5
    assert ref.run_info()["unet_calls_per_outer_step"] == {"frozen": 6.0, "grad": 4.0}


def test_bank_resume_is_bit_identical(tiny_cfg, tmp_path):
    from _updates import assert_resume_bit_identical

    full, _ = assert_resume_bit_identical(tiny_cfg, tmp_path, steps=4, trajectories="bank", bank_size=2,
                                          batch_size=2)
    assert len({s["bank_index"] for r in full.log for s in r["samples"]}) == 2  # both trajectories read
    info = json.loads((tmp_path / "full" / "run.json").read_text())
    assert info["trajectories"]["source"] == "bank" and info["config"]["trajectories"] == "bank"


def test_saved_bank_is_reused_and_a_mismatched_one_refused(tiny_cfg, tmp_path):
    path = tmp_path / "bank.safetensors"
    kw = dict(steps=2, trajectories="bank", bank_size=2, bank_file=str(path))
    first = erase(tiny_cfg(**kw), write=False)
    assert path.exists() and not first.run_info["trajectories"]["loaded"]
    again = erase(tiny_cfg(**kw), write=False)
    info = again.run_info
    assert info["trajectories"]["loaded"] and info["unet_evals"]["bank_build"] == 0
    assert again.log == first.log
    for name in first.trained:
        assert torch.equal(first.trained[name], again.trained[name])
    # a different seed of the run alone keeps the bank (its noises follow --bank-seed)
    erase(tiny_cfg(**kw, seed=5, bank_seed=0), write=False)
    refused = {"seed": dict(seed=1), "size": dict(bank_size=3), "ddim_steps": dict(ddim_steps=8),
               "guidance": dict(start_guidance=5.0), "prompts": dict(num_centers=10),
               "build_batch": dict(bank_build_batch=4)}
    for part, change in refused.items():
        with pytest.raises(UserError, match=f"--bank-file .* was built for another run .*{part}"):
            erase(tiny_cfg(**{**kw, **change}), write=False)
    # another model: a different content hash of the original weights
    from ap_erase_fast.models import load_components

    comps = load_components("tiny")
    comps.content_hash = "0" * 64
    with pytest.raises(UserError, match="differs in: model"):
        Eraser(tiny_cfg(**kw), components=comps).setup()
    path.write_bytes(b"not a bank")
    with pytest.raises(UserError, match="cannot read --bank-file .*delete it"):
        erase(tiny_cfg(**kw), write=False)


def test_a_bank_file_being_built_is_waited_for_and_read(tiny_cfg, tmp_path):
    """A second process that names a bank file another one is building (its lock is held)
    waits, then reads the finished file instead of building the bank again; the lock is gone
    after both."""
    import shutil
    import threading
    import time

    from ap_erase_fast.outdir import FolderLock, lock_file_for

    kw = dict(steps=1, trajectories="bank", bank_size=2)
    built = tmp_path / "built.safetensors"
    first = erase(tiny_cfg(**kw, bank_file=str(built)), write=False)
    path = tmp_path / "shared" / "bank.safetensors"
    path.parent.mkdir()
    other = FolderLock(path).acquire()  # "another process" is building the bank
    out = {}
    waiter = threading.Thread(target=lambda: out.update(run=erase(tiny_cfg(**kw, bank_file=str(path)),
                                                                   write=False)))
    waiter.start()
    time.sleep(1.5)
    assert waiter.is_alive() and not path.exists()  # waiting, not building
    shutil.copyfile(built, path)
    other.release()
    waiter.join(60)
    assert not waiter.is_alive()
    info = out["run"].run_info
    assert info["trajectories"]["loaded"] and info["unet_evals"]["bank_build"] == 0
    assert out["run"].log == first.log
    assert not lock_file_for(path).exists()


def test_bank_options_are_checked(tiny_cfg):
    with pytest.raises(UserError, match="--gumbel-mode hard or --trajectories base"):
        tiny_cfg(trajectories="bank", gumbel_mode="soft").validate()
    with pytest.raises(UserError, match="belong to --trajectories bank"):
        tiny_cfg(bank_file="x.safetensors").validate()
    with pytest.raises(UserError, match="--bank-size must be at least 1"):
        tiny_cfg(trajectories="bank", bank_size=0).validate()
    with pytest.raises(UserError, match="--bank-seed must be between 0 and"):
        tiny_cfg(trajectories="bank", bank_seed=-1).validate()
    with pytest.raises(UserError, match="unknown --trajectories"):
        tiny_cfg(trajectories="cache").validate()


def test_sdxl_lora_bank_holds_the_frozen_trajectories_and_trains(tiny_cfg):
    """SDXL (pooled text embeddings and time ids in the conditioning) with LoRA (θ = adapters
    off): the bank's states are the frozen model's trajectories bit for bit, and a bank run
    trains the adapters."""
    er = _setup(tiny_cfg, model="tiny-sdxl", lora_rank=4, trajectories="bank", bank_size=1,
                bank_build_batch=1, steps=2)
    bank, models = er.trajectories, er.models
    for prompt, cond in ((bank.concept_prompts[0], models.concepts[0]),):
        for t_enc in (0, 3, S - 1):
            want = models.sample(bank.x_T[:1], cond, t_enc, which="frozen")
            assert torch.equal(bank.sample(None, None, t_enc, [prompt], [0]), want)
    b0 = {n: p.detach().clone() for n, p in er.trained}
    er.models.calls.clear()  # the checks above sampled; the run itself samples nothing
    er.train()
    assert any(not torch.equal(p, b0[n]) for n, p in er.trained)
    assert er.run_info()["unet_calls_per_outer_step"] == {"frozen": 4.0, "grad": 3.0}


def test_cli_train_with_a_bank_file(tmp_path, small_vocab):
    from ap_erase_fast.cli import main

    bank = tmp_path / "bank.safetensors"
    args = ["train", "--erase", "garbage truck", "--vocab", small_vocab, "--k-closest", "60",
            "--num-centers", "12", "--ddim-steps", "10", "--steps", "2", "--quiet",
            "--trajectories", "bank", "--bank-size", "2", "--bank-file", str(bank)]
    assert main([*args, "--output", str(tmp_path / "a")]) == 0
    assert main([*args, "--output", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "run.json").read_text())
    b = json.loads((tmp_path / "b" / "run.json").read_text())
    assert not a["trajectories"]["loaded"] and b["trajectories"]["loaded"]
    assert a["unet_evals"]["per_outer_step"] == b["unet_evals"]["per_outer_step"] == 7
    assert main([*args, "--seed", "3", "--output", str(tmp_path / "c")]) == 2  # another noise seed
    assert not (tmp_path / "c").exists()  # refused before anything was written


def test_bank_refresh_resamples_a_share_with_the_trained_model(tiny_cfg):
    """--bank-refresh 2 --bank-refresh-share 0.25: before outer steps 2 and 4 the next quarter
    of the bank's trajectories (cyclic, m-major) is re-sampled with θ′ from its own noise, bit
    for bit what θ′ samples from x_T^(m) (one trajectory per call); the rest is left as built;
    the evaluations are counted (2·(S − 1) per trajectory) in the run's per-step cost."""
    from ap_erase_fast.trajectories import state_position

    er = _setup(tiny_cfg, trajectories="bank", bank_size=2, bank_refresh=2, bank_refresh_share=0.25,
                bank_build_batch=1, lr=1e-2, steps=5)
    bank = er.trajectories
    built = bank.states.clone()
    m_count, p_count = built.shape[:2]
    count = -(-m_count * p_count // 4)
    order = [divmod(i, p_count) for i in range(m_count * p_count)]
    er.train(until=2)
    assert torch.equal(bank.states, built) and bank.refreshes == 0  # nothing before step 2
    er._refresh_bank()  # what step 2 starts with: the first quarter, with θ′ after 2 updates
    first = order[:count]
    assert bank.refreshes == 1
    changed = {(m, p) for m in range(m_count) for p in range(p_count)
               if not torch.equal(bank.states[m, p], built[m, p])}
    assert changed == set(first)
    for m, p in first[:3] + first[-1:]:
        for t_enc in (0, 4, S - 1):
            want = er.models.sample(bank.x_T[m:m + 1], bank.conds[p:p + 1], t_enc, which="trained")
            assert torch.equal(bank.states[m, p, state_position(bank.tables, t_enc)], want[0]), (m, p, t_enc)
    calls_before = er.models.calls["bank_refresh"]
    er.iteration = 3 * er.cfg.pgd_steps
    er._refresh_bank()  # not a refresh step
    er.iteration = 4 * er.cfg.pgd_steps
    er._refresh_bank()  # step 4: the second quarter
    assert bank.refreshes == 2
    assert er.models.calls["bank_refresh"] - calls_before == count * 2 * (S - 1)
    assert not any(torch.equal(bank.states[m, p], built[m, p]) for m, p in order[count:2 * count])
    info = er.run_info()
    assert info["trajectories"]["refreshes"] == 2 and info["trajectories"]["refreshed_trajectories"] == 2 * count


def test_bank_refresh_resume_is_bit_identical(tiny_cfg, tmp_path):
    """Resumed before the first refresh and after it: the same log, θ′ and bank (checkpoints
    keep a refreshed bank's states) as the uninterrupted run."""
    from safetensors.torch import load_file

    kw = dict(steps=5, trajectories="bank", bank_size=2, bank_refresh=2, bank_refresh_share=0.5, lr=1e-2,
              checkpoint_every=2)
    full = erase(tiny_cfg(**kw, output=str(tmp_path / "full")))
    last = load_file(str(tmp_path / "full.checkpoints" / "step-000005" / "bank.safetensors"))["states"]
    for step in ("step-000002", "step-000004"):  # before the refresh of step 2 / after it
        resumed = erase(tiny_cfg(**kw, output=str(tmp_path / step),
                                 resume=str(tmp_path / "full.checkpoints" / step)))
        assert full.log == resumed.log
        for name in full.trained:
            assert torch.equal(full.trained[name], resumed.trained[name]), name
        bank = load_file(str(tmp_path / f"{step}.checkpoints" / "step-000005" / "bank.safetensors"))
        assert torch.equal(bank["states"], last), step
    info = json.loads((tmp_path / "full" / "run.json").read_text())
    count = -(-2 * info["trajectories"]["prompts"] // 2)
    assert info["trajectories"]["refreshes"] == 2  # before steps 2 and 4
    assert info["unet_calls_per_outer_step"]["bank_refresh"] == pytest.approx(2 * count * 2 * (S - 1) / 5)
    again = json.loads((tmp_path / "step-000004" / "run.json").read_text())["trajectories"]
    assert [again[k] for k in ("refreshes", "refreshed_trajectories")] == [2, 2 * count]


def test_bank_refresh_options_are_checked(tiny_cfg):
    with pytest.raises(UserError, match="--bank-refresh re-samples a bank"):
        tiny_cfg(bank_refresh=2).validate()
    for bad in (dict(bank_refresh=-1), dict(bank_refresh=2, bank_refresh_share=0.0),
                dict(bank_refresh=2, bank_refresh_share=1.5)):
        with pytest.raises(UserError, match="--bank-refresh must be 0"):
            tiny_cfg(trajectories="bank", **bad).validate()
