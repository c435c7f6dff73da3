"""The shape of the code: dependencies point one way, the wire schemas stay in the HTTP layer, modules stay small.

Read from the source with ``ast`` (every import counts, also one inside a function or under
``TYPE_CHECKING``), so nothing is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from processes import REPO

#: The HTTP layer of the service: the modules that build or read the wire objects of service/schemas.py.
#: Everything below it (catalogue, resident adapters, engine, batcher, metrics ...) speaks plain dataclasses.
HTTP_LAYER = {
    "service.app",
    "service.routes",
    "service.responses",
    "service.classification",
    "service.results",
    "service.lifecycle",
    "service.console",
    "service.live_stats",
    "service.engine_client",
    "service.protocols.tei",
    "service.protocols.oip",
    "service.protocols.oip_codec",
    "service.ray_serve.ingress",
    "service.ray_serve.replica",  # answers the ingress with its EngineClient's named results
}
MAX_SERVICE_MODULE_LINES = 350


def modules(package: str) -> dict[str, Path]:
    """Module name -> file of every Python module of ``package`` (a top-level folder of the repository)."""
    found = {}
    for path in sorted((REPO / package).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports (``from a.b import c`` counts as ``a.b`` and ``a.b.c``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def package_of(module: str) -> str:
    return module.split(".")[0]


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("cogalora", {"service", "training", "benchmarks"}), ("training", {"service"}), ("service", {"training"})],
)
def test_dependencies_point_one_way(package, forbidden):
    offending = {
        module: sorted(name for name in imported(path) if package_of(name) in forbidden)
        for module, path in modules(package).items()
    }
    assert not {module: names for module, names in offending.items() if names}


def test_only_the_http_layer_imports_the_wire_schemas():
    importers = {module for module, path in modules("service").items() if "service.schemas" in imported(path)}
    assert importers, "nothing imports service.schemas: the test reads the wrong files"
    assert importers <= HTTP_LAYER, f"below the HTTP layer: {sorted(importers - HTTP_LAYER)}"
    assert set(modules("service")) >= HTTP_LAYER, f"no such modules: {sorted(HTTP_LAYER - set(modules('service')))}"


def test_no_service_module_grows_past_the_size_one_reader_holds_in_mind():
    lengths = {
        module: len(path.read_text(encoding="utf-8").splitlines()) for module, path in modules("service").items()
    }
    assert not {module: lines for module, lines in lengths.items() if lines > MAX_SERVICE_MODULE_LINES}, (
        f"split by concern: at most {MAX_SERVICE_MODULE_LINES} lines a module"
    )
