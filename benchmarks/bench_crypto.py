"""Micro-benchmark of the crypto recipes: `.venv/bin/python benchmarks/bench_crypto.py` prints one table.

Trust side: none (a developer tool). Times per call on this machine's CPU, single thread.
`--n N` sets the number of calls per row (default 2000; key releases run N/10, 10 MB seals 5).
The second table times each HPKE suite (crypto/suites.py) on the same 3 kB request.
`--cpu` times thread CPU (`time.thread_time`) instead of wall time: on a shared machine the CPU a
call costs, without the time its thread waited for a core.
"""

from __future__ import annotations

import argparse
import os
import time

from enclaveml.crypto import (HpkeKeyPair, ReplayGuard, SigningKey, frame_fresh, generate_key, open_key_release,
                              open_request, open_sealed, seal, seal_key_release, seal_request)
from enclaveml.crypto import suites as S
from enclaveml.protocol import infer as protocol


_CLOCK = time.perf_counter


def _per_call(fn, n: int) -> float:
    t = _CLOCK()
    for _ in range(n):
        fn()
    return (_CLOCK() - t) / n


def main(n: int = 2000) -> None:
    kp = HpkeKeyPair.generate()
    pub = kp.public_bytes()
    image = os.urandom(3000)  # about one CIFAR-10 PNG
    result = b'{"label":"cat","scores":[0.1,0.2]}'
    msg, ctx = seal_request(pub, frame_fresh(image))
    _, sealer = open_request(kp, msg)
    batch = protocol.encode_payload([image] * 32, 1)  # what the SDK sends for 32 images: one request
    msg32, _ = seal_request(pub, frame_fresh(batch))
    resp = sealer.seal_response(result)
    guard = ReplayGuard()
    owner, key, nonce = SigningKey.generate(), generate_key(), os.urandom(32)
    release = seal_key_release(owner, pub, "m", key, nonce)
    big = os.urandom(10_000_000)
    token = seal(key, big)
    rows = [
        ("seal_request (3 kB image + freshness header)", _per_call(lambda: seal_request(pub, frame_fresh(image)), n)),
        ("open_request", _per_call(lambda: open_request(kp, msg), n)),
        ("seal_request, 32 images in one request (per image)", _per_call(lambda: seal_request(pub, frame_fresh(batch)), n // 10) / 32),
        ("open_request, 32 images in one request (per image)", _per_call(lambda: open_request(kp, msg32), n // 10) / 32),
        ("ReplayGuard.check", _per_call(lambda: guard.check(os.urandom(16), time.time()), n)),
        ("seal_response (34 B result)", _per_call(lambda: sealer.seal_response(result), n)),
        ("open_response", _per_call(lambda: ctx.open_response(resp), n)),
        ("seal_key_release", _per_call(lambda: seal_key_release(owner, pub, "m", key, nonce), n // 10)),
        ("open_key_release", _per_call(lambda: open_key_release(kp, release, nonce), n // 10)),
        ("seal 10 MB (AES-256-GCM)", _per_call(lambda: seal(key, big), 5)),
        ("open_sealed 10 MB", _per_call(lambda: open_sealed(key, token), 5)),
    ]
    print(f"{'operation':54s} {'time per call':>14s}")
    for name, secs in rows:
        print(f"{name:54s} {secs * 1e6:11.0f} us")
    print(f"request overhead: {len(msg) - len(image)} B (enc 32 + tag 16 + freshness header 25); "
          f"response overhead: {len(resp) - len(result)} B (nonce 16 + tag 16)")
    suite_table(n, image, result, owner, key, nonce)


def _best(fn, n: int, tries: int = 5) -> float:
    """The fastest of `tries` slices of n/tries calls: a shared machine's preemptions only add."""
    return min(_per_call(fn, max(1, n // tries)) for _ in range(tries))


def suite_table(n: int, image: bytes, result: bytes, owner, key: bytes, nonce: bytes) -> None:
    """Per suite: seal/open of a one-image request and of its response, and a key release
    (each the fastest of 5 slices of the calls)."""
    keys = S.EnclaveKeys.generate()
    print(f"\n{'suite':18s}{'seal req':>10s}{'open req':>10s}{'seal resp':>11s}{'open resp':>11s}"
          f"{'key rel seal':>14s}{'key rel open':>14s}{'req B over':>12s}{'resp B over':>12s}")
    best: dict[str, list[float]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for _ in range(2):  # two passes over the suites, so a load change hits each alike; keep the best
        for suite in S.SUITES:
            pub = keys.pq.public_bytes() if suite == S.MLKEM768_X25519 else keys.classic.public_bytes()
            framed = frame_fresh(image)
            msg, ctx = S.seal_with(suite, pub, framed, b"aad")
            _, sealer = S.open_any(keys, msg, b"aad")
            resp = sealer.seal_response(result, b"aad")
            rel = seal_key_release(owner, keys.classic.public_bytes(), "m", key, nonce, suite, pub)
            t = [_best(lambda: S.seal_with(suite, pub, frame_fresh(image), b"aad"), n),
                 _best(lambda: S.open_any(keys, msg, b"aad"), n),
                 _best(lambda: sealer.seal_response(result, b"aad"), n),
                 _best(lambda: ctx.open_response(resp, b"aad"), n),
                 _best(lambda: seal_key_release(owner, keys.classic.public_bytes(), "m", key, nonce, suite, pub), n // 10),
                 _best(lambda: open_key_release(keys, rel, nonce), n // 10)]
            best[suite] = [min(a, b) for a, b in zip(best.get(suite, t), t)]
            sizes[suite] = (len(msg) - len(framed), len(resp) - len(result))
    for suite in S.SUITES:
        print(f"{suite:18s}" + "".join(f"{v * 1e6:>{w}.0f} us" for v, w in zip(best[suite], (7, 7, 8, 8, 11, 11)))
              + f"{sizes[suite][0]:>12d}{sizes[suite][1]:>12d}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="calls per row (default 2000)")
    ap.add_argument("--cpu", action="store_true", help="time thread CPU, not wall time")
    args = ap.parse_args()
    if args.cpu:
        _CLOCK = time.thread_time
    print(f"clock: {'thread CPU' if args.cpu else 'wall'}; load average {os.getloadavg()[0]:.2f}")
    main(max(10, args.n))
