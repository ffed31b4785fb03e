"""Instance protocol without a server: sign + encrypt, open + check + re-seal, decrypt batches."""

from __future__ import annotations

import pytest
import torch

from enclaveml.crypto import HpkeKeyPair, SigningKey, generate_key
from enclaveml.errors import DataError, PolicyViolation, TamperedMessage
from enclaveml.models import zoo
from enclaveml.train.instances import EnclaveDataset, InstanceIngest, make_upload, open_instance, participant_id

PRE = zoo.entry("darknet").preprocessing


@pytest.fixture()
def images(cifar10_dir):
    files = sorted((cifar10_dir / "test" / "cat").iterdir())[:3]
    return [f.read_bytes() for f in files]


def test_ingest_seals_and_dataset_decrypts(images):
    kp, dk, tk = HpkeKeyPair.generate(), generate_key(), generate_key()
    ing = InstanceIngest(kp, dk, tk, PRE, 10)
    key = SigningKey.generate()
    acc = [ing.ingest(make_upload(kp.public_bytes(), key, img, 3)[1]) for img in images]
    assert len({a.tag for a in acc}) == 3 and len({a.owner for a in acc}) == 1
    assert all(images[0][200:264] not in a.sealed for a in acc)
    # a host storing one instance twice cannot make it count twice
    ds = EnclaveDataset(dk, [(a.tag, a.sealed) for a in acc] + [(acc[0].tag, acc[0].sealed)])
    assert len(ds) == 3 and ds.dropped == 1
    x, y = ds.batch(torch.tensor([0, 2]))
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.uint8 and y.tolist() == [3, 3]
    assert ds.meta[0][1] == participant_id(key.public_key())
    with pytest.raises(TamperedMessage):  # a sealed instance moved under another tag
        open_instance(dk, acc[1].tag, acc[0].sealed)
    flipped = bytearray(acc[0].sealed)
    flipped[40] ^= 1
    with pytest.raises(TamperedMessage):
        open_instance(dk, acc[0].tag, bytes(flipped))


def test_ingest_rejects_bad_uploads(images):
    kp = HpkeKeyPair.generate()
    ing = InstanceIngest(kp, generate_key(), generate_key(), PRE, 10)
    a, b = SigningKey.generate(), SigningKey.generate()
    with pytest.raises(TamperedMessage):
        ing.ingest(make_upload(HpkeKeyPair.generate().public_bytes(), a, images[0], 1)[1])
    with pytest.raises(PolicyViolation):
        ing.ingest(make_upload(kp.public_bytes(), a, images[0], 1, claimed_pid=participant_id(b.public_key()))[1])
    with pytest.raises(DataError):
        ing.ingest(make_upload(kp.public_bytes(), a, images[0], 10)[1])
    with pytest.raises(DataError):
        ing.ingest(make_upload(kp.public_bytes(), a, b"GIF89a not allowed", 1)[1])
