"""The `tsm` backend: Intel TDX and AMD SEV-SNP confidential VMs through Linux configfs-tsm (enclave side).

The enclave worker runs in a confidential VM; the whole VM's memory is protected from the host by
the hardware. Evidence comes from the kernel's configfs-tsm interface (Linux 6.7+,
Documentation/ABI/testing/configfs-tsm):

    mkdir /sys/kernel/config/tsm/report/$name         # a private report request
    write 64 bytes of report data to $name/inblob     # bumps $name/generation
    read  $name/outblob                                # TDX: a DCAP quote; SNP: the 1184-byte report
    read  $name/provider                               # "tdx_guest" or "sev_guest"
    read  $name/auxblob (SNP, optional)                # certificate table: VCEK/ASK/ARK from the host
    read  $name/generation                             # must still be 1: nobody else wrote in between
    rmdir $name

Report data is the same 64-byte binding as every backend (`bind_report_data`).
"""

from __future__ import annotations

import os
import secrets
import uuid
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import UserInputError
from .backend import EnclaveBackend, register_backend
from .evidence import REPORT_DATA_SIZE, Evidence
from .harden import harden_process

TSM_ROOT = Path("/sys/kernel/config/tsm/report")
PROVIDERS = {"tdx_guest": "tdx", "sev_guest": "sev-snp"}

#: GUIDs of the SNP extended-report certificate table (AMD GHCB spec, "SNP Extended Guest Request").
SNP_CERT_GUIDS = {
    uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"): "VCEK",
    uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1"): "VLEK",
    uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"): "ASK",
    uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"): "ARK",
}


def _mkdir(path: Path) -> None:
    os.mkdir(path)  # configfs creates the attribute files itself


def _rmdir(path: Path) -> None:
    os.rmdir(path)


def parse_cert_table(aux: bytes) -> dict[str, bytes]:
    """The SNP certificate table: entries (GUID 16, offset u32, length u32) until an all-zero entry."""
    out: dict[str, bytes] = {}
    pos = 0
    while pos + 24 <= len(aux):
        guid = uuid.UUID(bytes_le=aux[pos : pos + 16])
        off = int.from_bytes(aux[pos + 16 : pos + 20], "little")
        length = int.from_bytes(aux[pos + 20 : pos + 24], "little")
        if guid.int == 0 and off == 0 and length == 0:
            break
        if off + length > len(aux):
            raise UserInputError("tsm: SNP certificate table entry points past the auxblob")
        name = SNP_CERT_GUIDS.get(guid)
        if name:
            out[name] = aux[off : off + length]
        pos += 24
    return out


def build_cert_table(certs: dict[str, bytes]) -> bytes:
    """The inverse of `parse_cert_table` (what a host hands in; used by tests)."""
    names = {v: k for k, v in SNP_CERT_GUIDS.items()}
    header = (len(certs) + 1) * 24
    table, body = b"", b""
    for name, der in certs.items():
        table += names[name].bytes_le + (header + len(body)).to_bytes(4, "little") + len(der).to_bytes(4, "little")
        body += der
    return table + bytes(24) + body


@register_backend("tsm")
class TsmBackend(EnclaveBackend):
    """Options: `root` (the configfs-tsm report directory), `snp_chain` (a PEM file with the
    ASK and ARK, attached to SNP evidence when the host's auxblob lacks them), `lock_memory`."""

    def __init__(self, root: str | Path = TSM_ROOT, snp_chain: str | Path | None = None, lock_memory: bool = True) -> None:
        self.root = Path(root)
        self.snp_chain = Path(snp_chain) if snp_chain else None
        self.lock_memory = lock_memory
        self._measurement: str | None = None

    def _report(self, report_data: bytes) -> tuple[str, bytes, bytes | None]:
        if not self.root.is_dir():
            raise UserInputError(f"tsm: {self.root} does not exist (needs Linux 6.7+ in a TDX or SEV-SNP guest with configfs mounted)")
        entry = self.root / f"enclaveml-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            _mkdir(entry)
        except OSError as e:
            raise UserInputError(f"tsm: cannot create {entry} ({e.strerror})") from None
        try:
            (entry / "inblob").write_bytes(bytes(report_data))
            out = (entry / "outblob").read_bytes()
            provider = (entry / "provider").read_text().strip()
            aux_path = entry / "auxblob"
            aux = aux_path.read_bytes() if aux_path.exists() else None
            generation = (entry / "generation").read_text().strip()
        except OSError as e:
            raise UserInputError(f"tsm: report request in {entry} failed ({e.strerror})") from None
        finally:
            try:
                _rmdir(entry)
            except OSError:
                pass
        if generation != "1":  # someone else wrote to our entry between our write and read
            raise UserInputError(f"tsm: report entry was written {generation} times, expected 1 (raced)")
        kind = PROVIDERS.get(provider)
        if kind is None:
            raise UserInputError(f"tsm: unknown provider {provider!r} (known: {', '.join(PROVIDERS)})")
        return kind, out, aux

    def evidence(self, report_data: bytes) -> Evidence:
        if len(report_data) != REPORT_DATA_SIZE:
            raise ValueError(f"report data must be {REPORT_DATA_SIZE} bytes, got {len(report_data)}")
        kind, out, aux = self._report(report_data)
        collateral = None
        if kind == "sev-snp":
            from .verifiers.snp import snp_collateral

            certs = parse_cert_table(aux) if aux else {}
            blobs = [certs[n] for n in ("VCEK", "VLEK", "ASK", "ARK") if n in certs]
            if self.snp_chain is not None and not ({"ASK", "ARK"} <= set(certs)):
                blobs.append(self.snp_chain.read_bytes())
            collateral = snp_collateral(*blobs) if blobs else None
        return Evidence(backend=kind, quote=out, collateral=collateral)

    def measurement(self) -> str:
        """MRTD (TDX) or MEASUREMENT (SNP), read from a report over zero report data."""
        if self._measurement is None:
            ev = self.evidence(bytes(REPORT_DATA_SIZE))
            if ev.backend == "sev-snp":
                from .snp_report import parse_report

                self._measurement = parse_report(ev.quote).measurement.hex()
            else:
                import dcap_qvl

                self._measurement = dcap_qvl.parse_quote(ev.quote).report.mr_td.hex()
        return self._measurement

    def sealing_key(self, label: bytes) -> bytes:
        """SNP: the firmware's derived key (SNP_GET_DERIVED_KEY, VCEK root, bound to measurement and
        guest policy) through HKDF per label. TDX has no sealing key: keys must be released to the
        TD after attestation (the owner's key release), so this refuses."""
        if not Path("/dev/sev-guest").exists():
            raise UserInputError("tsm: no sealing key here (TDX has none; on SEV-SNP /dev/sev-guest is needed)")
        base = _snp_derived_key()
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"enclaveml snp sealing v1", info=bytes(label)).derive(base)

    def harden(self) -> dict[str, Any]:
        return {
            "backend": "tsm",
            "memory_protection": "confidential VM memory (hardware encrypted from the host); in-VM root is still trusted",
            **harden_process(lock=self.lock_memory),
        }


def _snp_derived_key() -> bytes:
    """SNP_GET_DERIVED_KEY ioctl on /dev/sev-guest (Linux uapi sev-guest.h). Not exercised in tests:
    it needs SNP hardware."""
    import ctypes
    import fcntl

    class Req(ctypes.Structure):  # struct snp_derived_key_req
        _fields_ = [("root_key_select", ctypes.c_uint32), ("rsvd", ctypes.c_uint32), ("guest_field_select", ctypes.c_uint64),
                    ("vmpl", ctypes.c_uint32), ("guest_svn", ctypes.c_uint32), ("tcb_version", ctypes.c_uint64)]

    class Resp(ctypes.Structure):  # struct snp_derived_key_resp
        _fields_ = [("data", ctypes.c_uint8 * 64)]

    class Ioctl(ctypes.Structure):  # struct snp_guest_request_ioctl
        _fields_ = [("msg_version", ctypes.c_uint8), ("req_data", ctypes.c_uint64), ("resp_data", ctypes.c_uint64),
                    ("exitinfo2", ctypes.c_uint64)]

    SNP_GET_DERIVED_KEY = 0xC0205301  # _IOWR('S', 1, struct snp_guest_request_ioctl)
    req = Req(root_key_select=0, guest_field_select=(1 << 0) | (1 << 3), vmpl=0)  # guest policy + measurement
    resp = Resp()
    io = Ioctl(msg_version=1, req_data=ctypes.addressof(req), resp_data=ctypes.addressof(resp))
    with open("/dev/sev-guest", "rb+", buffering=0) as f:
        fcntl.ioctl(f, SNP_GET_DERIVED_KEY, io)
    data = bytes(resp.data)
    if int.from_bytes(data[:4], "little") != 0:
        raise UserInputError(f"tsm: SNP derived-key request failed with status {int.from_bytes(data[:4], 'little')}")
    return data[32:64]
