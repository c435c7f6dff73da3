"""What the service imports is what a plain ``pip install`` of the project brings (the Docker image
installs the core dependencies only: a module that arrives only with a dev or Ray extra breaks it)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, packages_distributions, requires

from processes import REPO

# Optional parts, each with its extra: scale-out on Ray Serve.
OPTIONAL = ("service/ray_serve",)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _canonical(re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0])


def core_closure() -> set[str]:
    """The core dependencies of pyproject.toml and, recursively, what they require (extras excluded)."""
    declared = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    seen: set[str] = set()
    todo = [_requirement_name(requirement) for requirement in declared]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            needed = requires(name) or []
        except PackageNotFoundError:
            continue
        todo.extend(_requirement_name(r) for r in needed if "extra ==" not in r.replace('"', " ").replace("'", " "))
    return seen


def imported_top_level_modules(package: str) -> dict[str, str]:
    """Top-level modules imported anywhere in ``package`` (outside OPTIONAL) -> a file importing it."""
    found: dict[str, str] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        relative = path.relative_to(REPO).as_posix()
        if relative.startswith(OPTIONAL):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], relative)
    return found


def test_every_module_the_service_imports_comes_with_the_core_dependencies():
    closure = core_closure()
    distributions = packages_distributions()
    ours = {"cogalora", "service", "training", "benchmarks"}
    missing = {}
    for package in ("cogalora", "service"):
        for module, where in imported_top_level_modules(package).items():
            if module in ours or module in sys.stdlib_module_names:
                continue
            providers = {_canonical(d) for d in distributions.get(module, [])}
            if not providers & closure:
                missing[module] = f"{where} (installed by {sorted(providers) or 'nothing'})"
    assert not missing, f"imported but not brought by the core dependencies: {missing}"
