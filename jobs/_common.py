"""Shared launcher bits: parse `--config/--set`, open storage, save the resolved config."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from nearid.cluster import EndpointError, check_endpoints
from nearid.config import ConfigError, add_config_args, dump_yaml, load_config
from nearid.storage import Storage, StorageError


def parse(stage: str, description: str, argv=None, extra=None):
    parser = argparse.ArgumentParser(description=description)
    add_config_args(parser)
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        if "://" not in cfg.run.root:
            # workers (Ray Train, actors) run in other folders: pin the local root to this one
            cfg.run.root = os.path.abspath(cfg.run.root)
        storage = Storage.open(cfg.run.root, cfg.storage)
        storage.check()
        check_endpoints(cfg)   # a dead Ray address or MLflow server: one clear error, not a hang
    except (ConfigError, StorageError, EndpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    storage.write_bytes(f"config/{stage}.yaml", dump_yaml(cfg).encode())
    return args, cfg, storage
