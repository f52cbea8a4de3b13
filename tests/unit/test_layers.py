"""The package's layers, as each sub-package's docstring states them, checked on the source.

An AST walk collects every import of every module of ``flow_repository`` (function-level
ones too), then :func:`violations` holds them against ``RULES`` and ``THIRD_PARTY`` and
:func:`cycles` looks for a circle between modules. The synthetic tests at the bottom show
that a broken rule or a circle is reported.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from pathlib import Path

PACKAGE = "flow_repository"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE

# module prefix -> prefixes of ours it may import (the most specific prefix wins).
# ``None`` as a rule: no restriction within the server side (only ``client`` is refused).
SERVER_SIDE = ("flow_repository.domain", "flow_repository.contract",
               "flow_repository.adapters", "flow_repository.services",
               "flow_repository.entrypoints", "flow_repository.server",
               "flow_repository.settings")
RULES: dict[str, tuple[str, ...]] = {
    "flow_repository.domain": ("flow_repository.domain",),
    "flow_repository.contract": (),
    "flow_repository.contract.schemas": ("flow_repository.domain", "flow_repository.contract"),
    "flow_repository.services": ("flow_repository.domain", "flow_repository.contract",
                                 "flow_repository.adapters", "flow_repository.services",
                                 "flow_repository.settings"),
    "flow_repository.adapters": ("flow_repository.domain", "flow_repository.contract",
                                 "flow_repository.adapters", "flow_repository.settings"),
    "flow_repository.entrypoints": SERVER_SIDE,
    # the one command line: ``flow-repository flows ...`` is the client's
    "flow_repository.entrypoints.cli": (*SERVER_SIDE, "=flow_repository.client.cli"),
    # the composition root and the process: below the entry points that start them
    "flow_repository.server": tuple(layer for layer in SERVER_SIDE
                                    if layer != "flow_repository.entrypoints"),
    "flow_repository.settings": (),
    "flow_repository.server.redaction": (),
    "flow_repository.server.logs": ("flow_repository.server.redaction",
                                     "flow_repository.domain.trace"),
    "flow_repository.client": ("flow_repository.client", "=flow_repository.contract"),
}
# third-party package -> the only module prefixes that may import it
THIRD_PARTY: dict[str, tuple[str, ...]] = {
    "pymongo": ("flow_repository.adapters.store",),
    "sqlite3": ("flow_repository.adapters.store",),
    "pika": ("flow_repository.adapters.rabbitmq", "flow_repository.adapters.relay",
             "flow_repository.entrypoints.consumer"),
    "flask": ("flow_repository.entrypoints",),
    "flask_smorest": ("flow_repository.entrypoints",),
    "marshmallow": ("flow_repository.contract.schemas",),
    "gunicorn": ("flow_repository.server", "flow_repository.entrypoints.cli"),
    # the optional ``otel`` extra: one module knows it, and imports it guarded
    "opentelemetry": ("flow_repository.adapters.tracing",),
}


def within(module: str, prefix: str) -> bool:
    """``module`` is ``prefix`` or inside it; a prefix starting with "=" matches exactly."""
    if prefix.startswith("="):
        return module == prefix[1:]
    return module == prefix or module.startswith(prefix + ".")


def rule_for(module: str, rules: Mapping[str, tuple[str, ...]]) -> tuple[str, ...] | None:
    """The allowed prefixes of the most specific rule covering ``module`` (None: no rule)."""
    covering = [prefix for prefix in rules if within(module, prefix)]
    return rules[max(covering, key=len)] if covering else None


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str], root: Path = ROOT) -> set[str]:
    """Every module a file imports: ours resolved to modules, others by their full name."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                found.add(candidate if candidate in known else source)
    return found


def import_map(root: Path = ROOT) -> dict[str, set[str]]:
    files = sorted(root.rglob("*.py"))
    known = {module_name(path, root) for path in files}
    return {module_name(path, root): imports_of(path, known, root) for path in files}


def violations(modules: Mapping[str, set[str]],
               rules: Mapping[str, tuple[str, ...]] = RULES,
               third_party: Mapping[str, tuple[str, ...]] = THIRD_PARTY) -> list[str]:
    found = []
    for module, imported in sorted(modules.items()):
        allowed = rule_for(module, rules)
        for target in sorted(imported):
            top = target.split(".")[0]
            if top == PACKAGE:
                if target == PACKAGE or allowed is None:
                    continue
                if not any(within(target, prefix) for prefix in allowed):
                    found.append(f"{module} imports {target}")
            elif top in third_party and not any(
                    within(module, prefix) for prefix in third_party[top]):
                found.append(f"{module} imports {top}")
    return found


def cycles(modules: Mapping[str, set[str]]) -> list[Sequence[str]]:
    """Import circles between our modules (each found once, from its smallest member)."""
    found = []
    graph = {module: sorted(t for t in targets if t in modules and t != module)
             for module, targets in modules.items()}

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in graph[node]:
            if nxt == start:
                found.append([*path, start])
            elif nxt > start and nxt not in path:
                walk(start, nxt, [*path, nxt])

    for module in sorted(graph):
        walk(module, module, [module])
    return found


def test_every_module_keeps_to_its_layer() -> None:
    assert violations(import_map()) == []


def test_no_module_imports_itself_round_a_circle() -> None:
    assert cycles(import_map()) == []


def test_at_most_eight_modules_sit_at_the_top_of_the_package() -> None:
    assert len(list(ROOT.glob("*.py"))) <= 8


def test_every_package_says_what_lives_there_and_what_it_may_import() -> None:
    for init in ROOT.glob("*/__init__.py"):
        docstring = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in docstring, init


def test_a_broken_rule_is_reported() -> None:
    fake = {
        "flow_repository.domain.flow": {"flow_repository.services.flows", "re"},
        "flow_repository.services.flows": {"pika", "flow_repository.domain.flow"},
        "flow_repository.adapters.references": {"flow_repository.entrypoints.app"},
        "flow_repository.adapters.store.mongo": {"pymongo"},
        "flow_repository.client.gitops": {"flow_repository.contract",
                                          "flow_repository.contract.schemas"},
    }
    assert violations(fake) == [
        "flow_repository.adapters.references imports flow_repository.entrypoints.app",
        "flow_repository.client.gitops imports flow_repository.contract.schemas",
        "flow_repository.domain.flow imports flow_repository.services.flows",
        "flow_repository.services.flows imports pika",
    ]


def test_a_circle_is_reported() -> None:
    fake = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(fake) == [["a", "b", "c", "a"]]
