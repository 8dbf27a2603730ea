"""The import rules between the packages, read from the source with `ast` (nothing is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The core's modules without I/O, and the libraries that would bring some.
PURE_CORE = (
    "services.core.family",
    "services.core.net",
    "services.core.pool_math",
    "services.core.prefixes",
    "services.core.reasons",
)
# The worker's core: what a maintenance decides and does; protobuf and gRPC stay out of it.
WORKER_CORE = (
    "services.cloudworker.planner",
    "services.cloudworker.maintainer",
    "services.cloudworker.model",
    "services.cloudworker.providers",
)
IO_LIBRARIES = ("asyncio", "boto3", "botocore", "grpc", "os", "redis", "socket", "subprocess", "urllib")


def imports_of(package: str) -> dict[str, set[str]]:
    """Module name -> the absolute names it imports (relative imports resolved)."""
    result: dict[str, set[str]] = {}
    for path in sorted((ROOT / package.replace(".", "/")).rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        here = module.split(".")
        if path.name == "__init__.py":
            module = module.removesuffix(".__init__")
            here = here[:-1] + ["__init__"]
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join([*here[: -node.level], *([base] if base else [])])
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in node.names)
        result[module] = names
    return result


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of `package` it imports (a name imported from a module counts as that
    module; importing a package counts as its `__init__`)."""
    imports = imports_of(package)
    graph: dict[str, set[str]] = {}
    for module, names in imports.items():
        targets: set[str] = set()
        for name in names:
            parts = name.split(".")
            found = next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in imports), "")
            if found and found != module:
                targets.add(found)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph`: each group of modules that reach one another, sorted (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(found)


def offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{module} imports {name}"
        for module, names in imports_of(package).items()
        for name in names
        if any(name == f or name.startswith(f"{f}.") for f in forbidden)
    )


def test_the_scan_sees_imports() -> None:
    assert "services.core.pool_math.Watermarks" in imports_of("services.cloudworker")["services.cloudworker.planner"]
    assert "services.core.family.Family" in imports_of("services.allocator")["services.allocator.domain.model"]


def test_the_cycle_check_sees_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycle_inside_services() -> None:
    """A cycle, even one broken at run time by an import inside a function or under TYPE_CHECKING,
    says two modules are one: break it at its root."""
    assert cycles(import_graph("services")) == []


@pytest.mark.parametrize("module", WORKER_CORE)
def test_protobuf_stops_at_the_worker_s_edge(module: str) -> None:
    """The worker's core speaks its own values; `allocator_grpc.py` alone translates protobuf and
    the gRPC client's errors."""
    imports = imports_of("services.cloudworker")
    found = sorted(
        f"{m} imports {name}"
        for m, names in imports.items()
        if m == module or m.startswith(f"{module}.")
        for name in names
        if name.split(".")[0] in ("ipam", "grpc", "clients") or name.startswith("google.protobuf")
    )
    assert found == []


@pytest.mark.parametrize(
    "package,forbidden",
    [
        ("services.cloudworker", ("services.allocator",)),
        ("services.allocator", ("services.cloudworker",)),
        ("services.core", ("services.allocator", "services.cloudworker", "clients", "grpc", "ipam")),
        ("services", ("dev", "bench", "tests")),  # the runtime image holds services/ without them
        ("clients", ("dev", "bench", "tests")),
        ("dev", ("bench", "tests")),
    ],
)
def test_packages_import_only_what_they_may(package: str, forbidden: tuple[str, ...]) -> None:
    assert offenders(package, forbidden) == []


@pytest.mark.parametrize("module", PURE_CORE)
def test_pure_core_modules_do_no_io(module: str) -> None:
    names = imports_of("services.core")[module]
    assert sorted(n for n in names if n.split(".")[0] in IO_LIBRARIES) == []
