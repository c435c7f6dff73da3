"""A new user's first hour with the service: it fails fast with one line that says why, says what it
serves, answers errors with what to do, and its documentation pages work without internet.

Start-up failures run the real ``python -m service`` (exit status and message); the rest runs the app
in process, on the fake engine side (``api_fakes``) or on real components over a tiny encoder.
"""

from __future__ import annotations

import logging
import re
import struct
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from api_fakes import assert_envelope, fake_components, running
from conftest import synthetic_checkpoint
from processes import REPO, ServiceProcess, run_service_once

from service.app import create_app
from service.cli import StartupError, check_startup
from service.settings import Settings

# ---- start-up: a real `python -m service` that must refuse to start -----------------------------


def _missing(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    return ["--model-dir", str(tmp_path / "nowhere")], {}


def _empty(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    (tmp_path / "models").mkdir()
    return ["--model-dir", str(tmp_path / "models")], {}


def _one_checkpoint(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    checkpoint = tmp_path / "runs" / "sst2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "cogalora.json").write_text("{}")
    return ["--model-dir", str(checkpoint)], {}


def _cuda_on_this_torch(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    return ["--model-dir", str(REPO / "models"), "--device", "cuda"], {}


def _typo_in_a_variable(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    return [], {"COGALORA_APIKEY": "secret"}


def _malformed_number(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    return [], {"COGALORA_METRICS_ADAPTER_LABELS": "top:x"}


@pytest.mark.parametrize(
    ("arrange", "expected"),
    [
        (_missing, ["nowhere does not exist", "point --model-dir (or COGALORA_MODEL_DIR) at a folder"]),
        (_empty, ["holds no checkpoint folder", "COGALORA_ALLOW_EMPTY_MODEL_DIR=true"]),
        (_one_checkpoint, ["is one checkpoint, not a folder of checkpoints", "/runs, adapter 'sst2'"]),
        (_cuda_on_this_torch, ["device 'cuda' cannot be used", "use --device cpu"]),
        (_typo_in_a_variable, ["unknown environment variable COGALORA_APIKEY (did you mean COGALORA_API_KEY?)"]),
        (_malformed_number, ["COGALORA_METRICS_ADAPTER_LABELS: top:N needs a whole number N >= 1"]),
    ],
    ids=["missing-dir", "empty-dir", "one-checkpoint", "cuda-unavailable", "unknown-variable", "invalid-setting"],
)
def test_a_start_that_cannot_work_exits_2_with_one_line_naming_the_problem_and_the_fix(tmp_path, arrange, expected):
    if arrange is _cuda_on_this_torch and torch.cuda.is_available():
        pytest.skip("this torch has a usable GPU: --device cuda is not an error here")
    args, env = arrange(tmp_path)
    result = run_service_once(*args, **env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("python -m service: error: ")
    for fragment in expected:
        assert fragment in lines[0]
    assert "secret" not in lines[0]
    assert "Uvicorn running" not in result.stdout + result.stderr, "checks must run before the server listens"


@pytest.fixture
def tiny_model_dir(tmp_path: Path, tiny_base_dir: Path) -> Path:
    """Two adapters on the tiny encoder, and a folder whose cogalora.json is malformed."""
    root = tmp_path / "models"
    synthetic_checkpoint(root / "alpha", str(tiny_base_dir), ["neg", "pos"], seed=0)
    synthetic_checkpoint(root / "beta", str(tiny_base_dir), ["a", "b", "c"], seed=3)
    (root / "broken").mkdir()
    (root / "broken" / "cogalora.json").write_text("{not json")
    return root


def wait_for_exit(process: ServiceProcess, timeout: float = 180) -> int:
    process.proc.wait(timeout=timeout)
    return process.proc.returncode


def test_loading_that_fails_after_the_start_ends_the_process_with_status_1_and_the_reason(tmp_path, tiny_base_dir):
    root = tmp_path / "models"
    synthetic_checkpoint(root / "alpha", str(tiny_base_dir), ["neg", "pos"], seed=0)
    weights = tiny_base_dir / "model.safetensors"  # its config still reads: the scan passes, loading cannot
    weights.write_bytes(weights.read_bytes()[:200])
    process = ServiceProcess(root, tmp_path / "service.log")
    try:
        assert wait_for_exit(process) == 1
    finally:
        process.stop()
    last = process.log_text().strip().splitlines()[-1]
    reason = f"loading the model repository failed: base model {str(tiny_base_dir)!r} cannot be loaded ("
    assert last.startswith(f"python -m service: error: {reason}"), last


def test_require_all_adapters_turns_an_unservable_folder_into_a_failed_start(tmp_path, tiny_model_dir):
    process = ServiceProcess(tiny_model_dir, tmp_path / "service.log", {"COGALORA_REQUIRE_ALL_ADAPTERS": "true"})
    try:
        assert wait_for_exit(process) == 1
    finally:
        process.stop()
    last = process.log_text().strip().splitlines()[-1]
    assert "1 checkpoint folder(s) cannot be served (broken: broken/cogalora.json: not valid JSON" in last
    assert "unset COGALORA_REQUIRE_ALL_ADAPTERS" in last


def test_an_empty_model_dir_is_refused_unless_allowed(tmp_path):
    with pytest.raises(StartupError, match="holds no checkpoint folder"):
        check_startup(Settings(model_dir=tmp_path))
    check_startup(Settings(model_dir=tmp_path, allow_empty_model_dir=True))
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "cogalora.json").write_text("{}")
    with pytest.raises(StartupError, match="is one checkpoint"):  # allowed empty, but still no checkpoint itself
        check_startup(Settings(model_dir=tmp_path / "sst2", allow_empty_model_dir=True))


async def test_a_service_started_empty_serves_what_an_admin_adds(tmp_path, tiny_base_dir):
    root = tmp_path / "models"
    root.mkdir()
    settings = Settings(model_dir=root, allow_empty_model_dir=True, dtype="float32", admin_key="admin-key")
    async with running(create_app(settings)) as client:
        client.headers["X-API-Key"] = "admin-key"  # admin routes are closed without an admin key
        body = assert_envelope(await client.post("/classify", json={"inputs": "good"}), 422, "adapter_required")
        assert body["error"].startswith("no adapter is being served") and "POST /adapters/{name}" in body["error"]
        synthetic_checkpoint(root / "alpha", str(tiny_base_dir), ["neg", "pos"], seed=0)
        assert (await client.post("/adapters/alpha")).status_code == 201
        answer = await client.post("/classify", json={"inputs": "good"})
        assert answer.status_code == 200 and answer.json()["adapter"] == "alpha"


# ---- adapters that cannot be served, and what is served -------------------------------------------


async def test_an_unservable_folder_is_warned_about_listed_and_named_while_the_others_serve(tiny_model_dir, caplog):
    settings = Settings(model_dir=tiny_model_dir, dtype="float32", admin_key="admin-key")
    with caplog.at_level(logging.INFO):
        async with running(create_app(settings)) as client:  # /ready 200: the default keeps serving the others
            client.headers["X-API-Key"] = "admin-key"  # for the admin load at the end
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any(m.startswith("adapter 'broken' failed to load: broken/cogalora.json") for m in warnings)
            ready = next(r for r in caplog.records if r.getMessage() == "ready")
            assert (ready.version, ready.device, ready.dtype) == (version("cogalora-serve"), "cpu", "float32")
            assert ready.torch_threads == settings.resolved_torch_threads() and ready.unavailable == ["broken"]

            body = assert_envelope(
                await client.post("/classify", json={"inputs": "good", "adapter": "broken"}), 422, "adapter_load_failed"
            )
            assert body["error"].startswith("adapter 'broken' failed to load: broken/cogalora.json: not valid JSON")
            assert str(tiny_model_dir) not in body["error"]
            for path in ("/models/broken/predict", "/v2/models/broken/infer"):
                oip = {"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["good"]}]}
                payload = oip if path.startswith("/v2") else {"inputs": "good"}
                assert_envelope(await client.post(path, json=payload), 422, "adapter_load_failed")
            assert "broken" in (await client.get("/adapters")).json()["unavailable"]

            info = (await client.get("/info")).json()
            assert info["adapters"] == ["alpha", "beta"] and info["loaded"] == 2
            assert info["unavailable"]["broken"].startswith("broken/cogalora.json: not valid JSON")

            unknown = assert_envelope(
                await client.post("/classify", json={"inputs": "good", "adapter": "alpah"}), 404, "unknown_adapter"
            )
            assert unknown["error"] == "unknown adapter 'alpah'; did you mean 'alpha'? available: alpha, beta"
            required = assert_envelope(await client.post("/classify", json={"inputs": "x"}), 422, "adapter_required")
            assert required["error"] == "'adapter' is required: 2 adapters are available (alpha, beta)"
            conflict = assert_envelope(await client.post("/adapters/alpha"), 409, "adapter_conflict")
            assert "DELETE /adapters/alpha first, then POST /adapters/alpha" in conflict["error"]


async def test_info_says_the_version_device_dtype_threads_and_adapters(tmp_path):
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    settings = Settings(model_dir=tmp_path, dtype="float32", torch_threads=3, engine_lanes=2, api_key="k")
    app = create_app(settings, components=fake_components(["sst2", "agnews"]))
    async with running(app) as client:
        assert_envelope(await client.get("/info"), 401, "unauthorized")  # it names the adapters
        info = (await client.get("/info", headers={"X-API-Key": "k"})).json()
        assert info == {
            "name": "cogalora-serve",
            "version": project,
            "state": "ready",
            "device": "cpu",
            "dtype": "float32",
            "int8_kernels": None,
            "engine_process": True,
            "engine_processes": 2,
            "engine_lanes": 2,
            "torch_threads": 3,
            "adapters": ["agnews", "sst2"],
            "loaded": 2,
            "unavailable": {},
        }
        assert (await client.get("/v2")).json()["version"] == project
        assert (await client.get("/openapi.json")).json()["info"]["version"] == project


@pytest.mark.parametrize("asked", ["native", "torch"])
async def test_info_says_what_runs_int8_s_per_token_steps(tmp_path, asked):
    settings = Settings(model_dir=tmp_path, dtype="int8", device="cpu", int8_kernels=asked)
    async with running(create_app(settings, components=fake_components(["sst2"]))) as client:
        shown = (await client.get("/info")).json()["int8_kernels"]
    built = (REPO / "cogalora").glob("_int8_rows*")
    assert shown == ("native" if asked == "native" and any(built) else "torch")


# ---- errors a user can act on ---------------------------------------------------------------------

OIP_PATH = "/v2/models/sst2/infer"


def oip_body(texts: list[str]) -> dict:
    return {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}


def oip_binary(texts: list[str]) -> tuple[bytes, dict[str, str]]:
    """The same request in Triton's binary tensor data form (what tritonclient sends)."""
    data = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)
    header = b'{"inputs":[{"name":"text","shape":[%d],"datatype":"BYTES","parameters":{"binary_data_size":%d}}]}' % (
        len(texts),
        len(data),
    )
    return header + data, {"Inference-Header-Content-Length": str(len(header))}


@pytest.mark.parametrize("texts", [[""], ["fine", "   "], ["\n\t"]])
async def test_an_empty_or_blank_text_is_the_same_422_on_every_route(tmp_path, texts):
    app = create_app(Settings(model_dir=tmp_path), components=fake_components(["sst2"]))
    index = next(i for i, text in enumerate(texts) if not text.strip())
    expected = f"input {index} is empty (or only whitespace): send text to classify"
    binary, headers = oip_binary(texts)
    async with running(app) as client:
        answers = [
            await client.post("/classify", json={"inputs": texts}),
            await client.post("/models/sst2/predict", json={"inputs": texts}),
            await client.post("/models/sst2", json={"inputs": texts}),
            await client.post(OIP_PATH, json=oip_body(texts)),
            await client.post(OIP_PATH, content=binary, headers=headers),
        ]
        if len(texts) == 1:
            answers.append(await client.post("/classify", json={"inputs": texts[0]}))
        for response in answers:
            assert assert_envelope(response, 422, "invalid_request")["error"] == expected
        assert (await client.post("/classify", json={"inputs": ["fine"]})).status_code == 200


@pytest.mark.parametrize("path", ["/classify", "/models/sst2/predict"])
@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ([], "inputs: must be one text or a non-empty list of texts, got an empty list"),
        (3, "inputs: must be one text or a non-empty list of texts, got a number"),
        (None, "inputs: must be one text or a non-empty list of texts, got null"),
        (["a", {"t": 1}], "inputs: element 1 is not a string"),
    ],
)
async def test_a_wrong_inputs_value_gets_one_message_not_one_per_union_branch(tmp_path, path, inputs, expected):
    app = create_app(Settings(model_dir=tmp_path), components=fake_components(["sst2"]))
    async with running(app) as client:
        body = assert_envelope(await client.post(path, json={"inputs": inputs}), 422, "invalid_request")
    assert body["error"] == expected


BODY = b'{"inputs": "a fine film"}'
JSON = "application/json"


@pytest.mark.parametrize(
    ("headers", "got"),
    [
        ({}, "no content-type"),
        ({"content-type": "application/x-www-form-urlencoded"}, "content-type 'application/x-www-form-urlencoded'"),
        ({"content-type": "text/plain"}, "content-type 'text/plain'"),
    ],
)
async def test_a_body_without_a_json_content_type_says_to_send_one(tmp_path, headers, got):
    app = create_app(Settings(model_dir=tmp_path), components=fake_components(["sst2"]))
    async with running(app) as client:
        for path in ("/classify", "/models/sst2/predict"):
            body = assert_envelope(await client.post(path, content=BODY, headers=headers), 422, "invalid_request")
            assert body["error"] == f"the body must be JSON sent with the header 'content-type: {JSON}' (got {got})"
        assert (await client.post("/classify", content=BODY, headers={"content-type": JSON})).status_code == 200


# ---- documentation pages that work offline ----------------------------------------------------------


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_pages_load_every_asset_from_the_service_itself(tmp_path, page):
    app = create_app(Settings(model_dir=tmp_path, api_key="k"), components=fake_components(["sst2"]))
    async with running(app) as client:
        response = await client.get(page)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
        html = response.text
        assert "http://" not in html and "https://" not in html and "//cdn" not in html, html
        urls = re.findall(r'(?:src|href|spec-url)="([^"]+)"|url: ?\'([^\']+)\'', html)
        urls = [first or second for first, second in urls]
        assert "/openapi.json" in urls and any(url.endswith(".js") for url in urls), urls
        for url in urls:
            assert url.startswith("/") and not url.startswith("//"), url
            asset = await client.get(url)  # open like /docs, even with an API key set
            assert asset.status_code == 200, url
            assert len(asset.content) > 1000, url
