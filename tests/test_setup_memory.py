"""The set-up phase's device memory (docs/memory_flow.md, "The set-up phase"; setup_memory.py).

In the fast profile with a compute dtype (bf16/fp16):

* the SD3/FLUX text encoders are held in that dtype and put on the device one at a time while
  prompts are encoded (the embeddings stay fp32; the embedding-cache key changes with the dtype);
* the denoiser is loaded on the CPU and moved with its untrained autocast weights already in the
  compute dtype: the same module, bit for bit, as moving the fp32 model and casting it there (the
  old path, which the tests run by putting back the plain move), hence the same first update.

fp32 runs (no compute dtype) keep the old path. On the CPU "the device" is the CPU, so the
one-at-a-time rule is observed through the two functions every encoder move goes through.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from ap_erase_fast import EraseConfig, setup_memory
from ap_erase_fast.backbones import make_backbone
from ap_erase_fast.backbones.flow import FlowBackbone
from ap_erase_fast.conditioning import Cond
from ap_erase_fast.engine import Eraser, autocast_cast_parameters
from ap_erase_fast.models import load_components

MODELS = ("tiny-sd3", "tiny-flux")
KEYS = ("text_encoder", "text_encoder_2", "text_encoder_3")
T5 = 8  # --max-sequence-length of these runs


def _cfg(vocab, **overrides):
    base = dict(model="tiny", erase=["garbage truck"], steps=1, seed=0, vocab=vocab, k_closest=60,
                num_centers=12, ddim_steps=10, quiet=True, device="cpu")
    if overrides.get("model", "tiny") in MODELS:
        base["max_sequence_length"] = T5
    return EraseConfig(**{**base, **overrides})


@contextlib.contextmanager
def spy_encoders(comps):
    """Log of ("on"|"off", key) for every move through FlowBackbone's two move functions and of
    ("run", key, dtypes of its floating tensors, keys on the device) for every encoder forward."""
    names = {id(getattr(comps, k)): k for k in KEYS if getattr(comps, k) is not None}
    on, log = set(), []
    to_device, off_device = FlowBackbone._encoder_to_device, FlowBackbone._encoder_off_device

    def spy_on(self, encoder):
        on.add(names[id(encoder)])
        log.append(("on", names[id(encoder)]))
        return to_device(self, encoder)

    def spy_off(self, encoder):
        on.discard(names[id(encoder)])
        log.append(("off", names[id(encoder)]))
        return off_device(self, encoder)

    def hook(module, args):
        dtypes = sorted({str(t.dtype) for t in module.state_dict().values() if t.is_floating_point()})
        log.append(("run", names[id(module)], dtypes, sorted(on)))

    handles = [getattr(comps, k).register_forward_pre_hook(hook) for k in names.values()]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FlowBackbone, "_encoder_to_device", spy_on)
        mp.setattr(FlowBackbone, "_encoder_off_device", spy_off)
        try:
            yield log
        finally:
            for h in handles:
                h.remove()


@pytest.fixture(scope="module")
def runs(small_vocab, tmp_path_factory):
    """(model, mixed precision) -> (set-up Eraser, spy log); fp32 first, then bf16, sharing one
    embedding cache."""
    cache = str(tmp_path_factory.mktemp("embeddings"))
    out = {"cache": cache}
    for model in MODELS:
        for mp in ("no", "bf16"):
            comps = load_components(model)
            with spy_encoders(comps) as log:
                er = Eraser(_cfg(small_vocab, model=model, mixed_precision=mp, embedding_cache=cache),
                            components=comps).setup()
            out[model, mp] = er, log
    return out


def _pipeline_encodings(model, dtype, prompt_lists):
    """A plain reference: the diffusers pipeline's encode_prompt with the encoders cast to
    ``dtype`` by ``.to`` (None: fp32), under no_grad as the backbone encodes (bf16 CPU kernels
    differ with grad mode on), flattened as the engine keeps rows."""
    c = load_components(model)
    if dtype is not None:
        for k in KEYS:
            if getattr(c, k) is not None:
                getattr(c, k).to(dtype)
    pipe = c.to_pipeline()
    out = []
    with torch.no_grad():
        for prompts in prompt_lists:
            if model == "tiny-sd3":
                states, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device="cpu",
                                                          do_classifier_free_guidance=False, max_sequence_length=T5)
            else:
                states, pooled, _ = pipe.encode_prompt(prompts, prompts, device="cpu", max_sequence_length=T5)
            out.append(Cond((states.float(), pooled.float())).flat())
    return out


def _kept(er):
    """The embeddings the engine keeps: "", the erased concept, R's rows (from the vocabulary)."""
    rows = er.search.tables[0]
    return [er.models.null.flat(), er.models.concepts[0].flat(), rows], [[""], [er.cfg.erase[0]], er.search.sets[0].words]


@pytest.mark.parametrize("model", MODELS)
def test_bf16_run_holds_encoders_in_bf16_and_fp32_run_is_unchanged(runs, model):
    """(a) bf16: every encoder forward ran with bf16 weights, and "", the concept and R's rows
    (encoded with the 300-word vocabulary, five batches) are fp32 tensors equal to the pipeline's
    bf16 encoding within bf16 tolerance (equal, here), and not the fp32 encoding. fp32: fp32
    weights, and the same embeddings exactly as the pipeline's fp32 encoding.
    Mutations checked: hold_text_encoders not casting (fails: dtypes); the batches' parts
    combined in reverse batch order (fails: R's rows); encode returning bf16 (fails: dtype)."""
    for mp, dtype in (("bf16", torch.bfloat16), ("no", None)):
        er, log = runs[model, mp]
        forwards = [e for e in log if e[0] == "run"]
        expect = [KEYS[0], KEYS[1]] + ([KEYS[2]] if model == "tiny-sd3" else [])
        assert sorted({e[1] for e in forwards}) == expect
        assert all(e[2] == [str(dtype or torch.float32)] for e in forwards), forwards
        kept, prompts = _kept(er)
        want = _pipeline_encodings(model, dtype, prompts)
        plain = _pipeline_encodings(model, None, prompts) if dtype is not None else want
        for ours, ref, fp32 in zip(kept, want, plain):
            assert ours.dtype == torch.float32 and ours.shape == ref.shape
            if dtype is None:
                assert torch.equal(ours, ref)
            else:
                torch.testing.assert_close(ours, ref, rtol=2 ** -8, atol=2 ** -8 * ref.abs().max().item())
                assert not torch.equal(ours, fp32)


@pytest.mark.parametrize("model", MODELS)
def test_one_text_encoder_on_the_device_at_a_time(runs, model):
    """(b) bf16: every encoder forward ran with that encoder alone on the device, and after the
    set-up none is there; fp32 runs keep the old placement (moved there, never moved back).
    Mutation checked: encoders not moved back after their batches (fails: two, then three on at
    once)."""
    er, log = runs[model, "bf16"]
    forwards = [e for e in log if e[0] == "run"]
    assert len(forwards) >= 3 * (2 if model == "tiny-flux" else 3)  # "", the concept, the vocabulary
    assert all(e[3] == [e[1]] for e in forwards), forwards
    on = set()
    for e in log:
        if e[0] in ("on", "off"):
            (on.add if e[0] == "on" else on.discard)(e[1])
    assert not on
    assert er.components.text_encoder is None  # released after the set-up (fast profile)
    _, log32 = runs[model, "no"]
    assert not [e for e in log32 if e[0] == "off"]


def test_cache_key_follows_the_encoders_dtype(runs, small_vocab):
    """The embedding-cache key hashes the encoders as held: bf16 and fp16 give new keys,
    holding without a cast keeps the key; the fp32 run's cached table is not read by the bf16
    run, whose own table is read back by a second bf16 run. fp16 keeps T5's ``wo`` in fp32, as
    ``from_pretrained(torch_dtype=float16)`` loads it. Mutation checked: hold_text_encoders not
    resetting a hash computed before (fails: same key)."""
    from transformers import T5EncoderModel

    def backbone(model="tiny-flux"):
        return make_backbone(load_components(model), "cpu", 10, max_sequence_length=T5)

    bb = backbone()
    fp32 = bb.text_encoder_hash()
    bb.hold_text_encoders(torch.bfloat16)
    bf16 = bb.text_encoder_hash()
    same = backbone()
    same.hold_text_encoders(None)
    half = backbone()
    half.hold_text_encoders(torch.float16)
    assert len({fp32, bf16, half.text_encoder_hash()}) == 3 and same.text_encoder_hash() == fp32
    c = half.components
    ref = T5EncoderModel.from_pretrained(c.pipeline_path, subfolder="text_encoder_2", torch_dtype=torch.float16)
    ours, theirs = c.text_encoder_2.state_dict(), ref.state_dict()
    assert {n: t.dtype for n, t in ours.items()} == {n: t.dtype for n, t in theirs.items()}
    assert {t.dtype for n, t in ours.items() if ".wo." in n} == {torch.float32}
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)

    assert runs["tiny-flux", "no"][0].cache_hit is False and runs["tiny-flux", "bf16"][0].cache_hit is False
    again = Eraser(_cfg(small_vocab, model="tiny-flux", mixed_precision="bf16", embedding_cache=runs["cache"])).setup()
    assert again.cache_hit is True
    assert torch.equal(again.search.tables[0], runs["tiny-flux", "bf16"][0].search.tables[0])


# --------------------------------------------------------------------------- the denoiser


def _plain_move(module, device, dtype, cast):
    """The old path: the fp32 model moved as it is; the engine's cast after it does the rest."""
    return module.to(device)


def _first_update(cfg):
    """(the denoiser's state after the set-up, requires_grad per parameter, θ′ − θ₀ of the first
    outer step)."""
    er = Eraser(cfg).setup()
    state = {n: t.detach().clone() for n, t in er.unet.state_dict(keep_vars=True).items()}
    grads = {n: p.requires_grad for n, p in er.unet.named_parameters()}
    theta0 = {n: p.detach().clone() for n, p in er.trained}
    er.run_outer_step()
    return state, grads, {n: p.detach() - theta0[n] for n, p in er.trained}


CASES = [("tiny-flux", "xattn", 0, "bf16"), ("tiny-flux", "xattn", 4, "bf16"), ("tiny-sd3", "noxattn", 0, "fp16"),
         ("tiny", "xattn", 0, "bf16"), ("tiny", "noxattn", 4, "bf16"), ("tiny-sdxl", "xattn", 0, "bf16")]


@pytest.mark.parametrize("model,method,rank,mp", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_denoiser_moved_cast_is_the_old_one(small_vocab, monkeypatch, model, method, rank, mp):
    """(c) the denoiser the engine builds through move_denoiser equals, tensor by tensor (names,
    dtypes, values, requires_grad; buffers too), the one the old path builds (fp32 model moved,
    then cast by the engine); (d) so the first update θ′ − θ₀ is the same, exactly (the same
    tensors go through the same CPU kernels). Full fine-tuning and LoRA (the adapters attached
    before the move, fp32), bf16 and fp16. Mutations checked: the trained names not taken out
    of the cast set (fails: fp32 masters cast); adapters attached after the move (fails: peft
    gives them the bf16 base's dtype); move_denoiser casting every floating parameter (fails:
    norms); the engine not calling move_denoiser (fails: call count); move_denoiser making new
    Parameter objects (fails: the engine's trained tensors are no longer the module's, θ′ − θ₀ = 0)."""
    cfg = dict(model=model, train_method=method, mixed_precision=mp, lora_rank=rank,
               lora_alpha=8.0 if rank else None, lr=1e-2, embedding_cache="none")
    calls = []
    move = setup_memory.move_denoiser
    monkeypatch.setattr(setup_memory, "move_denoiser", lambda *a: calls.append(a[2]) or move(*a))
    new = _first_update(_cfg(small_vocab, **cfg))
    assert calls == [{"bf16": torch.bfloat16, "fp16": torch.float16}[mp]]
    monkeypatch.setattr(setup_memory, "move_denoiser", _plain_move)
    old = _first_update(_cfg(small_vocab, **cfg))
    for a, b in zip(new[:2], old[:2]):
        assert list(a) == list(b)
    state, want = new[0], old[0]
    assert {t.dtype for t in state.values()} == {torch.float32, torch.bfloat16 if mp == "bf16" else torch.float16}
    for name in state:
        assert state[name].dtype == want[name].dtype and torch.equal(state[name], want[name]), name
    assert new[1] == old[1]
    assert set(new[2]) == set(old[2]) and any(d.abs().max() > 0 for d in new[2].values())
    for name, delta in new[2].items():
        assert delta.dtype == torch.float32 and torch.equal(delta, old[2][name]), name


def test_move_denoiser_places_and_casts_every_tensor():
    """Moved to the meta device (any device but the CPU): every parameter and buffer is there,
    the named parameters in the compute dtype, the others and the buffers as they were,
    requires_grad kept (the same Parameter objects on a real device: tests above). Mutation
    checked: the final module move left out (fails: the buffer stays on the CPU)."""
    model = torch.nn.Module()
    model.transformer = load_components("tiny-flux").unet
    model.register_buffer("table", torch.ones(3))
    params = dict(model.named_parameters())
    model.transformer.x_embedder.weight.requires_grad_(False)
    before = {n: (p.dtype, p.requires_grad) for n, p in params.items()}
    cast = set(sorted(autocast_cast_parameters(model))[::2])
    assert cast and set(params) - cast
    setup_memory.move_denoiser(model, "meta", torch.bfloat16, cast)
    for n, p in model.named_parameters():
        assert p.device.type == "meta" and p.requires_grad == before[n][1]
        assert p.dtype == (torch.bfloat16 if n in cast else before[n][0]), n
    assert model.table.device.type == "meta" and model.table.dtype == torch.float32


def test_vocabulary_reaches_the_device_256_prompts_at_a_time(small_vocab, monkeypatch):
    """The vocabulary table (host RAM) is encoded in chunks of at most 256 prompts, so the device
    holds at most 256 fp32 rows of it at once; the rows themselves are the ones test (a) checks
    against the pipeline's encoding. Mutation checked: one chunk for the whole vocabulary fails."""
    sizes, encode = [], FlowBackbone.encode

    def spy(self, prompts, batch_size=64):
        sizes.append(len(prompts))
        return encode(self, prompts, batch_size)

    monkeypatch.setattr(FlowBackbone, "encode", spy)
    er = Eraser(_cfg(small_vocab, model="tiny-flux", embedding_cache="none")).setup()
    assert max(sizes) <= 256 and sum(sizes) > 256  # the vocabulary came in more than one chunk
    assert er.search.tables[0].shape[0] == len(er.search.sets[0].words)
