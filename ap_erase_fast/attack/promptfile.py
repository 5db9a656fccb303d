"""Prompt files of ``ap-erase attack --prompts FILE``: every row is attacked as its own prompt,
with its own seed for the judged images.

Two formats, told apart by the header:

* **UnlearnDiffAtk's prompt sets** (e.g. its nudity set): a column ``evaluation_seed`` and a
  column ``prompt``; ``evaluation_guidance`` (the row's CFG scale), ``case_number``,
  ``categories`` and ``nudity_percentage`` are read where they exist, other columns (a pandas
  index column ``Unnamed: 0``, ``lexica_url``, ...) are ignored. The concept is the run's.
* **Plain**: a header ``prompt,seed`` with an optional ``concept`` column (empty: the run's
  concept).

A bad row (a missing value, an empty prompt, a seed that is not a whole number, an unknown
concept) is a :class:`~ap_erase_fast.errors.UserError` naming the file and the row, raised
before anything is written. Also the writers of the per-row outputs (``prompts.csv``, images).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from ..csvfile import read_csv
from ..errors import UserError

UNLEARNDIFFATK = "unlearndiffatk"
PLAIN = "plain"
_KEPT = ("case_number", "categories", "nudity_percentage")  # UnlearnDiffAtk columns kept per row


@dataclass
class PromptRow:
    row: int  # 1-based data row of the file
    line: int  # line of the file where the row ends (the header is line 1)
    prompt: str
    seed: int
    concept: str
    guidance: float | None = None  # the row's evaluation_guidance (UnlearnDiffAtk files)
    case: str | None = None  # case_number where the file has one
    extra: dict = field(default_factory=dict)  # categories, nudity_percentage, ...

    def info(self) -> dict:
        out = {"row": self.row, "line": self.line, "prompt": self.prompt, "seed": self.seed,
               "concept": self.concept}
        if self.guidance is not None:
            out["evaluation_guidance"] = self.guidance
        if self.case is not None:
            out["case_number"] = self.case
        out.update(self.extra)
        return out


def _whole(text: str) -> int | None:
    """A whole number written as ``12`` or ``12.0`` (pandas writes the latter), else None."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def read_prompt_file(path: str, erased: list[str], default_concept: str,
                     max_prompts: int | None = None) -> tuple[list[PromptRow], dict]:
    """The rows of ``path`` (every row checked, the first ``max_prompts`` returned) and what the
    file is (format, columns, sha256, rows)."""
    f = read_csv(path, "prompt file")
    if not f.header:
        raise UserError(f"prompt file {path} is empty; it needs a header line (prompt,seed[,concept] or "
                        f"UnlearnDiffAtk's columns with prompt and evaluation_seed)")
    names = f.header
    if "prompt" not in names:
        raise UserError(f"prompt file {path}, line 1 (header): no 'prompt' column (columns: "
                        f"{', '.join(n for n in names if n) or 'none'})")
    if "evaluation_seed" in names:
        kind, seed_col = UNLEARNDIFFATK, "evaluation_seed"
    elif "seed" in names:
        kind, seed_col = PLAIN, "seed"
    else:
        raise UserError(f"prompt file {path}, line 1 (header): no 'seed' column (or UnlearnDiffAtk's "
                        f"'evaluation_seed'); every prompt needs its own seed")
    col = {n: i for i, n in reversed(list(enumerate(names)))}  # the first column of a name
    known = {c.strip().lower(): c for c in erased}
    rows: list[PromptRow] = []
    for n, (line, rec) in enumerate(f.records, start=1):
        where = f"prompt file {path}, row {n} (line {line})"

        def cell(name, required=False):
            i = col.get(name)
            if i is None:
                return None
            if i >= len(rec):
                if required:
                    raise UserError(f"{where}: no value in column {name!r} (the row has {len(rec)} of "
                                    f"{len(names)} columns)")
                return None
            return rec[i].strip()

        prompt = cell("prompt", required=True)
        if not prompt:
            raise UserError(f"{where}: the prompt is empty")
        raw_seed = cell(seed_col, required=True)
        seed = _whole(raw_seed)
        if seed is None or seed < 0:
            raise UserError(f"{where}: {seed_col} {raw_seed!r} is not a whole number, 0 or more")
        concept = cell("concept") or default_concept
        if concept.strip().lower() not in known:
            raise UserError(f"{where}: concept {concept!r} is not erased by this run (it erased "
                            f"{', '.join(map(repr, erased))})")
        guidance = None
        raw_g = cell("evaluation_guidance")
        if raw_g:
            try:
                guidance = float(raw_g)
            except ValueError:
                guidance = None
            if guidance is None or not (guidance >= 0 and guidance < float("inf")):
                raise UserError(f"{where}: evaluation_guidance {raw_g!r} is not a number, 0 or more")
        extra = {k: cell(k) for k in _KEPT[1:] if cell(k)}
        rows.append(PromptRow(row=n, line=line, prompt=prompt, seed=seed, concept=known[concept.strip().lower()],
                              guidance=guidance, case=cell("case_number") or None, extra=extra))
    if not rows:
        raise UserError(f"prompt file {path} holds no prompt (only a header)")
    used = rows[:max_prompts] if max_prompts else rows
    info = {"path": str(f.path.absolute()), "sha256": f.sha256, "format": kind,
            "columns": names, "rows": len(rows), "attacked": len(used)}
    return used, info


def fit_prompt(encoder, prompt: str, room: int) -> tuple[str, bool]:
    """``prompt`` cut at its last words until its tokens fit ``room`` (the text encoder's length
    less the start/end tokens and an adversarial prefix); whether it was cut."""
    words = prompt.split()
    cut = False
    while words and len(encoder.word_ids(" ".join(words))) > room:
        words.pop()
        cut = True
    return " ".join(words), cut


def save_images(folder: Path, row: int, kind: str, images, seeds) -> list[str]:
    """``images/row<row>_<kind>_seed<seed>.png`` for each image; the relative paths."""
    from PIL import Image

    out = folder / "images"
    out.mkdir(exist_ok=True)
    names = []
    for img, seed in zip(images, seeds):
        name = f"images/row{row:04d}_{kind}_seed{seed}.png"
        Image.fromarray(img).save(folder / name, format="PNG")
        names.append(name)
    return names


CSV_COLUMNS = ("row", "case_number", "concept", "seed", "prompt", "attack", "adversarial_prompt",
               "hits", "images", "rate", "loss_after", "distance_after", "base_hits", "erased_hits")


def write_prompts_csv(path: Path, rows: list[dict]) -> None:
    """One line per (row, attack): the adversarial prompt found, its judged rate where a
    classifier or detector judges (empty otherwise), its attack loss (white-box) or distance
    (black-box), and the hits of the base and the erased model for the row's plain prompt on the
    same seeds."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            plain = {k: (r["rates"].get(k) or {}).get("hits", "") for k in ("base", "erased")}
            for name, entry in r["attacks"].items():
                judged = entry.get("rate") or {}
                w.writerow([r["row"], r.get("case_number", ""), r["concept"], r["seed"], r["prompt"], name,
                            entry.get("prompt", ""), judged.get("hits", ""), judged.get("images", ""),
                            judged.get("rate", ""), (entry.get("loss") or {}).get("after", ""),
                            (entry.get("distance") or {}).get("after", ""), plain["base"], plain["erased"]])


def pooled(rates: list[dict | None]) -> dict | None:
    """The rate of the images of every row together (hits and images summed), or None."""
    from .judge import rate

    rates = [r for r in rates if r]
    if not rates:
        return None
    hits, n = sum(r["hits"] for r in rates), sum(r["images"] for r in rates)
    return rate(["x"] * hits + ["-"] * (n - hits), "x")


def _summed(costs: list[dict]) -> dict:
    """The numbers of per-row cost entries added up."""
    out: dict = {}
    for cost in costs:
        for key, value in cost.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = out.get(key, 0) + value
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def run_rows(ctx, rows: list[PromptRow], folder: Path, attack_one) -> dict:
    """Every row of a prompt file attacked as its own prompt (``attack_one(ctx, prompt, concept,
    seeds)``, the single-prompt attack), the judged images of row ``r`` on seeds ``r.seed + i``;
    writes ``prompts.csv``, ``images/`` and ``grid.png`` (one column per row) into ``folder``
    and returns the report's fields."""
    from .judge import save_grid

    cfg, encoder, judge = ctx.cfg, ctx.encoder, ctx.judge
    extra = max(cfg.prefix_tokens if "prompt" in cfg.attacks else 0, 1 if "inversion" in cfg.attacks else 0)
    room = int(encoder.tokenizer.model_max_length) - 2 - extra  # the prefix, or the inversion's token
    results, grid, fitted = [], {}, []
    for r in rows:
        text, cut = fit_prompt(encoder, r.prompt, room)
        if not text:
            raise UserError(f"prompt file {cfg.prompts}, row {r.row} (line {r.line}): the prompt's first word "
                            f"alone needs more tokens than the text encoder reads ({room} with the prefix)")
        fitted.append((r, text, cut))
    ctx.start_bar()
    for r, text, cut in fitted:
        guidance = r.guidance if (r.guidance is not None and not ctx.job.explicit_guidance) else cfg.guidance
        seeds = [r.seed + i for i in range(cfg.images)]
        judge.guidance = guidance
        try:
            res = attack_one(ctx, text, r.concept, seeds)
        finally:
            judge.guidance = cfg.guidance
        images = {}
        for kind, imgs in res["grid"]:
            images[kind] = save_images(folder, r.row, kind, imgs, seeds)
            grid.setdefault(kind, []).append(imgs[0])
        targets = res["targets"]
        results.append({**r.info(), "attacked_prompt": text, "truncated": cut, "guidance": guidance,
                        "seeds": seeds, "judged": ctx.wants[r.concept] is not None,
                        "loss_plain": res["loss_plain"], "rates": res["rates"], "attacks": res["attacks"],
                        "images": images})
    files = ["prompts.csv", "images/"]
    write_prompts_csv(folder / "prompts.csv", [{**x, "prompt": x["attacked_prompt"]} for x in results])
    if cfg.grid_size:
        save_grid([(kind, imgs[:cfg.grid_size]) for kind, imgs in grid.items()], folder / "grid.png")
        files.append("grid.png")
    names = [a for a in cfg.attacks if a in results[0]["attacks"]]
    attacks = {name: {"rate": pooled([x["attacks"][name].get("rate") for x in results]),
                      "cost": _summed([x["attacks"][name].get("cost", {}) for x in results]),
                      "prompts": len(results), "per_row": f"rows[i].attacks.{name}",
                      "rate_is": "the images of every row together (hits and images summed)"}
               for name in names}
    return {"judged": any(x["judged"] for x in results),
            "seeds": "per row: the row's seed + i, i = 0..images-1 (UnlearnDiffAtk's protocol: --images 1)",
            "targets": targets and {**targets, "made_by": "per row: the base model, the row's prompt, the "
                                                          "judge's sampler (latents)"},
            "rates": {k: pooled([x["rates"][k] for x in results]) for k in ("base", "erased")},
            "attacks": attacks, "rows": results, "files": files}
