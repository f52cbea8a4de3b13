"""Flows kept as files: read them, plan what apply would change, apply the plan, export."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonpatch
import yaml

from flow_repository.client.rest import (
    Conflict,
    DryRun,
    FlowRepositoryClient,
    FlowRepositoryError,
    Forbidden,
    NotFound,
    PreconditionFailed,
    StatusTimeout,
    Unauthorized,
    Unavailable,
    ValidationError,
)
from flow_repository.contract import EDITABLE_FIELDS as SCHEMA_EDITABLE_FIELDS
from flow_repository.contract import READ_ONLY_FIELDS

# What a file says about a flow: the fields a client may write, in the order exports
# write them (the long graph last). The service writes the others itself (and ignores
# them when sent back), so files and exports leave them out.
EDITABLE_FIELDS = tuple(sorted(SCHEMA_EDITABLE_FIELDS, key=lambda name: name == "graph"))
SERVICE_FIELDS = (*READ_ONLY_FIELDS, "status")
SOURCE_KEY = "sourceKey"
FILE_SUFFIXES = {".json": "json", ".yaml": "yaml", ".yml": "yaml"}
# safe_load's loader, in libyaml's C implementation when PyYAML has it (5x faster on large
# folders); both build plain Python values only and refuse every python/* tag.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
INACTIVE = "inactive"
RUNNING = ("active", "starting")


class ManifestError(ValueError):
    """Files that cannot be applied; ``problems`` names each file and what is wrong."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# ----------------------------------------------------------------------------- files


@dataclass(frozen=True)
class Manifest:
    """One flow file: its body (service fields removed), its ``id`` and ``sourceKey``."""

    path: Path
    body: dict[str, Any]
    flow_id: str | None
    source_key: str | None

    @property
    def key(self) -> str:
        """The label apply writes on create and matches by when the id is not stored."""
        return self.source_key or self.flow_id or ""


def read_manifest(path: Path) -> Manifest:
    """Parse one ``.json``/``.yaml`` flow file (YAML with the safe loader only)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ManifestError([f"{path}: cannot be read ({error})"]) from None
    try:
        if FILE_SUFFIXES.get(path.suffix.lower()) == "json":
            document = json.loads(text)
        else:
            document = yaml.load(text, Loader=SAFE_LOADER)
    except (ValueError, yaml.YAMLError) as error:
        reason = str(error).splitlines()[0] if str(error) else error.__class__.__name__
        raise ManifestError([f"{path}: not valid {path.suffix[1:].upper()}: {reason}"]) from None
    return manifest_of(path, document)


def manifest_of(path: Path, document: Any) -> Manifest:
    if not isinstance(document, Mapping):
        raise ManifestError([f"{path}: a flow file must hold one object (a mapping)"])
    problems = []
    flow_id = document.get("id")
    if flow_id is not None and not (isinstance(flow_id, str) and flow_id):
        problems.append(f"{path}: id must be a non-empty string")
    settings = document.get("flowSettings")
    if settings is not None and not isinstance(settings, Mapping):
        problems.append(f"{path}: flowSettings must be an object")
        settings = None
    source_key = (settings or {}).get(SOURCE_KEY)
    if source_key is not None and not (isinstance(source_key, str) and source_key.strip()):
        problems.append(f"{path}: flowSettings.sourceKey must be a non-empty string")
    if not flow_id and not source_key:
        problems.append(f"{path}: needs an id or a flowSettings.sourceKey to be matched "
                        "with a stored flow (names are not unique)")
    if problems:
        raise ManifestError(problems)
    body = {key: value for key, value in document.items()
            if key not in SERVICE_FIELDS}
    return Manifest(path, body, flow_id or None, source_key or None)


def flow_files(path: Path) -> list[Path]:
    """``path`` itself, or every flow file under it (hidden files and folders skipped)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ManifestError([f"{path}: no such file or folder"])
    return sorted(candidate for candidate in path.rglob("*")
                  if candidate.is_file() and candidate.suffix.lower() in FILE_SUFFIXES
                  and not any(part.startswith(".") for part in
                              candidate.relative_to(path).parts))


def load_manifests(path: Path) -> list[Manifest]:
    """Every flow file at ``path``; ManifestError listing every bad file (nothing applied)."""
    manifests, problems = [], []
    for candidate in flow_files(path):
        try:
            manifests.append(read_manifest(candidate))
        except ManifestError as error:
            problems.extend(error.problems)
    seen: dict[tuple[str, str], Path] = {}
    for manifest in manifests:
        for kind, value in (("id", manifest.flow_id), ("sourceKey", manifest.source_key)):
            if value is None:
                continue
            if (kind, value) in seen:
                problems.append(f"{manifest.path}: {kind} {value!r} is also in "
                                f"{seen[kind, value]}")
            seen[kind, value] = manifest.path
    if problems:
        raise ManifestError(problems)
    return manifests


# ----------------------------------------------------------------------------- the plan


@dataclass
class Change:
    """One line of the plan, and (after apply) what became of it."""

    action: str  # create | update | unchanged | delete
    path: Path | None = None
    flow_id: str | None = None
    name: str | None = None
    key: str | None = None
    revision: int | None = None
    status: str = INACTIVE
    body: dict[str, Any] = field(default_factory=dict)
    stored: dict[str, Any] = field(default_factory=dict)
    patch: list[dict[str, Any]] = field(default_factory=list)
    ignored_fields: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    outcome: str | None = None  # created | updated | deleted | conflict | blocked | ...
    message: str = ""
    error: FlowRepositoryError | None = None  # what made the outcome "failed"

    @property
    def changes_something(self) -> bool:
        return self.action in ("create", "update", "delete")

    @property
    def blocked_by_status(self) -> bool:
        """An update or delete of a flow that is not inactive (the service refuses it)."""
        return self.action in ("update", "delete") and self.status != INACTIVE

    def summary(self) -> dict[str, Any]:
        result: dict[str, Any] = {"action": self.action, "id": self.flow_id, "name": self.name,
                                  "key": self.key, "status": self.status,
                                  "file": str(self.path) if self.path else None}
        if self.revision is not None:
            result["revision"] = self.revision
        if self.patch:
            result["patch"] = self.patch
        for name, value in (("ignoredFields", self.ignored_fields),
                            ("problems", self.problems), ("outcome", self.outcome),
                            ("message", self.message)):
            if value:
                result[name] = value
        return result


@dataclass
class Plan:
    changes: list[Change]
    server_dry_run: bool  # False: the service has no dry run yet; diffs computed here

    def count(self, action: str) -> int:
        return sum(1 for change in self.changes if change.action == action)

    @property
    def problems(self) -> list[str]:
        return [f"{change.path or change.flow_id}: {problem}"
                for change in self.changes for problem in change.problems]


def editable(flow: Mapping[str, Any], names: Iterable[str] = EDITABLE_FIELDS) -> dict[str, Any]:
    return {name: flow[name] for name in names if name in flow}


def _owner_set(owners: Any) -> set[tuple[Any, Any]]:
    return {(owner.get("id"), owner.get("type")) for owner in owners or []
            if isinstance(owner, Mapping)}


def desired_body(manifest: Manifest, stored: Mapping[str, Any] | None) -> dict[str, Any]:
    """What to send: the file's fields, keeping (or, on create, writing) the sourceKey label."""
    body = dict(manifest.body)
    stored_key = ((stored or {}).get("flowSettings") or {}).get(SOURCE_KEY)
    label = manifest.key if stored is None else stored_key
    if label and (stored is None or "flowSettings" in body):
        settings = dict(body.get("flowSettings") or {})
        settings.setdefault(SOURCE_KEY, label)
        body["flowSettings"] = settings
    return body


def in_sync(body: Mapping[str, Any], stored: Mapping[str, Any], owners_exact: bool) -> bool:
    """Whether every editable field the file names already holds the file's value.

    Owners compare as a set. The service keeps the caller among a flow's owners, so
    without a server dry run (``owners_exact`` False) stored owners that the file does not
    list are not a difference: otherwise a file without its author would never settle.
    """
    for name in EDITABLE_FIELDS:
        if name not in body:
            continue
        if name == "owners":
            wanted, have = _owner_set(body["owners"]), _owner_set(stored.get("owners"))
            if wanted != have if owners_exact else not wanted <= have:
                return False
        elif body[name] != stored.get(name):
            return False
    return True


def json_patch(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[dict[str, Any]]:
    """RFC 6902 operations turning the editable fields of ``before`` into ``after``'s."""
    return list(jsonpatch.make_patch(editable(before), editable(after)).patch)


class DryRunner:
    """The service's dry run, or a local stand-in while the service has none.

    The first call finds out: a service without dry runs answers POST /flows/validate
    with 404/405 (and must never be sent ``?dryRun=true``: it would ignore the parameter
    and write); a caller without the permission to dry-run (403) gets the local stand-in
    too, so that a read-only ``apply --dry-run`` still shows a plan. The local stand-in merges the file's fields into the stored flow the way a
    PATCH does; it cannot know the fields a newer service drops or the owner it adds.
    """

    def __init__(self, client: FlowRepositoryClient) -> None:
        self._client = client
        self.supported: bool | None = None

    def _probe(self, body: Mapping[str, Any]) -> bool:
        if self.supported is None:
            try:
                self._client.validate(body)
                self.supported = True
            except ValidationError:
                self.supported = True
            except Forbidden:
                self.supported = False
            except FlowRepositoryError as error:
                if error.status not in (404, 405):
                    raise
                self.supported = False
        return self.supported

    def create(self, body: Mapping[str, Any]) -> DryRun:
        if self._probe(body):
            return self._client.dry_run_create(body)
        return DryRun(dict(body))

    def update(self, flow_id: str, body: Mapping[str, Any], stored: Mapping[str, Any],
               revision: int | None) -> DryRun:
        # A flow that is not inactive fails the service's status precondition: merge here.
        if stored.get("status") == INACTIVE and self._probe(body):
            return self._client.dry_run_update(flow_id, body, if_match=revision)
        merged = {**editable(stored), **editable(body)}
        if "owners" in body:  # the service keeps the caller, whom only it knows
            merged["owners"] = [*body["owners"], *(
                owner for owner in stored.get("owners") or []
                if (owner.get("id"), owner.get("type")) not in _owner_set(body["owners"]))]
        return DryRun(merged)


# Validated (never stored) to learn who the caller is: the service adds the caller to the
# owners of every flow it would create, as an owner of type user.
WHOAMI_FLOW = {"name": "flow-repository apply: who am I", "graph": {
    "nodes": [{"id": "probe", "componentId": "0" * 24, "function": "probe"}], "edges": []}}


def caller_user_ids(client: FlowRepositoryClient) -> frozenset[str]:
    """The caller's user id as the service sees it (empty when the service cannot say)."""
    try:
        flow = client.validate(WHOAMI_FLOW).flow or {}
    except FlowRepositoryError:
        return frozenset()
    return frozenset(owner["id"] for owner in flow.get("owners") or []
                     if isinstance(owner, Mapping) and owner.get("type") == "user"
                     and isinstance(owner.get("id"), str))


def owned_as_user(flow: Mapping[str, Any], user_ids: frozenset[str]) -> bool:
    """True when one of ``user_ids`` is among the flow's owners as a user (not a tenant)."""
    return any(isinstance(owner, Mapping) and owner.get("type") == "user"
               and owner.get("id") in user_ids for owner in flow.get("owners") or [])


def make_plan(client: FlowRepositoryClient, manifests: Sequence[Manifest],
              prune: bool = False, prune_all_visible: bool = False) -> Plan:
    """Match files with stored flows (one list pass) and find what must change.

    ``prune`` deletes the labelled flows that have no file among those the caller owns as a
    user; ``prune_all_visible`` among every flow the caller can see (an administrator sees
    the whole installation: the CLI asks for confirmation first).
    """
    stored_flows = list(client.list())
    by_id = {flow["id"]: flow for flow in stored_flows}
    by_key: dict[str, list[dict[str, Any]]] = {}
    for flow in stored_flows:
        key = (flow.get("flowSettings") or {}).get(SOURCE_KEY)
        if isinstance(key, str):
            by_key.setdefault(key, []).append(flow)

    dry_runner = DryRunner(client)
    changes: list[Change] = []
    matched: dict[str, Path] = {}
    problems: list[str] = []
    for manifest in manifests:
        stored = by_id.get(manifest.flow_id) if manifest.flow_id else None
        if stored is None:
            candidates = by_key.get(manifest.key, [])
            if len(candidates) > 1:
                problems.append(f"{manifest.path}: sourceKey {manifest.key!r} is carried by "
                                f"several flows ({', '.join(f['id'] for f in candidates)})")
                continue
            stored = candidates[0] if candidates else None
        if stored is not None and stored["id"] in matched:
            problems.append(f"{manifest.path}: matches flow {stored['id']}, as "
                            f"{matched[stored['id']]} does")
            continue
        if stored is None:
            changes.append(_creation(dry_runner, manifest))
            continue
        matched[stored["id"]] = manifest.path
        changes.append(_update(dry_runner, manifest, stored))
    if problems:
        raise ManifestError(problems)
    if prune:
        user_ids = frozenset() if prune_all_visible else caller_user_ids(client)
        if not prune_all_visible and not user_ids:
            raise ManifestError([("--prune: the service did not say who you are (it has no "
                                 "POST /flows/validate), so your flows cannot be told from "
                                 "others'; use --all-visible to prune every flow you can see")])
        for flow in stored_flows:
            key = (flow.get("flowSettings") or {}).get(SOURCE_KEY)
            mine = prune_all_visible or owned_as_user(flow, user_ids)
            if isinstance(key, str) and flow["id"] not in matched and mine:
                changes.append(Change("delete", flow_id=flow["id"], name=flow.get("name"),
                                      key=key, revision=flow.get("revision"),
                                      status=flow.get("status", INACTIVE), stored=flow))
    return Plan(changes, bool(dry_runner.supported))


def _creation(dry_runner: DryRunner, manifest: Manifest) -> Change:
    body = desired_body(manifest, None)
    change = Change("create", path=manifest.path, name=body.get("name"), key=manifest.key,
                    body=body)
    try:
        result = dry_runner.create(body)
    except ValidationError as error:
        change.problems = error.problems
        return change
    change.ignored_fields, change.problems = result.ignored_fields, result.problems
    change.patch = json_patch({}, result.flow)
    return change


def _update(dry_runner: DryRunner, manifest: Manifest, stored: dict[str, Any]) -> Change:
    body = desired_body(manifest, stored)
    change = Change("unchanged", path=manifest.path, flow_id=stored["id"],
                    name=stored.get("name"), key=manifest.key,
                    revision=stored.get("revision"), status=stored.get("status", INACTIVE),
                    body=body, stored=stored)
    if in_sync(body, stored, owners_exact=dry_runner.supported is not False):
        return change
    try:
        result = dry_runner.update(stored["id"], body, stored, change.revision)
    except ValidationError as error:
        change.action, change.problems = "update", error.problems
        return change
    except (PreconditionFailed, Conflict) as error:  # it moved between the list and now
        change.action, change.outcome, change.message = "update", "conflict", str(error)
        return change
    change.patch = json_patch(stored, result.flow)
    change.ignored_fields, change.problems = result.ignored_fields, result.problems
    if change.patch or change.problems:
        change.action = "update"
    return change


# ----------------------------------------------------------------------------- applying it


@dataclass
class ApplyOptions:
    restart: bool = False
    wait_timeout: float = 120.0
    progress: Callable[[int, int, Change], None] | None = None


def apply_plan(client: FlowRepositoryClient, plan: Plan, options: ApplyOptions) -> None:
    """Carry out every change of the plan, each with If-Match; sets each change's outcome.

    A flow changed by someone else since the plan is a ``conflict`` and is left as it is.
    A flow that must change while running is ``blocked``, unless ``options.restart``: then
    it is stopped, waited for, changed and started again. The service being unavailable
    or the token refused stops the run; the changes not reached are ``skipped``.
    """
    todo = [change for change in plan.changes if change.changes_something]
    stopped_by: Exception | None = None
    for number, change in enumerate(todo, 1):
        if options.progress is not None:
            options.progress(number, len(todo), change)
        if change.outcome:  # already settled while planning (a conflict)
            continue
        if stopped_by is not None:
            change.outcome, change.message = "skipped", f"not attempted: {stopped_by}"
            continue
        if change.problems:
            change.outcome = "invalid"
            continue
        try:
            _apply_one(client, change, options)
        except (PreconditionFailed, Conflict) as error:
            change.outcome = "conflict"
            change.message = f"changed since the plan, left as it is: {error}"
        except ValidationError as error:
            change.outcome, change.problems = "invalid", error.problems
        except StatusTimeout as error:
            change.outcome, change.message = "timeout", str(error)
        except NotFound as error:
            change.outcome, change.message = "conflict", f"gone since the plan: {error}"
        except (Unavailable, Unauthorized, Forbidden) as error:
            change.outcome, change.message, change.error = "failed", str(error), error
            stopped_by = error
        except FlowRepositoryError as error:
            change.outcome, change.message, change.error = "failed", str(error), error


def _apply_one(client: FlowRepositoryClient, change: Change, options: ApplyOptions) -> None:
    if change.action == "create":
        created = client.create(change.body)
        change.flow_id, change.revision = created.flow.get("id"), created.revision
        change.outcome = "created"
        return
    assert change.flow_id is not None
    revision, restart_after = change.revision, False
    if change.blocked_by_status:
        if not options.restart:
            change.outcome = "blocked"
            change.message = (f"the flow is {change.status}; stop it first or apply with "
                              "--restart")
            return
        revision, restart_after = _stop_for_change(client, change, options)
    if change.action == "update":
        updated = client.update(change.flow_id, change.body, if_match=revision)
        change.revision, change.outcome = updated.revision, "updated"
    else:
        client.delete(change.flow_id, if_match=revision)
        change.outcome = "deleted"
    if restart_after and change.action == "update":
        client.start(change.flow_id)
        change.message = "stopped, changed and started again"
    elif restart_after:
        change.message = "stopped and deleted"


def _stop_for_change(client: FlowRepositoryClient, change: Change,
                     options: ApplyOptions) -> tuple[int | None, bool]:
    """Stop a running flow and wait until it is inactive; the revision to change it at.

    Stopping moves the revision on, so the plan's revision cannot guard the change any
    more: instead, the definition read back must still be the one the plan saw.
    """
    assert change.flow_id is not None
    if change.status in RUNNING:
        try:
            client.stop(change.flow_id)
        except Conflict:  # it stopped (or is stopping) by itself meanwhile
            pass
    flow = client.wait_for_status(change.flow_id, INACTIVE, options.wait_timeout)
    if editable(flow) != editable(change.stored):
        raise PreconditionFailed(412, [(f"flow {change.flow_id} was changed while it was "
                                       "being stopped")])
    return flow.get("revision"), change.status in RUNNING


# ----------------------------------------------------------------------------- export


def exported(flow: Mapping[str, Any]) -> dict[str, Any]:
    """A stored flow as a file holds it: its id and editable fields, in a fixed order."""
    return {"id": flow["id"], **editable(flow)}


def file_name(flow: Mapping[str, Any], fmt: str) -> str:
    key = (flow.get("flowSettings") or {}).get(SOURCE_KEY)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._") if isinstance(key, str) else ""
    return f"{stem or flow['id']}.{fmt}"


def dump(document: Mapping[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    return yaml.safe_dump(dict(document), sort_keys=False, allow_unicode=True, width=100)


def export_flows(client: FlowRepositoryClient, directory: Path, fmt: str = "yaml",
                 progress: Callable[[int, dict[str, Any]], None] | None = None) -> list[Path]:
    """Write every flow the caller can see as one file each, in the format apply reads."""
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    taken: set[str] = set()
    for number, flow in enumerate(client.list(), 1):
        name = file_name(flow, fmt)
        if name in taken:  # two flows label themselves alike: the id tells them apart
            name = f"{Path(name).stem}-{flow['id']}.{fmt}"
        taken.add(name)
        path = directory / name
        path.write_text(dump(exported(flow), fmt), encoding="utf-8")
        written.append(path)
        if progress is not None:
            progress(number, flow)
    return written
