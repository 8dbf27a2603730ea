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
