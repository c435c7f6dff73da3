"""The reference tables of docs/service.md that mirror code: exported metrics and error types, both ways.

A metric or error type added in code without its row fails here, and so does a row for one that does
not exist (the settings table has the same check in test_cli.py).
"""

from __future__ import annotations

import re

from processes import REPO

from service import errors
from service.metric_definitions import METRICS
from service.responses import HTTP_ERROR_TYPES

SERVICE_DOC = REPO / "docs" / "service.md"


def table_rows(pattern: str) -> list[tuple[str, ...]]:
    """The cells of every docs/service.md table row matching ``pattern`` (one group per cell kept)."""
    text = SERVICE_DOC.read_text(encoding="utf-8")
    return [match.groups() for match in re.finditer(pattern, text, flags=re.MULTILINE)]


def test_the_metrics_table_lists_every_exported_metric_with_its_type_and_labels_and_nothing_else():
    rows = table_rows(r"^\| `(cogalora_\w+)` \| (\w+) \|([\w, ]*)\|")
    documented = {
        name: (kind, tuple(label.strip() for label in labels.split(",") if label.strip()))
        for name, kind, labels in rows
    }
    assert len(documented) == len(rows), "docs/service.md: one row per metric"
    exported = {metric.documented_name: (metric.kind, metric.labels) for metric in METRICS}
    assert sorted(documented) == sorted(exported), "docs/service.md: the metrics table and the exported metrics differ"
    for name, (kind, labels) in exported.items():
        assert documented[name] == (kind, labels), name


def service_errors() -> set[type[errors.ServiceError]]:
    """ServiceError and every subclass of it."""
    found, pending = set(), [errors.ServiceError]
    while pending:
        kind = pending.pop()
        found.add(kind)
        pending += kind.__subclasses__()
    return found


def test_the_errors_table_lists_every_error_type_with_its_status_and_nothing_else():
    rows = table_rows(r"^\| (\d{3}) \| `(\w+)` \|")
    documented = {(int(status), error_type) for status, error_type in rows}
    assert len(documented) == len(rows), "docs/service.md: one row per error type"
    raised = {(kind.status_code, kind.error_type) for kind in service_errors()}
    raised |= set(HTTP_ERROR_TYPES.items())
    assert documented == raised, (
        f"only in docs/service.md: {sorted(documented - raised)}; missing from it: {sorted(raised - documented)}"
    )
