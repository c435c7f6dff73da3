"""``python -m service.ray_serve`` (2 replicas on a local Ray) against the single-process service.

One Ray start for the whole module (starting Ray and two MiniLM replicas is the slow part); the
single-process reference runs in process on the same model repository and settings.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from api_fakes import assert_envelope, running
from processes import ServiceProcess, metric_sum

from service.app import create_app
from service.settings import Settings

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install -e '.[ray]' (the dev extra has it)")

pytestmark = pytest.mark.integration

ADAPTERS = ("sst2", "agnews", "plain")
TEXTS = [
    "an absolutely wonderful film with a moving story",
    "the plot was dull and the acting was worse",
    "ok",
    "stocks rallied after the central bank cut interest rates again this quarter",
]
#: Both services: exact float32 (comparable to 1e-5), 2 adapters per replica for 3 adapters (so routing
#: matters: a replica that gets a third adapter must evict one), nothing preloaded (loads happen on requests).
ENV = {"COGALORA_DTYPE": "float32", "COGALORA_MAX_LOADED_ADAPTERS": "2", "COGALORA_PRELOAD_ADAPTERS": "0"}
LONG = " ".join(["word"] * 400)
BAD_REQUESTS = [
    {"inputs": "hello", "adapter": "nope"},  # 404 unknown adapter (ingress)
    {"inputs": "hello"},  # 422 adapter required: three adapters (ingress)
    {"inputs": [], "adapter": "sst2"},  # 422 validation
    {"inputs": "hello", "adapter": "sst2", "threshold": 1.5},  # 422 validation
    {"inputs": "x" * 10_001, "adapter": "sst2"},  # 413 too many characters
    {"inputs": ["a"] * 65, "adapter": "sst2"},  # 413 too many inputs
    {"inputs": LONG, "adapter": "sst2", "truncate": False},  # 413 input too long: raised by the replica's engine
]


@pytest.fixture(scope="module")
def ray_service(minilm_model_dir: Path, tmp_path_factory):
    """``python -m service.ray_serve --replicas 2`` on a free port; stopped (SIGTERM) after the module."""
    process = ServiceProcess(
        minilm_model_dir,
        tmp_path_factory.mktemp("ray") / "ray_serve.log",
        ENV,
        command=[
            sys.executable,
            "-m",
            "service.ray_serve",
            "--replicas",
            "2",
            "--replica-cpus",
            "1",
            "--host",
            "127.0.0.1",
        ],
        name="ray_serve",
    )
    try:
        process.wait_ready(timeout=300)
        yield process
    finally:
        process.stop(timeout=90)


async def answers(client: httpx.AsyncClient) -> tuple[list[dict], list[tuple[int, dict, str | None]]]:
    """The /classify answers for every adapter, and (status, body, Retry-After) for every bad request."""
    good = []
    for adapter in ADAPTERS:
        response = await client.post("/classify", json={"inputs": TEXTS, "adapter": adapter})
        assert response.status_code == 200, response.text
        good.append(response.json())
    bad = []
    for body in BAD_REQUESTS:
        response = await client.post("/classify", json=body)
        bad.append((response.status_code, response.json(), response.headers.get("retry-after")))
    response = await client.post("/classify", content=b"{not json", headers={"content-type": "application/json"})
    bad.append((response.status_code, response.json(), response.headers.get("retry-after")))
    return good, bad


@pytest.fixture(scope="module")
def reference(minilm_model_dir: Path) -> tuple[list[dict], list[tuple[int, dict, str | None]]]:
    """The single-process service's answers (in process, the settings of ``ENV``)."""
    settings = Settings(model_dir=minilm_model_dir, **{k.removeprefix("COGALORA_").lower(): v for k, v in ENV.items()})
    assert (settings.dtype, settings.max_loaded_adapters, settings.preload_adapters) == ("float32", 2, 0)

    async def collect():
        async with running(create_app(settings)) as client:
            return await answers(client)

    return asyncio.run(collect())


def test_answers_and_errors_equal_the_single_process_service(ray_service, reference) -> None:
    async def collect():
        async with httpx.AsyncClient(base_url=ray_service.url, timeout=60, trust_env=False) as client:
            return await answers(client)

    good, bad = asyncio.run(collect())
    expected_good, expected_bad = reference
    for got, expected in zip(good, expected_good, strict=True):
        assert got["adapter"] == expected["adapter"]
        for row, want in zip(got["results"], expected["results"], strict=True):
            assert row["label"] == want["label"]
            assert row["active_modules"] == want["active_modules"]  # the same gates
            assert (row["active_adapters"], row["total_adapters"], row["tokens"]) == (
                want["active_adapters"],
                want["total_adapters"],
                want["tokens"],
            )
            assert [s["label"] for s in row["scores"]] == [s["label"] for s in want["scores"]]
            for score, wanted in zip(row["scores"], want["scores"], strict=True):
                assert score["score"] == pytest.approx(wanted["score"], abs=1e-5)
            assert row["flops"] == pytest.approx(want["flops"], rel=1e-9)
    assert [status for status, _, _ in bad] == [404, 422, 422, 422, 413, 413, 413, 422]
    assert bad == expected_bad  # status, the whole envelope (message included) and Retry-After


def test_requests_for_an_adapter_land_on_a_replica_that_holds_it(ray_service) -> None:
    """Once every adapter is held somewhere, no request makes a replica load (and so evict) an adapter.

    Each replica holds at most 2 of the 3 adapters, so a router blind to adapters would send about half
    of the requests to a replica without the adapter, each one a load; the replicas count their loads.
    """

    def loads(client: httpx.Client) -> int:
        return sum(sum(r["adapter_loads"].values()) for r in client.get("/replicas").json()["replicas"])

    def round_trip(client: httpx.Client) -> dict[str, set[str]]:
        served: dict[str, set[str]] = {}
        for adapter in ADAPTERS:
            response = client.post("/classify", json={"inputs": "a fine day", "adapter": adapter})
            assert response.status_code == 200, response.text
            served.setdefault(adapter, set()).add(response.headers["x-cogalora-replica"])
        return served

    with httpx.Client(base_url=ray_service.url, timeout=60, trust_env=False) as client:
        for _ in range(6):  # warm up: until one whole round loads nothing (Ray has learnt who holds what)
            before = loads(client)
            round_trip(client)
            if loads(client) == before:
                break
        else:
            pytest.fail("replicas kept loading adapters: no adapter affinity")
        before = loads(client)
        served: dict[str, set[str]] = {}
        for _ in range(4):
            for adapter, replicas in round_trip(client).items():
                served.setdefault(adapter, set()).update(replicas)
        assert loads(client) == before
        reports = {r["replica"]: r for r in client.get("/replicas").json()["replicas"]}
        assert len(reports) == 2, reports
        for adapter, replicas in served.items():
            assert all(adapter in reports[replica]["loaded"] for replica in replicas), (adapter, replicas, reports)


def test_ingress_and_replicas_export_metrics(ray_service) -> None:
    with httpx.Client(base_url=ray_service.url, timeout=60, trust_env=False) as client:
        assert client.post("/classify", json={"inputs": TEXTS, "adapter": "sst2"}).status_code == 200
        page = client.get("/metrics").text
        assert metric_sum(page, "cogalora_requests_total", adapter="sst2", code="200") >= 1
        assert metric_sum(page, "cogalora_inputs_total", adapter="sst2") >= len(TEXTS)
        urls = [r["metrics_url"] for r in client.get("/replicas").json()["replicas"]]
    batches = 0.0
    for url in urls:
        assert url, "a replica exports no metrics"
        local = httpx.URL(url).copy_with(host="127.0.0.1")  # it listens on every interface of its node
        batches += metric_sum(httpx.get(local, timeout=10).text, "cogalora_batch_size_count")
    assert batches >= 1


async def test_a_replica_killed_under_traffic_loses_no_request(ray_service) -> None:
    """SIGKILL one of the two replicas while 16 clients keep sending: the ingress sends the requests the
    dead replica held to the other one (classification is idempotent), so every request gets its answer."""
    import os
    import signal

    import psutil

    replicas = [p for p in psutil.process_iter(["cmdline"]) if "ClassifierReplica" in " ".join(p.info["cmdline"] or [])]
    assert len(replicas) == 2, [p.info["cmdline"] for p in replicas]
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    async with httpx.AsyncClient(base_url=ray_service.url, timeout=120, limits=limits, trust_env=False) as client:
        expected = {
            adapter: (await client.post("/classify", json={"inputs": TEXTS[0], "adapter": adapter})).json()
            for adapter in ADAPTERS
        }
        sent = 0

        async def worker(k: int) -> list[tuple[str, httpx.Response]]:
            nonlocal sent
            got = []
            for i in range(25):
                adapter = ADAPTERS[(k + i) % 3]
                got.append((adapter, await client.post("/classify", json={"inputs": TEXTS[0], "adapter": adapter})))
                sent += 1
            return got

        workers = [asyncio.create_task(worker(k)) for k in range(16)]
        while sent < 40:  # traffic is flowing through both replicas
            await asyncio.sleep(0.01)
        os.kill(replicas[0].pid, signal.SIGKILL)
        answers = [pair for task in await asyncio.gather(*workers) for pair in task]
    assert len(answers) == 400
    failed = [(response.status_code, response.text[:200]) for _, response in answers if response.status_code != 200]
    assert failed == [], failed[:5]
    for adapter, response in answers:
        assert response.json()["results"][0]["label"] == expected[adapter]["results"][0]["label"]


def test_sigterm_stops_ray_cleanly(ray_service) -> None:
    ray_service.stop(timeout=90)
    assert ray_service.proc.returncode == 0, ray_service.log_tail()
    assert "ray_serve: stopped" in ray_service.log_text()


class FakeReplicas:
    """A stand-in for the replica deployment's handle: records the routing and answers as told."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.routed: list[str | None] = []
        self.model_id: str | None = None

    def options(self, multiplexed_model_id: str) -> FakeReplicas:
        routed = FakeReplicas(self.answer)
        routed.routed, routed.model_id = self.routed, multiplexed_model_id
        return routed

    @property
    def classify(self):
        async def remote(request):
            self.routed.append(self.model_id)
            return self.answer(request)

        return SimpleNamespace(remote=remote)

    @property
    def report(self):
        from service.ray_serve.deployments import ReplicaReport

        async def remote():
            return ReplicaReport("r1", loaded=["sst2"], metrics_url="http://10.0.0.1:9500/metrics")

        return SimpleNamespace(remote=remote)


async def test_ingress_routes_by_adapter_and_relays_replica_answers(minilm_model_dir: Path) -> None:
    """The ingress app in process over a fake replica handle (no Ray cluster): routing id, header, errors."""
    from ray.serve.exceptions import BackPressureError

    from service.errors import InputTooLongError
    from service.ray_serve.deployments import Ingress, ReplicaAnswer

    def answer(request):
        if request.adapter == "agnews":
            error = InputTooLongError("input 0 has 400 tokens; at most 128")
            return ReplicaAnswer("r2", loaded=["agnews"], adapter_loads={"agnews": 1}, error=error)
        if request.adapter == "plain":
            raise BackPressureError(num_queued_requests=9, max_queued_requests=8)
        return ReplicaAnswer("r1", loaded=["sst2"], adapter_loads={}, results=[])

    replicas = FakeReplicas(answer)
    settings = Settings(model_dir=minilm_model_dir, api_key="secret", admin_key="admin-secret")
    app = Ingress(replicas, settings).__serve_build_asgi_app__()
    key = {"x-api-key": "secret"}
    async with running(app) as client:
        ok = await client.post("/classify", json={"inputs": "fine", "adapter": "sst2"}, headers=key)
        assert ok.status_code == 200 and ok.headers["x-cogalora-replica"] == "r1"
        too_long = await client.post("/classify", json={"inputs": "x", "adapter": "agnews"}, headers=key)
        assert assert_envelope(too_long, 413, "input_too_long")["error"] == "input 0 has 400 tokens; at most 128"
        assert too_long.headers["x-cogalora-replica"] == "r2"
        busy = await client.post("/classify", json={"inputs": "x", "adapter": "plain"}, headers=key)
        assert assert_envelope(busy, 503, "queue_full") and busy.headers["retry-after"] == "1"
        assert replicas.routed == ["sst2", "agnews", "plain"]  # the adapter is the multiplexed model id
        assert (await client.get("/replicas")).status_code == 401
        listed = (await client.get("/replicas", headers=key)).json()["replicas"]
        assert {r["replica"]: r["loaded"] for r in listed} == {"r1": ["sst2"], "r2": ["agnews"]}
        assert {r["replica"]: r["requests"] for r in listed} == {"r1": 1, "r2": 1}  # kept across a report
        assert [r["metrics_url"] for r in listed] == ["http://10.0.0.1:9500/metrics", None]
        adapters = (await client.get("/adapters", headers=key)).json()
        assert {a["name"]: a["loaded"] for a in adapters["adapters"]} == {"agnews": True, "plain": False, "sst2": True}
        assert_envelope(await client.post("/adapters/sst2", headers=key), 403, "forbidden")  # not an admin key
        admin = {"x-api-key": "admin-secret"}
        assert_envelope(await client.post("/adapters/sst2", headers=admin), 409, "adapter_conflict")


def test_the_serve_config_file_builds_the_application(minilm_model_dir: Path) -> None:
    """deploy/ray/serve.yaml is a valid Serve config whose builder accepts its args (no cluster needed)."""
    import yaml
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    from service.ray_serve import build_app

    config = yaml.safe_load((Path(__file__).parents[1] / "deploy/ray/serve.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    assert application["import_path"] == "service.ray_serve:build_app"
    args = {**application["args"], "model_dir": str(minilm_model_dir)}  # /models exists on the cluster only
    assert isinstance(call_user_app_builder_with_args_if_necessary(build_app, args), Application)
    with pytest.raises(ValueError, match="replicas"):
        call_user_app_builder_with_args_if_necessary(build_app, {**args, "replicas": 0})
