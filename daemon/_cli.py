"""The ``scopestream`` command line.

Start-up is cheap: this module imports only the standard library at the top, each command imports
what it needs when it runs, and the commands that live in other modules (:data:`LAZY_COMMANDS`)
are listed by name and help only; their module is imported (and their real parser built) only
when that command is run or asks for its ``--help``. ``scopestream --version`` and ``scopestream
config --check`` import neither torch nor the simulators (``tests/test_cli.py`` checks
``sys.modules``).

SIGINT and SIGTERM are caught from the first line of :func:`main`: during ``run`` they end the run
with ``run_stop`` and ``exit_status: "aborted"`` (also when they arrive while it is still starting);
any other command ends with a one-line message and exit status 128 + the signal number.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from scopestream import __version__
from scopestream.daemon._errors import ConfigError, InputError

if TYPE_CHECKING:
    from scopestream.daemon._config import ScopestreamConfig

log = logging.getLogger("scopestream")

LAZY_COMMANDS: tuple[tuple[str, str, str, str], ...] = (
    ("simulate", "write a simulated movie and its exact ground truth",
     "scopestream.sim_camera.cli", "add_simulate_command"),
    ("musical", "MUSICAL super-resolution image(s) of a recorded stack",
     "scopestream.plugins.musical_cli", "add_musical_command"),
    ("report", "an HTML report with plots from analyze's result tables",
     "scopestream.daemon._report", "add_report_command"),
    ("train", "train a network on simulated data (scopestream train motion ...)",
     "scopestream.models.cli", "add_train_command"),
)
"""(command, one-line help, module, function): ``module.function(subparsers)`` adds the command's
real parser, whose handler imports the implementation when run. Add ``train``, ``report`` here."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM ended a command other than ``run`` (a BaseException, like KeyboardInterrupt)."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


class SignalLatch:
    """SIGINT/SIGTERM handling from the first instant of :func:`main`.

    Until a command says what a signal means, a signal is only remembered (so start-up never
    dies with a KeyboardInterrupt traceback). ``run`` hands it a callback that stops the daemon;
    every other command asks it to raise :class:`Interrupted`.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._on_signal: Callable[[str], None] | None = None
        self._raise = False

    def install(self) -> dict[signal.Signals, Any]:
        """Install the handlers; returns the previous ones."""
        return {signum: signal.signal(signum, self._handle) for signum in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        self.received = self.received or name
        if self._on_signal is not None:
            self._on_signal(name)
        elif self._raise:
            raise Interrupted(name)

    def call_on_signal(self, callback: Callable[[str], None]) -> None:
        """From now on a signal calls ``callback(name)``; one already received calls it at once."""
        self._on_signal = callback
        if self.received is not None:
            callback(self.received)

    def raise_on_signal(self) -> None:
        """From now on a signal raises :class:`Interrupted`; one already received raises it at once."""
        self._raise = True
        if self.received is not None:
            raise Interrupted(self.received)


_SIGNALS = SignalLatch()


def _add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="configuration file (YAML or TOML)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override one configuration key (dotted path); repeatable")


def _cmd_run(args: argparse.Namespace) -> int:
    from scopestream.daemon._config import load_config
    from scopestream.daemon._service import Daemon

    config = load_config(args.config, args.overrides)
    _explain_micromanager_discovery(config)
    daemon = Daemon(config)
    # A signal that came while the daemon was being built stops it now: run_start, then at once
    # run_stop with exit_status "aborted".
    _SIGNALS.call_on_signal(lambda name: daemon.stop(f"{name} received", exit_status="aborted"))
    log.info(
        "scopestream %s: events on %s, control on %s, metrics %s",
        __version__, daemon.events_endpoint, daemon.control_endpoint,
        f"on http://{config.metrics.host}:{daemon.metrics_port}/metrics" if daemon.metrics_port is not None else "off",
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


def _explain_micromanager_discovery(config: ScopestreamConfig) -> None:
    """Keep pymmcore-plus's "Could not find a compatible Micro-Manager installation" to the
    configurations it concerns, and then say what to install.

    pymmcore-plus looks for a Micro-Manager installation whenever a core is created
    (``CMMCorePlus.__init__`` calls ``find_micromanager()``), and logs an ERROR on its logger
    ``pymmcore-plus`` when there is none, although a configuration of Python devices (the
    simulated cameras) or one whose adapter folders are given needs no installation.
    """
    if config.source.kind != "micromanager":
        return
    from scopestream.daemon._sources import resolve_mm_config

    try:
        cfg_path, adapter_paths = resolve_mm_config(config.source.mm_config)
    except ConfigError:
        return  # the source reports it when it opens
    needs_cpp = _needs_cpp_adapters(cfg_path)
    has_paths = bool(adapter_paths or config.source.mm_adapter_paths)
    logging.getLogger("pymmcore-plus").addFilter(
        _MicroManagerDiscoveryFilter(str(cfg_path) if needs_cpp and not has_paths else None)
    )


def _needs_cpp_adapters(cfg_path: Path) -> bool:
    """Whether a Micro-Manager configuration loads C++ device adapters (uncommented Device lines);
    the simulated cameras' files declare Python devices only, on ``#py`` lines."""
    try:
        text = cfg_path.read_text(errors="replace")
    except OSError:
        return True
    return any(line.strip().startswith("Device,") for line in text.splitlines())


class _MicroManagerDiscoveryFilter(logging.Filter):
    """Drops pymmcore-plus's discovery error, or (``needing`` a config path) rewrites it into
    what to install for that configuration."""

    def __init__(self, needing: str | None) -> None:
        super().__init__()
        self._needing = needing

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Could not find a compatible Micro-Manager installation"):
            return True
        if self._needing is None:
            return False
        record.msg = (
            f"no Micro-Manager installation found, and {self._needing!r} loads C++ device adapters: "
            "install the DemoCamera adapters with `pip install 'scopestream[demo]'`, install "
            "Micro-Manager (`mmcore install`), or name adapter folders in source.mm_adapter_paths"
        )
        record.args = None
        return True


def _cmd_analyze(args: argparse.Namespace) -> int:
    from scopestream.daemon._config import load_config
    from scopestream.daemon._service import Daemon

    # Every frame of the file, nothing dropped, no ports: analyze is a batch job.
    preset = {"source.kind": "file", "source.file_path": str(args.input), "source.replay_fps": None,
              "bus.policy": "block", "metrics.enabled": False,
              "musical.skip_when_busy": False, "motion.skip_when_busy": False,
              "diffusion.network_skip_when_busy": False}  # windows wait for the workers
    config = load_config(args.config, args.overrides, preset)
    out = Path(args.out)
    if args.report is not None:
        from scopestream.daemon._report import require_matplotlib

        require_matplotlib()  # before a long run, not after
    daemon = Daemon(config, serve_events=args.publish, serve_control=False, results_dir=str(out))
    stop = daemon.run_until_stopped()
    assert stop is not None
    summary = {"run_id": daemon.run_id, **stop.model_dump(mode="json"),
               "tables": daemon.tables.rows_written if daemon.tables else {}}
    (out / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
    if stop.exit_status == "failed":
        raise InputError(stop.reason)
    print(json.dumps(summary))
    if args.report is not None:
        from scopestream.daemon._config import config_to_dict
        from scopestream.daemon._report import write_report

        report = Path(args.report) if args.report else out / "report.html"
        write_report(out, report, config_to_dict(config))
        log.info("wrote %s", report)
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
    from scopestream.daemon._config import config_to_dict, default_config_yaml, load_config

    if args.print_default:
        sys.stdout.write(default_config_yaml())
        return 0
    config = load_config(args.check, args.overrides)
    print(f"{args.check}: valid; stages {config.stages}")
    if args.verbose:
        print(json.dumps(config_to_dict(config), indent=2))
    return 0


def build_parser(load: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The command-line parser; the :data:`LAZY_COMMANDS` named in ``load`` get their real
    parser (their module imported), the others a placeholder that only names them."""
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
    p.add_argument("--report", nargs="?", const="", default=None, metavar="FILE",
                   help="also write the HTML report (default FILE: <out>/report.html; needs matplotlib)")
    _add_config_options(p)
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("config", help="print the default configuration or check a file")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--print-default", action="store_true", help="print the default configuration (YAML)")
    g.add_argument("--check", metavar="FILE", help="validate a configuration file")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides")
    p.set_defaults(func=_cmd_config)

    for name, help_text, module, adder in LAZY_COMMANDS:
        if name in load:
            from importlib import import_module

            try:
                mod = import_module(module)
            except ImportError as exc:
                raise InputError(f"the {name!r} command is unavailable: {exc}") from None
            getattr(mod, adder)(sub)
            continue
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.set_defaults(lazy_command=name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``scopestream`` command line; returns the exit status (0, 2 on bad input, 128 + n
    when signal n ended a command other than ``run``)."""
    global _SIGNALS
    _SIGNALS = SignalLatch()
    previous = _SIGNALS.install() if threading_is_main() else None  # first: never a start-up traceback
    try:
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
        if getattr(args, "lazy_command", None):  # that command's real parser, now that it runs
            parser = build_parser(load=[args.lazy_command])
            args = parser.parse_args(argv)
        elif unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        for handler in logging.getLogger().handlers:
            # pymmcore-plus sets its own logger to DEBUG; without -v its records stop here
            handler.setLevel(logging.DEBUG if args.verbose else logging.INFO)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return 2
        if args.func is not _cmd_run:
            _SIGNALS.raise_on_signal()
        return int(args.func(args))
    except (ConfigError, InputError, OSError) as exc:
        print(f"scopestream: error: {exc}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as exc:
        name = exc.signal_name if isinstance(exc, Interrupted) else "SIGINT"
        print(f"scopestream: interrupted by {name}", file=sys.stderr)
        return 128 + int(signal.Signals[name])
    finally:
        if previous is not None:  # main called in-process (tests): give the handlers back
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def threading_is_main() -> bool:
    """Signal handlers can be installed only from the main thread (tests call main from others)."""
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
