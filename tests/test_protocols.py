"""The TEI and Open Inference v2 routes against the fake engine side: answers, headers, bad requests, auth, metrics.

The real clients (huggingface_hub, tritonclient) against a real process: tests/test_protocol_clients.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct

import httpx
import numpy as np
import pytest
from api_fakes import FAKE_MAX_LENGTH, fake_components, running
from processes import metric_sum
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from service.app import create_app
from service.settings import Settings

TEXTS = ["a good film", "bad", "so good and more words here"]
BYTES_INPUT = {"name": "any_name", "shape": [len(TEXTS)], "datatype": "BYTES", "data": TEXTS}


def app_for(tmp_path, names=("sst2", "agnews"), **overrides):
    return create_app(Settings(model_dir=tmp_path, **overrides), components=fake_components(list(names)))


async def classify(client: httpx.AsyncClient, texts, adapter="sst2", **extra) -> list[dict]:
    response = await client.post("/classify", json={"inputs": texts, "adapter": adapter, **extra})
    assert response.status_code == 200, response.text
    return response.json()["results"]


def assert_error(response: httpx.Response, status: int, *fragments: str) -> None:
    """A clean 4xx in the service's envelope, which is also the Open Inference error format (``error``)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"}, body
    for fragment in fragments:
        assert fragment in body["error"], body


# ---- TEI --------------------------------------------------------------------------------------------


async def test_tei_predict_shapes_follow_the_input(tmp_path):
    async with running(app_for(tmp_path)) as client:
        reference = await classify(client, TEXTS)
        single = await client.post("/models/sst2/predict", json={"inputs": TEXTS[0]})
        many = await client.post("/models/sst2/predict", json={"inputs": TEXTS})
        inference_api = await client.post("/models/sst2", json={"inputs": TEXTS[0], "parameters": {}})
    assert single.status_code == many.status_code == inference_api.status_code == 200
    assert single.json() == reference[0]["scores"]  # a flat list, highest score first
    assert many.json() == [row["scores"] for row in reference]
    assert inference_api.json() == [reference[0]["scores"]]  # always one list per input


async def test_tei_headers_carry_the_routing_of_each_input(tmp_path):
    long_text = " ".join(["good"] * (FAKE_MAX_LENGTH + 5))
    async with running(app_for(tmp_path)) as client:
        reference = await classify(client, [*TEXTS, long_text])
        response = await client.post("/models/sst2/predict", json={"inputs": [*TEXTS, long_text]})
    headers = response.headers

    def values(name: str) -> list[str]:
        return headers[name].split(",")

    assert headers["x-adapter"] == "sst2"
    assert values("x-active-adapters") == [str(row["active_adapters"]) for row in reference]
    assert values("x-total-adapters") == [str(row["total_adapters"]) for row in reference]
    assert [float(v) for v in values("x-adapter-flops")] == [row["flops"]["adapter"] for row in reference]
    assert [float(v) for v in values("x-adapter-flops-saved")] == [row["flops"]["adapter_saved"] for row in reference]
    assert [float(v) for v in values("x-flops")] == [row["flops"]["total"] for row in reference]
    assert values("x-tokens") == [str(row["tokens"]) for row in reference]
    assert values("x-input-tokens") == [str(row["input_tokens"]) for row in reference]
    assert values("x-truncated") == ["false", "false", "false", "true"]
    assert "x-queue-time-ms" in headers and "x-inference-time-ms" in headers


async def test_tei_parameters_top_k_and_functions(tmp_path):
    async with running(app_for(tmp_path)) as client:
        reference = (await classify(client, TEXTS[0], raw_scores=True))[0]

        async def predict(**body) -> list[dict]:
            response = await client.post("/models/sst2/predict", json={"inputs": TEXTS[0], **body})
            assert response.status_code == 200, response.text
            return response.json()

        assert await predict(parameters={"top_k": 1}) == reference["scores"][:1]
        assert await predict(parameters={"function_to_apply": "softmax", "top_k": None}) == reference["scores"]
        logits = reference["raw_scores"]
        assert await predict(parameters={"function_to_apply": "none"}) == logits
        assert await predict(raw_scores=True) == logits  # TEI's top-level form
        assert await predict(parameters={"raw_scores": True}) == logits
        sigmoid = await predict(parameters={"function_to_apply": "sigmoid"})
        assert [entry["label"] for entry in sigmoid] == [entry["label"] for entry in logits]
        expected = [1 / (1 + math.exp(-entry["score"])) for entry in logits]
        assert [entry["score"] for entry in sigmoid] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"inputs": "x", "parameters": {"temperature": 1}}, 422, "parameters.temperature"),
        ({"inputs": "x", "details": True}, 422, "details"),
        ({"inputs": "x", "parameters": {"top_k": 0}}, 422, "top_k"),
        ({"inputs": "x", "parameters": {"function_to_apply": "relu"}}, 422, "function_to_apply"),
        ({"inputs": "x", "raw_scores": True, "parameters": {"function_to_apply": "softmax"}}, 422, "raw_scores"),
        ({"inputs": "x", "truncate": True, "parameters": {"truncate": False}}, 422, "truncate"),
        ({"inputs": 42}, 422, "inputs"),
        ({"inputs": []}, 422, "inputs"),
        ({"inputs": [["a", "b"]]}, 422, "inputs"),
        ({"inputs": " ".join(["w"] * FAKE_MAX_LENGTH), "truncate": False}, 413, "max_length"),
    ],
)
async def test_tei_bad_requests_get_clean_4xx(tmp_path, body, status, fragment):
    async with running(app_for(tmp_path)) as client:
        for path in ("/models/sst2", "/models/sst2/predict"):
            assert_error(await client.post(path, json=body), status, fragment)
        assert (await client.post("/models/sst2", json={"inputs": "good"})).status_code == 200


async def test_unknown_adapter_is_404_on_every_route(tmp_path):
    async with running(app_for(tmp_path)) as client:
        for response in await asyncio.gather(
            client.post("/models/nope", json={"inputs": "x"}),
            client.post("/models/nope/predict", json={"inputs": "x"}),
            client.post("/v2/models/nope/infer", json={"inputs": [BYTES_INPUT]}),
            client.get("/v2/models/nope"),
            client.get("/v2/models/nope/ready"),
        ):
            assert_error(response, 404, "unknown adapter")


# ---- Open Inference Protocol v2 --------------------------------------------------------------------------


def outputs_by_name(body: dict) -> dict[str, dict]:
    return {output["name"]: output for output in body["outputs"]}


async def test_oip_infer_answers_what_classify_answers(tmp_path):
    async with running(app_for(tmp_path)) as client:
        reference = await classify(client, TEXTS, adapter="agnews")
        response = await client.post("/v2/models/agnews/infer", json={"id": "r-1", "inputs": [BYTES_INPUT]})
        metadata = (await client.get("/v2/models/agnews")).json()
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model_name"], body["id"]) == ("agnews", "r-1")
    outputs = outputs_by_name(body)
    n = len(TEXTS)
    assert outputs["label"] == {
        "name": "label",
        "datatype": "BYTES",
        "shape": [n],
        "data": [r["label"] for r in reference],
    }
    assert outputs["score"]["datatype"] == "FP32" and outputs["score"]["data"] == [r["score"] for r in reference]
    labels = metadata["labels"]
    assert outputs["scores"]["shape"] == [n, len(labels)]
    for i, row in enumerate(reference):
        by_label = {entry["label"]: entry["score"] for entry in row["scores"]}
        assert outputs["scores"]["data"][i * len(labels) : (i + 1) * len(labels)] == [by_label[x] for x in labels]
    assert outputs["active_adapters"]["data"] == [r["active_adapters"] for r in reference]
    assert outputs["flops"]["data"] == [r["flops"]["total"] for r in reference]
    assert outputs["adapter_flops_saved"]["data"] == [r["flops"]["adapter_saved"] for r in reference]
    assert outputs["truncated"] == {"name": "truncated", "datatype": "BOOL", "shape": [n], "data": [False] * n}
    assert {output["name"] for output in metadata["outputs"]} == set(outputs)


async def test_oip_requested_outputs_shape_n_by_1_and_parameters(tmp_path):
    async with running(app_for(tmp_path)) as client:
        column = {**BYTES_INPUT, "shape": [len(TEXTS), 1], "data": [[text] for text in TEXTS]}
        body = {
            "inputs": [column],
            "outputs": [{"name": "score"}, {"name": "label"}],
            "parameters": {"threshold": 0.0, "truncate": True},
        }
        response = await client.post("/v2/models/sst2/infer", json=body)
    assert response.status_code == 200, response.text
    assert [output["name"] for output in response.json()["outputs"]] == ["score", "label"]


async def test_oip_binary_tensor_extension_both_ways(tmp_path):
    async with running(app_for(tmp_path)) as client:
        reference = await classify(client, TEXTS)
        raw = serialize_byte_tensor(np.array([text.encode() for text in TEXTS], dtype=np.object_)).item()
        header = {
            "inputs": [
                {"name": "t", "shape": [len(TEXTS)], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}
            ],
            "outputs": [{"name": "label", "parameters": {"binary_data": True}}, {"name": "score"}],
        }
        head = json.dumps(header).encode()
        response = await client.post(
            "/v2/models/sst2/infer",
            content=head + raw,
            headers={"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"},
        )
    assert response.status_code == 200, response.text
    split = int(response.headers["inference-header-content-length"])
    answer = json.loads(response.content[:split])
    label, score = answer["outputs"]
    assert "data" not in label and label["parameters"]["binary_data_size"] == len(response.content) - split
    labels = deserialize_bytes_tensor(response.content[split:])
    assert [value.decode() for value in labels] == [row["label"] for row in reference]
    assert score["data"] == [row["score"] for row in reference]


def infer_body(**tensor) -> dict:
    return {"inputs": [{**BYTES_INPUT, **tensor}]}


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (infer_body(datatype="FP32", data=[1.0, 2.0, 3.0]), "datatype must be BYTES"),
        (infer_body(datatype="INT64"), "datatype must be BYTES"),
        (infer_body(shape=[3, 2]), "shape must be"),
        (infer_body(shape=[2]), "but 3 elements"),
        (infer_body(shape=[0], data=[]), "shape must be"),
        (infer_body(data=["a", 1, "c"]), "must be a string"),
        (infer_body(data=None), "has no data"),
        (infer_body(parameters={"shared_memory_region": "x"}), "unsupported parameters"),
        ({"inputs": [BYTES_INPUT, BYTES_INPUT]}, "exactly one input"),
        ({"inputs": []}, "exactly one input"),
        ({"inputs": [BYTES_INPUT], "parameters": {"sequence_id": 3}}, "unknown request parameters"),
        ({"inputs": [BYTES_INPUT], "parameters": {"threshold": 2}}, "threshold"),
        ({"inputs": [BYTES_INPUT], "outputs": [{"name": "logits"}]}, "unknown output"),
        ({"inputs": [BYTES_INPUT], "outputs": [{"name": "label", "parameters": {"classification": 2}}]}, "binary_data"),
        ({"inputs": "text"}, "inputs"),
        ({"inputs": [{"name": "t", "datatype": "BYTES", "data": ["x"]}]}, "shape"),
    ],
)
async def test_oip_bad_requests_get_clean_4xx(tmp_path, body, fragment):
    async with running(app_for(tmp_path)) as client:
        assert_error(await client.post("/v2/models/sst2/infer", json=body), 422, fragment)
        assert (await client.post("/v2/models/sst2/infer", json={"inputs": [BYTES_INPUT]})).status_code == 200


@pytest.mark.parametrize(
    ("content", "length", "fragment"),
    [
        (b'{"inputs": []}', "99", "Inference-Header-Content-Length"),
        (b'{"inputs": []}', "-1", "Inference-Header-Content-Length"),
        (b"not json", "8", "malformed JSON header"),
        (
            b'{"inputs":[{"name":"t","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":9}}]}'
            + struct.pack("<I", 100)
            + b"abcde",
            None,
            "longer than its data",
        ),
        (
            b'{"inputs":[{"name":"t","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":6}}]}'
            + struct.pack("<I", 2)
            + b"\xff\xfe",
            None,
            "not UTF-8",
        ),
        (
            b'{"inputs":[{"name":"t","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4}}]}' + b"\0" * 4,
            None,
            "datatype must be BYTES",
        ),
        (
            b'{"inputs":[{"name":"t","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":5}}]}'
            + struct.pack("<I", 1)
            + b"ab",
            None,
            "belong to no input",
        ),
    ],
)
async def test_oip_malformed_binary_bodies_get_422(tmp_path, content, length, fragment):
    if length is None:
        length = str(content.index(b"}]}") + 3)
    async with running(app_for(tmp_path)) as client:
        response = await client.post(
            "/v2/models/sst2/infer", content=content, headers={"Inference-Header-Content-Length": length}
        )
        assert_error(response, 422, fragment)


async def test_oip_health_metadata_and_readiness(tmp_path):
    hold = asyncio.Event()
    settings = Settings(model_dir=tmp_path)
    app = create_app(settings, components=fake_components(["sst2"], hold=hold))
    async with running(app, wait_ready=False) as client:
        assert (await client.get("/v2/health/live")).json() == {"live": True}
        assert_error(await client.get("/v2/health/ready"), 503, "not ready")
        assert_error(await client.get("/v2/models/sst2/ready"), 503, "not loaded")
        hold.set()
        await asyncio.wait_for(app.state.service.ready_event.wait(), 30)
        assert (await client.get("/v2/health/ready")).json() == {"ready": True}
        assert (await client.get("/v2/models/sst2/ready")).json() == {"name": "sst2", "ready": True}
        server = (await client.get("/v2")).json()
        assert server["name"] == "cogalora-serve" and "binary_tensor_data" in server["extensions"]
        metadata = (await client.get("/v2/models/sst2")).json()
    assert metadata["name"] == "sst2" and metadata["platform"] == "cogalora"
    assert metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert metadata["labels"] == ["negative", "positive"]
    assert {"name": "scores", "datatype": "FP32", "shape": [-1, 2]} in metadata["outputs"]


# ---- shared with /classify: the API key, metrics, OpenAPI --------------------------------------------------


async def test_api_key_guards_every_model_route_but_not_the_probes(tmp_path):
    async with running(app_for(tmp_path, api_key="k")) as client:
        guarded = [
            client.post("/models/sst2", json={"inputs": "x"}),
            client.post("/models/sst2/predict", json={"inputs": "x"}),
            client.post("/v2/models/sst2/infer", json={"inputs": [BYTES_INPUT]}),
            client.get("/v2/models/sst2"),
            client.get("/v2/models/sst2/ready"),
        ]
        for response in await asyncio.gather(*guarded):
            assert_error(response, 401, "API key")
        for path in ("/v2/health/live", "/v2/health/ready", "/v2"):
            assert (await client.get(path)).status_code == 200, path
        keyed = await client.post("/models/sst2", json={"inputs": "good"}, headers={"Authorization": "Bearer k"})
        assert keyed.status_code == 200


async def test_every_protocol_feeds_the_same_metrics(tmp_path):
    async with running(app_for(tmp_path)) as client:
        before = (await client.get("/metrics")).text
        await classify(client, TEXTS)
        assert (await client.post("/models/sst2", json={"inputs": TEXTS})).status_code == 200
        assert (await client.post("/models/sst2/predict", json={"inputs": TEXTS[0]})).status_code == 200
        assert (await client.post("/v2/models/sst2/infer", json={"inputs": [BYTES_INPUT]})).status_code == 200
        assert (await client.post("/v2/models/sst2/infer", json={"inputs": []})).status_code == 422
        after = (await client.get("/metrics")).text

    def moved(name: str, **labels: str) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    assert moved("cogalora_requests_total", adapter="sst2", code="200") == 4
    assert moved("cogalora_requests_total", code="422") == 1
    assert moved("cogalora_inputs_total", adapter="sst2") == 3 * len(TEXTS) + 1


async def test_openapi_documents_the_protocol_routes(tmp_path):
    async with running(app_for(tmp_path)) as client:
        spec = (await client.get("/openapi.json")).json()
    for path in (
        "/models/{adapter}",
        "/models/{adapter}/predict",
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{adapter}",
        "/v2/models/{adapter}/ready",
        "/v2/models/{adapter}/infer",
    ):
        assert path in spec["paths"], path
    infer = spec["paths"]["/v2/models/{adapter}/infer"]["post"]
    assert infer["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/InferRequestBody")
    assert "x-active-adapters" in {
        h.lower() for h in spec["paths"]["/models/{adapter}"]["post"]["responses"]["200"]["headers"]
    }
