"""The ``kzpool`` command: ``serve``, ``check``, ``status``, ``health``, ``example-config``."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence

from .client.pool import PoolClient
from .common import config as config_mod
from .common import exitcodes, logs
from .common.errors import ConfigError, KzpoolError, PoolNotRunning
from .common.settings import CONSUMER_SETTINGS, SETTINGS

DEFAULT_CONFIG = "/etc/kzpool/config.ini"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kzpool", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the pool (master and workers)")
    check = commands.add_parser("check", help="validate a config file")
    status = commands.add_parser("status", help="show connections and leases")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--socket", help="lease socket (default: from the config)")
    health = commands.add_parser(
        "health", help="exit 0 if the master answers and the local zone has a primary, else 1")
    health.add_argument("--socket", help="lease socket (default: from the config)")
    health.add_argument("--timeout", type=float, default=5.0,
                        help="seconds to wait for the master's answer (default 5)")
    for command in (serve, check, status, health):
        command.add_argument("-c", "--config", default=DEFAULT_CONFIG,
                             help=f"config file (default {DEFAULT_CONFIG})")
    for setting in SETTINGS:
        if setting.cli:
            serve.add_argument(setting.flag, dest=f"set_{setting.name}", metavar="VALUE",
                               help=f"{setting.help} [pool] {setting.name}")
    commands.add_parser("example-config", help="print the [pool] section with every setting")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "example-config":
            print(example_consumer_section())
            print(example_pool_section())
            return exitcodes.OK
        if args.command == "status" and args.socket:
            return _status(args.socket, args.json)
        if args.command == "health" and args.socket:
            return _health(args.socket, args.timeout)
        overrides = {k[4:]: v for k, v in vars(args).items()
                     if k.startswith("set_") and v is not None}
        config = config_mod.load(args.config, overrides)
    except ConfigError as exc:
        if args.command == "health":  # a probe reads 0 or 1, and one line
            more = f" (and {len(exc.problems) - 1} more)" if len(exc.problems) > 1 else ""
            print(f"kzpool: unhealthy: invalid config: {exc.problems[0]}{more}", file=sys.stderr)
            return exitcodes.ERROR
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return exitcodes.CONFIG
    except KzpoolError as exc:
        print(f"kzpool: {exc}", file=sys.stderr)
        return exitcodes.ERROR
    if args.command == "check":
        print(f"{config.path}: ok ({len(config.brokers)} broker(s), local zone"
              f" {config.local_zone})")
        return exitcodes.OK
    if args.command == "status":
        return _status(config.settings.socket, args.json)
    if args.command == "health":
        return _health(config.settings.socket, args.timeout)
    return _serve(config)


def _serve(config: config_mod.Config) -> int:
    from .master.master import Master  # deferred: `check` and `status` stay light

    logs.setup(config.settings.log_level, config.passwords)
    try:
        return Master(config).run()
    except KzpoolError as exc:
        print(f"kzpool: {exc}", file=sys.stderr)
        return exitcodes.ERROR


def _status(socket_path: str, as_json: bool) -> int:
    """The tables from the registry (the pool's own user may read them there, without a
    round trip through the master's loop), else from the master."""
    from .common.status import document, render
    from .master import registry

    try:
        reply = document(registry.read(socket_path, timeout=0.0))
    except (OSError, KzpoolError):
        try:
            reply = PoolClient(socket_path).status()
        except PoolNotRunning as exc:
            print(f"kzpool: {exc}", file=sys.stderr)
            return exitcodes.NO_POOL
        except (KzpoolError, OSError) as exc:
            print(f"kzpool: the pool at {socket_path} did not answer: {exc}", file=sys.stderr)
            return exitcodes.ERROR
    reply.pop("ok", None)
    print(json.dumps(reply, indent=2) if as_json else render(reply))
    return exitcodes.OK


def _health(socket_path: str, timeout: float) -> int:
    """One line, exit 0 or 1.  The master itself is asked (not the registry, which answers
    while the master is stopped): its answer is the proof it runs its loop."""
    from .client.pool import UnixBackend, call
    from .common import messages
    from .common.status import health

    try:
        verdict = health(call(UnixBackend(), socket_path, messages.StatusRequest(), timeout))
    except PoolNotRunning as exc:
        print(f"kzpool: unhealthy: {exc}", file=sys.stderr)
        return exitcodes.ERROR
    except (KzpoolError, OSError) as exc:
        print(f"kzpool: unhealthy: the pool at {socket_path} did not answer within"
              f" {timeout:g} s: {exc or type(exc).__name__}", file=sys.stderr)
        return exitcodes.ERROR
    if not verdict.ok:
        print(f"kzpool: unhealthy: {verdict.reason}", file=sys.stderr)
        return exitcodes.ERROR
    print(f"kzpool: healthy: {verdict.reason}")
    return exitcodes.OK


def example_consumer_section() -> str:
    """A commented ``[consumer:NAME]`` section with every key, from its settings table."""
    lines = ["; In-service consumers: one [consumer:NAME] section each; the pool forks its",
             "; processes and restarts them. Every key, with its default:", ";",
             "; [consumer:billing]"]
    for setting in CONSUMER_SETTINGS:
        default = setting.default if setting.default is not None else (
            "(required)" if setting.name == "handler" else "")
        lines += textwrap.wrap(f"{setting.name} = {default}   ; {setting.help}", 94,
                               initial_indent="; ", subsequent_indent=";     ")
    return "\n".join(lines) + "\n"


def example_pool_section() -> str:
    """The ``[pool]`` section of config.ini.example, derived from the settings table."""
    lines = ["[pool]"]
    for setting in SETTINGS:
        lines += textwrap.wrap(setting.help, 94, initial_indent="; ", subsequent_indent="; ")
        if setting.env:
            lines.append(f"; Environment: {setting.env}. Flag: {setting.flag}.")
        else:
            lines.append(f"; Flag: {setting.flag}.")
        default = setting.default if setting.default is not None else ""
        lines.append(f";{setting.name} = {default}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.exit(main())
