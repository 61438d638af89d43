"""The ``ghappd`` command line."""

from __future__ import annotations

import argparse

from daemon import __version__

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ghappd")
    parser.add_argument("--version", action="version", version=__version__)
    parser.parse_args(argv)
    return 0
