"""The ``flow-repository`` command: serve, worker, token, openapi, backup, restore, and the
client commands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from flow_repository.client import cli as client_cli
from flow_repository.settings import MEMORY_DATABASE, Settings, SettingsError

GUNICORN_CONFIG = "python:flow_repository.server.gunicorn_conf"


def serve(settings: Settings) -> int:
    """Run the API under gunicorn with flow_repository/server/gunicorn_conf.py."""
    from gunicorn.app.base import Application as GunicornApplication

    from flow_repository.adapters.auth import build_authenticator
    from flow_repository.server.logs import configure_logging

    configure_logging(settings.log_level)
    try:
        # Checked (and the identity mode logged) once before any worker starts, so that a
        # refused setting stops the service with its reason instead of a failing worker.
        build_authenticator(settings)
    except SettingsError as error:
        print(f"flow-repository serve: {error}", file=sys.stderr)
        return 2

    class Application(GunicornApplication):
        def init(self, parser: Any, opts: Any, args: Any) -> None:
            return None

        def load_config(self) -> None:
            self.load_config_from_module_name_or_filename(GUNICORN_CONFIG)

        def load(self) -> Any:
            from flow_repository.entrypoints.app import create_app

            return create_app(settings, background=True)

    Application().run()
    return 0


def token(settings: Settings, arguments: argparse.Namespace) -> int:
    """Print a development JWT that the locally configured service accepts."""
    from flow_repository.adapters.auth import mint_token

    permissions = [p.strip() for p in arguments.permissions.split(",") if p.strip()]
    try:
        print(mint_token(settings, arguments.sub, arguments.tenant, permissions,
                         arguments.ttl))
    except ValueError as error:
        print(f"flow-repository token: {error}", file=sys.stderr)
        return 2
    return 0


def _embedded_file(settings: Settings, command: str) -> str | None:
    """The embedded database file ``command`` works on; None (and why, on stderr) if none."""
    if not settings.embedded:
        print(f"flow-repository {command}: MONGODB_URL is set; back up and restore MongoDB "
              "with mongodump and mongorestore (docs/scale.rst, Backup)", file=sys.stderr)
        return None
    if settings.embedded_database == MEMORY_DATABASE:
        print(f"flow-repository {command}: EMBEDDED_DB_PATH is :memory:, nothing is kept",
              file=sys.stderr)
        return None
    return settings.embedded_database


def backup(settings: Settings, arguments: argparse.Namespace) -> int:
    """Copy the embedded store into a file with SQLite's online backup, while it serves."""
    from flow_repository.adapters.store import SqliteFlowStore

    database = _embedded_file(settings, "backup")
    if database is None:
        return 2
    if not os.path.exists(database):
        print(f"flow-repository backup: there is no database at {database}", file=sys.stderr)
        return 2
    store = SqliteFlowStore.open(database)
    try:
        store.backup(arguments.output)
    finally:
        store.close()
    print(f"Backed up {database} to {arguments.output}.")
    return 0


def restore(settings: Settings, arguments: argparse.Namespace) -> int:
    """Replace the embedded store's data with a backup; refused while the service runs."""
    from flow_repository.adapters.store import SqliteFlowStore
    from flow_repository.server.bootstrap import database_in_use

    database = _embedded_file(settings, "restore")
    if database is None:
        return 2
    if not os.path.isfile(arguments.file):
        print(f"flow-repository restore: there is no file {arguments.file}", file=sys.stderr)
        return 2
    if database_in_use(database):
        # its processes hold the data in hand (leases, pending events): stop them first
        print(f"flow-repository restore: {database} is in use by serve or worker processes; "
              "stop them first", file=sys.stderr)
        return 3
    store = SqliteFlowStore.open(database)
    try:
        store.restore(arguments.file)
    except ValueError as error:
        print(f"flow-repository restore: {error}", file=sys.stderr)
        return 2
    finally:
        store.close()
    print(f"Restored {database} from {arguments.file}.")
    return 0


def openapi(settings: Settings) -> int:
    """Print the OpenAPI document the code generates."""
    print(openapi_document(settings))
    return 0


def openapi_document(settings: Settings | None = None) -> str:
    """The OpenAPI document as JSON; builds the app without touching any identity setup."""
    from flow_repository.adapters.auth import AuthError, Principal
    from flow_repository.entrypoints.app import create_app

    class NoCallers:
        def authenticate(self, token: str) -> Principal:
            raise AuthError("this app only prints its OpenAPI document")

    # no database of the user's is opened (or created) just to print the document
    app = create_app((settings or Settings.from_env({})).replace(
        log_level="ERROR", mongodb_url=None, embedded_db_path=MEMORY_DATABASE),
        authenticator=NoCallers())
    with app.app_context():
        spec = app.extensions["flask-smorest"]["apis"][""]["ext_obj"].spec.to_dict()
    return json.dumps(spec, indent=2, sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flow-repository", description=__doc__,
                                     epilog=client_cli.EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="serve the REST API (gunicorn)")
    commands.add_parser("worker", help="consume orchestrator and IAM events")
    minting = commands.add_parser("token", help="mint a local development token")
    minting.add_argument("--sub", required=True, help="the user id (sub claim)")
    minting.add_argument("--tenant", default=None, help="the tenant id")
    minting.add_argument("--permissions", default="all",
                         help="comma-separated permissions (default: all)")
    minting.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    commands.add_parser("openapi", help="print the OpenAPI document")
    backing_up = commands.add_parser(
        "backup", help="copy the embedded store (SQLite) into a file, also while it serves")
    backing_up.add_argument("-o", "--output", required=True, help="the backup file to write")
    restoring = commands.add_parser(
        "restore", help="replace the embedded store's data with a backup (service stopped)")
    restoring.add_argument("file", help="a file written by flow-repository backup")
    client_cli.register(commands)
    arguments = parser.parse_args(argv)
    if getattr(arguments, "handler", None) is not None:
        return client_cli.run(arguments)
    try:
        settings = Settings.from_env()
    except SettingsError as error:  # names the setting, its value and its range
        print(f"flow-repository {arguments.command}: {error}", file=sys.stderr)
        return 2
    if arguments.command == "serve":
        return serve(settings)
    if arguments.command == "worker":
        from worker.main import main as run_worker

        return run_worker(settings)
    if arguments.command == "token":
        return token(settings, arguments)
    if arguments.command == "backup":
        return backup(settings, arguments)
    if arguments.command == "restore":
        return restore(settings, arguments)
    return openapi(settings)


if __name__ == "__main__":
    sys.exit(main())
