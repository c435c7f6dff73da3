"""Who may do what, in process: the key file, the key ring, token buckets, and the HTTP contract over a
fake engine side (admin check, scopes through every protocol, catalogue access, audit lines, settings).

The same properties against real processes: tests/test_security_service.py.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from api_fakes import assert_envelope, fake_components, running
from processes import REPO

from service.app import create_app
from service.errors import RateLimitedError
from service.keyring import KeyRing
from service.keys import KeyFileError, digest, new_entry, read_key_file
from service.ratelimit import RateLimiter, RateLimits, TokenBucket
from service.settings import Settings

ADMIN = "the-admin-key-0123456789"
ALICE, BOB, OPS, CAROL, SLOW = (f"{name}-key-0123456789" for name in ("alice", "bob", "ops", "carol", "slow"))


def entry(key: str, **fields) -> dict:
    return {"sha256": digest(key).hex(), **fields}


def write_keys(path: Path, **entries: dict) -> Path:
    path.write_text(json.dumps({"keys": entries}), encoding="utf-8")
    return path


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ---- the key file and the key ring ----------------------------------------------------------------


def test_toml_and_json_key_files_give_the_same_principals(tmp_path):
    toml = tmp_path / "keys.toml"
    toml.write_text(
        f'[keys.alice]\nsha256 = "{digest("k1").hex()}"\nadapters = ["a-*"]\nrows_per_second = 5\n\n'
        f'[keys.ops]\nsha256 = "{digest("k2").hex().upper()}"\nadmin = true\n',
        encoding="utf-8",
    )
    json_file = write_keys(
        tmp_path / "keys.json",
        alice=entry("k1", adapters=["a-*"], rows_per_second=5),
        ops=entry("k2", admin=True),
    )
    assert read_key_file(toml) == read_key_file(json_file)
    (_, alice), (_, ops) = read_key_file(toml)
    assert alice.limits == RateLimits(None, 5.0, 1.0) and alice.may_use("a-x") and not alice.may_use("b")
    assert not alice.may_use("A-x"), "patterns are case-sensitive, like adapter folder names"
    assert ops.admin and ops.may_use("anything") and ops.limits is None


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"alice": {"sha256": "00"}}, "keys.alice.sha256"),
        ({"alice": entry("k")}, '"adapters" is required'),
        ({"alice": entry("k", adapters=["*"], colour="red")}, "keys.alice.colour"),
        ({"alice": entry("k", adapters=["*"], requests_per_second=0)}, "keys.alice.requests_per_second"),
        ({"bad id!": entry("k", adapters=["*"])}, "bad id!"),
        ({"a.b": entry("k", adapters=["*"])}, "a.b"),
        ({"admin_key": entry("k", adapters=["*"])}, "reserved"),
        ({"a": entry("same", adapters=["*"]), "b": entry("same", adapters=["x"])}, "the same key as keys.a"),
    ],
)
def test_an_invalid_key_file_is_refused_with_the_file_and_field(tmp_path, entries, message):
    path = write_keys(tmp_path / "keys.json", **entries)
    with pytest.raises(KeyFileError, match=r"keys\.json") as refused:
        read_key_file(path)
    assert message in str(refused.value)
    assert "k" not in [part.strip("'\"") for part in str(refused.value).split()], "no key material in messages"


def test_unreadable_or_malformed_files_name_the_file(tmp_path):
    with pytest.raises(KeyFileError, match="cannot be read"):
        read_key_file(tmp_path / "absent.toml")
    broken = tmp_path / "keys.toml"
    broken.write_text("[keys.alice\n", encoding="utf-8")
    with pytest.raises(KeyFileError, match="not valid TOML"):
        read_key_file(broken)


def test_a_key_of_the_file_must_not_repeat_a_settings_key(tmp_path):
    path = write_keys(tmp_path / "keys.json", alice=entry("the-api-key", adapters=["*"]))
    with pytest.raises(KeyFileError, match="COGALORA_API_KEY"):
        KeyRing("the-api-key", None, path)
    with pytest.raises(KeyFileError, match="must differ"):
        KeyRing("same", "same")


def test_the_key_ring_follows_the_file_and_keeps_the_last_good_keys(tmp_path):
    clock = Clock()
    reloads: list[bool] = []
    path = write_keys(tmp_path / "keys.json", alice=entry(ALICE, adapters=["*"]))
    ring = KeyRing("api", "adm", path, on_reload=reloads.append, clock=clock)
    assert [ring.identify(k).key_id for k in (ALICE, "api", "adm")] == ["alice", "api_key", "admin_key"]
    assert ring.identify(BOB) is None and ring.identify("") is None
    assert ring.requires_key and ring.has_admin()

    write_keys(path, bob=entry(BOB, adapters=["*"]))
    clock.now += 0.5
    assert ring.identify(BOB) is None and reloads == [], "the file is looked at no more than once a second"
    clock.now += 0.6
    assert ring.identify(BOB).key_id == "bob" and ring.identify(ALICE) is None and reloads == [True]
    assert ring.identify("api").key_id == "api_key", "the settings keys stay"

    write_keys(path, carol=entry(CAROL, adapters=["*"], note="an unknown field"))
    clock.now += 1.1
    assert ring.identify(BOB).key_id == "bob" and ring.identify(CAROL) is None
    assert reloads == [True, False], "an invalid file is reported and changes nothing"


def test_without_keys_nothing_is_required_and_nobody_is_admin():
    ring = KeyRing(None, None, None)
    assert not ring.requires_key and not ring.has_admin() and ring.identify("anything") is None
    assert KeyRing(None, "adm").requires_key is False, "an admin key alone leaves inference open"


def test_new_entry_makes_a_random_key_its_entry_accepts(tmp_path):
    key, toml = new_entry("alice", ["sst2", "a-*"], False, RateLimits(2.0, None, 3.0), json_format=False)
    again, _ = new_entry("alice", ["sst2"], False, RateLimits(), json_format=False)
    assert key != again and len(key) >= 43 and key not in toml
    path = tmp_path / "keys.toml"
    path.write_text(toml, encoding="utf-8")
    ring = KeyRing(None, None, path)
    alice = ring.identify(key)
    assert alice.key_id == "alice" and alice.adapters == ("sst2", "a-*") and alice.limits == RateLimits(2.0, None, 3.0)
    key, member = new_entry("ops", [], True, RateLimits(), json_format=True)
    write_path = tmp_path / "keys.json"
    write_path.write_text("{" + f'"keys": {{{member}}}' + "}", encoding="utf-8")
    assert KeyRing(None, None, write_path).identify(key).admin


def test_the_key_command_prints_the_entry_on_stdout_and_the_key_once_on_stderr(tmp_path):
    command = [sys.executable, "-m", "service.keys", "new", "alice", "--adapters", "sst2", "--rows-per-second", "10"]
    made = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    key = made.stderr.strip().rsplit(" ", 1)[-1]
    assert key not in made.stdout and "[keys.alice]" in made.stdout
    path = tmp_path / "keys.toml"
    path.write_text(made.stdout, encoding="utf-8")
    assert KeyRing(None, None, path).identify(key).key_id == "alice"
    checked = subprocess.run(
        [sys.executable, "-m", "service.keys", "check", str(path)], cwd=REPO, capture_output=True, text=True
    )
    assert checked.returncode == 0 and "alice" in checked.stdout and key not in checked.stdout
    reserved = subprocess.run(
        [sys.executable, "-m", "service.keys", "new", "anonymous", "--adapters", "*"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert reserved.returncode == 2 and "reserved" in reserved.stderr


# ---- token buckets ---------------------------------------------------------------------------------


def test_a_token_bucket_admits_its_rate_and_says_when_to_come_back():
    bucket = TokenBucket(rate=2.0, capacity=2.0, now=0.0)
    assert [bucket.take(1, 0.0), bucket.take(1, 0.0)] == [0.0, 0.0]
    assert bucket.take(1, 0.0) == pytest.approx(0.5)
    assert bucket.take(1, 0.25) == pytest.approx(0.25)
    assert bucket.take(1, 0.5) == 0.0
    # Over 10 s at 2/s, 20 requests pass (and the two of the first burst before them).
    admitted = sum(bucket.take(1, 0.5 + t / 100) == 0.0 for t in range(1, 1001))
    assert admitted == 20


def test_a_cost_above_the_capacity_passes_when_full_and_leaves_a_debt():
    bucket = TokenBucket(rate=4.0, capacity=4.0, now=0.0)
    assert bucket.take(10, 0.0) == 0.0  # 10 rows against 4/s: admitted once the bucket is full
    assert bucket.take(1, 0.0) == pytest.approx((1 + 6) / 4)  # -6 tokens: 1.75 s until one is back
    assert bucket.take(10, 2.5) == 0.0  # full again (4) after 2.5 s


def test_the_rate_limiter_counts_each_refusal_per_key_and_limit():
    clock = Clock()
    refused: list[tuple[str, str]] = []
    limiter = RateLimiter(lambda key_id, limit: refused.append((key_id, limit)), clock=clock)
    limits = RateLimits(requests_per_second=1.0, rows_per_second=3.0)
    limiter.admit_request("a", limits)
    with pytest.raises(RateLimitedError) as too_many:
        limiter.admit_request("a", limits)
    assert too_many.value.status_code == 429 and too_many.value.retry_after == pytest.approx(1.0)
    limiter.admit_request("b", limits)  # every key has its own buckets
    limiter.admit_rows("a", limits, 3)
    with pytest.raises(RateLimitedError, match="rows per second"):
        limiter.admit_rows("a", limits, 1)
    limiter.admit_rows("a", None, 1000)  # no limits: always admitted
    assert refused == [("a", "requests"), ("a", "rows")]
    clock.now += 1.0
    limiter.admit_request("a", limits)
    limiter.forget_except({"b"})
    limiter.admit_request("a", limits)  # a's buckets were dropped: full again


# ---- the HTTP contract --------------------------------------------------------------------------------


def keyed_app(tmp_path: Path, names=("sst2", "agnews", "plain"), available=("extra",), **settings):
    for name in available:
        (tmp_path / name).mkdir(exist_ok=True)
    keys = write_keys(
        tmp_path / "keys.json",
        alice=entry(ALICE, adapters=["sst2"]),
        bob=entry(BOB, adapters=["agnews", "pl*"]),
        ops=entry(OPS, admin=True),
    )
    settings = Settings(model_dir=tmp_path, key_file=keys, **settings)
    return create_app(settings, components=fake_components(list(names), list(available)))


def key(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


async def test_admin_routes_are_closed_without_an_admin_key(tmp_path):
    app = create_app(Settings(model_dir=tmp_path), components=fake_components(["sst2"], ["extra"]))
    (tmp_path / "extra").mkdir()
    async with running(app) as client:
        for call in (client.post("/adapters/extra"), client.delete("/adapters/sst2")):
            body = assert_envelope(await call, 403, "forbidden")
            assert "admin routes are closed" in body["error"]
        assert app.state.service.repository.loaded.keys() == {"sst2"}
        assert (await client.post("/classify", json={"inputs": "good"})).status_code == 200


async def test_an_admin_key_alone_leaves_inference_open_and_guards_admin(tmp_path):
    app = create_app(Settings(model_dir=tmp_path, admin_key=ADMIN), components=fake_components(["sst2"], ["extra"]))
    (tmp_path / "extra").mkdir()
    async with running(app) as client:
        assert (await client.post("/classify", json={"inputs": "good"})).status_code == 200
        assert_envelope(await client.post("/adapters/extra"), 401, "unauthorized")
        assert_envelope(await client.post("/adapters/extra", headers=key("wrong")), 401, "unauthorized")
        assert (await client.post("/adapters/extra", headers=key(ADMIN))).status_code == 201
        answer = await client.post("/classify", json={"inputs": "good", "adapter": "extra"}, headers=key(ADMIN))
        assert answer.status_code == 200


async def test_inference_keys_are_refused_admin_and_admin_keys_allowed(tmp_path):
    async with running(keyed_app(tmp_path, admin_key=ADMIN)) as client:
        body = assert_envelope(await client.delete("/adapters/sst2", headers=key(ALICE)), 403, "forbidden")
        assert "'alice'" in body["error"]
        assert_envelope(await client.delete("/adapters/sst2"), 401, "unauthorized")
        assert (await client.delete("/adapters/sst2", headers=key(OPS))).status_code == 200  # key file admin
        assert (await client.post("/adapters/sst2", headers=key(ADMIN))).status_code == 201  # settings admin


async def test_scopes_hold_on_every_route_that_names_an_adapter(tmp_path):
    oip = {"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["good"]}]}
    async with running(keyed_app(tmp_path)) as client:

        def calls(headers):
            return {
                "classify": lambda a: client.post("/classify", json={"inputs": "good", "adapter": a}, headers=headers),
                "tei": lambda a: client.post(f"/models/{a}", json={"inputs": "good"}, headers=headers),
                "predict": lambda a: client.post(f"/models/{a}/predict", json={"inputs": "good"}, headers=headers),
                "infer": lambda a: client.post(f"/v2/models/{a}/infer", json=oip, headers=headers),
                "metadata": lambda a: client.get(f"/v2/models/{a}", headers=headers),
                "ready": lambda a: client.get(f"/v2/models/{a}/ready", headers=headers),
            }

        for route, call in calls(key(ALICE)).items():
            assert (await call("sst2")).status_code == 200, route
            other, missing = await call("agnews"), await call("agnewz")
            assert other.status_code == missing.status_code == 404, route
            # The answer of a missing adapter, offering only the key's own adapters.
            assert other.json() == {
                "error": "unknown adapter 'agnews'; available: sst2",
                "error_type": "unknown_adapter",
            }
            assert missing.json()["error"] == "unknown adapter 'agnewz'; available: sst2"
        for route, call in calls(key(BOB)).items():
            assert (await call("plain")).status_code == 200, route  # "pl*"
            assert (await call("sst2")).status_code == 404, route
        listed = (await client.get("/adapters", headers=key(BOB))).json()
        assert [a["name"] for a in listed["adapters"]] == ["agnews", "plain"] and listed["loaded"] == 2
        assert len((await client.get("/adapters", headers=key(OPS))).json()["adapters"]) == 3  # admin: all
        assert (await client.get("/info", headers=key(BOB))).json()["adapters"] == ["agnews", "plain"]
        live = {}
        for holder in (ALICE, BOB, OPS):
            live[holder] = set((await client.get("/console/stats", headers=key(holder))).json()["adapters"])
        assert live == {ALICE: {"sst2"}, BOB: {"plain"}, OPS: {"sst2", "plain"}}  # the adapters that served above


async def test_catalogue_access_admin_hides_the_list_but_not_the_adapters(tmp_path):
    async with running(keyed_app(tmp_path, catalogue_access="admin")) as client:
        for path in ("/adapters", "/info", "/console/stats"):
            body = assert_envelope(await client.get(path, headers=key(ALICE)), 403, "forbidden")
            assert "admin keys only" in body["error"]
            assert (await client.get(path, headers=key(OPS))).status_code == 200
        answer = await client.post("/classify", json={"inputs": "good", "adapter": "sst2"}, headers=key(ALICE))
        assert answer.status_code == 200


async def test_audit_lines_name_who_what_and_the_outcome_and_no_key(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cogalora.audit")
    async with running(keyed_app(tmp_path)) as client:
        await client.post("/adapters/extra", headers=key(ALICE))
        await client.post("/adapters/extra", headers=key(OPS))
        await client.post("/adapters/nothere", headers=key(OPS))
        await client.delete("/adapters/a%0Afake%20line", headers=key(BOB))  # a name that is no name
        await client.post("/classify", json={"inputs": "good", "adapter": "sst2"}, headers=key(ALICE))
    lines = [r for r in caplog.records if r.name == "cogalora.audit" and getattr(r, "audit", False)]
    assert [(r.who, r.action, r.target, r.outcome, r.status) for r in lines] == [
        ("alice", "POST /adapters/{name}", "name=extra", "refused", 403),
        ("ops", "POST /adapters/{name}", "name=extra", "allowed", 201),
        ("ops", "POST /adapters/{name}", "name=nothere", "failed", 404),
        ("bob", "DELETE /adapters/{name}", "name=a?fake line", "refused", 403),
    ]
    assert all(r.request_id for r in lines)
    assert not any(secret in caplog.text for secret in (ALICE, OPS, digest(OPS).hex()))


async def test_rate_limits_and_key_metrics_through_http(tmp_path):
    keys = write_keys(tmp_path / "keys.json", slow=entry(SLOW, adapters=["*"], requests_per_second=0.01))
    app = create_app(Settings(model_dir=tmp_path, key_file=keys), components=fake_components(["sst2"]))
    async with running(app) as client:
        first = await client.post("/classify", json={"inputs": ["good", "bad"]}, headers=key(SLOW))
        assert first.status_code == 200
        refused = await client.post("/classify", content=b"{not json", headers=key(SLOW))
        body = assert_envelope(refused, 429, "rate_limited")
        assert int(refused.headers["retry-after"]) >= 99 and "0.01 requests per second" in body["error"]
        assert_envelope(await client.get("/adapters", headers=key(SLOW)), 429, "rate_limited")
        page = (await client.get("/metrics")).text
    assert 'cogalora_key_requests_total{code="200",key_id="slow"} 1.0' in page
    assert 'cogalora_key_requests_total{code="429",key_id="slow"} 2.0' in page
    assert 'cogalora_key_rate_limited_total{key_id="slow",limit="requests"} 2.0' in page
    assert 'cogalora_key_inputs_total{key_id="slow"} 2.0' in page
    assert SLOW not in page


async def test_sighup_path_reloads_the_key_file(tmp_path):
    app = keyed_app(tmp_path)
    async with running(app) as client:
        assert (await client.get("/adapters", headers=key(CAROL))).status_code == 401
        write_keys(tmp_path / "keys.json", carol=entry(CAROL, adapters=["*"]))
        app.state.access.reload_keys()
        assert (await client.get("/adapters", headers=key(CAROL))).status_code == 200
        assert (await client.get("/adapters", headers=key(ALICE))).status_code == 401


def test_settings_refuse_equal_keys_and_a_bad_key_file(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="must differ"):
        Settings(api_key="same", admin_key="same")
    with pytest.raises(ValidationError, match="cannot be read"):
        Settings(key_file=tmp_path / "absent.toml")
    assert Settings(api_key="", admin_key="").admin_key_value() is None
