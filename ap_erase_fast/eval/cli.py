"""``ap-erase eval`` arguments and entry point (placeholder until the eval layer lands)."""
from __future__ import annotations

import argparse

from ..errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", metavar="DIR", help="output folder of an 'ap-erase train' run")


def run(args: argparse.Namespace) -> int:
    raise UserError("ap-erase eval is not available yet")
