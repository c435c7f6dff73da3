"""Generate docker/grafana/dashboards/cogalora.json (the provisioned Grafana dashboard).

    python docker/grafana/make_dashboard.py          # rewrite the JSON
    python docker/grafana/make_dashboard.py --check  # exit 1 when the JSON is out of date

Every query selects ``adapter=~"$adapter"`` (a multi-value variable with "All" = ``.*``) and is
written to return data whenever the service has served some traffic in the window: series that
may legitimately be absent (errors, rejections) fall back to ``or vector(0)``. Metric names come from
``service/metric_definitions.py``, the service's own definitions.
tests/test_observability.py evaluates every expression against a real Prometheus.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the metric definitions live in the service package

from service import metric_definitions as M  # noqa: E402
from service.metric_definitions import Metric  # noqa: E402

DATASOURCE = {"type": "prometheus", "uid": "cogalora-prometheus"}
DASHBOARD_UID = "cogalora-serve"
OUTPUT = Path(__file__).resolve().parent / "dashboards" / "cogalora.json"

A = 'adapter=~"$adapter"'
RI = "$__rate_interval"
QUOTED_2XX = '"2.."'
QUOTED_AGREE = '"agree"'
#: The adapter variable's values: every adapter the service has answered for.
ADAPTER_VALUES = f"label_values({M.REQUESTS.series}, adapter)"


def rate(metric: str, selector: str = A, window: str = RI) -> str:
    matchers = f"{{{selector}}}" if selector else ""
    return f"rate({metric}{matchers}[{window}])"


def ratio_of_sums(numerator: str, denominator: str, by: str = "", selector: str = A) -> str:
    """sum(rate(num)) / sum(rate(den)), optionally grouped by labels."""
    group = f" by ({by})" if by else ""
    return f"sum{group} ({rate(numerator, selector)}) / sum{group} ({rate(denominator, selector)})"


def quantile(q: float, histogram: Metric, selector: str = A, by: str = "le") -> str:
    return f"histogram_quantile({q}, sum by ({by}) ({rate(histogram.bucket, selector)}))"


class Layout:
    """Places panels left to right in rows of 24 grid units."""

    def __init__(self) -> None:
        self.x = 0
        self.y = 0
        self.row_height = 0
        self.next_id = 1

    def place(self, width: int, height: int) -> dict:
        if self.x + width > 24:
            self.x, self.y, self.row_height = 0, self.y + self.row_height, 0
        pos = {"x": self.x, "y": self.y, "w": width, "h": height}
        self.x += width
        self.row_height = max(self.row_height, height)
        return pos

    def row(self, title: str) -> dict:
        if self.x:
            self.x, self.y, self.row_height = 0, self.y + self.row_height, 0
        panel = {
            "id": self.new_id(),
            "type": "row",
            "title": title,
            "collapsed": False,
            "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1},
            "panels": [],
        }
        self.y += 1
        return panel

    def new_id(self) -> int:
        panel_id = self.next_id
        self.next_id += 1
        return panel_id


def target(expr: str, legend: str, ref: str, instant: bool = False, fmt: str = "time_series") -> dict:
    return {
        "datasource": DATASOURCE,
        "expr": expr,
        "legendFormat": legend,
        "refId": ref,
        "range": not instant,
        "instant": instant,
        "format": fmt,
    }


def panel(
    layout: Layout,
    kind: str,
    title: str,
    description: str,
    targets: list[tuple[str, str]],
    width: int = 12,
    height: int = 8,
    unit: str = "short",
    instant: bool = False,
    fmt: str = "time_series",
    options: dict | None = None,
    custom: dict | None = None,
    extra_defaults: dict | None = None,
) -> dict:
    refs = "ABCDEFGH"
    defaults: dict = {"unit": unit}
    if custom is not None:
        defaults["custom"] = custom
    if extra_defaults:
        defaults.update(extra_defaults)
    return {
        "id": layout.new_id(),
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": layout.place(width, height),
        "targets": [target(expr, legend, refs[i], instant, fmt) for i, (expr, legend) in enumerate(targets)],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options or {},
    }


def timeseries(layout: Layout, title: str, description: str, targets, unit="short", stack=False, **kw) -> dict:
    custom = {
        "drawStyle": "line",
        "lineWidth": 1,
        "fillOpacity": 25 if stack else 10,
        "showPoints": "never",
        "spanNulls": True,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
    }
    options = {
        "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max", "lastNotNull"]},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    return panel(layout, "timeseries", title, description, targets, unit=unit, options=options, custom=custom, **kw)


def stat(layout: Layout, title: str, description: str, expr: str, unit="short", decimals=None, **kw) -> dict:
    options = {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "colorMode": "value",
        "graphMode": "area",
        "justifyMode": "auto",
        "textMode": "auto",
    }
    extra = {"decimals": decimals} if decimals is not None else None
    return panel(
        layout,
        "stat",
        title,
        description,
        [(expr, title)],
        width=4,
        height=4,
        unit=unit,
        options=options,
        extra_defaults=extra,
        **kw,
    )


def build() -> dict:
    layout = Layout()
    panels: list[dict] = []
    add = panels.append

    # ---- overview ------------------------------------------------------------------------
    add(layout.row("Overview"))
    requests_rate = f"sum({rate(M.REQUESTS.series)})"
    add(stat(layout, "Request rate", "POST /classify requests per second.", f"{requests_rate} or vector(0)", "reqps"))
    add(
        stat(
            layout,
            "p99 latency",
            "99th percentile of the whole request as the server saw it.",
            quantile(0.99, M.REQUEST_DURATION),
            "s",
        )
    )
    error_ratio = (
        f"(sum({rate(M.REQUESTS.series, A + ', code!~' + QUOTED_2XX)}) or vector(0))"
        f" / ({requests_rate} > 0) or vector(0)"
    )
    add(stat(layout, "Error ratio", "Share of requests answered with a non-2xx status.", error_ratio, "percentunit"))
    add(
        stat(
            layout,
            "Active adapters / input",
            "Mean number of LoRA modules whose gate was on, per classified input.",
            ratio_of_sums(M.ACTIVE_ADAPTERS.sum, M.ACTIVE_ADAPTERS.count),
            "short",
            decimals=2,
        )
    )
    saved = f"sum({rate(M.ADAPTER_FLOPS_SAVED.series)})"
    executed = f"sum({rate(M.ADAPTER_FLOPS.series)})"
    add(
        stat(
            layout,
            "Adapter FLOPs saved",
            "Share of adapter FLOPs skipped because the router turned the gate off.",
            f"{saved} / ({saved} + {executed})",
            "percentunit",
        )
    )
    add(
        stat(
            layout,
            "Adapters loaded",
            "Adapters loaded and servable.",
            f"max({M.ADAPTERS_LOADED.series})",
            "short",
        )
    )

    # ---- traffic -------------------------------------------------------------------------
    add(layout.row("Traffic and latency"))
    add(
        timeseries(
            layout,
            "Request rate by status code",
            "POST /classify requests per second, by HTTP status.",
            [(f"sum by (code) ({rate(M.REQUESTS.series)})", "{{code}}")],
            "reqps",
            stack=True,
        )
    )
    add(
        timeseries(
            layout,
            "Latency p50 / p95 / p99",
            "Whole-request latency percentiles (server side), from the request histogram.",
            [
                (quantile(0.5, M.REQUEST_DURATION), "p50"),
                (quantile(0.95, M.REQUEST_DURATION), "p95"),
                (quantile(0.99, M.REQUEST_DURATION), "p99"),
            ],
            "s",
        )
    )
    errors = 'code!~"2.."'
    rejected = 'code=~"429|503"'
    server = 'code=~"5.."'
    add(
        timeseries(
            layout,
            "Errors and rejections",
            "Non-2xx answers per second; 429/503 are queue-full rejections (with Retry-After), "
            "5xx includes them and timeouts (504).",
            [
                (f"sum({rate(M.REQUESTS.series, A + ', ' + errors)}) or vector(0)", "non-2xx"),
                (f"sum({rate(M.REQUESTS.series, A + ', ' + rejected)}) or vector(0)", "rejected 429/503"),
                (f"sum({rate(M.REQUESTS.series, A + ', ' + server)}) or vector(0)", "5xx"),
            ],
            "reqps",
        )
    )
    add(
        timeseries(
            layout,
            "Inputs per second by adapter",
            "Classified inputs per second (a request may carry several).",
            [(f"sum by (adapter) ({rate(M.INPUTS.series)})", "{{adapter}}")],
            "short",
            stack=True,
        )
    )

    # ---- batching ------------------------------------------------------------------------
    add(layout.row("Queueing and batching"))
    add(
        timeseries(
            layout,
            "Queue vs inference time",
            "Mean and p95 time a request waited for a batch, and spent in the engine.",
            [
                (
                    ratio_of_sums(M.QUEUE_DURATION.sum, M.QUEUE_DURATION.count),
                    "queue mean",
                ),
                (quantile(0.95, M.QUEUE_DURATION), "queue p95"),
                (
                    ratio_of_sums(M.INFERENCE_DURATION.sum, M.INFERENCE_DURATION.count),
                    "inference mean",
                ),
                (quantile(0.95, M.INFERENCE_DURATION), "inference p95"),
            ],
            "s",
        )
    )
    add(
        timeseries(
            layout,
            "Batch size (rows per engine forward)",
            "Across all adapters: a batch may mix adapters.",
            [
                (ratio_of_sums(M.BATCH_SIZE.sum, M.BATCH_SIZE.count, selector=""), "mean"),
                (quantile(0.5, M.BATCH_SIZE, selector=""), "p50"),
                (quantile(0.95, M.BATCH_SIZE, selector=""), "p95"),
            ],
            "short",
            width=8,
        )
    )
    add(
        timeseries(
            layout,
            "Engine forwards per second and their duration",
            "Batches per second, and the mean wall time of one forward.",
            [
                (f"sum({rate(M.BATCH_DURATION.count, '')})", "forwards/s"),
                (
                    ratio_of_sums(M.BATCH_DURATION.sum, M.BATCH_DURATION.count, selector=""),
                    "mean forward (s)",
                ),
            ],
            "short",
            width=8,
        )
    )
    add(
        timeseries(
            layout,
            "Queue depth and in-flight requests",
            "Rows waiting for a batch, and POST /classify requests being handled (max over each interval).",
            [
                (f"max(max_over_time({M.QUEUE_DEPTH.series}[{RI}]))", "queue depth (rows)"),
                (f"max(max_over_time({M.INFLIGHT.series}[{RI}]))", "in-flight requests"),
            ],
            "short",
            width=8,
        )
    )
    add(
        timeseries(
            layout,
            "Input tokens per input",
            "Median and p95 tokens per classified input, by adapter.",
            [
                (quantile(0.5, M.INPUT_TOKENS, by="le, adapter"), "{{adapter}} p50"),
                (quantile(0.95, M.INPUT_TOKENS, by="le, adapter"), "{{adapter}} p95"),
            ],
            "short",
            width=8,
        )
    )
    add(
        timeseries(
            layout,
            "FLOPs per input",
            "Mean total FLOPs per classified input (base encoder + routers + active adapters + head).",
            [
                (
                    ratio_of_sums(M.REQUEST_FLOPS.sum, M.REQUEST_FLOPS.count, by="adapter"),
                    "{{adapter}}",
                )
            ],
            "short",
            width=8,
        )
    )
    add(
        timeseries(
            layout,
            "Truncated inputs (%)",
            "Share of classified inputs cut to the adapter's max_length (truncate=true), by adapter. The rest of "
            "such an input was never read: a rising share means clients send longer texts than the model takes.",
            [(ratio_of_sums(M.TRUNCATED_INPUTS.series, M.INPUTS.series, by="adapter"), "{{adapter}}")],
            "percentunit",
            width=8,
            extra_defaults={"min": 0, "max": 1},
        )
    )

    # ---- routing -------------------------------------------------------------------------
    add(layout.row("Adapter routing"))
    add(
        timeseries(
            layout,
            "Active adapters per input (mean, by adapter)",
            "Mean number of LoRA modules that ran per input. Plain LoRA runs all of them.",
            [
                (
                    ratio_of_sums(M.ACTIVE_ADAPTERS.sum, M.ACTIVE_ADAPTERS.count, by="adapter"),
                    "{{adapter}}",
                )
            ],
            "short",
        )
    )
    add(
        timeseries(
            layout,
            "Total active rank per input (mean, by adapter)",
            f"Sum over sites of the rank each input used ({M.ACTIVE_RANK.name}): a RAD-LoRA router picks a rank per "
            "site, so this falls below rank x active adapters; for every other method it is exactly that "
            "(288 = 36 sites at rank 8).",
            [
                (
                    ratio_of_sums(M.ACTIVE_RANK.sum, M.ACTIVE_RANK.count, by="adapter"),
                    "{{adapter}}",
                ),
                (quantile(0.95, M.ACTIVE_RANK), "p95 (all adapters)"),
            ],
            "short",
        )
    )
    add(
        panel(
            layout,
            "heatmap",
            "Active adapters per input (distribution)",
            "How many modules ran per input, over time (histogram buckets; upper bound shown).",
            [(f"sum by (le) (increase({M.ACTIVE_ADAPTERS.bucket}{{{A}}}[{RI}]))", "{{le}}")],
            fmt="heatmap",
            options={
                "calculate": False,
                "yAxis": {"axisPlacement": "left", "unit": "short"},
                "rowsFrame": {"layout": "le"},
                "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
                "cellGap": 1,
                "tooltip": {"mode": "single", "yHistogram": True},
                "legend": {"show": True},
            },
        )
    )
    activations = f"sum by (layer, module) (increase({M.MODULE_ACTIVATIONS.series}{{{A}}}[$__range]))"
    inputs = f"scalar(sum(increase({M.INPUTS.series}{{{A}}}[$__range])))"
    add(
        panel(
            layout,
            "bargauge",
            "Activation rate by layer and module (dashboard range)",
            "Share of inputs for which each LoRA module ran, over the selected time range "
            "(activations / inputs). 1 = always on (plain LoRA); 0 = never (could be pruned).",
            [(f"{activations} / {inputs}", "L{{layer}} {{module}}")],
            width=12,
            height=14,
            unit="percentunit",
            instant=True,
            options={
                "orientation": "horizontal",
                "displayMode": "gradient",
                "showUnfilled": True,
                "valueMode": "color",
                "namePlacement": "left",
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            },
            extra_defaults={
                "min": 0,
                "max": 1,
                "color": {"mode": "continuous-GrYlRd"},
            },
        )
    )
    add(
        panel(
            layout,
            "status-history",
            "Activation rate by layer and module over time (heatmap)",
            "Per interval: activations / inputs of each module. Rows are layer and module.",
            [
                (
                    f"sum by (layer, module) ({rate(M.MODULE_ACTIVATIONS.series)}) / "
                    f"scalar(sum({rate(M.INPUTS.series)}))",
                    "L{{layer}} {{module}}",
                )
            ],
            width=12,
            height=14,
            unit="percentunit",
            options={"showValue": "never", "rowHeight": 0.9, "colWidth": 0.95, "legend": {"showLegend": False}},
            extra_defaults={"min": 0, "max": 1, "color": {"mode": "continuous-GrYlRd"}},
        )
    )
    add(
        timeseries(
            layout,
            "Active modules per input, by layer",
            "Mean number of a layer's adapter modules that ran per input.",
            [
                (
                    f"sum by (layer) ({rate(M.MODULE_ACTIVATIONS.series)}) / scalar(sum({rate(M.INPUTS.series)}))",
                    "layer {{layer}}",
                )
            ],
            "short",
            width=24,
        )
    )

    # ---- FLOPs ---------------------------------------------------------------------------
    add(layout.row("Adapter FLOPs"))
    add(
        timeseries(
            layout,
            "Adapter FLOPs executed vs saved",
            "Adapter FLOPs per second that ran (gate on) and that were skipped (gate off).",
            [
                (f"sum by (adapter) ({rate(M.ADAPTER_FLOPS.series)})", "{{adapter}} executed"),
                (f"sum by (adapter) ({rate(M.ADAPTER_FLOPS_SAVED.series)})", "{{adapter}} saved"),
            ],
            "short",
            stack=True,
        )
    )
    saved_by = f"sum by (adapter) ({rate(M.ADAPTER_FLOPS_SAVED.series)})"
    executed_by = f"sum by (adapter) ({rate(M.ADAPTER_FLOPS.series)})"
    add(
        timeseries(
            layout,
            "Adapter FLOPs saved (%)",
            "saved / (executed + saved), by adapter: what conditional routing skips. 0 for plain LoRA.",
            [(f"{saved_by} / ({saved_by} + {executed_by})", "{{adapter}}")],
            "percentunit",
            extra_defaults={"min": 0, "max": 1},
        )
    )

    # ---- routing fidelity ----------------------------------------------------------------
    add(layout.row("Routing fidelity"))
    shadow = M.SHADOW_ROWS.series
    shadow_total = f"sum by (adapter) ({rate(shadow)})"
    # "or 0 * total": an adapter whose checks all disagreed has no "agree" series, and must read 0.
    agreed = f"(sum by (adapter) ({rate(shadow, A + ', agreement=' + QUOTED_AGREE)}) or 0 * {shadow_total})"
    add(
        timeseries(
            layout,
            "Shadow agreement vs adapter FLOPs saved",
            "Live accuracy/compute trade-off. Agreement: share of shadow dense checks (a sampled row re-run "
            "with every gate on, shadow_fraction) whose label equals the routed label. Saved: share of adapter "
            "FLOPs the routers skipped.",
            [
                (f"{agreed} / {shadow_total}", "{{adapter}} agreement"),
                (f"{saved_by} / ({saved_by} + {executed_by})", "{{adapter}} FLOPs saved"),
            ],
            "percentunit",
            width=8,
            extra_defaults={"min": 0, "max": 1},
        )
    )
    add(
        timeseries(
            layout,
            "Shadow score difference |routed - dense|",
            "Per shadow dense check: how far the routed probability of the returned label is from plain "
            "LoRA's (same weights, every gate on). Mean and p95, by adapter.",
            [
                (
                    ratio_of_sums(M.SHADOW_SCORE_DIFFERENCE.sum, M.SHADOW_SCORE_DIFFERENCE.count, by="adapter"),
                    "{{adapter}} mean",
                ),
                (quantile(0.95, M.SHADOW_SCORE_DIFFERENCE, by="le, adapter"), "{{adapter}} p95"),
            ],
            "short",
            width=8,
        )
    )
    add(
        timeseries(
            layout,
            "Routing drift",
            "Mean |live - dev| per-site activation rate over the last drift_window rows of each adapter: near 0 "
            "while inputs look like the dev data; the CogaloraRoutingDrift alert fires above 0.05.",
            [(f"max by (adapter) ({M.ROUTING_DRIFT.series}{{{A}}})", "{{adapter}}")],
            "short",
            width=8,
            extra_defaults={
                "min": 0,
                "thresholds": {"mode": "absolute", "steps": [{"color": "green"}, {"color": "red", "value": 0.05}]},
            },
        )
    )

    return {
        "uid": DASHBOARD_UID,
        "title": "CoGaLoRA Serve",
        "description": "Traffic, latency, batching, per-input adapter routing and FLOPs of the CoGaLoRA service.",
        "tags": ["cogalora", "lora", "serving"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "5s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-15m", "to": "now"},
        "timepicker": {"refresh_intervals": ["5s", "10s", "30s", "1m", "5m"]},
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "adapter",
                    "label": "Adapter",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "definition": ADAPTER_VALUES,
                    "query": {
                        "qryType": 1,
                        "query": ADAPTER_VALUES,
                        "refId": "PrometheusVariableQueryEditor-VariableQuery",
                    },
                    "refresh": 2,
                    "includeAll": True,
                    "allValue": ".*",
                    "multi": True,
                    "sort": 1,
                    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                    "options": [],
                    "hide": 0,
                }
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the JSON file is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{OUTPUT} is out of date: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
