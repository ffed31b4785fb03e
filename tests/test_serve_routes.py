"""The host server's routes, in process: FastAPI's TestClient over the real `HostService` and a
real sim enclave worker (no uvicorn, no port). The routes are thin: each error reaches the client
as its status code and JSON kind, bodies over a limit are refused before they are read, and the
SDK deploys, infers and deletes through the same app. (`test_serve_e2e.py` keeps the
real-subprocess server.)"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient

from enclaveml import errors as E
from enclaveml.client import EnclaveClient
from enclaveml.crypto import SigningKey
from enclaveml.models import zoo
from enclaveml.models.bundle import make_bundle
from enclaveml.protocol.attest import EvidenceAnswer
from enclaveml.protocol.identity import ModelRef
from enclaveml.serve.app import create_app
from enclaveml.serve.launcher import local_sim_policy
from enclaveml.serve.service import BodyStream, ServerConfig, read_body
from enclaveml.tee import Evidence, verify_evidence
from enclaveml.tee.evidence import bind_report_data

MODEL = "darknet"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    base = tmp_path_factory.mktemp("routes")
    home = tmp_path_factory.getbasetemp() / "home"  # the ENCLAVEML_HOME conftest gives every test
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENCLAVEML_HOME", str(home))
        owner = SigningKey.generate()
        entry = zoo.entry(MODEL)
        model = zoo.load(MODEL, pretrained=False)
        _, key = make_bundle(model, 3, base / "bundle", {"zoo": MODEL}, entry.preprocessing, list(entry.classes), owner)
        cfg = ServerConfig(store=base / "store", enclave_threads=1, max_request_bytes=200_000, ping_interval_s=60.0)
        with TestClient(create_app(cfg), raise_server_exceptions=False) as http:
            client = EnclaveClient("http://testserver", local_sim_policy(home), http=http)
            yield SimpleNamespace(http=http, client=client, owner=owner, key=key, base=base, entry=entry, model=model)


def _errors(http, kind: str) -> float:
    m = http.get("/metrics", params={"format": "json"}).json()
    return sum(c["value"] for c in m["counters"] if c["name"] == "errors_total" and c["labels"].get("kind") == kind)


def test_health_and_listing_of_a_fresh_server(app):
    r = app.http.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["tee"] == "sim"
    assert isinstance(app.http.get("/v1/models").json()["models"], list)
    assert "http_requests_total" in app.http.get("/metrics").text
    assert r.headers["x-request-id"]


def test_evidence_route_answers_a_verifiable_evidence_answer(app):
    nonce = os.urandom(16)
    r = app.http.get("/v1/evidence", params={"nonce": nonce.hex()})
    assert r.status_code == 200
    ans = EvidenceAnswer.from_dict(r.json())
    assert ans.nonce.startswith(nonce) and len(ans.public_key) == 32
    verify_evidence(Evidence.from_dict(ans.evidence), app.client.policy, bind_report_data(ans.public_key, ans.nonce))
    before = _errors(app.http, "DataError")
    for bad in ("", "ab", "zz" * 8, "00" * 65):
        r = app.http.get("/v1/evidence", params={"nonce": bad})
        assert r.status_code == 422 and r.json()["error"] == "DataError", (bad, r.text)
    assert _errors(app.http, "DataError") == before + 4


def test_unknown_model_and_bad_names_get_their_status(app):
    owner = app.owner.public_key().to_bytes().hex()
    r = app.http.post(f"/v1/models/{owner}/nothing-here/infer", content=b"x")
    assert r.status_code == 404 and r.json()["error"] == "UnknownModel"
    r = app.http.post(f"/v1/models/{'0' * 63}/x/infer", content=b"x")  # not an owner key
    assert r.status_code == 400 and r.json()["error"] == "UserInputError"
    r = app.http.post("/v1/models/.hidden", content=b"\x00\x00")
    assert r.status_code == 400 and r.json()["error"] == "UserInputError"
    r = app.http.post("/v1/models/m", content=b"\x00")  # truncated before the upload header
    assert r.status_code == 422 and r.json()["error"] == "DataError"


def test_the_lean_infer_route_matches_what_fastapi_would_route():
    """`POST /v1/models/{owner}/{name}/infer` only: anything else goes on to FastAPI's router."""
    from enclaveml.serve.app import infer_target

    def t(path, method="POST"):
        return infer_target({"method": method, "path": path})

    assert t("/v1/models/ab/m/infer") == ("ab", "m")
    for path in ("/v1/models/ab/m/x/infer", "/v1/models//m/infer", "/v1/models/ab//infer", "/v1/models/m/infer",
                 "/v1/models/ab/m/infer/", "/v2/models/ab/m/infer", "/v1/models/ab/m/identity"):
        assert t(path) is None, path
    assert t("/v1/models/ab/m/infer", "GET") is None


def test_infer_errors_and_headers_are_the_routes_own(app):
    """The lean route answers like the FastAPI routes: JSON errors with their status and a
    counter, the request id header; other methods and paths are FastAPI's (405, 404)."""
    owner = app.owner.public_key().to_bytes().hex()
    before = _errors(app.http, "UnknownModel")
    r = app.http.post(f"/v1/models/{owner}/nothing-here/infer", content=b"x")
    assert r.status_code == 404 and r.json() == {"error": "UnknownModel", "message": r.json()["message"]}
    assert r.headers["content-type"] == "application/json" and r.headers["x-request-id"]
    assert _errors(app.http, "UnknownModel") == before + 1
    assert app.http.get(f"/v1/models/{owner}/nothing-here/infer").status_code == 405
    assert app.http.post(f"/v1/models/{owner}/a/b/infer", content=b"x").status_code == 404
    assert 'route="infer",status="404"' in app.http.get("/metrics").text


def test_sdk_deploys_infers_and_deletes_through_the_routes(app, cifar10_dir):
    img = next((cifar10_dir / "test" / "cat").glob("*.jpg")).read_bytes()
    out = app.client.deploy(app.base / "bundle", app.key, app.owner, model_id=MODEL)
    ref = ModelRef(app.owner.public_key().to_bytes().hex(), MODEL)
    assert out["model"] == str(ref) and out["k"] == 3 and out["replaced"] is False
    assert str(ref) in app.http.get("/healthz").json()["models"]
    res = app.client.infer([img, img], model=MODEL, top_k=2, logits=True)
    r = app.http.post(f"/v1/models/{ref}/infer", content=app.client._seal(
        app.client.attested(), [img], app.client.target(MODEL), 1, False)[0])
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert int(r.headers["content-length"]) == len(r.content) and r.headers["x-request-id"]
    assert len(res) == 2 and len(res[0]["top"]) == 2 and res[0]["logits"] == res[1]["logits"]
    with torch.no_grad():
        want = app.model(app.entry.preprocessing(img).unsqueeze(0))[0]
    assert (torch.tensor(res[0]["logits"]) - want).abs().max().item() < 1e-5
    assert res[0]["top"][0]["label"] == app.entry.classes[int(want.argmax())]
    # a body over --max-request-bytes is refused before it is read (413), and the model still answers
    r = app.http.post(f"/v1/models/{ref}/infer", content=b"\x00" * 200_001)
    assert r.status_code == 413 and r.json()["error"] == "PayloadTooLarge"
    r = app.http.post(f"/v1/models/{ref}/infer", content=b"\x00" * 100)  # not a sealed request
    assert r.status_code in (400, 422) and r.json()["error"] in ("TamperedMessage", "DataError")
    assert app.client.infer([img], model=MODEL)[0]["model"] == MODEL
    assert app.client.delete(MODEL, app.owner) == {"model": str(ref), "deleted": True}
    r = app.http.post(f"/v1/models/{ref}/infer", content=b"x")
    assert r.status_code == 404


def test_service_reads_bodies_without_http_types():
    """The service's body reader: limits from the declared length and from what arrives."""
    import asyncio

    async def chunks(n: int):
        for _ in range(n):
            yield b"x" * 10

    assert asyncio.run(read_body(BodyStream.of(b"abc"), 3)) == b"abc"
    assert asyncio.run(read_body(BodyStream(chunks(3), None), 30)) == b"x" * 30
    with pytest.raises(E.UserInputError, match="over the 29-byte limit"):
        asyncio.run(read_body(BodyStream(chunks(3), None), 29))  # no Content-Length: counted as it arrives
    with pytest.raises(E.UserInputError, match="body of 30 bytes"):
        asyncio.run(read_body(BodyStream(chunks(3), "30"), 29))  # refused before reading
    with pytest.raises(E.UserInputError, match="bad Content-Length"):
        asyncio.run(read_body(BodyStream(chunks(1), "ten"), 29))


def _blocking_calls_in_async_functions(path) -> list[str]:
    """Calls inside `async def`s that would block the event loop: a synchronous enclave call
    (`EnclaveProxy.call`, `ChannelClient.request`), `time.sleep`, a `TrainingHost` method called
    directly on `H()` rather than handed to a worker thread, and file reads/writes."""
    import ast

    out = []
    tree = ast.parse(path.read_text())
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            f, recv = node.func, node.func.value
            name = f.attr
            recv_text = ast.unparse(recv)
            if ((name == "call" and recv_text.endswith("enclave")) or name == "request" and "enclave" in recv_text
                    or recv_text == "time" and name == "sleep"
                    or isinstance(recv, ast.Call) and ast.unparse(recv.func) == "H"
                    or name in ("read_bytes", "write_bytes", "read_text", "write_text")):
                out.append(f"{path.name}:{node.lineno} in {fn.name}: {ast.unparse(node)[:80]}")
    return out


def test_no_route_makes_a_blocking_enclave_call_on_the_event_loop(tmp_path):
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "enclaveml"
    problems = [v for p in (src / "serve" / "app.py", src / "serve" / "service.py", src / "train" / "host.py")
                for v in _blocking_calls_in_async_functions(p)]
    assert not problems, "\n".join(problems)
    bad = tmp_path / "bad.py"  # the rule can fail
    bad.write_text("async def a(s):\n    s.enclave.call({})\n    time.sleep(1)\n    return H().contribute([])\n")
    assert len(_blocking_calls_in_async_functions(bad)) == 3
