"""Where the loop's latents z and z_r come from: ``--trajectories student | base | bank``.

AP trains on truncated DDIM trajectories (ALGORITHM.md §4). Sampling them is about 94 % of an
outer step when they are drawn fresh every iteration, so the source of the trajectories is the
largest cost lever of the method:

* ``student`` samples with θ′, the model being trained, every iteration (the authors' algorithm);
* ``base`` samples with θ, the frozen original model, every iteration (ESD's diffusers rewrite);
* ``bank`` samples, once before training, M full trajectories with θ for every prompt the loop
  can ask for (each erased concept and each member of R) from M starting noises shared by all
  prompts, and keeps every intermediate state. With θ frozen, z depends only on (x_T, prompt,
  t_enc), so one full trajectory holds z for every t_enc: a sample reads its trajectory m (drawn
  from the run's randomness plan) at its t_enc, and no UNet call samples during training.

Bank size: M × P × (S − 1) latents of C × h × w fp32 values, P = number of distinct prompts
(E erased concepts + the distinct members of their R's), S = DDIM steps. Building it costs
M × P × (S − 1) batch-2 (guided) UNet evaluations, i.e. 2·M·P·(S − 1) sample-evaluations.
For SD1.4 at 512 px (4 × 64 × 64 latents: 64 KiB), M = 4, P = 101, S = 50: 1.21 GiB;
SDXL at 1024 px (4 × 128 × 128: 256 KiB): 4.83 GiB.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from .conditioning import Cond
from .errors import UserError
from .sampling import cfg_evals, state_position, trajectory_states

BANK_FORMAT = 1
BANK_METADATA = "ap_erase_fast.bank"


class SampledTrajectories:
    """``student`` / ``base``: every trajectory sampled when it is needed, with θ′ or θ."""

    def __init__(self, models, name: str):
        self.models = models
        self.name = name
        self.which = "trained" if name == "student" else "frozen"

    def sample(self, x_T: torch.Tensor, cond: Cond, t_enc: int, prompts=None, members=None):
        """z for B samples: their starting noises ``x_T`` [B, ...] under the conditionings
        ``cond`` (B prompts), sampled until ``t_enc``. ``prompts``/``members`` are the bank's."""
        return self.models.sample(x_T, cond, t_enc, which=self.which)

    def info(self) -> dict:
        return {"source": self.name}


def bank_prompts(erase: list[str], concepts: list[Cond], sets, tables, cond_shapes):
    """The bank's prompts: the erased concepts first (their own conditionings), then the distinct
    members of the R's (their rows of R's tables: the very values a hard draw preserves).
    Returns (labels, conditioning of every prompt, prompt index of each erased concept,
    prompt index of each candidate of each R)."""
    labels = [f"erase:{c}" for c in erase]
    conds = [c.to("cpu") for c in concepts]
    index: dict[str, int] = {}
    members = []
    for s, table in zip(sets, tables):
        ids = []
        for j, word in enumerate(s.words):
            if word not in index:
                index[word] = len(labels)
                labels.append(f"R:{word}")
                conds.append(Cond.unflat(table[j:j + 1].detach().cpu(), cond_shapes))
            ids.append(index[word])
        members.append(ids)
    return labels, Cond.cat(conds), list(range(len(erase))), members


def _digest(data) -> str:
    h = hashlib.sha256()
    if isinstance(data, torch.Tensor):
        h.update(data.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    else:
        h.update(json.dumps(data, sort_keys=True).encode())
    return h.hexdigest()[:16]


class TrajectoryBank:
    """M trajectories per prompt, every state kept (see the module doc)."""

    name = "bank"

    def __init__(self, states: torch.Tensor, x_T: torch.Tensor, key: dict, concept_prompts,
                 member_prompts, tables, device: torch.device, info: dict, conds: Cond | None = None):
        self.states = states  # [M, P, S − 1, C, h, w] fp32
        self.tables = tables  # the DDIM tables: which state sampling until t_enc ends in
        self.x_T = x_T  # [M, C, h, w]
        self.key = key
        self.concept_prompts = concept_prompts
        self.member_prompts = member_prompts
        self.device = device
        self._info = info
        self.conds = conds  # every prompt's conditioning (what a refresh samples)
        self.refreshes = 0

    # -- refreshing ---------------------------------------------------------------------------
    def restore(self, states: torch.Tensor, refreshes: int, share: float) -> None:
        """The bank as a checkpoint saved it, after ``refreshes`` refreshes."""
        self.states.copy_(states)
        self.refreshes = refreshes
        self._info.update(refreshes=refreshes,
                          refreshed_trajectories=sum(len(self.refresh_pairs(share, r)) for r in range(refreshes)))

    def refresh_pairs(self, share: float, refreshes: int) -> list[tuple[int, int]]:
        """The (m, prompt) trajectories refresh number ``refreshes`` (0, 1, ...) re-samples:
        the next ⌈share · M · P⌉ of the m-major order, cyclically."""
        m_count, p_count = self.states.shape[:2]
        n = m_count * p_count
        count = min(n, math.ceil(share * n))
        return [divmod((refreshes * count + i) % n, p_count) for i in range(count)]

    def refresh(self, models, share: float, batch: int, dist) -> None:
        """Re-sample the next share of the trajectories with θ′ from their own noises x_T^(m)
        (``--bank-refresh``); the other states stay as they are."""
        pairs = self.refresh_pairs(share, self.refreshes)
        states = _sample_pairs(models, self.conds, self.x_T, self.tables, pairs, batch, dist,
                               False, which="trained", kind="bank_refresh")
        for row, (m, p) in enumerate(pairs):
            self.states[m, p] = states[row].to(self.states.device)
        self.refreshes += 1
        self._info["refreshes"] = self.refreshes
        self._info["refreshed_trajectories"] = self._info.get("refreshed_trajectories", 0) + len(pairs)

    # -- reading ------------------------------------------------------------------------------
    def sample(self, x_T, cond, t_enc: int, prompts: list[int], members: list[int]):
        """z of B samples: trajectory ``members[i]`` of prompt ``prompts[i]`` at ``t_enc`` (the
        state sampling until t_enc ends in; ``x_T`` and ``cond`` are not read)."""
        pos = state_position(self.tables, t_enc)
        m = torch.tensor(members, dtype=torch.long, device=self.states.device)
        p = torch.tensor(prompts, dtype=torch.long, device=self.states.device)
        return self.states[m, p, pos].to(self.device, non_blocking=True)

    def info(self) -> dict:
        return dict(self._info)

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def create(cls, cfg, models, sets, tables, cond_shapes, latent_shape, dist, device,
               model_hash: str | None, progress: bool = False) -> "TrajectoryBank":
        """The bank of this run: loaded from ``cfg.bank_file`` when that file exists (refused
        when it was built for anything else), else built (the ranks share the work) and saved
        there when a file was named."""
        labels, conds, concept_prompts, member_prompts = bank_prompts(
            cfg.erase, models.concepts, sets, tables, cond_shapes)
        tables_ = models.tables
        seed = cfg.seed if cfg.bank_seed is None else cfg.bank_seed
        key = {
            "format": BANK_FORMAT,
            "model": model_hash,
            "prompts": _digest(labels), "conditionings": _digest(conds.flat().float()),
            "unconditional": _digest(models.null.flat().float().cpu()),
            "seed": int(seed), "size": int(cfg.bank_size), "ddim_steps": tables_.ddim_steps,
            "schedule": _digest(tables_.alphas_cumprod), "guidance": float(models.guidance),
            "prediction_type": tables_.prediction_type, "latent_shape": list(latent_shape[1:]),
            "compute_dtype": str(models.compute_dtype).replace("torch.", ""),
            "build_batch": int(cfg.bank_build_batch),
        }
        store = device if cfg.bank_on_device else torch.device("cpu")
        n_states = tables_.ddim_steps - 1
        info = {"source": "bank", "size": cfg.bank_size, "prompts": len(labels),
                "erased_prompts": len(cfg.erase), "trajectories": cfg.bank_size * len(labels),
                "states_per_trajectory": n_states, "seed": int(seed), "device": str(store),
                "bytes": cfg.bank_size * len(labels) * n_states * _numel(latent_shape[1:]) * 4,
                "unet_evals": cfg_evals(models.guidance) * cfg.bank_size * len(labels) * n_states, "file": cfg.bank_file,
                "loaded": False}
        t0 = time.perf_counter()
        path = Path(cfg.bank_file) if cfg.bank_file else None
        # one process builds a named bank, others that want the same file wait and read it
        lock = _wait_for_lock(path) if path is not None and dist.world == 1 else None
        try:
            if path is not None and path.exists():
                states, x_T = _load(path, key)
                info.update(loaded=True, unet_evals_this_run=0)
            else:
                x_T = _bank_noise(seed, cfg.bank_size, latent_shape)
                states = _build(models, conds, x_T, tables_, cfg.bank_build_batch, dist, progress)
                info["unet_evals_this_run"] = info["unet_evals"]
                if path is not None and dist.is_main:
                    _save(path, states, x_T, key, info)
                dist.barrier()
        finally:
            if lock is not None:
                lock.release()
        info["build_s"] = round(time.perf_counter() - t0, 3)
        if cfg.bank_refresh:
            info.update(refresh_every=cfg.bank_refresh, refresh_share=cfg.bank_refresh_share,
                        refreshes=0, refreshed_trajectories=0)
        return cls(states.to(store), x_T, key, concept_prompts, member_prompts, tables_, device, info,
                   conds)


def _wait_for_lock(path: Path):
    """The lock on a bank file (``.<name>.lock`` beside it), waiting while another process
    holds it: that process is building the same file, which this one then reads (or, if it was
    built for something else, refuses) instead of building it again."""
    from .outdir import FolderInUse, FolderLock

    lock, said = FolderLock(path), False
    while True:
        try:
            return lock.acquire()
        except FolderInUse:
            if not said:
                print(f"trajectory bank {path}: another process is building it; waiting to read it",
                      file=sys.stderr, flush=True)
                said = True
            time.sleep(0.5)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _bank_noise(seed: int, size: int, latent_shape) -> torch.Tensor:
    """The M starting noises x_T^(m), from a generator of the bank's own (not the run's plan)."""
    digest = hashlib.sha256(f"ap_erase_fast/bank-noise/{seed}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randn((size, *latent_shape[1:]), generator=g, dtype=torch.float32)


def _build(models, conds: Cond, x_T: torch.Tensor, tables, batch: int, dist, progress: bool):
    """Every (m, prompt) trajectory with θ, in fixed chunks of ``batch`` trajectories (m-major),
    chunk i on rank i mod world; all ranks end with every state. [M, P, S − 1, C, h, w]."""
    pairs = [(m, p) for m in range(x_T.shape[0]) for p in range(len(conds))]
    flat = _sample_pairs(models, conds, x_T, tables, pairs, batch, dist, progress)
    return flat.view(x_T.shape[0], len(conds), *flat.shape[1:])


def _sample_pairs(models, conds: Cond, x_T: torch.Tensor, tables, pairs, batch: int, dist,
                  progress: bool, which: str = "frozen", kind: str = "bank_build") -> torch.Tensor:
    """The states [len(pairs), S − 1, C, h, w] of the trajectories (m, prompt) of ``pairs``,
    sampled with θ (``which="frozen"``) or θ′ in chunks of ``batch`` (chunk i on rank i mod
    world; every rank ends with all of them), counting the evaluations under ``kind``."""
    from tqdm.auto import tqdm

    chunks = [pairs[i:i + batch] for i in range(0, len(pairs), batch)]
    mine = [i for i in range(len(chunks)) if i % dist.world == dist.rank]
    fn = models.model_fn(which, kind)
    device = models.backbone.device
    null = models.null
    built = {}
    bar = tqdm(total=len(mine), unit="chunk", desc="trajectory bank", disable=not progress,
               dynamic_ncols=True)
    with torch.no_grad():
        for i in mine:
            chunk = chunks[i]
            x = x_T[[m for m, _ in chunk]].to(device)
            cond = Cond.cat([conds[p:p + 1] for _, p in chunk]).to(device)
            states = list(trajectory_states(fn, x, cond, null.expand(len(chunk)), tables,
                                            models.guidance))
            built[i] = torch.stack(states, 1).float().cpu()  # [n, S − 1, C, h, w]
            bar.update(1)
    bar.close()
    if dist.world > 1:
        for part in dist.gather(built):
            built.update(part)
    return torch.cat([built[i] for i in range(len(chunks))])


def _save(path: Path, states, x_T, key: dict, info: dict) -> None:
    """Write the bank atomically (a temporary file renamed into place)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    meta = {BANK_METADATA: json.dumps({"key": key, "info": {k: v for k, v in info.items()
                                                              if k not in ("file", "loaded")}})}
    try:
        save_file({"states": states.contiguous(), "x_T": x_T.contiguous()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write --bank-file {path}: {exc.strerror or exc}; free space or "
                        f"choose another path") from None


def _load(path: Path, key: dict):
    """The states and noises of a saved bank, after checking it was built for this run."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get(BANK_METADATA, "null") or "null")
            if not isinstance(meta, dict) or "key" not in meta:
                raise ValueError("it is not a trajectory bank of this library")
            theirs = meta["key"]
            differ = sorted(k for k in set(key) | set(theirs) if key.get(k) != theirs.get(k))
            if differ:
                raise UserError(f"--bank-file {path} was built for another run (it differs in: "
                                f"{', '.join(differ)}); delete it to rebuild, or choose another "
                                f"--bank-file")
            states, x_T = fh.get_tensor("states"), fh.get_tensor("x_T")
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise UserError(f"cannot read --bank-file {path} ({exc}); delete it to rebuild the "
                        f"bank") from None
    return states, x_T


def make_source(cfg, models, sets=None, tables=None, cond_shapes=None, latent_shape=None,
                dist=None, device=None, model_hash: str | None = None, progress: bool = False):
    """The trajectory source ``cfg.trajectories`` names (``model_hash``: the original weights'
    content hash, part of a saved bank's key)."""
    if cfg.trajectories == "bank":
        return TrajectoryBank.create(cfg, models, sets, tables, cond_shapes, latent_shape, dist,
                                     device, model_hash, progress)
    return SampledTrajectories(models, cfg.trajectories)
