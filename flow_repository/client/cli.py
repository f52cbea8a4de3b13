"""The client side of the ``flow-repository`` command: ``flows ...``, ``apply`` and ``export``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml

from flow_repository.client.gitops import (
    ApplyOptions,
    Change,
    ManifestError,
    Plan,
    apply_plan,
    export_flows,
    load_manifests,
    make_plan,
)
from flow_repository.client.rest import (
    Conflict,
    FlowRepositoryClient,
    FlowRepositoryError,
    Forbidden,
    Gone,
    NotFound,
    PreconditionFailed,
    StatusTimeout,
    TooManyRequests,
    Unauthorized,
    Unavailable,
    ValidationError,
)

DEFAULT_URL = "http://localhost:3001"

# Exit codes scripts can rely on (also in docs/client.rst and in --help).
OK, FAILED, USAGE, NOT_FOUND, CONFLICT, INVALID, REFUSED, UNAVAILABLE, TIMEOUT = range(9)
EXIT_CODES = f"""exit codes:
  {OK}  success (apply: every change made, or nothing to change)
  {FAILED}  any other failure
  {USAGE}  wrong arguments
  {NOT_FOUND}  no such flow (or not visible to the caller)
  {CONFLICT}  conflict: the flow's status or revision forbids the change; for apply, a flow
     changed since the plan, or a running flow must change (see --restart)
  {INVALID}  invalid input: a malformed file, or a flow the service refuses (400)
  {REFUSED}  the token is missing, wrong or expired (401), or lacks a permission (403)
  {UNAVAILABLE}  the service, its IAM or its database is unavailable (503, unreachable)
  {TIMEOUT}  timed out waiting for a status (--wait, --restart)
"""
EXIT_BY_ERROR: tuple[tuple[type[FlowRepositoryError], int], ...] = (
    (StatusTimeout, TIMEOUT), (NotFound, NOT_FOUND), (Conflict, CONFLICT),
    (PreconditionFailed, CONFLICT), (ValidationError, INVALID), (Unauthorized, REFUSED),
    (Forbidden, REFUSED), (Unavailable, UNAVAILABLE), (TooManyRequests, UNAVAILABLE),
    (Gone, FAILED),
)
EXIT_BY_OUTCOME = {"conflict": CONFLICT, "blocked": CONFLICT, "invalid": INVALID,
                   "timeout": TIMEOUT}


class Progress:
    """One self-overwriting status line on stderr, only when stderr is a terminal."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self.enabled = self._stream.isatty()
        self._shown = False

    def show(self, text: str) -> None:
        if self.enabled:
            self._stream.write("\r\033[K" + text)
            self._stream.flush()
            self._shown = True

    def done(self) -> None:
        if self._shown:
            self._stream.write("\r\033[K")
            self._stream.flush()
            self._shown = False


# ----------------------------------------------------------------------------- arguments


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``flows``, ``apply`` and ``export`` to the ``flow-repository`` command."""
    connection = argparse.ArgumentParser(add_help=False)
    group = connection.add_argument_group("connection")
    group.add_argument("--url", default=None,
                       help=f"service URL (default: $FLOW_REPOSITORY_URL or {DEFAULT_URL})")
    group.add_argument("--token", default=None,
                       help="bearer token (default: $FLOW_REPOSITORY_TOKEN)")
    group.add_argument("--timeout", type=float, default=10.0,
                       help="seconds per HTTP request (default: 10)")
    group.add_argument("--retries", type=int, default=3,
                       help="extra attempts of a safe request after a 503 (default: 3)")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("-o", "--output", choices=("table", "json"), default="table",
                        help="output format (default: table)")
    formatter = argparse.RawDescriptionHelpFormatter

    flows = commands.add_parser("flows", help="list, read, start, stop and delete flows",
                                epilog=EXIT_CODES, formatter_class=formatter)
    actions = flows.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", parents=[connection, output], epilog=EXIT_CODES,
                                 formatter_class=formatter, help="list the flows you can see")
    listing.add_argument("--status", help="inactive, starting, active or stopping")
    listing.add_argument("--type", help="flow type, e.g. ordinary or realtime")
    listing.add_argument("--user", help="only flows this user owns")
    listing.add_argument("--from-template", help="only flows made from this template id")
    listing.add_argument("--search", help="text in the name or description")
    listing.add_argument("--sort", help="createdAt, updatedAt or name; '-' for descending")
    listing.set_defaults(handler=list_flows)
    reading = actions.add_parser("get", parents=[connection], epilog=EXIT_CODES,
                                 formatter_class=formatter, help="print one flow")
    reading.add_argument("id")
    reading.add_argument("-o", "--output", choices=("json", "yaml"), default="json")
    reading.set_defaults(handler=get_flow)
    for name, verb, target in (("start", "start", "active"), ("stop", "stop", "inactive")):
        command = actions.add_parser(name, parents=[connection], epilog=EXIT_CODES,
                                     formatter_class=formatter, help=f"{verb} a flow")
        command.add_argument("id")
        command.add_argument("--wait", action="store_true",
                             help=f"wait until the flow is {target}")
        command.add_argument("--wait-timeout", type=float, default=120.0,
                             help="seconds to wait (default: 120)")
        command.set_defaults(handler=change_status, verb=verb, target=target)
    deleting = actions.add_parser("delete", parents=[connection], epilog=EXIT_CODES,
                                  formatter_class=formatter, help="delete an inactive flow")
    deleting.add_argument("id")
    deleting.add_argument("--if-match", type=int, metavar="REVISION",
                          help="delete only if the flow is still at this revision")
    deleting.set_defaults(handler=delete_flow)
    history = actions.add_parser("history", parents=[connection, output], epilog=EXIT_CODES,
                                 formatter_class=formatter, help="a flow's revisions")
    history.add_argument("id")
    history.set_defaults(handler=show_history)
    watching = actions.add_parser(
        "watch", parents=[connection, output], epilog=EXIT_CODES, formatter_class=formatter,
        help="print one line per change of the flows you can see, as it happens",
        description="Follow GET /flows/events: one line per change (created, modified,\n"
                    "restored, status, deleted); reconnects by itself without losing one.")
    watching.add_argument("--status", help="only changes that leave a flow in this status")
    watching.add_argument("--type", help="only flows of this type")
    watching.add_argument("--user", help="only flows this user owns")
    watching.add_argument("--from-template", help="only flows made from this template id")
    watching.add_argument("--since", metavar="EVENT_ID",
                          help="resume after this event id (printed first on each line)")
    watching.add_argument("--count", type=int, metavar="N", help="stop after N changes")
    watching.add_argument("--for", dest="duration", type=float, metavar="SECONDS",
                          help="stop after this many seconds (default: never)")
    watching.set_defaults(handler=watch_flows)
    diffing = actions.add_parser("diff", parents=[connection], epilog=EXIT_CODES,
                                 formatter_class=formatter,
                                 help="JSON Patch between two revisions of a flow")
    diffing.add_argument("id")
    diffing.add_argument("--from", dest="from_revision", type=int, required=True)
    diffing.add_argument("--to", dest="to_revision", type=int,
                         help="default: the current revision")
    diffing.set_defaults(handler=show_diff)

    applying = commands.add_parser(
        "apply", parents=[connection, output], epilog=EXIT_CODES, formatter_class=formatter,
        help="make the stored flows match flow files (.json, .yaml)",
        description="Match each file's flow with a stored flow (by id, else by\n"
                    "flowSettings.sourceKey, written on create), show the plan, then\n"
                    "apply it with If-Match.")
    applying.add_argument("-f", "--filename", required=True, type=Path, metavar="PATH",
                          help="a flow file or a folder of them")
    applying.add_argument("--dry-run", action="store_true", help="show the plan and stop")
    applying.add_argument("--prune", action="store_true",
                          help="delete your flows (you are among their owners as a user) "
                               "that carry a sourceKey but have no file")
    applying.add_argument("--all-visible", action="store_true",
                          help="with --prune: consider every flow you can see, not only "
                               "yours (for an administrator: the whole installation); asks "
                               "for confirmation unless --yes")
    applying.add_argument("-y", "--yes", action="store_true",
                          help="do not ask before pruning with --all-visible")
    applying.add_argument("--restart", action="store_true",
                          help="stop a running flow that must change, change it, start it")
    applying.add_argument("--wait-timeout", type=float, default=120.0,
                          help="seconds to wait for a flow to stop (default: 120)")
    applying.set_defaults(handler=apply_files)

    exporting = commands.add_parser(
        "export", parents=[connection], epilog=EXIT_CODES, formatter_class=formatter,
        help="write every flow you can see to a folder, one file each")
    exporting.add_argument("-o", "--output-dir", required=True, type=Path, metavar="DIR")
    exporting.add_argument("--format", choices=("yaml", "json"), default="yaml")
    exporting.set_defaults(handler=export_to)


def run(arguments: argparse.Namespace) -> int:
    """Run a client subcommand; every failure becomes a message and a documented exit code."""
    url = arguments.url or os.environ.get("FLOW_REPOSITORY_URL") or DEFAULT_URL
    token = arguments.token or os.environ.get("FLOW_REPOSITORY_TOKEN")
    client = FlowRepositoryClient(url, token, timeout=arguments.timeout,
                                  retries=max(0, arguments.retries))
    try:
        return arguments.handler(client, arguments)
    except ManifestError as error:
        _error("cannot apply these files:\n  " + "\n  ".join(error.problems))
        return INVALID
    except FlowRepositoryError as error:
        _error(str(error))
        return error_code(error)
    except OSError as error:  # e.g. export into a folder that cannot be written
        _error(str(error))
        return FAILED
    finally:
        client.close()


def _error(message: str) -> None:
    print(f"flow-repository: {message}", file=sys.stderr)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    cells = [[str(value if value is not None else "") for value in row] for row in rows]
    widths = [max(len(headers[i]), *(len(row[i]) for row in cells)) if cells
              else len(headers[i]) for i in range(len(headers))]
    for row in [list(headers), *cells]:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip())


# ----------------------------------------------------------------------------- flows ...


def list_flows(client: FlowRepositoryClient, arguments: argparse.Namespace) -> int:
    flows = client.list(status=arguments.status, type=arguments.type, user=arguments.user,
                        from_template=arguments.from_template, search=arguments.search,
                        sort=arguments.sort)
    if arguments.output == "json":
        _print_json(list(flows))
    else:
        _table([(f.get("id"), f.get("status"), f.get("revision"), f.get("updatedAt"),
                 f.get("name")) for f in flows], ("ID", "STATUS", "REVISION", "UPDATED", "NAME"))
    return OK


def get_flow(client: FlowRepositoryClient, arguments: argparse.Namespace) -> int:
    flow = client.get(arguments.id).flow
    if arguments.output == "yaml":
        print(yaml.safe_dump(flow, sort_keys=False, allow_unicode=True), end="")
    else:
        _print_json(flow)
    return OK


def change_status(client: FlowRepositoryClient, arguments: argparse.Namespace) -> int:
    answer = getattr(client, arguments.verb)(arguments.id)
    if arguments.wait:
        progress = Progress()
        try:
            client.wait_for_status(
                arguments.id, arguments.target, arguments.wait_timeout,
                progress=lambda flow: progress.show(
                    f"flow {arguments.id} is {flow.get('status')}; waiting for "
                    f"{arguments.target}"))
        finally:
            progress.done()
        answer = {"id": arguments.id, "status": arguments.target}
    print(f"{answer.get('id', arguments.id)} {answer.get('status')}")
    return OK


def watch_flows(client: FlowRepositoryClient, arguments: argparse.Namespace) -> int:
    changes = client.watch(status=arguments.status, type=arguments.type, user=arguments.user,
                           from_template=arguments.from_template, last_event_id=arguments.since,
                           timeout=arguments.duration)
    seen = 0
    try:
        for change in changes:
            if arguments.output == "json":
                print(json.dumps({"eventId": change.id, "event": change.event, **change.data},
                                 ensure_ascii=False), flush=True)
            else:
                print(f"{change.id}  {change.event:<8}  {change.flow_id}  "
                      f"r{change.revision}  {change.status}  {change.data.get('at', '')}",
                      flush=True)
            seen += 1
            if arguments.count is not None and seen >= arguments.count:
                break
    except KeyboardInterrupt:
        pass
    finally:
        changes.close()
    return OK


def delete_flow(client: FlowRepositoryClient, arguments: argparse.Namespace) -> int:
    client.delete(arguments.id, if_match=arguments.if_match)
    print(f"{arguments.id} deleted")
    return OK


def _first(entry: Mapping[str, Any], *names: str) -> Any:
    return next((entry[name] for name in names if entry.get(name) is not None), None)


def show_history(client: FlowRepositoryClient, arguments: argparse.Namespace) -> int:
    entries = list(client.revisions(arguments.id))
    if arguments.output == "json":
        _print_json(entries)
        return OK
    rows = []
    for entry in entries:
        change = _first(entry, "kind", "type", "change") or ""
        if entry.get("from") is not None or entry.get("to") is not None:
            change = f"{change} {entry.get('from')} -> {entry.get('to')}".strip()
        rows.append((entry.get("revision"), _first(entry, "at", "createdAt", "changedAt",
                                                   "time"),
                     _first(entry, "sub", "author", "changedBy", "user"), change,
                     entry.get("reason") or ""))
    _table(rows, ("REVISION", "WHEN", "BY", "CHANGE", "REASON"))
    return OK


def show_diff(client: FlowRepositoryClient, arguments: argparse.Namespace) -> int:
    _print_json(client.diff(arguments.id, arguments.from_revision, arguments.to_revision))
    return OK


# ----------------------------------------------------------------------------- apply, export

SYMBOLS = {"create": "+", "update": "~", "delete": "-", "unchanged": "="}


def _describe(change: Change) -> str:
    where = str(change.path) if change.path else f"(sourceKey {change.key})"
    ident = change.flow_id or "new"
    return f"{SYMBOLS[change.action]} {change.action:<9} {ident:<24}  {where}  {change.name or ''}"


def print_plan(plan: Plan, stream: TextIO) -> None:
    for change in plan.changes:
        print(_describe(change).rstrip(), file=stream)
        if change.action == "update":
            for operation in change.patch:
                value = json.dumps(operation.get("value"), ensure_ascii=False)
                if len(value) > 100:
                    value = value[:97] + "..."
                text = f"{operation['op']} {operation['path']}"
                print(f"      {text} {value}" if "value" in operation else f"      {text}",
                      file=stream)
        if change.blocked_by_status:
            print(f"      the flow is {change.status}: it must be stopped to change "
                  "(--restart does it)", file=stream)
        for field in change.ignored_fields:
            print(f"      ignored by the service: {field}", file=stream)
        for problem in change.problems:
            print(f"      problem: {problem}", file=stream)
        if change.outcome == "conflict":
            print(f"      conflict: {change.message}", file=stream)
    counts = ", ".join(f"{plan.count(action)} to {action}" for action in
                       ("create", "update", "delete"))
    print(f"Plan: {counts}, {plan.count('unchanged')} unchanged.", file=stream)
    if not plan.server_dry_run and any(c.action in ("create", "update")
                                       for c in plan.changes):
        print("(the service has no dry run: the diffs were computed here)", file=stream)


def error_code(error: FlowRepositoryError) -> int:
    return next((code for kind, code in EXIT_BY_ERROR if isinstance(error, kind)), FAILED)


def _exit_code(changes: Sequence[Change]) -> int:
    """The first failure that stopped the run decides; else the gravest outcome."""
    for change in changes:
        if change.outcome == "failed" and change.error is not None:
            return error_code(change.error)
    return max((EXIT_BY_OUTCOME.get(change.outcome or "", OK) for change in changes),
               default=OK)


def apply_files(client: FlowRepositoryClient, arguments: argparse.Namespace) -> int:
    if arguments.all_visible and not arguments.prune:
        _error("--all-visible only applies with --prune")
        return USAGE
    manifests = load_manifests(arguments.filename)
    plan = make_plan(client, manifests, prune=arguments.prune,
                     prune_all_visible=arguments.all_visible)
    as_json = arguments.output == "json"
    if not as_json:
        print_plan(plan, sys.stdout)
    if plan.problems:
        if as_json:
            _print_json({"plan": [c.summary() for c in plan.changes], "applied": False})
        _error("the plan has problems; nothing was applied")
        return INVALID
    if (arguments.all_visible and plan.count("delete") and not arguments.dry_run
            and not arguments.yes and not _confirmed(plan)):
        if as_json:
            _print_json({"plan": [c.summary() for c in plan.changes], "applied": False})
        _error("not confirmed: nothing was applied (--yes confirms without asking)")
        return USAGE
    if not arguments.dry_run:
        progress = Progress()
        options = ApplyOptions(
            restart=arguments.restart, wait_timeout=arguments.wait_timeout,
            progress=lambda number, total, change: progress.show(
                f"applying {number}/{total}: {change.action} {change.name or change.key}"))
        try:
            apply_plan(client, plan, options)
        finally:
            progress.done()
    if as_json:
        _print_json({"plan": [c.summary() for c in plan.changes],
                     "applied": not arguments.dry_run})
    else:
        for change in plan.changes:
            if change.outcome and change.outcome not in ("created", "updated", "deleted"):
                print(f"{change.outcome}: {change.path or change.flow_id}: "
                      f"{change.message or '; '.join(change.problems)}")
        wanted = sum(1 for change in plan.changes if change.changes_something)
        if not arguments.dry_run and wanted:
            done = sum(1 for change in plan.changes
                       if change.outcome in ("created", "updated", "deleted"))
            print(f"Applied: {done} of {wanted} changes.")
    return _exit_code(plan.changes)


def _confirmed(plan: Plan) -> bool:
    """Ask on the terminal before pruning flows that may be other people's; no terminal: no."""
    if not sys.stdin.isatty():
        return False
    deleted = [change for change in plan.changes if change.action == "delete"]
    print(f"--all-visible: delete these {len(deleted)} flows, whoever owns them?",
          file=sys.stderr)
    for change in deleted:
        print(f"  {change.flow_id} {change.name or ''} ({change.status})", file=sys.stderr)
    return input("Type yes to go on: ").strip().lower() == "yes"


def export_to(client: FlowRepositoryClient, arguments: argparse.Namespace) -> int:
    progress = Progress()
    try:
        written = export_flows(client, arguments.output_dir, arguments.format,
                               progress=lambda number, flow: progress.show(
                                   f"exported {number}: {flow.get('name') or flow['id']}"))
    finally:
        progress.done()
    print(f"exported {len(written)} flows to {arguments.output_dir}")
    return OK

