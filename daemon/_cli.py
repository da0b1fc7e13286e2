"""The ``scopestream`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from scopestream import __version__
from scopestream.daemon._config import (
    ConfigError,
    config_to_dict,
    default_config_yaml,
    load_config,
)
from scopestream.daemon._errors import InputError

log = logging.getLogger("scopestream")


def _add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="configuration file (YAML or TOML)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override one configuration key (dotted path); repeatable")


def _cmd_run(args: argparse.Namespace) -> int:
    from scopestream.daemon._service import Daemon

    config = load_config(args.config, args.overrides)
    daemon = Daemon(config)
    stop_signal: list[str] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        stop_signal.append(name)
        daemon.stop(f"{name} received")

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    log.info(
        "scopestream %s: events on %s, control on %s, metrics on http://%s:%s/metrics",
        __version__, daemon.events_endpoint, daemon.control_endpoint, config.metrics.host, daemon.metrics_port,
    )
    stop = daemon.run_until_stopped()
    if stop is not None:
        log.info(
            "run %s ended (%s): %d frames received, %d processed, %d dropped",
            daemon.run_id, stop.reason, stop.frames_received, stop.frames_processed, stop.frames_dropped,
        )
        if stop.exit_status == "failed":
            print(f"scopestream: error: {stop.reason}", file=sys.stderr)
            return 1
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from scopestream.daemon._service import Daemon

    # Every frame of the file, nothing dropped, no ports: analyze is a batch job.
    preset = {"source.kind": "file", "source.file_path": str(args.input), "source.replay_fps": None,
              "bus.policy": "block", "metrics.enabled": False}
    config = load_config(args.config, args.overrides, preset)
    out = Path(args.out)
    daemon = Daemon(config, serve_events=args.publish, serve_control=False, results_dir=str(out))
    stop = daemon.run_until_stopped()
    assert stop is not None
    summary = {"run_id": daemon.run_id, **stop.model_dump(mode="json"),
               "tables": daemon.tables.rows_written if daemon.tables else {}}
    (out / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
    if stop.exit_status == "failed":
        raise InputError(stop.reason)
    print(json.dumps(summary))
    return 0


def _cmd_listen(args: argparse.Namespace) -> int:
    from scopestream.daemon.client import Subscriber

    with Subscriber(args.endpoint, topics=args.topic or ()) as sub:
        try:
            for msg in sub:
                line: dict[str, Any] = {"topic": msg.topic, "header": msg.header.model_dump(mode="json"), "body": msg.body}
                if args.arrays:
                    line["arrays"] = {k: v.tolist() for k, v in msg.arrays.items()}
                print(json.dumps(line), flush=True)
                if args.until_stop and msg.topic == "run_stop":
                    return 0
        except KeyboardInterrupt:
            return 0
        except BrokenPipeError:
            return 0
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    if args.print_default:
        sys.stdout.write(default_config_yaml())
        return 0
    config = load_config(args.check, args.overrides)
    print(f"{args.check}: valid; stages {config.stages}")
    if args.verbose:
        print(json.dumps(config_to_dict(config), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scopestream", description="Live analysis daemon for microscope cameras.")
    parser.add_argument("--version", action="version", version=f"scopestream {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="run the daemon (default: the embedded simulated camera, every stage)")
    _add_config_options(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("listen", help="print events as JSON lines")
    p.add_argument("--topic", action="append", help="topic to print (repeatable; default all)")
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5556", help="the daemon's events.endpoint")
    p.add_argument("--arrays", action="store_true", help="include array payloads as lists")
    p.add_argument("--until-stop", action="store_true", help="exit after run_stop")
    p.set_defaults(func=_cmd_listen)

    p = sub.add_parser("analyze", help="run the pipeline over a recorded stack and write result tables")
    p.add_argument("input", type=Path, help="multi-page TIFF / OME-TIFF")
    p.add_argument("--out", required=True, help="folder for the result tables")
    p.add_argument("--publish", action="store_true", help="also publish events on events.endpoint")
    _add_config_options(p)
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("config", help="print the default configuration or check a file")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--print-default", action="store_true", help="print the default configuration (YAML)")
    g.add_argument("--check", metavar="FILE", help="validate a configuration file")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides")
    p.set_defaults(func=_cmd_config)

    for module, adder in (("scopestream.sim_camera.cli", "add_simulate_command"),
                          ("scopestream.plugins.musical_cli", "add_musical_command"),
                          ("scopestream.models.motion.cli", "add_train_command")):
        try:
            mod = __import__(module, fromlist=[adder])
        except ImportError as exc:
            log.debug("command from %s unavailable: %s", module, exc)
            continue
        getattr(mod, adder)(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except (ConfigError, InputError, OSError) as exc:
        print(f"scopestream: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
