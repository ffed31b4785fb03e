"""The enclave worker's op registry: unknown ops and bad arguments are errors, and the worker goes on.

Pure dispatch first (no channel), then the same registry behind a real channel (a socketpair and
the runtime's serving loop on a thread), then the two real worker registries (serving, CalTrain).
"""

from __future__ import annotations

import socket
import threading

import pytest
import torch

from enclaveml.errors import DataError, TamperedMessage
from enclaveml.runtime.enclave.main import add_builtin_ops
from enclaveml.runtime.enclave.ops import Bool, Hex, Int, Ints, OpRegistry, Str, Strs
from enclaveml.runtime.rpc import ChannelClient, RemoteError, error_fields, error_from_fields, serve_channel
from enclaveml.runtime.transport import Channel


def _registry(calls: list) -> OpRegistry:
    ops = OpRegistry()

    @ops.op("add", a=Int(0, 10), b=Int(0, 10, default=1), tensors=("x",))
    def add(call, a, b):
        calls.append(("add", a, b))
        return {"sum": a + b}, {"y": call.tensors["x"] + a + b}, None

    @ops.op("echo", inline=True, s=Str(8, default=""), h=Hex(2, 4, default=b"\x00\x00"), f=Bool(),
            names=Strs(3, 4, default=[]), ns=Ints(3, 0, 9, default=[]), blobs=("data",))
    def echo(call, s, h, f, names, ns):
        calls.append(("echo", s, h, f, names, ns))
        return {"s": s, "h": h.hex(), "f": f, "names": names, "ns": ns}, None, {"data": call.blobs["data"][::-1]}

    @ops.op("tampered")
    def tampered(call):
        raise TamperedMessage("bad tag")

    @ops.op("crash")
    def crash(call):
        raise RuntimeError("secret detail that must not travel")

    return ops


def test_dispatch_checks_every_argument_before_the_handler_runs():
    calls: list = []
    ops = _registry(calls)
    h, t, _ = ops.handle({"op": "add", "id": 7, "a": 2}, {"x": torch.zeros(2)}, {})
    assert h == {"sum": 3} and torch.equal(t["y"], torch.full((2,), 3.0))
    h, _, b = ops.handle({"op": "echo", "s": "hi", "h": "abcd", "f": True, "names": ["a"], "ns": [9]}, {},
                         {"data": b"xyz"})
    assert h == {"s": "hi", "h": "abcd", "f": True, "names": ["a"], "ns": [9]} and b == {"data": b"zyx"}
    bad = [
        ({"op": "nope"}, "unknown enclave operation 'nope'"),
        ({"op": None}, "unknown enclave operation"),
        ({"op": ["add"]}, "unknown enclave operation"),
        ({}, "unknown enclave operation"),
        ({"op": "add"}, "argument 'a' is missing"),
        ({"op": "add", "a": 11}, "a must be an integer 0..10"),
        ({"op": "add", "a": -1}, "a must be an integer 0..10"),
        ({"op": "add", "a": True}, "a must be an integer"),  # a bool is not an int here
        ({"op": "add", "a": 1.0}, "a must be an integer"),
        ({"op": "add", "a": "1"}, "a must be an integer"),
        ({"op": "echo", "s": "x" * 9}, "s must be a string of at most 8"),
        ({"op": "echo", "s": 5}, "s must be a string"),
        ({"op": "echo", "h": "zz"}, "h must be hex"),
        ({"op": "echo", "h": "00"}, "h must be hex of 2 to 4 bytes"),
        ({"op": "echo", "h": "00" * 5}, "h must be hex of 2 to 4 bytes"),
        ({"op": "echo", "f": 1}, "f must be true or false"),
        ({"op": "echo", "names": ["a", "b", "c", "d"]}, "names must be a list of at most 3"),
        ({"op": "echo", "names": ["abcde"]}, "names must be a list"),
        ({"op": "echo", "names": "abc"}, "names must be a list"),
        ({"op": "echo", "ns": [10]}, "ns must be a list of at most 3 integers 0..9"),
    ]
    for header, why in bad:
        with pytest.raises(DataError, match=why):
            ops.handle(header, {"x": torch.zeros(1)}, {"data": b""})
    with pytest.raises(DataError, match="tensor 'x' is missing"):
        ops.handle({"op": "add", "a": 1}, {}, {})
    with pytest.raises(DataError, match="blob 'data' is missing"):
        ops.handle({"op": "echo"}, {}, {})
    assert calls == [("add", 2, 1), ("echo", "hi", b"\xab\xcd", True, ["a"], [9])]  # no bad request ran


def test_registration_is_checked():
    ops = _registry([])
    with pytest.raises(ValueError, match="twice"):
        ops.add("add", lambda call: {})
    with pytest.raises(ValueError, match="reserved"):
        ops.add("other", lambda call, id: {}, id=Int(0, 1))
    assert ops.names() == ["add", "crash", "echo", "tampered"]
    assert ops.is_inline({"op": "echo"}) and not ops.is_inline({"op": "add"})
    assert ops.is_inline({"op": "nope"})  # an unknown op fails at once, on the reading thread


def test_the_error_table_round_trips_and_hides_internal_errors():
    assert error_fields(TamperedMessage("bad tag")) == {"error": "TamperedMessage", "message": "bad tag"}
    e = error_from_fields({"error": "TamperedMessage", "message": "bad tag"})
    assert type(e) is TamperedMessage and str(e) == "bad tag"
    assert error_fields(RuntimeError("secret")) == {"error": "InternalError", "message": "internal error in the worker"}
    assert type(error_from_fields({"error": "InternalError", "message": "m"})) is RemoteError
    assert type(error_from_fields({"error": "SystemExit", "message": "m"})) is RemoteError  # only the table's classes
    assert error_from_fields({"ok": True}) is None

    class Local(DataError):  # a subclass outside the table travels as its nearest class in it
        pass

    assert error_fields(Local("x"))["error"] == "DataError"


def test_a_worker_serving_the_registry_answers_errors_and_keeps_serving():
    ops = add_builtin_ops(_registry([]), lambda: {"app": "test"})
    a, b = socket.socketpair()
    worker = threading.Thread(target=serve_channel, args=(Channel(b), ops.handle, 2), kwargs={"inline": ops.is_inline})
    worker.start()
    client = ChannelClient(Channel(a))
    try:
        for header, exc, why in (({"op": "nope"}, DataError, "unknown enclave operation"),
                                 ({"op": "add", "a": 99}, DataError, "0..10"),
                                 ({"op": "add", "a": 1}, DataError, "tensor 'x' is missing"),
                                 ({"op": "tampered"}, TamperedMessage, "bad tag")):
            with pytest.raises(exc, match=why):
                client.request(header, timeout=10)
        with pytest.raises(RemoteError) as ei:
            client.request({"op": "crash"}, timeout=10)
        assert "secret" not in str(ei.value)
        h, t, _ = client.request({"op": "add", "a": 4}, {"x": torch.ones(3)}, timeout=10)
        assert h["sum"] == 5 and torch.equal(t["y"], torch.full((3,), 6.0))
        assert client.request({"op": "ping"}, timeout=10)[0]["pong"] is True
        assert client.request({"op": "info"}, timeout=10)[0]["app"] == "test"
    finally:
        client.close()
        worker.join(30)
    assert not worker.is_alive()


def test_the_serving_and_caltrain_registries_check_their_arguments():
    """The real workers' ops refuse out-of-range arguments before their enclave code runs (the
    objects behind them are never touched: None here)."""
    from enclaveml.serve.worker import register_ops as serving_ops
    from enclaveml.train.enclave_worker import register_ops as caltrain_ops

    serving, caltrain = serving_ops(OpRegistry(), None), caltrain_ops(OpRegistry(), None)
    for ops, header, why in (
        (serving, {"op": "front_batch", "n": 4097}, "n must be an integer 0..4096"),
        (serving, {"op": "front_batch", "n": -1}, "n must be an integer"),
        (serving, {"op": "finish_batch", "handles": ["a"], "rows": [4097]}, "rows must be"),
        (serving, {"op": "finish_batch", "handles": "a"}, "handles must be a list"),
        (serving, {"op": "evidence", "nonce": "xyz"}, "nonce must be hex"),
        (serving, {"op": "deploy", "model": ["m"]}, "model must be a string"),
        (caltrain, {"op": "ingest", "n": "3"}, "n must be an integer"),
        (caltrain, {"op": "ingest", "n": 10**6}, "n must be an integer 0..100000"),
        (caltrain, {"op": "forward", "step": 1.5}, "step must be an integer"),
        (caltrain, {"op": "records", "count": -1}, "count must be"),
        (caltrain, {"op": "add_data", "tags": "abc"}, "tags must be a list"),
        (caltrain, {"op": "add_data", "reset": "yes"}, "reset must be true or false"),
        (caltrain, {"op": "loss"}, "tensor 'scores' is missing"),
        (caltrain, {"op": "backward"}, "tensor 'grad' is missing"),
        (caltrain, {"op": "evidence", "nonce": "0g"}, "nonce must be hex"),
        (caltrain, {"op": "drop_tables"}, "unknown enclave operation"),
    ):
        with pytest.raises(DataError, match=why):
            ops.handle(header, {}, {})


def test_dependencies_point_inward():
    """The runtime knows neither system; serving and CalTrain never import each other (DESIGN.md)."""
    import ast
    from pathlib import Path

    import enclaveml

    root = Path(enclaveml.__file__).parent

    def imports(pkg: str) -> set[str]:
        out = set()
        for p in (root / pkg).rglob("*.py"):
            depth = len(p.relative_to(root).parts)  # a relative import of this many dots reaches the package root
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, ast.ImportFrom):
                    mod = node.module or ""
                    if node.level >= depth:
                        out.add(mod.split(".")[0])
                    elif node.level == 0 and mod.startswith("enclaveml."):
                        out.add(mod.split(".")[1])
                elif isinstance(node, ast.Import):
                    out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("enclaveml.")}
        return out

    assert not imports("runtime") & {"serve", "train", "client", "assess", "cli"}, imports("runtime")
    assert "serve" not in imports("train") and "train" not in imports("serve")
