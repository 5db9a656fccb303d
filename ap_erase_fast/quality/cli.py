"""``ap-erase bench quality``: erasure and preservation measured end to end on ShapesWorld.

For every target (each shape in turn, and one colour), every method and every seed, the built-in
``shapes`` model is erased with the same step budget, then images are generated from fixed
seeds (paired across methods) and labelled by the shipped classifier:

* shape target S: 'a <shape>' prompts, ``--images`` per shape. ESR = share of 'a S' images not
  classified S; PSR = mean over the other five shapes of the share classified correctly.
* colour target C: 'a <colour> <shape>' prompts for all 36 pairs. ESR = share of 'a C <shape>'
  images whose colour is not C; PSR = mean over the other colours of colour accuracy.

Also recorded: what the erased concept's images became (label histogram), the ε-space measures
of ``ap-erase eval`` (drift of the erased and of the kept prompts), the size of R and the
preserved concepts drawn, and the training time. Methods (all xattn, same steps, lr, batch):

* ``base`` — the model as shipped;
* ``esd`` — negative-guidance erasure without preservation (λ = 0);
* ``preserve_null`` — preservation of the fixed neutral prompt "" (R = {""});
* ``preserve_random`` — preservation of a uniformly random member of R each sample, at the cost
  of the shared schedule (the control that tells whether the search itself pays off);
* ``ap_faithful`` — AP, the authors' alternating loop;
* ``ap_shared`` — AP, the shared schedule;
* ``oracle`` — preservation of the measured near set (the kept concepts plain ESD damages most),
  drawn uniformly: an upper bound for any search over R (runs after the target's base and esd);
* ``ap_normalised`` — AP faithful with ``--search-score normalised``;
* ``ap_topk`` — AP faithful preserving a mixture of π's top-k candidates (``--gumbel-mode topk``);
* ``ap_score`` — AP faithful whose π follows the score-function estimate of the gradient of the
  expected preservation error over the hard draw (``--search-estimator score``).

``--model shapes2`` judges on ShapesWorld 2's held-out prompts ("an image of a ..."; asserted
out of R in every run) and splits PSR into PSR-near (the near set) and PSR-far (the rest); the
ablation flags (``--tau``, ``--gumbel-mode``, ``--pgd-steps``, ``--num-centers``) change the
search of every AP run (``ap_*``; the controls keep their settings and are not re-run) and become
part of each row's identity.

``--budgets`` judges every erasure also after fewer steps on the way (exactly a shorter run), and
``--sweep-lrs`` adds runs at other learning rates (``--sweep-targets``, ``--sweep-seeds``): the
points of each (target, seed) curve, from the base model to the strongest erasure, on which PSR
is read at matched erasure (ESR 80 % and 95 %) and ESR is plotted against PSR per method. Everything goes to ``--out DIR`` as
``quality_<tag>.{jsonl,csv,md}``, ``quality_<tag>_sweep.png`` and ``quality_<tag>_grid.png``
(default: a new ``bench-quality-<date-time>`` folder under the current one; the committed
report is regenerated with ``--out benchmarks/results``). Finished runs are read back from the
jsonl, so an interrupted benchmark resumes when it is given the same ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

from ..config import TRAIN_METHODS
from ..shapes.world import SHAPES
from .metrics import near_sets
from .report import _environment, _log, write_outputs
from .runs import COMMON, METHODS, _key, _load_done, budgets_below, run_one
from .worlds import EVAL_STEPS, WORLDS, World, world_of

DEFAULT_TARGETS = list(SHAPES) + ["red"]
# --quick: small, but a visible erasure (ESR well above the base model's) in about a minute
QUICK = dict(targets=["circle"], seeds=[0], steps=12, lr=4e-3, images=8,
             methods=["base", "esd", "preserve_random", "ap_shared"], sweep_lrs=[])


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ap-erase bench quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=tuple(WORLDS), default="shapes",
                    help="the built-in world: shapes (ShapesWorld) or shapes2 (ShapesWorld 2: held-out "
                         "evaluation prompts, PSR-near / PSR-far, the oracle method)")
    ap.add_argument("--targets", type=_names, default=None,
                    help="concepts to erase, one run each (shapes and/or colours); default: every "
                         "shape and red")
    ap.add_argument("--methods", type=_names, default=list(METHODS), help=f"of: {', '.join(METHODS)}")
    ap.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=40, help="outer steps of every erasure")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--loss-space", choices=("x0", "eps"), default="x0")
    ap.add_argument("--search-lr", type=float, default=0.1,
                    help="Adam lr of π (AP methods); 0.1 because π gets as many updates as the "
                         "short budget has steps (the paper: 1e-2 over 1000 steps)")
    ap.add_argument("--preserve-weight", type=float, default=1.0,
                    help="λ of the methods that preserve (ESD has λ = 0)")
    ap.add_argument("--train-method", default="xattn", choices=TRAIN_METHODS,
                    help="parameters every erasure trains (as in train)")
    ap.add_argument("--lora-rank", type=int, default=0,
                    help="train LoRA adapters of this rank instead of the weights (0: full fine-tuning)")
    ap.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    ap.add_argument("--images", type=int, default=24, help="evaluation images per shape prompt")
    ap.add_argument("--eval-steps", type=int, default=EVAL_STEPS,
                    help=f"DDIM steps of the evaluation images and ε measures (default {EVAL_STEPS})")
    abl = ap.add_argument_group("ablations (every erasure of the run; recorded per row and part of its identity)")
    abl.add_argument("--tau", type=float, default=None, help="Gumbel-Softmax temperature τ (default 2)")
    abl.add_argument("--gumbel-mode", choices=("hard", "soft", "topk"), default=None,
                     help="hard draw (default), soft mixture, or mixture of the top k")
    abl.add_argument("--gumbel-topk", type=int, default=None, help="k of --gumbel-mode topk (default 5)")
    abl.add_argument("--pgd-steps", type=int, default=None, help="P: loop iterations per outer step (default 2)")
    abl.add_argument("--num-centers", type=int, default=None,
                     help=f"|R| bound: k-means centres over the k closest (default {COMMON['num_centers']})")
    ap.add_argument("--budgets", type=_ints, default=[],
                    help="step budgets below --steps at which every erasure is also judged (it then "
                         "continues, exactly as without): points of its ESR-PSR curve for the price "
                         "of their evaluation, e.g. 10,20")
    ap.add_argument("--sweep-lrs", type=_floats, default=[], help="extra learning rates for the ESR-PSR plot")
    ap.add_argument("--sweep-targets", type=_names, default=["circle"])
    ap.add_argument("--sweep-seeds", type=_ints, default=[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=None,
                    help="results folder (default: a new bench-quality-<date-time> folder under "
                         "the current one; give the same folder again to resume or to collect "
                         "shards; --out benchmarks/results regenerates the committed report)")
    ap.add_argument("--tag", default=None,
                    help="file name stem after 'quality_' (default: shapes_cpu, shapes_quick "
                         "with --quick)")
    ap.add_argument("--controls-from", type=_names, default=[], metavar="TAG[,TAG]",
                    help="reuse the finished runs of these tags in the same --out folder (copied into "
                         "this tag's results): an ablation then re-runs only what it changes, e.g. "
                         "--tag shapes2_tau1 --tau 1 --controls-from shapes2_cpu")
    ap.add_argument("--near-sets", default=None, metavar="FILE",
                    help="take the near sets from this *_near.json of an earlier table instead of "
                         "measuring them from this table's esd runs (a confirmation on fresh seeds "
                         "keeps the sets it was planned with)")
    ap.add_argument("--confirm", default=None, metavar="METHOD:CONTROL",
                    help="add the pre-registered confirmation section: METHOD − CONTROL in PSR-near at "
                         "each matched ESR level, sign tests adjusted by Holm-Bonferroni over the levels")
    ap.add_argument("--trajectory-table", action="store_true",
                    help="add the trajectory-source section: each <method>_bank and <method>_base "
                         "against <method> (student) at matched erasure, with 95 %% intervals and "
                         "the non-inferiority margins of benchmarks/quality_shapes2_trajectories.sh")
    ap.add_argument("--report-only", action="store_true",
                    help="write the report from the finished runs in --out and run nothing (runs not "
                         "finished are left out; the sample grid PNG already there is kept)")
    ap.add_argument("--shard", default=None, metavar="I/N",
                    help="run only every N-th of the runs not yet finished, starting at I (0-based), "
                         "e.g. two processes started together with --threads 1 and --shard 0/2, 1/2; "
                         "a last run without --shard collects every shard's results, runs anything "
                         "left and writes the report")
    ap.add_argument("--quick", action="store_true",
                    help=f"a small real erasure in about a minute: target circle, seed 0, "
                         f"{QUICK['steps']} steps at lr {QUICK['lr']:g}, {QUICK['images']} images "
                         f"per shape, methods {', '.join(QUICK['methods'])}, no sweep (each "
                         f"setting can still be given)")
    return ap


def main(argv: list[str] | None = None) -> int:
    from ..errors import UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    quick = parser.parse_known_args(argv)[0].quick
    # --quick: its settings stand in for the defaults (argparse keeps values already in the
    # namespace unless their flag is given)
    args = parser.parse_args(argv, argparse.Namespace(**copy.deepcopy(QUICK)) if quick else None)
    args.tag = args.tag or (f"{args.model}_quick" if args.quick else f"{args.model}_cpu")
    w = world_of(args.model)
    if args.targets is None:
        args.targets = list(w.SHAPES) + ["red"]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        raise UserError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
    bad = [t for t in args.targets + args.sweep_targets if t not in w.SHAPES and t not in w.COLOURS]
    if bad:
        raise UserError(f"unknown target(s) {', '.join(bad)}; --model {args.model} has the shapes "
                        f"{', '.join(w.SHAPES)} and the colours {', '.join(w.COLOURS)}")
    if "oracle" in args.methods and not {"base", "esd"} <= set(args.methods):
        raise UserError("the oracle preserves the near set that esd measures against base: "
                        "--methods needs base and esd with oracle")
    if args.steps < 1 or args.images < 1 or args.batch_size < 1 or args.eval_steps < 1:
        raise UserError("--steps, --images, --eval-steps and --batch-size must be at least 1")
    if any(not 0 < b < args.steps for b in args.budgets):
        raise UserError(f"--budgets must lie between 1 and --steps - 1 ({args.steps - 1}); got "
                        f"{','.join(map(str, args.budgets))}")
    if args.lora_rank < 0 or (args.lora_alpha is not None and not args.lora_alpha > 0):
        raise UserError("--lora-rank must be 0 (full fine-tuning) or positive, and --lora-alpha positive")
    if args.near_sets:
        try:
            fixed = json.loads(Path(args.near_sets).read_text())
            assert isinstance(fixed, dict) and all(isinstance(v.get("near"), list) for v in fixed.values())
        except (OSError, ValueError, AssertionError, AttributeError) as exc:
            raise UserError(f"--near-sets {args.near_sets}: not a near-set file written by an earlier "
                            f"table (quality_<tag>_near.json): {exc}") from None
    if args.confirm:
        pair = args.confirm.split(":")
        if len(pair) != 2 or any(m not in args.methods for m in pair):
            raise UserError(f"--confirm must be METHOD:CONTROL with both in --methods (got {args.confirm!r})")
    if args.report_only and args.shard:
        raise UserError("--report-only writes the report of every shard's runs: leave out --shard")
    shard = None
    if args.shard:
        try:
            i, n = (int(x) for x in args.shard.split("/"))
            assert 0 <= i < n
        except (ValueError, AssertionError):
            raise UserError(f"--shard must look like I/N with 0 <= I < N (got {args.shard!r})") from None
        shard = (i, n)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..runtime import new_results_dir

    out = Path(args.out) if args.out else new_results_dir("quality")
    out.mkdir(parents=True, exist_ok=True)
    args.out_dir = str(out)  # where the runs keep their shared trajectory banks (.banks/)
    raw = out / (f"quality_{args.tag}.jsonl" if shard is None else f"quality_{args.tag}.shard{shard[0]}of{shard[1]}.jsonl")
    grid_dir = out / f".quality_{args.tag}_grid"  # sample images of the grid, for the report
    done = _load_done(out, args.tag)
    borrowed = {}  # finished runs of --controls-from tags that this tag lacks
    for other in args.controls_from:
        theirs = _load_done(out, other) if other != args.tag else {}
        if not theirs:
            raise UserError(f"--controls-from {other}: no finished runs of that tag in {out} "
                            f"(quality_{other}.jsonl or its shards)")
        borrowed.update({k: r for k, r in theirs.items() if k not in borrowed})
    if shard is None:  # collect the shards' results into the one results file
        shards = sorted(out.glob(f"quality_{args.tag}.shard*.jsonl"))
        if shards:
            tmp = raw.with_name(raw.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
            os.replace(tmp, raw)
            for path in shards:
                path.unlink()
    command = "ap-erase bench quality " + " ".join(argv)
    jobs = [(t, m, s, args.lr) for s in args.seeds for t in args.targets for m in args.methods]
    jobs += [(t, m, s, lr) for lr in args.sweep_lrs if lr != args.lr for s in args.sweep_seeds
             for t in args.sweep_targets for m in args.methods if m != "base"]
    # the oracle runs last: its R is the near set the target's base and esd runs measure
    jobs.sort(key=lambda j: j[1] == "oracle")

    def keys(t, m, s, lr):
        """The identities of a job's rows: one per step budget (the base model: one)."""
        steps = [args.steps] if METHODS[m] is None else [*budgets_below(args), args.steps]
        return [_key(t, m, s, lr, {**vars(args), "steps": b}) for b in steps]

    def finished(t, m, s, lr):
        """Whether a job has nothing left to do: its rows are in (this tag's or a --controls-from
        tag's), and so is its sample grid where the report shows one (a borrowed run is not re-run
        for this tag's grid)."""
        ks = keys(t, m, s, lr)
        if not all(k in done or k in borrowed for k in ks):
            return False
        want_grid = t == args.targets[0] and s == args.seeds[0] and lr == args.lr
        return not want_grid or (grid_dir / f"{m}.pt").exists() or any(k in borrowed for k in ks)

    if shard is not None:
        # every N-th of the jobs still to run, so that a resumed table splits evenly (shards
        # started together see the same finished runs; the collecting run picks up any leftover)
        jobs = [j for j in jobs if not finished(*j)][shard[0]::shard[1]]
    todo = sum(not finished(*j) for j in jobs)

    def oracle_needs(t):
        """The runs whose near set the oracle of ``t`` preserves: base and esd of every seed."""
        return {f"{mm} seed {ss}": _key(t, mm, ss, args.lr, vars(args)) for ss in args.seeds for mm in ("base", "esd")}

    # the oracle's near set comes from runs finished before it (in this process, which runs
    # the oracle last, or earlier): one shard cannot wait for another's
    own = {k for j in jobs for k in keys(*j)}
    for t in dict.fromkeys(t for t, m, _, _ in jobs if m == "oracle"):
        lacking = [name for name, k in oracle_needs(t).items() if k not in done and k not in borrowed
                   and k not in own]
        if lacking:
            raise UserError(f"the oracle for {t} needs the base and esd runs of {t} at lr {args.lr:g} for every "
                            f"seed (missing: {', '.join(lacking)}); run the other methods first (every shard), "
                            "then the oracle")
    budgets = budgets_below(args)
    _log(f"{len(jobs)} runs ({len(jobs) - todo} already in {raw.name}), {args.steps} steps each"
         + (f", judged also after {', '.join(map(str, budgets))}" if budgets else "") + f"; results in {out}")
    world = None
    rows = []
    t_all = time.perf_counter()
    with open(raw, "a") as fh:
        for i, (t, m, s, lr) in enumerate(jobs):
            ks = keys(t, m, s, lr)
            want_grid = t == args.targets[0] and s == args.seeds[0] and lr == args.lr
            grid_file = grid_dir / f"{m}.pt"
            if args.report_only and shard is None:
                rows += [done[k] if k in done else borrowed[k] for k in ks if k in done or k in borrowed]
                continue
            if finished(t, m, s, lr):
                for k in ks:
                    if k not in done:  # copied, so that this tag's results stand on their own
                        fh.write(json.dumps(borrowed[k]) + "\n")
                        done[k] = borrowed[k]
                rows += [done[k] for k in ks]
                continue
            near = None
            if m == "oracle":  # every seed's base and esd run are in by now (checked above)
                found = {**borrowed, **_load_done(out, args.tag), **done}
                known = [found[k] for k in oracle_needs(t).values()]
                near = near_sets(known, [t], args.lr, args.model, steps=args.steps)[t]["near"]
            if world is None:
                _log("loading the ShapesWorld model and its classifier")
                world = World(args.model)
            _log(f"{i + 1}/{len(jobs)} {t:>8} {m:<16} seed {s} lr {lr:g}: "
                 + ("generating and classifying images" if METHODS[m] is None else
                    f"erasing ({args.steps} steps), then generating and classifying images"))
            results = run_one(world, t, m, s, args, lr, near)
            row, images = results[-1]
            if want_grid:
                grid_dir.mkdir(exist_ok=True)
                per = args.images if t in w.SHAPES else max(1, args.images // len(w.SHAPES)) * len(w.SHAPES)
                torch.save({"images": images, "per_prompt": torch.tensor(per)}, grid_file)
            for k, (r, _) in zip(ks, results):
                if k not in done:
                    fh.write(json.dumps(r) + "\n")
                rows.append(done.get(k, r))
            fh.flush()
            _log(f"{i + 1}/{len(jobs)} {t:>8} {m:<16} seed {s} lr {lr:g}: ESR "
                 + " / ".join(f"{r['esr']:.2f}" for r, _ in results) + " PSR "
                 + " / ".join(f"{r['psr']:.2f}" for r, _ in results)
                 + (f" (after {', '.join(str(r['steps']) for r, _ in results)} steps)" if len(results) > 1 else "")
                 + f" ({row['wall_s']:.0f} s; {time.perf_counter() - t_all:.0f} s total)")
    if shard is not None:
        _log(f"shard {args.shard} done; run again without --shard to write the report")
        return 0
    grid = {}
    for m in args.methods:
        if (grid_dir / f"{m}.pt").exists():
            saved = torch.load(grid_dir / f"{m}.pt", weights_only=True)
            grid[m] = (saved["images"], int(saved["per_prompt"]))
    write_outputs(rows, args, _environment(command), grid, out, args.tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
