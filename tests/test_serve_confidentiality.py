"""Confidentiality, proven by looking: after inference on a canary image, scan the host server's
memory, logs and store for the image bytes, its decoded pixels and the label names. None may be
there. The same scan of the enclave worker must find them, which shows the scan works.

The canary: a PNG of random pixels (so every byte sequence of it is unique to this run), and a
model whose class names are random strings. Needles are 32-byte windows of each representation.
"""

from __future__ import annotations

import io
import os
import secrets
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from enclaveml.client import EnclaveClient
from enclaveml.crypto import SigningKey
from enclaveml.models import zoo
from enclaveml.models.bundle import make_bundle
from enclaveml.serve.launcher import ServerProcess, local_sim_policy, server_env, snapshot_package

WINDOW = 16
SIDE = 32


def _windows(data: bytes) -> list[bytes]:
    """Every non-overlapping WINDOW-byte tile of `data` (random data: each tile is unique)."""
    return [data[p:p + WINDOW] for p in range(0, len(data) - WINDOW + 1, WINDOW)]


def _regions(pid: int) -> list[tuple[int, int, str]]:
    """Writable or anonymous readable mappings: where runtime data can live (file-backed
    read-only code and data are the files' own contents)."""
    out = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        addr, perms = parts[0], parts[1]
        name = parts[5] if len(parts) > 5 else ""
        if "r" not in perms or name in ("[vvar]", "[vsyscall]", "[vdso]"):
            continue
        if "w" not in perms and name and not name.startswith("["):
            continue
        start, end = (int(x, 16) for x in addr.split("-"))
        out.append((start, end, name))
    return out


class NeedleIndex:
    """Find hundreds of needles in hundreds of MB quickly.

    A needle of >= 15 bytes always contains one 8-byte-aligned word of the buffer it lies in,
    so we look every aligned word up in a table of the needles' 8-byte substrings (numpy), and
    compare whole needles only at those candidates.
    """

    MASK = (1 << 24) - 1

    def __init__(self, needles: dict[str, list[bytes]]):
        self.needles = needles
        self.cand: dict[int, list[tuple[str, int, int]]] = {}
        for kind, lst in needles.items():
            for i, nd in enumerate(lst):
                assert len(nd) >= 15
                for j in range(8):
                    self.cand.setdefault(int.from_bytes(nd[j:j + 8], "little"), []).append((kind, i, j))
        self.table = np.zeros(self.MASK + 1, dtype=bool)
        self.table[(np.array(list(self.cand), dtype=np.uint64) & np.uint64(self.MASK)).astype(np.int64)] = True
        self.longest = max(len(nd) for lst in needles.values() for nd in lst)

    def search(self, data: bytes, words_upto: int | None = None) -> set[tuple[str, int]]:
        """Needles (kind, index) that start at an aligned word before `words_upto` bytes of `data`."""
        n = len(data) if words_upto is None else min(words_upto, len(data))
        words = np.frombuffer(data, dtype="<u8", count=n // 8)
        seen = set()
        for w in np.nonzero(self.table[(words & np.uint64(self.MASK)).astype(np.int64)])[0]:
            for kind, i, j in self.cand.get(int(words[w]), ()):
                nd = self.needles[kind][i]
                at = int(w) * 8 - j
                if at >= 0 and data[at:at + len(nd)] == nd:
                    seen.add((kind, i))
        return seen

    def counts(self, seen: set[tuple[str, int]]) -> dict[str, int]:
        return {k: sum(1 for kind, _ in seen if kind == k) for k in self.needles}


def scan_process(pid: int, needles: dict[str, list[bytes]]) -> dict[str, int]:
    """How many needles of each kind occur anywhere in the process's readable data memory."""
    index = NeedleIndex(needles)
    seen: set[tuple[str, int]] = set()
    chunk = 32 << 20
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for start, end, _ in _regions(pid):
            pos = start  # regions are page-aligned, so chunk offsets are word-aligned in memory
            while pos < end:
                n = min(chunk, end - pos)
                try:
                    data = os.pread(fd, min(n + index.longest, end - pos), pos)
                except OSError:
                    break
                seen |= index.search(data, n)
                pos += n
    finally:
        os.close(fd)
    return index.counts(seen)


def scan_files(root: Path, needles: dict[str, list[bytes]]) -> dict[str, list[str]]:
    """Files under `root` holding any needle, per kind (files are scanned at all 8 byte shifts)."""
    index = NeedleIndex(needles)
    hits: dict[str, list[str]] = {k: [] for k in needles}
    for p in [root] if root.is_file() else sorted(x for x in root.rglob("*") if x.is_file()):
        data = p.read_bytes()
        seen: set[tuple[str, int]] = set()
        for shift in range(8):  # a file has no alignment: try each
            seen |= index.search(data[shift:])
        for k, c in index.counts(seen).items():
            if c:
                hits[k].append(str(p))
    return hits


@pytest.fixture(scope="module")
def canary_run(tmp_path_factory, cifar10_dir):
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("canary")
    home = base / "home"
    pkg = snapshot_package(base / "pkg")
    labels = [f"canary-label-{secrets.token_hex(10)}" for _ in range(10)]
    model = zoo.load("darknet", pretrained=False)
    entry = zoo.entry("darknet")
    owner = SigningKey.generate()
    _, key = make_bundle(model, 3, base / "bundle", {"zoo": "darknet"}, entry.preprocessing, labels, owner)

    pixels = np.frombuffer(os.urandom(SIDE * SIDE * 3), dtype=np.uint8).reshape(SIDE, SIDE, 3)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    image = buf.getvalue()
    x = entry.preprocessing(image)  # the normalised input tensor, as the enclave computes it
    floats = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div(255.0)
    needles = {
        "image bytes": _windows(image),
        "pixels uint8": _windows(pixels.tobytes()),
        "pixels float": _windows(floats.numpy().tobytes()),
        "input tensor": _windows(x.numpy().astype(np.float32).tobytes()),
        "label names": [lab.encode() for lab in labels],
    }

    srv = ServerProcess(base / "store", base / "server.log", env=server_env(home, pkg)).start()
    try:
        with EnclaveClient(srv.url, local_sim_policy(home, pkg)) as c:
            c.deploy(base / "bundle", key, owner, model_id="canary")
            res = c.infer([image, image], model="canary", top_k=10)
        yield {"srv": srv, "base": base, "needles": needles, "labels": labels, "results": res,
               "enclave_pid": srv.enclave_pid()}
    finally:
        srv.stop()


def test_the_client_got_real_answers(canary_run):
    res = canary_run["results"]
    assert {t["label"] for t in res[0]["top"]} == set(canary_run["labels"])


def test_host_memory_holds_no_input_pixels_or_labels(canary_run):
    found = scan_process(canary_run["srv"].pid, canary_run["needles"])
    assert found == {k: 0 for k in canary_run["needles"]}, f"host server memory leaks: {found}"


def test_host_logs_and_store_hold_no_input_pixels_or_labels(canary_run):
    needles = canary_run["needles"]
    for where in (canary_run["base"] / "server.log", canary_run["base"] / "store"):
        hits = scan_files(where, needles)
        assert hits == {k: [] for k in needles}, f"{where} leaks: {hits}"
    assert list((canary_run["base"] / "store").glob("*/canary/frontnet.sealed"))  # the scan looked at something


def test_the_same_scan_finds_them_in_the_enclave_worker(canary_run):
    """The positive control: the enclave does hold these, so a scan that finds nothing in the host
    means something. (Reading the non-dumpable worker's memory needs root / CAP_SYS_PTRACE.)"""
    try:
        found = scan_process(canary_run["enclave_pid"], canary_run["needles"])
    except PermissionError:
        pytest.skip("cannot read the hardened worker's memory without CAP_SYS_PTRACE")
    assert found["label names"] == len(canary_run["labels"]), found
    assert found["image bytes"] >= 1, found
    # Decoded pixels in any of their forms (freed buffers are reused, so not every form survives).
    assert found["pixels uint8"] + found["pixels float"] + found["input tensor"] >= 1, found


def test_the_scanner_finds_planted_needles_at_any_offset(tmp_path):
    needles = {"a": _windows(os.urandom(200)), "b": [b"canary-label-" + secrets.token_hex(8).encode()]}
    for shift in range(9):
        blob = os.urandom(1000 + shift) + needles["a"][3] + os.urandom(77) + needles["b"][0] + os.urandom(50)
        (tmp_path / "f").write_bytes(blob)
        assert {k: len(v) for k, v in scan_files(tmp_path / "f", needles).items()} == {"a": 1, "b": 1}
    # A child process holding a secret it made itself: found there, and a random needle is not.
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import os,sys; s=os.urandom(64); print(s.hex(), flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        secret = bytes.fromhex(child.stdout.readline().strip())
        assert scan_process(child.pid, {"a": [secret[8:8 + WINDOW]]})["a"] == 1
        assert scan_process(child.pid, {"a": [os.urandom(WINDOW)]})["a"] == 0
    finally:
        child.stdin.close()
        child.wait(60)
