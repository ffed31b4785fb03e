"""Training instances: signed and encrypted by participants, verified and re-sealed by the enclave.

Trust side: `make_upload` runs on the participant; `InstanceIngest` and `EnclaveDataset` in the
enclave. Pure functions and small objects, no I/O. Wire formats (docs/caltrain.md):

    signed message = "enclaveml/v2 caltrain-instance\\0" || plan hash (32) || SHA-256(image bytes) (32)
                     || label (u32 BE) || participant id (32 raw bytes)
    upload plaintext = "CTI2" || plan hash (32) || participant id (32) || Ed25519 public key (32)
                       || signature (64) || label (u32 BE) || encoded image bytes (JPEG or PNG)
    upload         = HPKE request of that plaintext to the attested enclave key, aad UPLOAD_AAD
    participant id = SHA-256(Ed25519 public key): an id that does not match its key is detectable

The plan hash names the training plan the participant agreed to (plan.py): an enclave running
another plan refuses the upload (PolicyViolation), and the signature, re-checked every batch and
kept in the linkage records, proves which plan the participant signed for. After checking it,
the enclave re-seals the instance for the host's store under its data key (per plan):

    sealed  = AES-256-GCM(data key, "CTS1" || hash (32) || participant id (32) || public key (32)
                          || signature (64) || label (u32) || C, H, W (u16 each) || uint8 pixels),
              aad = "caltrain/instance" || plan hash || tag
    tag     = HMAC-SHA256(tag key, "instance\\0" || hash)  (dedup index the host can see; not the hash)
    owner   = HMAC-SHA256(tag key, "participant\\0" || participant id) (tells "resent" from "duplicate")

The host thus stores ciphertext, a keyed tag per instance and a keyed tag per contributor.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

import numpy as np
import torch

from ..crypto import HpkeKeyPair, SigningKey, VerifyKey, open_request, open_sealed, seal, seal_request
from ..data.preprocess import Preprocessing, decode_array
from ..errors import DataError, PolicyViolation, TamperedMessage
from .plan import UNPLANNED

SIGN_LABEL = b"enclaveml/v2 caltrain-instance\x00"
UPLOAD_MAGIC = b"CTI2"
SEALED_MAGIC = b"CTS1"
UPLOAD_INFO = b"enclaveml/v1 caltrain-upload"
UPLOAD_AAD = b"caltrain/upload/v1"
_UP_HEAD = struct.Struct(">4s32s32s32s64sI")
_SEALED_HEAD = struct.Struct(">4s32s32s32s64sIHHH")


def participant_id(key: VerifyKey) -> bytes:
    """The raw 32-byte participant id: SHA-256 of the public key (hex of it = key.fingerprint())."""
    return bytes.fromhex(key.fingerprint())


def signed_message(instance_hash: bytes, label: int, pid: bytes, plan: bytes = UNPLANNED) -> bytes:
    """What a participant signs: the instance, its label, who contributes it, and for which plan."""
    if len(plan) != 32:
        raise ValueError("plan hash must be 32 bytes")
    return SIGN_LABEL + bytes(plan) + bytes(instance_hash) + struct.pack(">I", int(label)) + bytes(pid)


def instance_hash(image_bytes: bytes) -> bytes:
    return hashlib.sha256(bytes(image_bytes)).digest()


def sign_instance(key: SigningKey, image_bytes: bytes, label: int, plan: bytes = UNPLANNED) -> tuple[bytes, bytes]:
    """Participant: (instance hash, signature over (plan, hash, label, participant id))."""
    h = instance_hash(image_bytes)
    return h, key.sign(signed_message(h, label, participant_id(key.public_key()), plan))


def make_upload(enclave_public: bytes, key: SigningKey, image_bytes: bytes, label: int,
                claimed_pid: bytes | None = None, plan: bytes = UNPLANNED) -> tuple[bytes, bytes]:
    """Participant: (instance hash, HPKE upload) for one instance, bound to the training plan
    `plan` (its hash; see plan.py). `claimed_pid` only for tests."""
    vk = key.public_key()
    pid = participant_id(vk) if claimed_pid is None else claimed_pid
    h = instance_hash(image_bytes)
    sig = key.sign(signed_message(h, label, pid, plan))
    plain = _UP_HEAD.pack(UPLOAD_MAGIC, bytes(plan), pid, vk.to_bytes(), sig, int(label)) + bytes(image_bytes)
    msg, _ = seal_request(enclave_public, plain, UPLOAD_AAD, info=UPLOAD_INFO)
    return h, msg


@dataclass(frozen=True)
class Instance:
    """A verified instance inside the enclave (plaintext: never leaves it unsealed)."""

    hash: bytes
    participant: bytes
    public_key: bytes
    signature: bytes
    label: int
    pixels: np.ndarray  # uint8 C,H,W


@dataclass(frozen=True)
class Accepted:
    tag: str  # hex
    owner: str  # hex
    sealed: bytes
    participant: str  # hex id, for the participant's receipt


class InstanceIngest:
    """Enclave: open uploads, check id, signature, label and image, and re-seal for the store."""

    def __init__(self, hpke: HpkeKeyPair, data_key: bytes, tag_key: bytes, pre: Preprocessing, num_classes: int,
                 plan: bytes = UNPLANNED):
        """`plan`: the hash of the plan this enclave runs; uploads bound to another are refused."""
        self.hpke = hpke
        self._data_key = data_key
        self._tag_key = tag_key
        self.pre = pre
        self.num_classes = num_classes
        self.plan = bytes(plan)

    def tag(self, h: bytes) -> str:
        return hmac.new(self._tag_key, b"instance\x00" + h, hashlib.sha256).hexdigest()

    def owner_tag(self, pid: bytes) -> str:
        return hmac.new(self._tag_key, b"participant\x00" + pid, hashlib.sha256).hexdigest()

    def ingest(self, upload: bytes) -> Accepted:
        """One upload -> sealed instance; raises TamperedMessage, PolicyViolation or DataError."""
        plain, _ = open_request(self.hpke, upload, UPLOAD_AAD, info=UPLOAD_INFO)
        if len(plain) <= _UP_HEAD.size or plain[:4] != UPLOAD_MAGIC:
            raise DataError("upload is not a CalTrain instance (bad header)")
        _, plan, pid, pub, sig, label = _UP_HEAD.unpack_from(plain)
        image = plain[_UP_HEAD.size:]
        if not hmac.compare_digest(plan, self.plan):
            raise PolicyViolation(f"upload is bound to training plan {plan.hex()[:16]}..., this enclave runs "
                                  f"{self.plan.hex()[:16]}...")
        vk = VerifyKey.from_bytes(pub)
        if not hmac.compare_digest(participant_id(vk), pid):
            raise PolicyViolation("participant id does not match its public key")
        h = instance_hash(image)
        vk.verify(sig, signed_message(h, label, pid, self.plan))  # TamperedMessage
        if not 0 <= label < self.num_classes:
            raise DataError(f"label {label} is out of range 0..{self.num_classes - 1}")
        # DataError on malformed images; Pillow's pixels (colour JPEGs through libjpeg-turbo directly)
        pixels = np.ascontiguousarray(decode_array(image, self.pre, name="instance").transpose(2, 0, 1))
        tag = self.tag(h)
        body = _SEALED_HEAD.pack(SEALED_MAGIC, h, pid, pub, sig, label, *pixels.shape) + pixels.tobytes()
        return Accepted(tag, self.owner_tag(pid), seal(self._data_key, body, _sealed_aad(self.plan, tag)), pid.hex())


def _sealed_aad(plan: bytes, tag: str) -> bytes:
    return b"caltrain/instance" + bytes(plan) + tag.encode()


def open_instance(data_key: bytes, tag: str, sealed: bytes, plan: bytes = UNPLANNED) -> Instance:
    """Enclave: unseal one stored instance (TamperedMessage if the host changed or swapped it, or
    if it was sealed under another plan)."""
    body = open_sealed(data_key, sealed, _sealed_aad(plan, tag))
    magic, h, pid, pub, sig, label, c, hh, w = _SEALED_HEAD.unpack_from(body)
    if magic != SEALED_MAGIC or len(body) != _SEALED_HEAD.size + c * hh * w:
        raise TamperedMessage("sealed instance has a bad layout")
    px = np.frombuffer(body, dtype=np.uint8, offset=_SEALED_HEAD.size).reshape(c, hh, w)
    return Instance(h, pid, pub, sig, label, px)


def verify_instance(inst: Instance, plan: bytes = UNPLANNED) -> None:
    """Re-check an unsealed instance: id = hash of its key, and the signature over (plan, hash, label, id)."""
    vk = VerifyKey.from_bytes(inst.public_key)
    if not hmac.compare_digest(participant_id(vk), inst.participant):
        raise PolicyViolation("participant id does not match its public key")
    vk.verify(inst.signature, signed_message(inst.hash, inst.label, inst.participant, plan))


class EnclaveDataset:
    """Enclave: the training set as sealed tokens; decrypts (and re-verifies) batch by batch.

    Duplicates by instance hash are dropped here too, so a host that stores an instance twice
    cannot weight it twice; `sort=True` orders instances by tag, so the training order does not
    depend on the order in which the host hands them over.
    """

    def __init__(self, data_key: bytes, items: list[tuple[str, bytes]], verify_signatures: bool = True,
                 sort: bool = False, plan: bytes = UNPLANNED):
        self._key = data_key
        self.plan = bytes(plan)
        self.verify_signatures = verify_signatures
        if sort:
            items = sorted(items, key=lambda it: it[0])
        seen: set[bytes] = set()
        self.items: list[tuple[str, bytes]] = []
        self.meta: list[tuple[bytes, bytes, bytes, int]] = []  # hash, pid, signature, label
        self.dropped = 0
        for tag, token in items:
            inst = open_instance(self._key, tag, token, self.plan)
            if inst.hash in seen:
                self.dropped += 1
                continue
            seen.add(inst.hash)
            if not self.items:
                self._px_shape = tuple(inst.pixels.shape)
            self.items.append((tag, token))
            self.meta.append((inst.hash, inst.participant, inst.signature, inst.label))
        self.labels = torch.tensor([m[3] for m in self.meta], dtype=torch.long)
        #: Indices whose signature this object has checked (on these immutable sealed bytes, in
        #: enclave memory): `all_pixels` re-checks only the others.
        self._verified: set[int] = set()

    def digest(self) -> str:
        """SHA-256 over the (sorted) tags: which data set a checkpoint belongs to."""
        h = hashlib.sha256()
        for tag, _ in self.items:
            h.update(tag.encode())
        return h.hexdigest()

    def all_pixels(self, chunk: int = 512) -> torch.Tensor:
        """Every instance, in order (the fingerprint pass). Each is opened (AES-GCM) again; its
        signature is checked unless this object already checked it during the run's training
        batches (the same bytes: the host cannot change what the enclave holds)."""
        if not len(self):
            return torch.zeros(0, dtype=torch.uint8)
        return torch.cat([self.batch(torch.arange(i, min(i + chunk, len(self))), reverify=False)[0]
                          for i in range(0, len(self), chunk)])

    def verified_count(self) -> int:
        """How many instances have had their signature checked by this object."""
        return len(self._verified)

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, idx: torch.Tensor, reverify: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Decrypt instances `idx` -> (uint8 N,C,H,W, labels); re-check each signature (with
        `reverify=False`, only those this object has not checked yet)."""
        idx = idx.tolist()
        if not idx:
            return torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
        out = np.empty((len(idx), *self._px_shape), dtype=np.uint8)
        ys = []
        for row, i in enumerate(idx):
            tag, token = self.items[i]
            inst = open_instance(self._key, tag, token, self.plan)
            if self.verify_signatures and (reverify or i not in self._verified):
                verify_instance(inst, self.plan)
                self._verified.add(i)
            if tuple(inst.pixels.shape) != tuple(out.shape[1:]):
                raise DataError("instances of one data set must have one shape")
            out[row] = inst.pixels  # one copy, out of the decrypted buffer
            ys.append(inst.label)
        return torch.from_numpy(out), torch.tensor(ys, dtype=torch.long)
