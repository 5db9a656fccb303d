"""R given by the user (--preserve-set) and the random-preservation control (--search random)."""
import torch

from ap_erase_fast import erase
from ap_erase_fast.config import EraseConfig, parse_prompt_list
from ap_erase_fast.engine import Eraser


def test_parse_prompt_list_keeps_the_empty_prompt():
    assert parse_prompt_list('"", a ring') == ["", "a ring"]
    assert parse_prompt_list(["", "x"]) == ["", "x"]
    cfg = EraseConfig.from_dict({"erase": "circle", "preserve_set": '""', "search": "random"})
    assert cfg.preserve_set == [""] and cfg.search == "random"


def test_fixed_preservation_set_is_used_as_given(tiny_cfg):
    er = Eraser(tiny_cfg(preserve_set=["", "a dog"], schedule="shared", steps=3)).setup()
    assert er.search.sets[0].words == ["", "a dog"] and er.search.tables[0].shape[0] == 2
    assert torch.equal(er.search.tables[0][0:1], er.models.null.flat().cpu())
    er.train()
    drawn = {s["adv_word"] for rec in er.log for s in rec["samples"]}
    assert drawn <= {"", "a dog"}


def test_random_search_draws_uniformly_and_never_moves_pi(tiny_cfg):
    er = Eraser(tiny_cfg(search="random", schedule="shared", steps=4, batch_size=2)).setup()
    pi0 = er.search.pi[0].detach().clone()
    er.train()
    assert torch.equal(er.search.pi[0].detach(), pi0)
    adv = Eraser(tiny_cfg(schedule="shared", steps=4, batch_size=2)).setup()
    adv.train()
    assert not torch.equal(adv.search.pi[0].detach(), pi0)  # the adversarial search does move π
    # same seed, same Gumbel noise: the first draw (π still uniform) is the same word in both
    assert er.log[0]["samples"] == adv.log[0]["samples"]
    # with π uniform, the hard Gumbel draw is a uniform draw: over many draws every word of R
    # comes up about equally often
    from ap_erase_fast.ops import gumbel_mix

    n = len(er.search.sets[0].words)
    g = -torch.log(-torch.log(torch.rand(20000, n, generator=torch.Generator().manual_seed(0))))
    _, idx = gumbel_mix(er.search.pi[0].detach().expand(20000, n), er.search.tables[0], tau=2.0, hard=True,
                        gumbel=g, backend="torch", return_index=True)
    counts = torch.bincount(idx, minlength=n).float()
    assert counts.min() > 0.6 * 20000 / n and counts.max() < 1.4 * 20000 / n


def test_faithful_random_search_runs_and_records(tiny_cfg):
    res = erase(tiny_cfg(search="random", steps=2), write=False)
    assert res.run_info["config"]["search"] == "random"
