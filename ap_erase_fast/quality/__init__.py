"""The quality instrument: erasure and preservation measured end to end on the ShapesWorld
models (``ap-erase bench quality``, ``ap-erase bench ablations``; docs/BENCHMARKS.md).

Its layers, lowest first (docs/DESIGN.md, "Architecture"):

* :mod:`.worlds` — what the shapes worlds expose to the instrument (model, classifier, prompts);
* :mod:`.metrics` — ESR / PSR of a judged erasure, the near sets and PSR-near / PSR-far;
* :mod:`.statistics` — matched-ESR interpolation, paired differences, sign tests, Holm;
* :mod:`.runs` — one erasure judged at its step budgets, and the resume keys;
* :mod:`.plots`, :mod:`.report` — the figures and the markdown report;
* :mod:`.cli` — ``ap-erase bench quality``;
* :mod:`.ablations` — a study over finished ablation tables (``ap-erase bench ablations``).

Importing the package imports none of them.
"""
