"""``ap-erase attack --prompts FILE``: UnlearnDiffAtk's prompt-set CSV and the plain
``prompt,seed[,concept]`` CSV, a tiny-model run over the rows, and bad rows.

Mutation checks (done by hand when the tests were written; each broke the code on purpose, the
named test failed, the code was restored):

* the row's seed ignored (``seeds = [i for i in range(cfg.images)]`` in ``run_rows``):
  ``test_tiny_prompt_file_end_to_end`` failed (the rows' seeds reported [0], [0], [0]);
* ``--max-prompts`` ignored (``used = rows`` in ``read_prompt_file``):
  ``test_unlearndiffatk_format_parses`` failed (3 rows returned for a cap of 2);
* the row's evaluation_guidance ignored (``guidance = cfg.guidance`` in ``run_rows``): the
  end-to-end test failed (guidance 7.5, 7.5, 7.5);
* the empty-prompt check removed (``if False:`` in ``read_prompt_file``):
  ``test_bad_rows_are_one_line_and_exit_2`` failed: the run loaded the model and stopped later
  with another line ("the prompt's first word alone needs more tokens ..."), not "prompt is empty".
"""
import csv
import json

import numpy as np
import pytest
from PIL import Image
from test_attack_blackbox import attack_tiny_run  # noqa: F401  (the session's tiny run)

from ap_erase_fast.cli import main
from ap_erase_fast.errors import UserError

# UnlearnDiffAtk's nudity prompt-set header (OPTML-Group/Diffusion-MU-Attack, prompts/nudity.csv);
# the rows are made up here.
UDA_HEADER = ("Unnamed: 0,prompt,categories,hard,inappropriate_percentage,nudity_percentage,q16_percentage,"
              "sd_safety_percentage,prompt_toxicity,lexica_url,evaluation_seed,evaluation_guidance,"
              "sd_image_width,sd_image_height,sd_model,case_number")
UDA_ROWS = [
    '21,"a garbage truck on a wet road, oil painting ",shocking,1,60.0,10.0,60.0,60.0,0.04,'
    'https://example.org/a,932309623,7,512,512,stable-diffusion-v1-4,21',
    '296,a toy truck,"shocking, sexual",0,30.0,40.0,10.0,20.0,0.2,https://example.org/b,4288447746,9.5,512,512,'
    'stable-diffusion-v1-4,296',
    '541,"a street\nat night",violence,0,40.0,0.0,10.0,90.0,0.3,https://example.org/c,7.0,7,512,512,'
    'stable-diffusion-v1-4,541',
]


def _write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_unlearndiffatk_format_parses(tmp_path):
    from ap_erase_fast.attack.promptfile import UNLEARNDIFFATK, read_prompt_file

    path = _write(tmp_path / "nudity.csv", "\n".join([UDA_HEADER, *UDA_ROWS]) + "\n")
    rows, info = read_prompt_file(path, ["nudity"], "nudity")
    assert info["format"] == UNLEARNDIFFATK and info["rows"] == 3 and info["attacked"] == 3
    assert [r.prompt for r in rows] == ["a garbage truck on a wet road, oil painting", "a toy truck",
                                        "a street\nat night"]
    assert [r.seed for r in rows] == [932309623, 4288447746, 7] and [r.guidance for r in rows] == [7.0, 9.5, 7.0]
    assert [r.case for r in rows] == ["21", "296", "541"] and {r.concept for r in rows} == {"nudity"}
    assert rows[1].extra == {"categories": "shocking, sexual", "nudity_percentage": "40.0"}
    assert [(r.row, r.line) for r in rows] == [(1, 2), (2, 3), (3, 5)]  # the 3rd row spans lines 4-5
    capped, info = read_prompt_file(path, ["nudity"], "nudity", max_prompts=2)
    assert [r.seed for r in capped] == [932309623, 4288447746] and info["attacked"] == 2 and info["rows"] == 3
    # UnlearnDiffAtk's object sets: case_number,prompt,evaluation_seed,evaluation_guidance
    obj = _write(tmp_path / "truck.csv", "case_number,prompt,evaluation_seed,evaluation_guidance\n"
                                         "0,Garbage truck collecting bins.,7745,7.5\n")
    rows, _ = read_prompt_file(obj, ["garbage truck"], "garbage truck")
    assert (rows[0].prompt, rows[0].seed, rows[0].guidance, rows[0].case) == ("Garbage truck collecting bins.",
                                                                            7745, 7.5, "0")


def test_plain_format_parses(tmp_path):
    from ap_erase_fast.attack.promptfile import PLAIN, read_prompt_file

    path = _write(tmp_path / "p.csv", "prompt,seed,concept\na red circle,3,\nan image of a ring,12,Ring\n"
                                      "\n a circle ,0,circle\n")
    rows, info = read_prompt_file(path, ["circle", "ring"], "circle")
    assert info["format"] == PLAIN and info["columns"] == ["prompt", "seed", "concept"]
    assert [(r.prompt, r.seed, r.concept, r.guidance) for r in rows] == [
        ("a red circle", 3, "circle", None), ("an image of a ring", 12, "ring", None), ("a circle", 0, "circle", None)]
    assert [r.row for r in rows] == [1, 2, 3]  # a blank line is no row
    two = _write(tmp_path / "two.csv", "seed,prompt\n5,a circle\n6,a square\n")  # no concept column
    rows, _ = read_prompt_file(two, ["circle"], "circle", max_prompts=1)
    assert [(r.prompt, r.seed, r.concept) for r in rows] == [("a circle", 5, "circle")]


BAD_FILES = {  # file text -> what the one error line must say
    "seed,concept\n3,garbage truck\n": ["line 1 (header)", "no 'prompt' column"],
    "prompt,concept\na truck,garbage truck\n": ["line 1 (header)", "no 'seed' column"],
    "prompt,seed\na truck,1\n  ,2\n": ["row 2 (line 3)", "prompt is empty"],
    "prompt,seed\na truck,1.5\n": ["row 1 (line 2)", "'1.5' is not a whole number"],
    "prompt,seed\na truck,x\n": ["row 1 (line 2)", "'x' is not a whole number"],
    "prompt,seed\na truck,-4\n": ["row 1 (line 2)", "'-4'"],
    "prompt,seed,concept\na truck,1,garbage truck\na dog,2,dog\n": ["row 2 (line 3)", "concept 'dog' is not erased"],
    "prompt,seed,concept\na truck\n": ["row 1 (line 2)", "no value in column 'seed'"],
    UDA_HEADER + "\n" + UDA_ROWS[0].replace(",932309623,7,", ",932309623,strong,") + "\n":
        ["row 1 (line 2)", "evaluation_guidance 'strong'"],
    "": ["is empty"],
    "prompt,seed\n": ["holds no prompt"],
}


def test_bad_rows_are_one_line_and_exit_2(attack_tiny_run, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    for n, (text, wanted) in enumerate(BAD_FILES.items()):
        path = _write(tmp_path / f"bad{n}.csv", text)
        code = main(["attack", "--run", attack_tiny_run, "--prompts", path, "--output", str(out), "--device", "cpu",
                     "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: ") and "\n" not in err, (text, err)
        assert f"prompt file {path}" in err and all(w in err for w in wanted), (text, err)
        assert not out.exists()
    good = _write(tmp_path / "good.csv", "prompt,seed\na truck,1\n")
    for argv, wanted in ((["--prompts", str(tmp_path / "none.csv")], "does not exist"),
                         (["--prompts", good, "--prompt", "a truck"], "exclude each other"),
                         (["--prompts", good, "--attacks", "rephrase"], "leave 'rephrase' out"),
                         (["--max-prompts", "2"], "pass --prompts FILE too"),
                         (["--prompts", good, "--max-prompts", "0"], "--max-prompts")):
        code = main(["attack", "--run", attack_tiny_run, "--output", str(out), "--device", "cpu", *argv])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: ") and "\n" not in err and wanted in err, (argv, err)
    assert not out.exists()


def test_tiny_prompt_file_end_to_end(attack_tiny_run, tmp_path, capsys):  # noqa: F811
    """3 rows of 4 attacked (--max-prompts 3): rows 1 and 2 the same prompt on other seeds, row 3
    row 1's prompt and seed with another guidance (UnlearnDiffAtk format)."""
    path = _write(tmp_path / "p.csv", "case_number,prompt,evaluation_seed,evaluation_guidance\n"
                                      "10,garbage truck,5,7.5\n11,garbage truck,9,7.5\n"
                                      "12,garbage truck,5,2\n13,a fourth prompt,1,7.5\n")
    out = tmp_path / "atk"
    argv = ["attack", "--run", attack_tiny_run, "--prompts", path, "--max-prompts", "3", "--output", str(out),
            "--attacks", "prompt,blackbox", "--attack-steps", "2", "--restarts", "1", "--prefix-tokens", "2",
            "--target-images", "1", "--probes", "2", "--attack-batch", "2", "--population", "4",
            "--blackbox-tokens", "2", "--images", "1", "--steps", "2", "--device", "cpu", "--grid-size", "2"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "attacked 3 prompt(s)" in text and "prompts.csv" in text
    rep = json.loads((out / "attack.json").read_text())
    assert rep["prompts"]["format"] == "unlearndiffatk" and rep["prompts"]["rows"] == 4
    rows = rep["rows"]
    assert [r["seed"] for r in rows] == [5, 9, 5] and [r["seeds"] for r in rows] == [[5], [9], [5]]
    assert [r["guidance"] for r in rows] == [7.5, 7.5, 2.0] and [r["case_number"] for r in rows] == ["10", "11", "12"]
    for r in rows:
        assert set(r["attacks"]) == {"prompt", "blackbox"} and r["truncated"] is False
        assert r["attacks"]["prompt"]["prompt"].endswith(" garbage truck") and r["rates"]["base"] is None
    assert set(rep["attacks"]) == {"prompt", "blackbox"} and rep["attacks"]["prompt"]["prompts"] == 3
    assert rep["attacks"]["prompt"]["cost"]["optimisation_steps"] == 3 * 2 and rep["attacks"]["blackbox"]["rate"] is None
    # prompts.csv: one line per row and attack, the adversarial prompt found
    with open(out / "prompts.csv", newline="") as fh:
        lines = list(csv.DictReader(fh))
    assert [(x["row"], x["attack"]) for x in lines] == [(str(i), a) for i in (1, 2, 3) for a in ("prompt", "blackbox")]
    assert [x["adversarial_prompt"] for x in lines] == [r["attacks"][a]["prompt"] for r in rows
                                                        for a in ("prompt", "blackbox")]
    # the images: each row's own seed and guidance
    img = {(r["row"], k): np.asarray(Image.open(out / r["images"][k][0])) for r in rows for k in r["images"]}
    assert rows[0]["images"]["base"] == ["images/row0001_base_seed5.png"]
    assert not np.array_equal(img[1, "base"], img[2, "base"])  # seed 5 vs 9
    assert not np.array_equal(img[1, "base"], img[3, "base"])  # guidance 7.5 vs 2
    assert set(k for (_, k) in img) == {"base", "erased", "attacked", "blackbox"}
    grid = Image.open(out / "grid.png")
    assert grid.size[0] == 110 + 2 * 96 and grid.size[1] == 4 * 96  # 2 columns (capped), 4 rows of images
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atk", "p.csv"]


def test_long_prompts_are_cut_to_fit(attack_tiny_run):  # noqa: F811
    from ap_erase_fast.attack.promptfile import fit_prompt
    from ap_erase_fast.attack.whitebox import PromptEncoder
    from ap_erase_fast.models.loading import load_components

    comps = load_components("tiny", device="cpu")
    enc = PromptEncoder(comps.text_encoder, comps.tokenizer)
    long = " ".join(["garbage truck"] * 50)
    text, cut = fit_prompt(enc, long, 70)
    assert cut and len(enc.word_ids(text)) <= 70 and len(enc.word_ids(text + " truck")) > 70
    assert long.startswith(text) and fit_prompt(enc, "a truck", 70) == ("a truck", False)
    with pytest.raises(UserError):
        enc.ids(enc.word_ids(long))
