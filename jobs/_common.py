"""Shared launcher bits: the library's `nearid.launch` behind an argparse parser per job."""
from __future__ import annotations

import argparse

from nearid.launch import add_stage_args, setup


def parse(stage: str, description: str, argv=None, extra=None):
    parser = argparse.ArgumentParser(description=description)
    add_stage_args(parser)
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    cfg, storage = setup(stage, args)
    return args, cfg, storage
