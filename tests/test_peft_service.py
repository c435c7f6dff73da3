"""Bring your own adapter, end to end: PEFT LoRA classifiers trained here with PEFT's own API on the packaged
MiniLM, served by a real ``python -m service`` process beside the committed CoGaLoRA and RAD-LoRA adapters:
dropped into the model directory, uploaded, replaced and deleted under traffic, fetched from a Hugging Face
cache; hostile uploads refused with nothing written."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
import torch
from archives import HOSTILE, pack
from peft import LoraConfig, PeftModel, get_peft_model
from processes import ADMIN_KEY, API_KEY, REPO, metric_sum
from test_uploads import fill_hub_cache, tree
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from cogalora import PACKAGED_MODEL_ID, resolve_base_model
from cogalora.peft_folder import SIDECAR_FILE

pytestmark = pytest.mark.integration

AUTH = {"X-API-Key": ADMIN_KEY}  # an admin key also classifies, with every adapter
COMMITTED = ("sst2", "agnews", "sst2-radlora")
TEXTS = [
    "a gripping, beautifully acted film",
    "the plot made no sense at all and the ending was worse",
    "it was fine",
    "an absolute triumph of a movie, moving and funny",
    "dull",
]
TRAIN = [
    ("a wonderful, heartfelt movie", 0),
    ("great acting and a clever story", 0),
    ("one of the best films this year", 0),
    ("terrible, boring and far too long", 1),
    ("an awful mess of a film", 1),
    ("i hated every minute", 1),
    ("it was okay, nothing special", 2),
    ("an average film with some good scenes", 2),
]
HUB_ID, HUB_COMMIT = "acme/reviews-lora", "89abcdef0123456789abcdef0123456789abcdef"


@dataclass(frozen=True)
class Trained:
    """A PEFT adapter folder and what PEFT's own PeftModel answers for ``TEXTS`` (each text alone)."""

    folder: Path
    labels: list[str]
    logits: torch.Tensor


#: name -> (LoraConfig arguments, label names, where the names are written: config.json, serving.json or nowhere)
ADAPTERS = {
    "peft-r4-qv": ({"r": 4, "target_modules": ["query", "value"]}, ["pos", "neg", "meh"], "config.json"),
    "peft-r16-all": ({"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}, ["good", "bad", "so-so"], "sidecar"),
    "peft-r4-all": ({"r": 4, "target_modules": "all-linear", "use_rslora": True}, None, None),
    "peft-r16-qv": ({"r": 16, "target_modules": ["query", "value"]}, ["up", "down", "flat"], "config.json"),
}


def train_peft(base: str, folder: Path, lora: dict, labels: list[str] | None, names_in: str | None, seed: int) -> None:
    """Eight steps of PEFT training on tiny data, saved by ``save_pretrained``: a folder as users have them."""
    torch.manual_seed(seed)
    names = {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}} if labels else {}
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3, **names)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", **lora))
    tokenizer = AutoTokenizer.from_pretrained(base)
    inputs = tokenizer([text for text, _ in TRAIN], padding=True, return_tensors="pt")
    targets = torch.tensor([label for _, label in TRAIN])
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for _ in range(8):
        model(**inputs, labels=targets).loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    model.save_pretrained(folder)
    if names_in == "config.json":
        model.config.save_pretrained(folder)
    elif names_in == "sidecar":
        (folder / SIDECAR_FILE).write_text(json.dumps({"labels": labels}))


def peft_reference(base: str, folder: Path) -> torch.Tensor:
    """Logits of PEFT's PeftModel loaded from the folder, in float32, each text alone."""
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=3), folder)
    tokenizer = AutoTokenizer.from_pretrained(base)
    with torch.no_grad():
        return torch.stack([model.eval()(**tokenizer(text, return_tensors="pt")).logits[0] for text in TEXTS])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Trained]:
    torch.set_num_threads(1)
    base = resolve_base_model(PACKAGED_MODEL_ID)
    root = tmp_path_factory.mktemp("peft")
    adapters = {}
    for seed, (name, (lora, labels, names_in)) in enumerate(ADAPTERS.items()):
        train_peft(base, root / name, lora, labels, names_in, seed)
        logits = peft_reference(base, root / name)
        adapters[name] = Trained(root / name, labels or ["LABEL_0", "LABEL_1", "LABEL_2"], logits)
    return adapters


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, trained) -> Path:
    """The committed adapters, and two PEFT folders dropped in as they are."""
    root = tmp_path_factory.mktemp("models")
    for name in COMMITTED:
        shutil.copytree(REPO / "models" / name, root / name)
    for name in ("peft-r4-qv", "peft-r16-all"):
        shutil.copytree(trained[name].folder, root / name)
    return root


@pytest.fixture(scope="module")
def service(model_dir, trained, start_service, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf-cache")
    fill_hub_cache(cache, HUB_ID, HUB_COMMIT, trained["peft-r16-qv"].folder)
    return start_service(
        model_dir,
        COGALORA_DTYPE="float32",
        COGALORA_API_KEY=API_KEY,
        COGALORA_ADMIN_KEY=ADMIN_KEY,
        COGALORA_MAX_WAIT_MS="100",
        COGALORA_MAX_BATCH_SIZE="64",
        COGALORA_SHADOW_FRACTION="0",
        COGALORA_LOG_LEVEL="INFO",
        HF_HUB_CACHE=str(cache),
        HF_HUB_OFFLINE="1",
    )


def logits_of(row: dict, labels: list[str]) -> torch.Tensor:
    by_label = {entry["label"]: entry["score"] for entry in row["raw_scores"]}
    return torch.tensor([by_label[label] for label in labels])


def peft_answers_match(body: dict, expected: Trained, texts: list[int]) -> bool:
    try:
        assert_peft_answers(body, expected, texts)
    except AssertionError:
        return False
    return True


def assert_peft_answers(body: dict, expected: Trained, texts: list[int]) -> None:
    for row, text in zip(body["results"], texts, strict=True):
        assert row["label"] == expected.labels[int(expected.logits[text].argmax())]
        torch.testing.assert_close(logits_of(row, expected.labels), expected.logits[text], atol=1e-5, rtol=0)


def classify_body(adapter: str, texts: list[int]) -> dict:
    return {"inputs": [TEXTS[i] for i in texts], "adapter": adapter, "raw_scores": True}


async def test_peft_folders_give_peft_logits_mixed_in_batches_with_the_committed_adapters(service, trained):
    everything = list(range(len(TEXTS)))
    async with httpx.AsyncClient(base_url=service.url, headers=AUTH, timeout=60, trust_env=False) as client:
        listed = (await client.get("/adapters")).json()
        assert listed["unavailable"] == {}
        infos = {info["name"]: info for info in listed["adapters"]}
        assert set(infos) == {*COMMITTED, "peft-r4-qv", "peft-r16-all"}
        assert infos["peft-r4-qv"]["labels"] == ["pos", "neg", "meh"], "from config.json"
        assert infos["peft-r16-all"]["labels"] == ["good", "bad", "so-so"], "from serving.json"
        assert (infos["peft-r16-all"]["method"], infos["peft-r16-all"]["total_adapters"]) == ("lora", 36)
        assert infos["peft-r4-qv"]["total_adapters"] == 12

        # Every adapter alone, text by text: PEFT's logits, and the committed adapters' own answers.
        solo = {}
        for name in infos:
            rows = []
            for text in everything:
                response = await client.post("/classify", json=classify_body(name, [text]))
                assert response.status_code == 200, response.text
                rows += response.json()["results"]
            solo[name] = rows
        for name in ("peft-r4-qv", "peft-r16-all"):
            assert_peft_answers({"results": solo[name]}, trained[name], everything)
            assert all(row["active_adapters"] == row["total_adapters"] for row in solo[name]), "always on"

        # All of them at once: one burst whose requests the batcher mixes into shared engine batches.
        before = await client.get("/metrics")
        responses = await asyncio.gather(
            *(client.post("/classify", json=classify_body(name, everything)) for name in infos)
        )
        after = await client.get("/metrics")
        processes = (await client.get("/info")).json()["engine_processes"]
    batches = metric_sum(after.text, "cogalora_batch_size_count") - metric_sum(before.text, "cogalora_batch_size_count")
    assert batches < len(infos), "some engine batch held rows of several adapters"
    for name, response in zip(infos, responses, strict=True):
        assert response.status_code == 200, response.text
        for row, alone in zip(response.json()["results"], solo[name], strict=True):
            assert (row["label"], row["active_modules"]) == (alone["label"], alone["active_modules"])
            for entry, lone in zip(row["raw_scores"], alone["raw_scores"], strict=True):
                assert entry["label"] == lone["label"] and entry["score"] == pytest.approx(lone["score"], abs=1e-5)
    loads = service.log_text().count("loaded base model")
    assert loads == processes, "PEFT and CoGaLoRA adapters share one encoder (per engine process)"


async def test_tei_oip_and_metrics_serve_a_peft_adapter_like_any_other(service, trained):
    expected = trained["peft-r4-qv"]
    labels = [expected.labels[int(row.argmax())] for row in expected.logits]
    async with httpx.AsyncClient(base_url=service.url, headers=AUTH, timeout=60, trust_env=False) as client:
        before = (await client.get("/metrics")).text
        tei = (await client.post("/models/peft-r4-qv/predict", json={"inputs": TEXTS})).json()
        oip_body = {"inputs": [{"name": "text", "shape": [len(TEXTS)], "datatype": "BYTES", "data": TEXTS}]}
        oip = (await client.post("/v2/models/peft-r4-qv/infer", json=oip_body)).json()
        after = (await client.get("/metrics")).text
    assert [max(row, key=lambda entry: entry["score"])["label"] for row in tei] == labels
    assert {o["name"]: o for o in oip["outputs"]}["label"]["data"] == labels
    requests = metric_sum(after, "cogalora_requests_total", adapter="peft-r4-qv", code="200")
    assert requests - metric_sum(before, "cogalora_requests_total", adapter="peft-r4-qv", code="200") == 2


class Traffic:
    """Clients posting /classify in a loop until stopped; every answer is kept with when it was sent and received."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.answers: list[tuple[str, float, float, httpx.Response]] = []
        self.running: dict[str, tuple[asyncio.Event, list[asyncio.Task]]] = {}

    def start(self, adapter: str, clients: int = 2) -> None:
        stop = asyncio.Event()
        self.running[adapter] = (stop, [asyncio.create_task(self._loop(adapter, stop, k)) for k in range(clients)])

    async def _loop(self, adapter: str, stop: asyncio.Event, k: int) -> None:
        while not stop.is_set():
            texts = [k % len(TEXTS), (k + 2) % len(TEXTS)]
            sent = time.monotonic()
            response = await self.client.post("/classify", json=classify_body(adapter, texts))
            self.answers.append((adapter, sent, time.monotonic(), response))

    async def stop(self, adapter: str) -> None:
        stop, tasks = self.running.pop(adapter)
        stop.set()
        await asyncio.gather(*tasks)

    def of(self, adapter: str) -> list[tuple[float, float, httpx.Response]]:
        return [(sent, done, response) for name, sent, done, response in self.answers if name == adapter]

    async def until(self, adapter: str, count: int, after: float = 0.0, timeout: float = 120.0) -> None:
        """Wait (with a deadline) until ``count`` answers for ``adapter`` sent after ``after`` have come back."""
        deadline = time.monotonic() + timeout
        while sum(sent > after for sent, _, _ in self.of(adapter)) < count:
            for task in self.running[adapter][1]:
                if task.done():
                    task.result()  # a client that crashed says why
            assert time.monotonic() < deadline, f"{adapter}: fewer than {count} answers in {timeout:.0f} s"
            await asyncio.sleep(0.05)


async def test_upload_replace_and_delete_under_traffic(service, model_dir, trained):
    first, second = trained["peft-r4-all"], trained["peft-r16-qv"]
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(
        base_url=service.url, headers=AUTH, timeout=60, limits=limits, trust_env=False
    ) as client:
        traffic = Traffic(client)
        traffic.start("peft-r4-qv")
        traffic.start("sst2")

        gz = {"content-type": "application/gzip"}
        upload = await client.put("/adapters/live", content=pack(first.folder, "tar.gz", top="live"), headers=gz)
        assert upload.status_code == 201, upload.text
        assert (upload.json()["method"], upload.json()["labels"]) == ("lora", first.labels)
        traffic.start("live", clients=4)
        await traffic.until("live", 8)

        zipped = {"content": pack(second.folder, "zip"), "headers": {"content-type": "application/zip"}}
        again = await client.put("/adapters/live", **zipped)
        assert again.status_code == 409 and again.json()["error_type"] == "adapter_conflict"
        began = time.monotonic()
        replaced = await client.put("/adapters/live?replace=true", **zipped)
        ended = time.monotonic()
        assert replaced.status_code == 201, replaced.text
        assert replaced.json()["labels"] == second.labels
        await traffic.until("live", 8, after=ended)
        await traffic.stop("live")

        deleted = await client.delete("/adapters/live?delete_files=true")
        assert deleted.status_code == 200 and deleted.json() == {"name": "live", "status": "deleted"}
        gone = await client.post("/classify", json=classify_body("live", [0]))
        assert gone.status_code == 404 and gone.json()["error_type"] == "unknown_adapter"
        assert (await client.delete("/adapters/live?delete_files=true")).status_code == 404
        await traffic.until("sst2", 8, after=time.monotonic())
        await traffic.stop("sst2")
        await traffic.stop("peft-r4-qv")
        reference = {}
        for text in range(len(TEXTS)):
            reference[TEXTS[text]] = (await client.post("/classify", json=classify_body("sst2", [text]))).json()[
                "results"
            ][0]

    assert not (model_dir / "live").exists() and not [p for p in model_dir.iterdir() if p.name.startswith(".")]
    answers = traffic.of("live")
    assert all(response.status_code == 200 for _, _, response in answers), "no failed answer while replacing"
    assert any(sent < ended and done > began for sent, done, _ in answers), "requests were in flight during the swap"
    for sent, _, response in answers:
        texts = [TEXTS.index(text) for text in _texts_of(response)]
        # Both adapters may share label names: which weights answered shows in the logits, not the labels.
        answered_by = [t for t in (first, second) if peft_answers_match(response.json(), t, texts)]
        assert len(answered_by) == 1, "every answer is exactly the old or exactly the new adapter's"
        if sent > ended:
            assert answered_by[0] is second, "requests sent after the replacement get the new weights"
    for _, _, response in traffic.of("peft-r4-qv"):
        assert response.status_code == 200
        assert_peft_answers(response.json(), trained["peft-r4-qv"], [TEXTS.index(t) for t in _texts_of(response)])
    for _, _, response in traffic.of("sst2"):
        assert response.status_code == 200
        for text, row in zip(_texts_of(response), response.json()["results"], strict=True):
            alone = reference[text]
            assert row["label"] == alone["label"] and row["score"] == pytest.approx(alone["score"], abs=1e-5)


def _texts_of(response: httpx.Response) -> list[str]:
    return json.loads(response.request.content)["inputs"]


async def test_hostile_uploads_are_refused_and_nothing_is_written(service, model_dir, trained):
    good = trained["peft-r4-all"].folder
    before = tree(model_dir)
    async with httpx.AsyncClient(base_url=service.url, headers=AUTH, timeout=60, trust_env=False) as client:
        listed = (await client.get("/adapters")).json()
        for case, (build, status) in sorted(HOSTILE.items()):
            response = await client.put(f"/adapters/evil-{case}", content=build(good))
            assert response.status_code == status, (case, response.text)
            assert set(response.json()) == {"error", "error_type"}
        wrong_key = await client.put("/adapters/evil", content=pack(good), headers={"X-API-Key": "wrong"})
        assert wrong_key.status_code == 401 and wrong_key.json()["error_type"] == "unauthorized"
        no_key = httpx.put(f"{service.url}/adapters/evil", content=pack(good), trust_env=False)
        assert no_key.status_code == 401
        bad_name = await client.put("/adapters/..%2Fevil", content=pack(good))
        assert bad_name.status_code in (404, 422)
        assert (await client.get("/adapters")).json() == listed
    assert declared_2gb_body(service.url, ADMIN_KEY).startswith(b"HTTP/1.1 413")
    assert declared_2gb_body(service.url, API_KEY).startswith(b"HTTP/1.1 403"), "no admin: refused, body unread"
    assert tree(model_dir) == before, "nothing written, not even a staging folder"
    assert "Traceback" not in service.log_text()


def declared_2gb_body(url: str, key: str) -> bytes:
    """The first bytes of the answer to an upload whose Content-Length says 2 GB (the body is never sent)."""
    address = urlparse(url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as connection:
        connection.sendall(
            b"PUT /adapters/huge HTTP/1.1\r\nHost: test\r\nX-API-Key: " + key.encode() + b"\r\n"
            b"Content-Type: application/gzip\r\nContent-Length: 2147483648\r\n\r\n"
        )
        return connection.recv(64)


async def test_hub_ids_install_from_the_local_cache_and_fail_clearly_offline(service, model_dir, trained):
    expected = trained["peft-r16-qv"]
    async with httpx.AsyncClient(base_url=service.url, headers=AUTH, timeout=60, trust_env=False) as client:
        pinned = {"source": f"hf://{HUB_ID}", "revision": HUB_COMMIT}
        response = await client.put("/adapters/from-hub", json=pinned)
        assert response.status_code == 201, response.text
        assert response.headers["x-adapter-revision"] == HUB_COMMIT
        answer = await client.post("/classify", json=classify_body("from-hub", [0, 1, 3]))
        assert_peft_answers(answer.json(), expected, [0, 1, 3])

        offline = await client.put("/adapters/other", json={"source": "hf://acme/not-cached", "revision": "v2"})
        assert offline.status_code == 422, offline.text
        assert offline.json()["error_type"] == "adapter_source_unavailable"
        assert "hf://acme/not-cached (revision v2)" in offline.json()["error"]
        malformed = await client.put("/adapters/other", json={"source": "https://example.com/x"})
        assert malformed.status_code == 422 and "hf://" in malformed.json()["error"]
        extra = await client.put("/adapters/other", json={"source": f"hf://{HUB_ID}", "token": "x"})
        assert extra.status_code == 422
        assert (await client.delete("/adapters/from-hub?delete_files=true")).status_code == 200
    assert not (model_dir / "other").exists() and not (model_dir / "from-hub").exists()
