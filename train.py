#!/usr/bin/env python
"""Launcher entry: ``python train.py --config run.yaml [flags]`` is ``ap-erase train``.

Takes every flag of ``ap-erase train``; ``--config`` is a YAML/JSON file of those settings.
"""
import sys

from ap_erase_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
