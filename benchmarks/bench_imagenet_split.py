"""Cost and fidelity of partitioned ImageNet models: EfficientNet-Lite0 (trained, packaged) and
ResNet-18 (random weights, cut from its torch.fx graph). Owner side; prints Markdown tables.

For each chosen point: FrontNet parameters, FLOPs and enclave memory (assess/cost.py, one image),
then a real bundle (sealed FrontNet, permuted BackNet) opened the way host and enclave open it,
run on the 20 packaged ImageNet photos: top-1 agreement with the whole model and the largest
logit difference. Usage: python benchmarks/bench_imagenet_split.py [--points-lite 2,6,9,12,16,18]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from enclaveml.assess.cost import flops, param_count, peak_activation_bytes, weight_bytes
from enclaveml.crypto import SigningKey
from enclaveml.data.packaged import packaged_imagefolder
from enclaveml.data.preprocess import load_image_bytes
from enclaveml.models import efficientnet, examples
from enclaveml.models.bundle import make_bundle, open_enclave_parts, read_public_bundle
from enclaveml.models.loading import load_model


def table(title: str, spec: str, weights: Path, points: list[int], photos: list[bytes]) -> None:
    model, pre, _ = load_model(spec, str(weights), resize=True)
    x = torch.stack([pre(p) for p in photos])
    with torch.no_grad():
        ref = model(x)
    owner = SigningKey.generate()
    pts = {p.index: p for p in model.partition_points()}
    print(f"\n### {title}\n")
    print("| k | layer | IR shape | FrontNet params | MFLOPs | enclave MiB | top-1 agree | max abs logit diff |")
    print("|---|---|---|---|---|---|---|---|")
    for k in points:
        front, _ = model.split(k)
        shape = tuple(model.input_shape)
        mib = (weight_bytes(front) + peak_activation_bytes(front, shape)) / 2**20
        with tempfile.TemporaryDirectory() as d:
            _, key = make_bundle(model, k, Path(d) / "b", {"factory": spec}, pre, [str(i) for i in range(1000)], owner)
            _, back = read_public_bundle(Path(d) / "b", allowed_factories={spec})
            f, mapping = open_enclave_parts(Path(d) / "b", key, allowed_factories={spec})
            with torch.no_grad():
                out = mapping.to_original(back(f(x)))
        agree = float((out.argmax(1) == ref.argmax(1)).float().mean())
        p = pts[k]
        print(f"| {k} | {p.name} | {'x'.join(map(str, p.out_shape))} | {param_count(front):,} | "
              f"{flops(front, shape) / 1e6:.1f} | {mib:.2f} | {agree:.0%} | {(out - ref).abs().max().item():.2e} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points-lite", default="2,6,9,12,16,18")
    ap.add_argument("--points-resnet", default="4,8,12,16,20,22")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    photos = [load_image_bytes(p) for p in sorted(packaged_imagefolder("foolbox-imagenet").rglob("*")) if p.is_file()]
    with tempfile.TemporaryDirectory() as d:
        lite_w, _ = efficientnet.export(Path(d) / "lite0")
        if a.points_lite:
            table("EfficientNet-Lite0 (trained), 20 packaged ImageNet photos", efficientnet.UNTRAINED, lite_w,
                  [int(v) for v in a.points_lite.split(",")], photos)
        torch.manual_seed(0)
        from safetensors.torch import save_file

        res_w = Path(d) / "resnet18.safetensors"
        save_file({k: v.contiguous() for k, v in examples.resnet18().state_dict().items()}, str(res_w))
        table("ResNet-18 (random weights, graph-cut), 20 packaged ImageNet photos", "enclaveml.models.examples:resnet18",
              res_w, [int(v) for v in a.points_resnet.split(",")], photos)
    print(f"\nwall {time.perf_counter() - t0:.0f} s, torch threads {a.threads}")


if __name__ == "__main__":
    main()
