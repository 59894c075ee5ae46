"""The ``sidegate`` command: serve, check, schema, mock."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import secrets
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
import yaml
from aiohttp import web

from sidegate.config import ConfigError, config_json_schema, load_config
from sidegate.middlewares.api_keys import hash_key, new_key
from sidegate.middlewares.errors import SidegateError

from .app import create_app, held_secrets, open_store
from .logs import configure_logging
from .reload import reload_config
from .usage import budget_report, parse_usage_query, usage_body
from .workers import WORKER_FLAG, run_workers, worker_count

__all__ = ["main"]

log = structlog.get_logger("sidegate")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidegate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True, help="the YAML config file")
    serve.add_argument("--host", help="overrides server.host")
    serve.add_argument("--port", type=int, help="overrides server.port")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    serve.add_argument(
        "--workers", type=worker_count, default=1, help="processes sharing the port (SO_REUSEPORT)"
    )
    serve.add_argument(
        "--loop",
        choices=LOOPS,
        default="auto",
        help="the event loop: uvloop when it is installed (auto, the default), or asyncio's own",
    )
    serve.add_argument(WORKER_FLAG, type=int, help=argparse.SUPPRESS)
    check = commands.add_parser("check", help="validate a config; exit 1 with every problem")
    check.add_argument("--config", required=True)
    commands.add_parser("schema", help="print the config's JSON Schema")
    keys = commands.add_parser("keys", help="manage proxy-issued API keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_commands.add_parser("new", help="mint a key; prints it once, and its config line")
    new.add_argument("--team", required=True)
    new.add_argument("--id", help="the key's id in config and logs (default: <team>-<random>)")
    new.add_argument("--role", action="append", default=[], help="a role, e.g. admin (repeatable)")
    new.add_argument(
        "--config", help="hash with this config's auth.pepper (hmac-sha256) instead of sha256"
    )
    usage = commands.add_parser("usage", help="print budgets and usage from the store")
    usage.add_argument("--config", required=True)
    usage.add_argument("--team", help="one team only")
    usage.add_argument("--from", dest="since", help="ISO 8601 (default: start of this month)")
    usage.add_argument("--to", dest="until", help="ISO 8601 (default: now)")
    usage.add_argument("--granularity", default="day", choices=["hour", "day", "month"])
    usage.add_argument("--json", action="store_true", help="one JSON document")
    mock = commands.add_parser("mock", help="run a built-in mock upstream")
    mock.add_argument("vendor", choices=["meridian", "meivan"])
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=9101)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "schema":
        schema = orjson.dumps(config_json_schema(), option=orjson.OPT_INDENT_2).decode()
        with contextlib.suppress(BrokenPipeError):
            print(schema)
        return 0
    if args.command == "check":
        try:
            load_config(args.config)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"{args.config}: ok")
        return 0
    if args.command == "keys":
        return _new_key(args)
    if args.command == "usage":
        return asyncio.run(_usage(args))
    if args.command == "mock":
        from .mock import meivan_app, meridian_app

        app = meridian_app() if args.vendor == "meridian" else meivan_app()
        web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)
        return 0
    if args.workers > 1 and args.worker_index is None:
        return run_workers(
            args.workers,
            sys.argv[1:] if argv is None else argv,
            config=args.config,
            port=args.port,
            log_level=args.log_level,
            log_format=args.log_format,
        )
    return _serve(args)


async def _usage(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    now = datetime.now(UTC)
    query = {
        "from": args.since or now.strftime("%Y-%m-01T00:00:00Z"),
        "to": args.until or now.isoformat(),
        "granularity": args.granularity,
    }
    try:
        since, until, granularity = parse_usage_query(query)
    except SidegateError as exc:
        print(f"sidegate usage: {exc.message}", file=sys.stderr)
        return 2
    stores = await open_store(config.store)
    try:
        budgets = await budget_report(config, stores, now=now, team=args.team)
        teams = [args.team] if args.team else sorted(config.teams)
        usage = {
            team: usage_body(await stores.ledger.aggregate(team, since, until, granularity))
            for team in teams
        }
    finally:
        await stores.close()
    if args.json:
        print(
            orjson.dumps({"budgets": budgets, "usage": usage}, option=orjson.OPT_INDENT_2).decode()
        )
        return 0
    print(f"{'team':<16}{'key':<16}{'period':<9}{'spent':>14}{'reserved':>12}{'limit':>12}  resets")
    for row in budgets:
        print(
            f"{row['team']:<16}{row['key_id'] or '-':<16}{row['period']:<9}"
            f"{row['spent_usd']:>14.6f}{row['reserved_usd']:>12.6f}{row['limit_usd']:>12.2f}"
            f"  {row['resets_at'] or '-'}"
        )
    print(f"\nusage {query['from']} .. {query['to']}")
    for team, body in usage.items():
        total = body["aggregate"]
        print(f"{team}: {_summary(total)}")
        for model, row in total["by_model"].items():
            print(f"  {model}: {_summary(row)}")
    return 0


def _summary(row: dict[str, Any]) -> str:
    return f"{row['requests']} requests, {row['total_tokens']} tokens, ${row['cost_usd']:.6f}"


def _new_key(args: argparse.Namespace) -> int:
    pepper = None
    if args.config:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 1
        if config.auth.pepper is None:
            print(
                f"{args.config}: auth.pepper is not set; omit --config for sha256", file=sys.stderr
            )
            return 1
        pepper = config.auth.pepper.get_secret_value().encode()
    key = new_key()
    key_id = args.id or f"{args.team}-{secrets.token_hex(3)}"
    entry: dict[str, object] = {"id": key_id, "team": args.team, "hash": hash_key(key, pepper)}
    if args.role:
        entry["roles"] = args.role
    line = yaml.safe_dump(entry, default_flow_style=True, sort_keys=False, width=1 << 16).strip()
    print(f"key: {key}")
    print("  (shown once: give it to its owner now; sidegate keeps only the hash)")
    print("add under auth.api_keys:")
    print(f"  - {line}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        new_loop = event_loop_factory(args.loop)
    except RuntimeError as exc:
        print(f"sidegate: {exc}", file=sys.stderr)
        return 2
    app = create_app(config, source=args.config)  # the file is read once
    configure_logging(args.log_level, args.log_format, secrets=lambda: held_secrets(app))
    gc.collect()  # what loading left behind; start-up's survivors are frozen once it is done
    app.on_startup.append(_on_sighup_reload)
    app.on_startup.append(_freeze_startup_objects)
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    loop = new_loop()
    log.info("serving", host=host, port=port, config=args.config, loop=loop_name(loop))
    web.run_app(
        app,
        host=host,
        port=port,
        # aiohttp reads 0 as "no limit"; a grace of 0 means "do not wait".
        shutdown_timeout=max(config.server.shutdown_grace_s, 0.001),
        access_log=None,
        print=None,
        reuse_port=True if args.worker_index is not None else None,
        loop=loop,
    )
    return 0


LOOPS = ("auto", "uvloop", "asyncio")


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """What makes ``sidegate serve``'s event loop: ``uvloop``, ``asyncio`` or ``auto`` (uvloop
    when it can be imported, else asyncio's). RuntimeError when uvloop is asked for and missing.

    uvloop is a dependency wherever it builds (not on Windows or PyPy). It runs the same
    requests in fewer instructions than asyncio's loop: 12% fewer for the bare chain, 9% for
    the full one (valgrind, ``bench/instructions.sh``). Only ``serve`` chooses; an app that
    mounts sidegate runs on the host application's loop.
    """
    if choice not in LOOPS:
        raise ValueError(f"unknown event loop {choice!r}")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise RuntimeError("--loop uvloop, but uvloop is not installed") from None
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio``: the package ``loop``'s class comes from."""
    return type(loop).__module__.partition(".")[0]


async def _freeze_startup_objects(app: web.Application) -> None:
    """Keep the garbage collector off what start-up built, and off requests in flight.

    Start-up's objects (modules, config, tables, the upstream session) live as long as the
    process: frozen, no full collection walks them again. Requests leave next to no reference
    cycles behind (a closed connection does), but the default young-generation threshold (700)
    makes the collector run every few requests and walk the objects of every request in
    flight; 10,000 makes that rare.
    """
    gc.freeze()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


_GC_YOUNG_THRESHOLD = 10_000


async def _on_sighup_reload(app: web.Application) -> None:
    tasks: set[asyncio.Task[bool]] = set()

    def reload() -> None:
        task = asyncio.create_task(reload_config(app))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)
