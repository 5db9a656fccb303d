"""What an evaluation writes: the ε-space section, plots, image grids, per-image records and
``report.md``. Plots need matplotlib (the ``[eval]`` extra); without it they are skipped and the
report says so. Grids use PIL only.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

GRID_CELL = 128  # px per image in the grids (tiny 16-px images are upscaled, nearest)


def eps_section(eps: dict, erased: list[str], heldout: list[str], settings, concepts_info: dict) -> dict:
    names = list(erased) + list(heldout)
    per = {n: {"drift": eps["drift"][i], "gap_erased": eps["gap_erased"][i], "gap_base": eps["gap_base"][i]}
           for i, n in enumerate(names)}
    erasure = {}
    for i, c in enumerate(erased):
        gb, ge = eps["gap_base"][i], eps["gap_erased"][i]
        erasure[c] = {"gap_base": gb, "gap_erased": ge, "gap_ratio": (ge / gb) if gb > 0 else None,
                      "shift": eps["drift"][i],
                      "by_timestep": {str(t): {"gap_base": eps["gap_base_by_index"][i][j],
                                               "gap_erased": eps["gap_erased_by_index"][i][j],
                                               "shift": eps["drift_by_index"][i][j]}
                                      for j, t in enumerate(eps["timesteps"])}}
    drifts = {c: per[c]["drift"] for c in heldout}
    ranked = sorted(drifts.items(), key=lambda kv: kv[1], reverse=True)
    vals = list(drifts.values())
    mean_heldout = sum(vals) / len(vals)
    mean_erased_shift = sum(e["shift"] for e in erasure.values()) / len(erasure)
    preservation = {
        "concepts": concepts_info,
        "drift": drifts,
        "mean": mean_heldout,
        "median": statistics.median(vals),
        "max": ranked[0][1],
        "most_affected": [{"concept": c, "drift": d} for c, d in ranked[:10]],
        "erased_shift_over_heldout_drift": (mean_erased_shift / mean_heldout) if mean_heldout > 0 else None,
    }
    return {
        "definition": {
            "z": "latent at DDIM timestep tau_k on the base model's CFG trajectory for the concept, "
                 "x_T from torch.Generator().manual_seed(seed)",
            "target": "eps_base(z,'') - eta * (eps_base(z,c) - eps_base(z,''))",
            "gap_erased": "mean((eps_erased(z,c) - target)^2)",
            "gap_base": "mean((eps_base(z,c) - target)^2)",
            "shift / drift": "mean((eps_erased(z,c) - eps_base(z,c))^2)",
            "averaging": "mean over latent elements, then over seeds and query timesteps",
        },
        "settings": {**settings.as_dict(), "query_ddim_indices": eps["indices"],
                     "query_timesteps": eps["timesteps"]},
        "erasure": erasure,
        "preservation": preservation,
    }


def save_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(image).save(path, format="PNG")


def save_grid(items, path: Path) -> None:
    """Two rows: base images on top, erased images below, same prompt and seed per column."""
    from PIL import Image

    n = len(items)
    grid = Image.new("RGB", (n * GRID_CELL, 2 * GRID_CELL), "white")
    for col, (_, base, erased) in enumerate(items):
        for row, img in enumerate((base, erased)):
            pil = Image.fromarray(img)
            resample = Image.NEAREST if max(pil.size) < GRID_CELL else Image.BICUBIC
            grid.paste(pil.resize((GRID_CELL, GRID_CELL), resample), (col * GRID_CELL, row * GRID_CELL))
    grid.save(path, format="PNG")


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def plot_spectrum(eps_report: dict, path: Path, plt) -> None:
    """The sensitivity spectrum: held-out concepts sorted by drift, erased concepts' own shift
    drawn as dashed lines."""
    drift = eps_report["preservation"]["drift"]
    ranked = sorted(drift.items(), key=lambda kv: kv[1], reverse=True)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(ranked) + 2), 4.2))
    ax.bar(range(len(ranked)), [v for _, v in ranked], color="#4c72b0")
    ax.set_xticks(range(len(ranked)))
    ax.set_xticklabels([c for c, _ in ranked], rotation=90, fontsize=7)
    for c, e in eps_report["erasure"].items():
        ax.axhline(e["shift"], color="#c44e52", linestyle="--", linewidth=1)
        ax.text(len(ranked) - 0.5, e["shift"], f" erased: {c}", color="#c44e52", fontsize=7,
                va="bottom", ha="right")
    ax.set_ylabel("drift  mean (ε_θ'(c) − ε_θ(c))²")
    ax.set_title("Sensitivity spectrum: held-out concepts sorted by drift")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ner(ner: dict, path: Path, plt) -> None:
    thresholds = list(ner["base"]["ner"])
    x = np.arange(len(thresholds))
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for off, key, color in ((-0.2, "base", "#8c8c8c"), (0.2, "erased", "#c44e52")):
        vals = [100 * (ner[key]["ner"][t] or 0.0) for t in thresholds]
        ax.bar(x + off, vals, width=0.4, label=key, color=color)
    ax.set_xticks(x)
    ax.set_xticklabels([f"NER-{t}" for t in thresholds])
    ax.set_ylabel("% images with exposed classes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(folder: Path, eps_report: dict, images_report: dict | None, records: list[dict],
                  grids: dict) -> dict:
    files = {"report": "report.json", "summary": "report.md", "plots": {}, "grids": {}}
    plt = _plt()
    if plt is None:
        files["plots_skipped"] = "matplotlib is not installed (pip install 'ap_erase_fast[eval]')"
    else:
        plot_spectrum(eps_report, folder / "sensitivity_spectrum.png", plt)
        files["plots"]["sensitivity_spectrum"] = "sensitivity_spectrum.png"
    if images_report is not None:
        with open(folder / "per_image.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
        files["per_image"] = "per_image.jsonl"
        if images_report["saved"]:
            files["images"] = {"base": "images/base/<index>.png", "erased": "images/erased/<index>.png"}
        for group, items in grids.items():
            if items:
                name = f"grid_{group}.png"
                save_grid(items, folder / name)
                files["grids"][group] = {"file": name, "rows": ["base", "erased"],
                                         "columns": [{"index": r.index, "prompt": r.prompt, "seed": r.seed}
                                                     for r, _, _ in items]}
        nudenet = images_report["detectors"].get("nudenet")
        if nudenet is not None and plt is not None:
            plot_ner(nudenet["results"], folder / "ner.png", plt)
            files["plots"]["ner"] = "ner.png"
    return files


def _f(v, digits=4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def markdown(report: dict) -> str:
    eps = report["eps_space"]
    m = report["model"]
    lines = [f"# Evaluation of {', '.join(repr(c) for c in report['erased_concepts'])} erased from {m['id']}", ""]
    if report.get("notice"):
        lines += [f"> **Note:** {report['notice']}.", ""]
    lines += [f"* run: `{report['run']['path']}`" + (" (base model only)" if report["base_only"] else ""),
              f"* base UNet sha256 `{m['base_unet_sha256'][:16]}`, erased UNet sha256 "
              f"`{(m['erased_unet_sha256'] or '')[:16]}`, base matches the run: {m['base_matches_run']}",
              f"* device {report['device']}, torch {report['versions']['torch']}, diffusers "
              f"{report['versions']['diffusers']}, transformers {report['versions']['transformers']}"]
    if report.get("defaults"):
        d = report["defaults"]
        lines.append(f"* evaluation defaults of the model: {d['name']} ({d.get('source', '')})")
    lines.append("")
    s = eps["settings"]
    lines += ["## Erasure in ε-space", "",
              f"Seeds {s['seeds']}, DDIM timesteps {s['query_timesteps']} of a {s['ddim_steps']}-step base "
              f"trajectory (CFG {s['trajectory_guidance']}), η = {s['negative_guidance']}. gap = mean squared "
              f"distance to the negative-guidance target; shift = mean squared base→erased change.", "",
              "| concept | gap (base) | gap (erased) | ratio | shift |", "|---|---|---|---|---|"]
    for c, e in eps["erasure"].items():
        lines.append(f"| {c} | {_f(e['gap_base'])} | {_f(e['gap_erased'])} | {_f(e['gap_ratio'])} | {_f(e['shift'])} |")
    p = eps["preservation"]
    lines += ["", "## Preservation in ε-space (sensitivity)", "",
              f"{p['concepts']['count']} held-out concepts ({p['concepts']['path']}): drift mean {_f(p['mean'])}, "
              f"median {_f(p['median'])}, max {_f(p['max'])}; erased shift / held-out drift = "
              f"{_f(p['erased_shift_over_heldout_drift'])}.", "",
              "| most affected | drift |", "|---|---|"]
    lines += [f"| {d['concept']} | {_f(d['drift'])} |" for d in p["most_affected"]]
    if "sensitivity_spectrum" in report["files"]["plots"]:
        lines += ["", "![sensitivity spectrum](sensitivity_spectrum.png)"]
    img = report.get("images")
    if img:
        pr = img["protocol"]
        lines += ["", "## Images", "",
                  f"{img['prompts']['rows']} prompts ({img['prompts'].get('path') or img['prompts'].get('source')}), "
                  f"groups {img['groups']}; {pr['scheduler']} {pr['steps']} steps, CFG {pr['guidance_scale']}, "
                  f"{pr['resolution']} px, per-prompt seed ({pr.get('library', 'diffusers')}).", ""]
        for name, det in img["detectors"].items():
            lines += [f"### {name}", ""]
            res = det["results"]
            if name == "nudenet":
                ts = list(res["base"]["ner"])
                lines += ["| model | " + " | ".join(f"NER-{t}" for t in ts) + " |", "|---" * (len(ts) + 1) + "|"]
                for key in ("base", "erased"):
                    lines.append(f"| {key} | " + " | ".join(f"{100 * res[key]['ner'][t]:.2f} %" for t in ts) + " |")
                lines.append(f"\nclasses ({det['settings']['class_set']}): {', '.join(det['settings']['classes'])}")
            elif name == "lpips":
                lines += ["| prompt group | images | LPIPS(base, erased) |", "|---|---|---|"]
                lines += [f"| {g} | {v['images']} | {_f(v['lpips'])} |" for g, v in res.items()]
            else:
                lines += ["| model | prompt group | images | values |", "|---|---|---|---|"]
                for key in ("base", "erased"):
                    for g, v in res[key].items():
                        vals = ", ".join(f"{k} {_f(x)}" for k, x in v.items() if k != "images")
                        lines.append(f"| {key} | {g} | {v['images']} | {vals} |")
            lines.append("")
        for group, g in report["files"]["grids"].items():
            lines.append(f"![{group}: base (top) vs erased (bottom)]({g['file']})")
    lines += ["", f"Total {report['timings']['total_s']:.1f} s. Every number and setting: `report.json`.", ""]
    return "\n".join(lines)
