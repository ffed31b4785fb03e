"""The AMD SEV-SNP attestation report: its byte layout, parsed (both sides; pure, no I/O).

Layout from AMD's SEV-SNP Firmware ABI specification (ATTESTATION_REPORT, versions 2 to 5):
1184 bytes, little-endian, signed over bytes 0..0x29F by the VCEK (or VLEK) with ECDSA P-384 and
SHA-384; the signature's R and S are 72-byte little-endian integers at 0x2A0 and 0x2E8.
TCB_VERSION fields are the Milan/Genoa layout (bootloader, tee, snp, microcode).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from ..errors import EvidenceRejected

REPORT_SIZE = 0x4A0  # 1184
SIGNED_SIZE = 0x2A0
SIG_R, SIG_S, SIG_COMPONENT = 0x2A0, 0x2E8, 72
SIG_ALGO_ECDSA_P384_SHA384 = 1
POLICY_DEBUG = 1 << 19  # guest policy bit: debugging the guest is allowed (host can read its memory)
SIGNING_KEYS = {0: "VCEK", 1: "VLEK", 7: "none"}


def tcb_fields(raw: int) -> dict[str, int]:
    """TCB_VERSION u64 -> {bootloader, tee, snp, microcode} (Milan/Genoa byte positions 0, 1, 6, 7)."""
    b = raw.to_bytes(8, "little")
    return {"bootloader": b[0], "tee": b[1], "snp": b[6], "microcode": b[7]}


@dataclass(frozen=True)
class SnpReport:
    raw: bytes
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: int
    platform_info: int
    signing_key: str
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    reported_tcb: int
    chip_id: bytes
    committed_tcb: int
    launch_tcb: int
    sig_r: int
    sig_s: int

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[:SIGNED_SIZE]

    @property
    def debug(self) -> bool:
        return bool(self.policy & POLICY_DEBUG)

    def details(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "guest_svn": self.guest_svn,
            "policy": f"{self.policy:#x}",
            "debug": self.debug,
            "vmpl": self.vmpl,
            "signing_key": self.signing_key,
            "family_id": self.family_id.hex(),
            "image_id": self.image_id.hex(),
            "host_data": self.host_data.hex(),
            "id_key_digest": self.id_key_digest.hex(),
            "author_key_digest": self.author_key_digest.hex(),
            "report_id": self.report_id.hex(),
            "chip_id": self.chip_id.hex(),
            "reported_tcb": tcb_fields(self.reported_tcb),
            "current_tcb": tcb_fields(self.current_tcb),
            "committed_tcb": tcb_fields(self.committed_tcb),
            "launch_tcb": tcb_fields(self.launch_tcb),
        }


def parse_report(raw: bytes) -> SnpReport:
    """Parse 1184 bytes; wrong size, version or signature algorithm is EvidenceRejected."""
    raw = bytes(raw)
    if len(raw) != REPORT_SIZE:
        raise EvidenceRejected(f"SEV-SNP report must be {REPORT_SIZE} bytes, got {len(raw)}")
    version, guest_svn, policy = struct.unpack_from("<IIQ", raw, 0x00)
    if not 2 <= version <= 5:
        raise EvidenceRejected(f"unsupported SEV-SNP report version {version}")
    vmpl, sig_algo, current_tcb, platform_info, flags = struct.unpack_from("<IIQQI", raw, 0x30)
    if sig_algo != SIG_ALGO_ECDSA_P384_SHA384:
        raise EvidenceRejected(f"unsupported SEV-SNP signature algorithm {sig_algo}")
    signing_key = SIGNING_KEYS.get((flags >> 2) & 0x7, "reserved")
    (reported_tcb,) = struct.unpack_from("<Q", raw, 0x180)
    (committed_tcb,) = struct.unpack_from("<Q", raw, 0x1E0)
    (launch_tcb,) = struct.unpack_from("<Q", raw, 0x1F0)
    return SnpReport(
        raw=raw,
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        family_id=raw[0x10:0x20],
        image_id=raw[0x20:0x30],
        vmpl=vmpl,
        signature_algo=sig_algo,
        current_tcb=current_tcb,
        platform_info=platform_info,
        signing_key=signing_key,
        report_data=raw[0x50:0x90],
        measurement=raw[0x90:0xC0],
        host_data=raw[0xC0:0xE0],
        id_key_digest=raw[0xE0:0x110],
        author_key_digest=raw[0x110:0x140],
        report_id=raw[0x140:0x160],
        reported_tcb=reported_tcb,
        chip_id=raw[0x1A0:0x1E0],
        committed_tcb=committed_tcb,
        launch_tcb=launch_tcb,
        sig_r=int.from_bytes(raw[SIG_R : SIG_R + SIG_COMPONENT], "little"),
        sig_s=int.from_bytes(raw[SIG_S : SIG_S + SIG_COMPONENT], "little"),
    )
