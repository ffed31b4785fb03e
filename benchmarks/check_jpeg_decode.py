"""Does the JPEG fast path give Pillow's pixels and Pillow's verdicts? (issue 13, data/preprocess.py)

Trust side: operator. `decode_array` decodes colour JPEGs with libjpeg-turbo (simplejpeg) and
everything else with Pillow; `decode_image` is Pillow alone. This compares the two on every
CIFAR-10 test JPEG (pixels must be equal), then on --cases hostile files made from real JPEGs
(baseline and progressive) by 1-4 random flips, cuts, duplicated runs and zeroed bytes, each under
the resizing and the strict preprocessing: both must refuse, or both give the same pixels.
Prints the counts; exits 1 on any disagreement:

    PYTHONPATH=src python benchmarks/check_jpeg_decode.py [--cases 30000] [--seed 1]
"""

from __future__ import annotations

import argparse
import io
import random
import sys
from pathlib import Path

import numpy as np


def mutate(data: bytes, rng: random.Random) -> bytes:
    """`data` after 1-4 random edits: a byte flipped, the rest cut off, a run of up to 32 bytes
    duplicated, or a byte zeroed (also used by tests/test_data_decode.py)."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(b))
        op = rng.choice(["flip", "cut", "dup", "zero"])
        if op == "flip":
            b[i] ^= rng.randint(1, 255)
        elif op == "cut":
            del b[i:]
            b = b or bytearray(b"\xff")
        elif op == "dup":
            b[i:i] = b[i:i + rng.randint(1, 32)]
        else:
            b[i] = 0
    return bytes(b)


def main() -> None:
    from PIL import Image

    from enclaveml import paths
    from enclaveml.data.preprocess import Preprocessing, _turbo_pixels, decode_array, decode_image
    from enclaveml.errors import DataError

    shared = paths.shared_dir()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(shared / "data" / "cifar10" / "test") if shared else None)
    ap.add_argument("--cases", type=int, default=30000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if not args.data or not Path(args.data).is_dir():
        sys.exit("no CIFAR-10 test folder: pass --data DIR (DIR/<class>/*.jpg)")
    files = [p.read_bytes() for p in sorted(Path(args.data).glob("*/*.jpg"))]
    strict, resizing = Preprocessing(size=(32, 32), resize=False), Preprocessing(size=(32, 32))

    def outcome(fn, data, pre):
        try:
            return "ok", np.asarray(fn(data, pre), dtype=np.uint8).tobytes()
        except DataError as e:
            return "error", str(e)

    real_bad = sum(outcome(decode_array, b, strict) != outcome(decode_image, b, strict) for b in files)
    print(f"{len(files)} real JPEGs: {real_bad} differ")
    sources = files[:20]
    for progressive in (False, True):
        b = io.BytesIO()
        Image.linear_gradient("L").resize((40, 30)).convert("RGB").save(b, "JPEG", quality=80, progressive=progressive)
        sources.append(b.getvalue())
    rng = random.Random(args.seed)
    cases = fast = disagree = 0
    for _ in range(args.cases):
        data = mutate(rng.choice(sources), rng)
        for pre in (resizing, strict):
            cases += 1
            a = outcome(decode_array, data, pre)
            fast += a[0] == "ok" and _turbo_pixels(data, pre, "x") is not None
            disagree += a != outcome(decode_image, data, pre)
    print(f"{cases} hostile cases ({args.cases} files x 2 preprocessings): {fast} decoded by the fast path, "
          f"{disagree} disagreements with Pillow")
    sys.exit(1 if real_bad or disagree else 0)


if __name__ == "__main__":
    main()
