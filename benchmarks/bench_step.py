#!/usr/bin/env python
"""Outer steps/s and peak memory of the AP loop; see ``ap_erase_fast/bench.py`` (same as
``ap-erase bench step``).

    python benchmarks/bench_step.py --preset tiny                 # CPU
    python benchmarks/bench_step.py --preset sd14                 # GPU, all configurations
    python benchmarks/bench_step.py --preset sd14 --memory-cap-gib 22 --tag cap22
"""
import sys

from ap_erase_fast.bench import main

if __name__ == "__main__":
    sys.exit(main())
