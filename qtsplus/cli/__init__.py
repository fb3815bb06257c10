"""Command line: `qtsplus build-dataset | cache-features | train-selector | evaluate | retrain | serve` (see --help).

Each command builds its typed config (a preset, its own arguments, then `--set` overrides), prints it with
`--show-config`, or runs its Prefect flow in this process. The commands are rows of `qtsplus.cli.commands.COMMANDS`.
With no Prefect server configured (PREFECT_API_URL unset), flows run against a local API that the first command
starts and later commands reuse (`qtsplus.cli.local_api`), so nothing needs to be started first.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from pydantic import ValidationError

from qtsplus.cli.commands import COMMANDS, Command

# Prefect reads its settings at import: offline, INFO logs to the API (the run's Logs tab tells the story: one summary
# line per stage), warnings only on the console, unless told otherwise.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
# Prefect's own temporary server (QTSPLUS_LOCAL_API=off) gives up after 20 s, which a busy machine exceeds.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command. Only the command `argv` names loads its preset table (for `--preset` choices),
    so that a command does not import the others' configs (cache-features' would import torch)."""
    selected = next((a for a in argv or () if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(prog="qtsplus", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help,
                           epilog="examples:\n  " + "\n  ".join(command.examples) if command.examples else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        for arg in command.args:
            p.add_argument(arg.option, dest=arg.field, required=arg.required, help=arg.help, nargs=arg.nargs,
                           choices=arg.choices)
        if command.presets:
            choices = command.preset_names() if command.name == selected else None
            p.add_argument("--preset", default=command.default_preset, choices=choices,
                           help=f"named settings to start from (default: {command.default_preset})")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting by dotted key, e.g. --set max_steps=100; repeatable; values parse "
                            "as JSON when they can")
        p.add_argument("--show-config", action="store_true", help="print the resolved config as JSON and exit")
        if command.progress:
            p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.set_defaults(run=command)
    serve = sub.add_parser("serve", help="serve every flow as a Prefect deployment (needs PREFECT_API_URL)")
    from flows.deployments import add_serve_arguments

    add_serve_arguments(serve)
    return parser


def config_for(command: Command, args: argparse.Namespace) -> Any:
    """The command's typed config: preset, then its own arguments, then `--set` overrides."""
    from qtsplus.presets import apply_overrides

    fields = {arg.field: getattr(args, arg.field) for arg in command.args}
    return apply_overrides(command.build_config(getattr(args, "preset", None), fields), args.overrides)


def run(command: Command, args: argparse.Namespace) -> int:
    try:
        config = config_for(command, args)
    except (ValueError, ValidationError) as err:  # a bad preset, argument or override: say what, not where
        print(f"qtsplus {command.name}: {err}", file=sys.stderr)
        return 2
    if args.show_config:
        print(config.model_dump_json(indent=2))
        return 0
    progress = command.progress and not args.no_progress
    if command.progress and not progress:
        os.environ["QTSPLUS_NO_PROGRESS"] = "1"
    from qtsplus.cli import local_api

    if local_api.enabled():
        local_api.ensure()
    flow = command.load(command.flow)
    result = flow(config=config, progress=progress) if command.progress else flow(config=config)
    command.printer(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    if args.command == "serve":
        from flows.deployments import serve_main

        return serve_main(args)
    return run(args.run, args)
