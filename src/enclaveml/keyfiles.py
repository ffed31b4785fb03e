"""Key files: private keys on their holder's disk, written mode 0600 from creation (edge I/O).

Trust side: owner and participants (their own machines). `enclaveml.crypto` holds keys only as
values (`SigningKey.to_pem` / `from_pem`) and never touches a file; this module is where a key
meets the disk, so the CLI, the Python API (`enclaveml.OwnerKey`) and CalTrain read and write
key files one way. A private key file is never world-readable, not even briefly: it is created
with mode 0600 (and re-chmodded, since O_CREAT's mode does not apply to an existing file).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

from .crypto import SigningKey
from .errors import UserInputError

K = TypeVar("K", bound=SigningKey)


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a single write may be short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_private(path: "str | os.PathLike[str]", data: bytes, *, overwrite: bool = True,
                  what: str = "key") -> Path:
    """Write `data` to a new mode-0600 file (its parent created); `overwrite=False` refuses an
    existing file (UserInputError)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(p, flags, 0o600)
    except FileExistsError:
        raise UserInputError(f"{p}: a {what} is already there; refusing to overwrite it") from None
    except OSError as e:
        raise UserInputError(f"{p}: cannot write {what} ({e.strerror})") from None
    try:
        os.fchmod(fd, 0o600)
        write_all(fd, bytes(data))
    finally:
        os.close(fd)
    return p


def save_signing_key(key: SigningKey, path: "str | os.PathLike[str]", *, overwrite: bool = True) -> Path:
    """Write `key` as PEM PKCS#8, mode 0600."""
    return write_private(path, key.to_pem(), overwrite=overwrite)


def load_signing_key(path: "str | os.PathLike[str]", cls: "type[K]" = SigningKey) -> K:  # type: ignore[assignment]
    """The key in a PEM file (`cls`: SigningKey or a subclass such as `OwnerKey`)."""
    try:
        pem = Path(path).read_bytes()
    except OSError as e:
        raise UserInputError(f"{path}: cannot read key ({e.strerror})") from None
    return cls.from_pem(pem)


def load_or_create_signing_key(path: "str | os.PathLike[str]", cls: "type[K]" = SigningKey) -> K:  # type: ignore[assignment]
    """The key at `path`, generated (0600) on first use."""
    if Path(path).exists():
        return load_signing_key(path, cls)
    key = cls.generate()
    save_signing_key(key, path)
    return key
