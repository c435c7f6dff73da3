"""Property tests from the app's own OpenAPI document (schemathesis): no 5xx, responses match the schema."""

from __future__ import annotations

import time

import pytest
import schemathesis
from api_fakes import on_engine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import checks
from schemathesis.python import asgi

from service.app import create_app
from service.engine_core import build_engine
from service.metrics import ServiceMetrics
from service.settings import Settings

pytestmark = pytest.mark.integration

LOADED = ["sst2", "agnews", "plain"]
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]


@pytest.fixture(scope="module")
def loaded(minilm_model_dir):
    """Repository and engine on the packaged MiniLM, loaded once for the module."""
    return build_engine(Settings(model_dir=minilm_model_dir), ServiceMetrics())


@pytest.fixture
def api_schema(loaded, minilm_model_dir):
    """The app on the real engine; small limits so generated bodies reach every 413 path."""
    settings = Settings(model_dir=minilm_model_dir, max_client_batch=8, max_input_chars=400, max_body_bytes=20_000)
    app = create_app(settings, components=on_engine(*loaded))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    with asgi.get_client(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "the app never became ready"
            time.sleep(0.01)
    return schema  # schemathesis ends the app's lifespan when the test ends


def operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_contract(api_schema, mode):
    """Every operation, with generated valid (and invalid) requests: never a 5xx, always the documented shape."""
    generation_mode = schemathesis.GenerationMode(mode)
    checked = []
    for operation in operations(api_schema):

        @given(case=operation.as_strategy(generation_mode), adapter=st.sampled_from([None, *LOADED]))
        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def run(case, adapter) -> None:
            if adapter and case.operation.label == "POST /classify" and isinstance(case.body, dict):
                case.body["adapter"] = adapter  # reach the engine too, not only the unknown-adapter path
            response = case.call_and_validate(checks=CHECKS)
            assert response.status_code < 500, response.text
            if response.status_code >= 400:
                assert set(response.json()) == {"error", "error_type"}, response.text

        try:
            run()
        except Unsatisfiable:
            assert mode == "negative", operation.label  # nothing invalid to send to an operation without inputs
            continue
        checked.append(operation.label)
    assert len(checked) >= (7 if mode == "positive" else 3), checked
