"""`enclaveml.Client` against a real `enclaveml serve` child (`enclaveml.local_server`).

Every image form the API accepts (path, bytes, PIL image, uint8 or float tensor, array, a batch
tensor) reaches the enclave as the same pixels and gets the same answer; deploy takes a `Bundle`
and its model key from beside it; only the owner can undeploy.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import enclaveml as eml
from enclaveml.errors import EnclaveMLError, UnknownModel


def _same(a: eml.Prediction, b: eml.Prediction) -> bool:
    """Same labels in the same order, scores equal up to batching's float rounding."""
    return [(t.index, t.label) for t in a.top] == [(t.index, t.label) for t in b.top] and \
        all(abs(x.score - y.score) < 1e-5 for x, y in zip(a.top, b.top))


@pytest.mark.slow
def test_client_deploys_a_bundle_and_infers_every_image_form(tmp_path, cifar10_dir):
    owner = eml.OwnerKey.generate()
    bundle = eml.partition("darknet", k=3, out=tmp_path / "bundle", owner_key=owner)
    path = sorted((cifar10_dir / "test" / "ship").glob("*.jpg"))[0]
    raw = path.read_bytes()
    pil = Image.open(io.BytesIO(raw)).convert("RGB")
    arr = np.asarray(pil).copy()
    u8 = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    with eml.local_server(tmp_path / "store") as server:
        with eml.Client(server.url, eml.sim_policy()) as client:
            d = client.deploy(bundle, owner_key=owner)
            assert (d.model, d.bundle_id, d.k, d.replaced) == ("darknet", bundle.bundle_id, 3, False)
            ref = client.infer(path, model=d.model, top_k=3, logits=True)
            assert isinstance(ref, eml.Prediction) and ref.logits is not None and ref.logits.shape == (10,)
            assert [t.label for t in ref.top][0] == ref.label and 0 < ref.score <= 1
            # JPEG bytes vs its decoded pixels re-encoded as PNG: the enclave decodes both to the same pixels
            for form in (raw, str(path), pil, arr, u8, u8.float() / 255):
                p = client.infer(form, model=d.model, top_k=3)
                assert _same(p, ref), type(form)
            batch = client.infer(torch.stack([u8, u8]), model=d.model, top_k=3)
            assert isinstance(batch, list) and len(batch) == 2 and all(_same(b, ref) for b in batch)
            assert _same(client.infer([raw], model=d.model, top_k=3)[0], ref)
            with pytest.raises(UnknownModel):  # names are scoped by owner: another key has no "darknet"
                client.undeploy(d.model, owner_key=eml.OwnerKey.generate())
            client.undeploy(d.model, owner_key=owner)
            with pytest.raises((UnknownModel, EnclaveMLError)):
                client.infer(raw, model=d.model)
