"""``ap-erase attack --attacks blackbox`` (Ring-A-Bell-style, text encoder only) and the prompt
attack's judged early stop (a stub judge).

Mutation checks (done by hand when the tests were written; each broke the code on purpose, the
named test failed, the code was restored):

* the concept direction's sign flipped (``(without - with).mean(0)`` in ``concept_direction``):
  ``test_direction_is_the_mean_pair_difference`` and the end-to-end test (``distance.after`` no
  longer the found prompt's distance to f(plain) + eta * c) failed;
* the eta term dropped (``target_states`` returning ``plain`` + ``direction``, eta ignored):
  ``test_blackbox_end_to_end_tiny`` failed (``distance.plain`` is not eta^2 mean(c^2));
* elitism removed from the search (every generation replaced by children) and, separately, the
  population sorted worst-first (``dist.argsort(descending=True)``):
  ``test_genetic_search_finds_a_reachable_target`` failed;
* the in-run early stop removed (``stopped = True; break`` dropped in ``prefix_attack``) and,
  separately, the stop of the restarts removed (the ``break`` after ``best["judged"]["rate"] >
  cfg.stop_rate`` in ``_prompt_attack``): ``test_judged_early_stop_with_a_stub_judge`` failed.
"""
import json
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from ap_erase_fast.attack import AttackConfig
from ap_erase_fast.cli import main


@pytest.fixture(scope="session")
def attack_tiny_run(tmp_path_factory, small_vocab):
    """A tiny-model run whose UNet moved (as in tests/test_attack.py), shared by the attack tests
    of this file and of tests/test_attack_promptfile.py (which imports this fixture: pytest then
    holds two definitions, so the run is kept under the session's base folder and made once)."""
    from ap_erase_fast import EraseConfig, erase

    out = tmp_path_factory.getbasetemp() / "attack_tiny_run" / "gt"
    if (out / "run.json").is_file():
        return str(out)
    erase(EraseConfig(model="tiny", erase=["garbage truck"], steps=5, lr=1e-3, seed=0, vocab=small_vocab,
                      k_closest=60, num_centers=12, ddim_steps=10, quiet=True, device="cpu", output=str(out),
                      loss_space="eps"))
    return str(out)


@pytest.fixture(scope="module")
def tiny_encoder():
    from ap_erase_fast.attack.whitebox import PromptEncoder
    from ap_erase_fast.models.loading import load_components

    comps = load_components("tiny", device="cpu", torch_dtype=torch.float32)
    comps.text_encoder.requires_grad_(False).eval()
    return PromptEncoder(comps.text_encoder, comps.tokenizer)


@torch.no_grad()
def _states(encoder, text: str) -> torch.Tensor:
    """Reference text states: the tokenizer's own padding, the text encoder called directly."""
    tok = encoder.tokenizer
    ids = tok(text, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    return encoder.text_encoder(ids)[0].float()


def test_direction_is_the_mean_pair_difference(tiny_encoder):
    from ap_erase_fast.attack.blackbox import concept_direction, concept_pairs

    pairs, source = concept_pairs("tiny", "garbage truck", seed=0)
    assert len(pairs) == 16 and "template" in source
    assert all("garbage truck" in w and "garbage" not in wo for w, wo in pairs)
    ref = torch.stack([_states(tiny_encoder, w)[0] - _states(tiny_encoder, wo)[0] for w, wo in pairs]).mean(0)
    got = concept_direction(tiny_encoder, pairs)
    assert got.shape == ref.shape and float(ref.norm()) > 0.1
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # two pairs only: their own mean, not the templates'
    two = pairs[3:5]
    torch.testing.assert_close(concept_direction(tiny_encoder, two),
                               ((_states(tiny_encoder, two[0][0]) - _states(tiny_encoder, two[0][1]))
                                + (_states(tiny_encoder, two[1][0]) - _states(tiny_encoder, two[1][1])))[0] / 2,
                               rtol=1e-5, atol=1e-6)


def test_shapes_world_pairs_swap_the_shape():
    from ap_erase_fast.attack.blackbox import concept_pairs
    from ap_erase_fast.shapes import world2 as w

    pairs, source = concept_pairs("shapes2", "circle", seed=0)
    captions = set(w.all_captions())
    assert len(pairs) == 32 and "captions" in source
    for with_, without in pairs:
        assert "circle" in with_.split() and "circle" not in without.split() and without in captions
        assert with_ in captions and len(with_.split()) == len(without.split())
        assert [a for a, b in zip(with_.split(), without.split()) if a != b] == ["circle"]
    assert concept_pairs("shapes2", "circle", seed=1)[0] != pairs  # drawn with the seed
    assert "template" in concept_pairs("shapes2", "red", seed=0)[1]  # a colour: the templates


def test_genetic_search_finds_a_reachable_target(tiny_encoder):
    """The target is the states of a known 2-token prompt of the candidates: the search must find
    it (distance 0) from a random start, and its best distance never rises."""
    from ap_erase_fast.attack.blackbox import distance, genetic_search
    from ap_erase_fast.attack.prompts import candidate_tokens

    ids, _ = candidate_tokens(tiny_encoder.tokenizer, "tiny", "tokenizer")
    cands = ids[1000:1012]
    want = [cands[7], cands[2]]
    target = _states(tiny_encoder, " ".join(t.replace("</w>", "") for t in
                                            tiny_encoder.tokenizer.convert_ids_to_tokens(want)))
    res = genetic_search(tiny_encoder, cands, target, k=2, population=12, generations=25, seed=3)
    assert res.start_distance > 1e-4 and res.tokens == want and res.distance < 1e-10, res
    best = [h["best"] for h in res.history]
    assert all(b <= a for a, b in zip(best, best[1:])) and len(best) == 25
    assert res.evals == 12 + 25 * (12 - 1)  # the initial population, then every child (1 elite)
    # the reported distance is the found prompt's, recomputed
    again = distance(tiny_encoder.encode(tiny_encoder.ids(res.tokens)), target)
    assert float(again) == pytest.approx(res.distance, abs=1e-9)


def test_blackbox_end_to_end_tiny(attack_tiny_run, tiny_encoder, tmp_path, capsys):
    """The CLI, the report fields, and the target f(plain) + eta * c checked against a direction
    and states computed here (eta = 2.5, the concept's template pairs)."""
    from ap_erase_fast.attack.blackbox import concept_pairs

    out = tmp_path / "bb"
    argv = ["attack", "--run", attack_tiny_run, "--output", str(out), "--attacks", "blackbox",
            "--attack-steps", "6", "--population", "8", "--blackbox-tokens", "3", "--blackbox-strength", "2.5",
            "--images", "2", "--steps", "2", "--device", "cpu", "--seed", "1", "--grid-size", "2"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "blackbox attack:" in text and "text-encoder evals" in text
    rep = json.loads((out / "attack.json").read_text())
    assert set(rep["attacks"]) == {"blackbox"} and rep["settings"]["blackbox_strength"] == 2.5
    bb = rep["attacks"]["blackbox"]
    assert len(bb["tokens"]) == 3 and bb["prompt"].split() == bb["words"] and bb["types_back"]
    assert len(bb["history"]) == 6 and bb["search"]["population"] == 8
    d = bb["distance"]
    assert d["after"] <= d["start"]
    # the target, from the pairs, the plain prompt ("garbage truck") and eta, computed here
    pairs, _ = concept_pairs("tiny", "garbage truck", seed=1)
    ref_dir = torch.stack([_states(tiny_encoder, w)[0] - _states(tiny_encoder, wo)[0] for w, wo in pairs]).mean(0)
    target = _states(tiny_encoder, "garbage truck") + 2.5 * ref_dir
    assert d["plain"] == pytest.approx(2.5 ** 2 * float((ref_dir ** 2).mean()), rel=1e-4)
    found = _states(tiny_encoder, bb["prompt"])
    assert d["after"] == pytest.approx(float(((found - target) ** 2).mean()), rel=1e-4)
    assert bb["target"]["direction_norm"] == pytest.approx(float(ref_dir.norm()), rel=1e-4)
    assert bb["target"]["pairs"] == 16
    # cost: the pairs (2 x 16), the plain prompt, the search (8 + 6 generations x 7 children)
    cost = bb["cost"]
    assert cost["search_text_encoder_evals"] == 8 + 6 * 7 and cost["text_encoder_evals"] == 32 + 1 + 50
    assert cost["unet_evals"] == 0 and cost["judge_unet_evals"] > 0 and cost["generations"] == 6
    # no classifier on the tiny model: no rate claimed; no white-box attack: no loss pool
    assert bb["rate"] is None and rep["judged"] is False and "random weights" in rep["notice"]
    assert rep["loss_plain"] is None and rep["targets"] is None
    assert (out / "grid.png").is_file()


# ---- the prompt attack's judged early stop ----------------------------------------------------
def test_judged_early_stop_with_a_stub_judge(attack_tiny_run, monkeypatch):
    """The attacker's check (``api._check``) is a stub: 1/4 at the 1st judged check, 3/4 (above
    --stop-rate 0.7) at the 2nd, 4/4 at any later one. The run stops at the 2nd check's step,
    keeps its prompt, and no further restart runs (3 are allowed)."""
    from ap_erase_fast.attack import api
    from ap_erase_fast.attack import whitebox as wb
    from ap_erase_fast.models.loading import vae_scale_factor

    cfg = AttackConfig(run=attack_tiny_run, attacks=["prompt"], attack_steps=12, judge_every=2, restarts=3,
                       stop_rate=0.7, judge_images=4, prefix_tokens=2, attack_batch=2, device="cpu", quiet=True)
    run, model_id, concept = api._run_and_concept(cfg)
    cfg = replace(cfg, steps=2, guidance=1.0, batch_size=2)
    job = SimpleNamespace(run=run, model_id=model_id, labels={concept: None}, classifier=None, device="cpu",
                          pairs=None, t_start=time.perf_counter())
    ctx = api._setup(cfg, job, {})
    ctx.start_bar()
    side = ctx.resolution // vae_scale_factor(ctx.comps.vae)
    z0 = torch.randn(2, ctx.comps.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(0))
    pool = wb.make_pool(z0, ctx.backbone.tables.alphas_cumprod, 2, 0)
    calls = []

    def stub(judge, states, uncond, seeds, want, on_step):
        from ap_erase_fast.attack.judge import rate

        calls.append(seeds)
        hits = [1, 3][len(calls) - 1] if len(calls) <= 2 else 4
        return rate(["circle"] * hits + ["ring"] * (4 - hits), want)

    monkeypatch.setattr(api, "_check", stub)
    prompt_ids = ctx.encoder.word_ids("garbage truck")
    entry, adv = api._prompt_attack(ctx, prompt_ids, "garbage truck", pool, "circle")
    runs = entry["restarts"]
    assert len(calls) == 2 and calls[0] == [api.SELECT_SEED + i for i in range(4)]
    assert len(runs) == 1 and entry["cost"]["restarts_run"] == 1, runs
    first = runs[0]
    checks = first["checks"]
    assert first["stopped_early"] and len(checks) == 2 and first["steps_run"] == checks[1]["step"] < 12
    assert [c["judged"]["hits"] for c in checks] == [1, 3]
    assert entry["prefix_tokens"] == checks[1]["tokens"] and entry["selection"]["selected_rate"]["rate"] == 0.75
    assert entry["cost"]["optimisation_steps"] == checks[1]["step"] and entry["cost"]["judged_prompts"] == 2
    torch.testing.assert_close(adv, ctx.encoder.encode(ctx.encoder.ids(checks[1]["tokens"] + prompt_ids)))
