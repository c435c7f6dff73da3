"""Clients people already use, unchanged, against a real ``python -m service``: Hugging Face's InferenceClient
(TEI-style routes) and Triton's ``tritonclient.http`` (Open Inference Protocol v2). They must answer what
``/classify`` answers. Runs on the shared keyed service (conftest ``keyed_service``): the API key applies.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from huggingface_hub import InferenceClient
from processes import API_KEY
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.integration

TEXTS = ["a gripping, beautifully acted film", "the plot made no sense at all", "ok"]


def auth() -> dict[str, str]:
    """A fresh header dict per call: tritonclient writes its own headers into the dict it is given."""
    return {"Authorization": f"Bearer {API_KEY}"}


#: Scores of a row alone and in a batch agree to this (batch invariance, docs/architecture.md); FP32 outputs too.
SCORE_TOLERANCE = 1e-5


def post_with_key(service, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{service.url}{path}", json=body, headers=auth(), timeout=60, trust_env=False)


@pytest.fixture(scope="module")
def reference(keyed_service) -> dict[str, list[dict]]:
    """/classify's answers for TEXTS, per adapter."""
    answers = {}
    for adapter in ("sst2", "agnews"):
        response = post_with_key(keyed_service, "/classify", {"inputs": TEXTS, "adapter": adapter})
        assert response.status_code == 200, response.text
        answers[adapter] = response.json()["results"]
    return answers


def ranked(entries) -> tuple[list[str], list[float]]:
    return [entry["label"] for entry in entries], [entry["score"] for entry in entries]


def test_huggingface_inference_client_gives_what_classify_gives(keyed_service, reference):
    for adapter in ("sst2", "agnews"):
        client = InferenceClient(model=f"{keyed_service.url}/models/{adapter}", token=API_KEY, timeout=60)
        for text, row in zip(TEXTS, reference[adapter], strict=True):
            answer = client.text_classification(text)
            labels, scores = ranked(row["scores"])
            assert [element.label for element in answer] == labels
            assert [element.score for element in answer] == pytest.approx(scores, abs=SCORE_TOLERANCE)
        best = client.text_classification(TEXTS[0], top_k=1)
        assert [element.label for element in best] == [reference[adapter][0]["label"]]


def test_huggingface_client_without_the_key_is_refused(keyed_service):
    client = InferenceClient(model=f"{keyed_service.url}/models/sst2", timeout=60)
    with pytest.raises(Exception, match="401"):
        client.text_classification(TEXTS[0])


def test_tei_predict_list_input_on_the_real_service(keyed_service, reference):
    """TEI's own body (a list of inputs, top-level options) through plain HTTP: a list of ranked lists."""
    response = post_with_key(keyed_service, "/models/sst2/predict", {"inputs": TEXTS, "truncate": True})
    assert response.status_code == 200, response.text
    for answer, row in zip(response.json(), reference["sst2"], strict=True):
        labels, scores = ranked(row["scores"])
        assert ranked(answer)[0] == labels
        assert ranked(answer)[1] == pytest.approx(scores, abs=SCORE_TOLERANCE)
    active = [int(value) for value in response.headers["x-active-adapters"].split(",")]
    assert active == [row["active_adapters"] for row in reference["sst2"]]


@pytest.fixture(scope="module")
def triton_client(keyed_service):
    client = triton.InferenceServerClient(url=keyed_service.url.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


def texts_input(binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("TEXT", [len(TEXTS)], "BYTES")
    tensor.set_data_from_numpy(np.array(TEXTS, dtype=np.object_), binary_data=binary)
    return tensor


@pytest.mark.parametrize("binary", [True, False], ids=["binary-default", "json"])
def test_tritonclient_infer_gives_what_classify_gives(triton_client, reference, binary):
    outputs = (
        None
        if binary
        else [
            triton.InferRequestedOutput(name, binary_data=False)
            for name in ("label", "score", "active_adapters", "adapter_flops")
        ]
    )
    result = triton_client.infer("sst2", [texts_input(binary)], outputs=outputs, headers=auth())
    rows = reference["sst2"]
    # BYTES come back as bytes from binary outputs and as str from JSON ones (as with Triton itself)
    labels = [label.decode() if isinstance(label, bytes) else label for label in result.as_numpy("label")]
    assert labels == [row["label"] for row in rows]
    assert result.as_numpy("score").dtype == np.float32
    assert result.as_numpy("score").tolist() == pytest.approx([row["score"] for row in rows], abs=SCORE_TOLERANCE)
    assert result.as_numpy("active_adapters").tolist() == [row["active_adapters"] for row in rows]
    assert result.as_numpy("adapter_flops").tolist() == [row["flops"]["adapter"] for row in rows]
    if binary:  # every output by default: the full score table in the metadata's label order
        labels = triton_client.get_model_metadata("sst2", headers=auth())["labels"]
        table = result.as_numpy("scores")
        assert table.shape == (len(TEXTS), len(labels))
        for scores, row in zip(table, rows, strict=True):
            by_label = {entry["label"]: entry["score"] for entry in row["scores"]}
            assert scores.tolist() == pytest.approx([by_label[label] for label in labels], abs=SCORE_TOLERANCE)
        assert result.as_numpy("truncated").tolist() == [False] * len(TEXTS)


def test_tritonclient_health_and_metadata(triton_client):
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready("agnews", headers=auth())
    assert not triton_client.is_model_ready("nope", headers=auth())
    assert "binary_tensor_data" in triton_client.get_server_metadata()["extensions"]
    metadata = triton_client.get_model_metadata("agnews", headers=auth())
    assert metadata["labels"] == ["World", "Sports", "Business", "Sci/Tech"]
    assert metadata["inputs"][0]["datatype"] == "BYTES"


def test_tritonclient_errors_are_clean_4xx(triton_client):
    with pytest.raises(InferenceServerException) as unknown:
        triton_client.infer("nope", [texts_input(True)], headers=auth())
    assert unknown.value.status() == "404" and "unknown adapter" in unknown.value.message()
    with pytest.raises(InferenceServerException) as unauthorized:
        triton_client.infer("sst2", [texts_input(True)])
    assert unauthorized.value.status() == "401"
    numbers = triton.InferInput("TEXT", [2], "FP32")
    numbers.set_data_from_numpy(np.array([1.0, 2.0], dtype=np.float32))
    with pytest.raises(InferenceServerException) as wrong_type:
        triton_client.infer("sst2", [numbers], headers=auth())
    assert wrong_type.value.status() == "422" and "BYTES" in wrong_type.value.message()
