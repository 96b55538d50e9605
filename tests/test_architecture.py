"""The import rules of DESIGN.md section 1, enforced: data flows one way, each stage
owns one thing, and no two mta modules import each other (directly or around a
cycle).

Every ``import`` in every module of the package counts, including those inside
functions (a lazy import is still a dependency).  ``from mta.x import y`` counts as
an import of ``mta.x.y`` when that is a module, else of ``mta.x``; a package's
``__init__`` is a module like any other.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterable

import pytest

import mta

PACKAGE_DIR = os.path.dirname(mta.__file__)

# (importer prefix, forbidden prefixes, why).  A prefix matches the module itself and
# everything under it.
STAGES = ("mta.smtp", "mta.policy", "mta.queue", "mta.delivery", "mta.storage")
RULES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    (
        "mta.envelope",
        ("mta",),
        "the value types depend on nothing",
    ),
    (
        "mta.interfaces",
        ("mta",),
        "the seams depend on nothing but the value types",
    ),
    (
        "mta.observe",
        ("mta",),
        "observability looks at every stage from the side and imports none",
    ),
    (
        "mta.smtp",
        ("mta.queue", "mta.delivery", "mta.storage", "mta.app", "mta.admin"),
        "the session hands messages to the queue only through ISpool",
    ),
    (
        "mta.policy",
        ("mta.queue", "mta.delivery", "mta.storage", "mta.smtp", "mta.app", "mta.admin"),
        "checks see the message through their context, never the queue or stores",
    ),
    (
        "mta.queue",
        ("mta.smtp", "mta.policy", "mta.delivery", "mta.storage", "mta.app", "mta.admin"),
        "the queue calls delivery only through IDeliveryAgent",
    ),
    (
        "mta.delivery",
        ("mta.smtp", "mta.policy", "mta.queue", "mta.app", "mta.admin"),
        "delivery gets a DeliveryJob and never calls back into the session or queue",
    ),
    (
        "mta.storage",
        ("mta.smtp", "mta.policy", "mta.queue", "mta.delivery", "mta.app", "mta.admin"),
        "a store knows messages only as IMessageBody",
    ),
    (
        "mta.admin",
        ("mta.smtp.session", "mta.queue.runner", "mta.delivery.relay", "mta.app"),
        "operators act through IQueueControl and IMailStore, not a live stage",
    ),
    (
        "mta.config",
        ("mta.smtp", "mta.policy", "mta.queue", "mta.delivery", "mta.storage", "mta.admin"),
        "the configuration is validated before any stage exists",
    ),
)
# The composition roots: only these may import mta.app.
APP_IMPORTERS = ("mta.tap", "mta.process.child")
# Shared utilities every stage may use: they import nothing of the stages.
UTILITIES = ("mta.process", "mta.fileio", "mta.dns", "mta.crypto", "mta.s3")


def module_files(root: str = PACKAGE_DIR) -> dict[str, str]:
    """Module name -> file for every .py under the package."""
    out = {}
    base = os.path.dirname(root)
    for dirpath, _, names in os.walk(root):
        for name in names:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, base)[:-3].replace(os.sep, ".")
            if rel.endswith(".__init__"):
                rel = rel[: -len(".__init__")]
            out[rel] = path
    return out


def imports_of(name: str, path: str, modules: Iterable[str]) -> set[str]:
    """The mta modules `name` (at `path`) imports."""
    modules = set(modules)
    is_package = path.endswith("__init__.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join(parts[:keep] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in modules else base)
    out = set()
    for imported in found:
        if imported == "mta" or imported.startswith("mta."):
            # Resolve to the deepest existing module (mta.queue.entry.X -> mta.queue.entry).
            while imported not in modules and "." in imported:
                imported = imported.rsplit(".", 1)[0]
            if imported != name:
                out.add(imported)
    return out


def graph(root: str = PACKAGE_DIR) -> dict[str, set[str]]:
    files = module_files(root)
    return {name: imports_of(name, path, files) for name, path in files.items()}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(deps: dict[str, set[str]]) -> list[str]:
    """Every import that breaks a rule, as readable lines."""
    out = []
    for importer, imported in sorted(deps.items()):
        for target in sorted(imported):
            if target == "mta":
                continue  # the root package holds only __version__
            for prefix, forbidden, why in RULES:
                if not _under(importer, prefix) or _under(target, prefix):
                    continue
                if any(_under(target, f) for f in forbidden):
                    out.append(f"{importer} imports {target}: {why}")
            if _under(target, "mta.app") and importer not in APP_IMPORTERS:
                out.append(f"{importer} imports {target}: only the composition roots may")
            if importer in APP_IMPORTERS and _under(target, "mta.app"):
                continue
            if any(_under(importer, u) for u in UTILITIES) and any(
                _under(target, s) for s in STAGES
            ):
                out.append(f"{importer} imports {target}: a shared utility depends on no stage")
    return out


def cycles(deps: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in deps.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(deps):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def deps():
    return graph()


def test_stages_import_only_what_the_design_allows(deps):
    assert violations(deps) == []


def test_the_root_package_imports_nothing(deps):
    assert deps["mta"] == set()


def test_no_import_cycles_between_mta_modules(deps):
    # mta.testing ships fakes for every seam, so it may reach into any stage.
    assert cycles({k: v for k, v in deps.items() if k != "mta.testing"}) == []


def test_the_checker_catches_a_forbidden_import_and_a_cycle():
    deps = {
        "mta.smtp.session": {"mta.queue.runner", "mta.policy.pipeline"},
        "mta.queue.runner": {"mta.delivery.local"},
        "mta.delivery.local": {"mta.storage.maildir", "mta.queue.entry"},
        "mta.storage.maildir": {"mta.storage.names"},
        "mta.storage.names": {"mta.storage.maildir"},
        "mta.observe.metrics": {"mta.queue.runner"},
        "mta.policy.pipeline": set(),
    }
    found = violations(deps)
    assert any(line.startswith("mta.smtp.session imports mta.queue.runner") for line in found)
    assert any(line.startswith("mta.queue.runner imports mta.delivery.local") for line in found)
    assert any(line.startswith("mta.delivery.local imports mta.queue.entry") for line in found)
    assert any(line.startswith("mta.observe.metrics imports") for line in found)
    assert not any("mta.policy.pipeline" in line for line in found)
    assert cycles(deps) == [["mta.storage.maildir", "mta.storage.names"]]


def test_modules_stay_small():
    """STYLE.md: modules stay small; the seams issue set the bar at ~500 lines."""
    sizes = {}
    for name, path in module_files().items():
        with open(path, encoding="utf-8") as f:
            sizes[name] = sum(1 for _ in f)
    assert {n: s for n, s in sizes.items() if s > 560} == {}
