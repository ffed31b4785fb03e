"""A trained zoo model on real CIFAR-10 images: the partitioned model predicts what the whole one does."""

from __future__ import annotations

import pytest
import torch

from enclaveml.crypto import SigningKey
from enclaveml.data.folder import load_image_folder, to_model_input
from enclaveml.models import zoo
from enclaveml.models.bundle import make_bundle, open_enclave_parts, read_public_bundle


@pytest.fixture(scope="module")
def trained(cifar10_dir):
    e = zoo.entry("darknet")
    if not e.weights_path.exists():
        pytest.skip("darknet has no trained weights yet")
    data = load_image_folder(cifar10_dir / "test", e.preprocessing, limit_per_class=10, workers=2)
    return e, zoo.load("darknet"), data, to_model_input(data.images, e.preprocessing)


@pytest.mark.parametrize("k", [4])
def test_trained_darknet_on_cifar10(trained, tmp_path, k):
    e, m, data, x = trained
    owner = SigningKey.generate()
    _, key = make_bundle(m, k, tmp_path / "b", {"zoo": "darknet"}, e.preprocessing, list(e.classes), owner)
    _, back = read_public_bundle(tmp_path / "b", owner.public_key())
    front, mapping = open_enclave_parts(tmp_path / "b", key, owner.public_key())
    with torch.no_grad():
        full = m(x)
        host = back(front(x))
        part = mapping.to_original(host)
    assert torch.equal(part.argmax(1), full.argmax(1))
    assert torch.allclose(part, full, rtol=0, atol=1e-4)
    # the host's own argmax is a permuted label: it agrees with the truth only by chance
    assert (host.argmax(1) == data.labels).float().mean() < (full.argmax(1) == data.labels).float().mean()
    assert [mapping.label(int(i)) for i in part.argmax(1)[:5]] == [e.classes[int(i)] for i in full.argmax(1)[:5]]
