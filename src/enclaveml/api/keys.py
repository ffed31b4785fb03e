"""`enclaveml.OwnerKey`: the model owner's Ed25519 signing key, and its key file (owner side).

The key signs bundle manifests, key releases and delete commands; the enclave binds each
deployment to its public key. The file (PEM PKCS#8) is written at the edge (`enclaveml.keyfiles`),
mode 0600 from creation, and never overwritten by accident: `save` refuses an existing file.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import keyfiles
from ..crypto import SigningKey
from ..errors import UserInputError


class OwnerKey(SigningKey):
    """`OwnerKey.generate()`, `OwnerKey.load(path)`, `key.save(path)`; usable wherever a SigningKey is."""

    __slots__ = ()

    @property
    def fingerprint(self) -> str:
        """Hex SHA-256 of the public key: what `enclaveml inspect` and manifests show."""
        return self.public_key().fingerprint()

    @property
    def public_hex(self) -> str:
        """The public key as 64 hex digits (what `train serve --owner` takes)."""
        return self.public_key().to_bytes().hex()

    def save(self, path: "str | os.PathLike[str]", *, overwrite: bool = False) -> Path:
        """Write the key (PEM, mode 0600 from creation); refuses an existing file unless `overwrite`."""
        return keyfiles.save_signing_key(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path: "str | os.PathLike[str]") -> "OwnerKey":
        """The key in a PEM file (the CLI's `--owner-key`)."""
        return keyfiles.load_signing_key(path, cls)

    @classmethod
    def load_or_create(cls, path: "str | os.PathLike[str]") -> "OwnerKey":
        """The key at `path`, generated (mode 0600) on first use."""
        return keyfiles.load_or_create_signing_key(path, cls)

    @classmethod
    def default(cls) -> "OwnerKey":
        """ENCLAVEML_HOME/owner.key, created on first use: the key the CLI uses without --owner-key."""
        from .. import paths

        return cls.load_or_create(paths.home() / "owner.key")

    def __repr__(self) -> str:
        return f"OwnerKey({self.fingerprint[:16]})"


def as_owner_key(key: "OwnerKey | SigningKey | str | os.PathLike[str] | None", *, create: bool) -> SigningKey:
    """A key object as given, a key file's key (created on first use when `create`), or the default key."""
    if isinstance(key, SigningKey):
        return key
    if key is None:
        from .. import paths

        key = paths.home() / "owner.key"
    if isinstance(key, (str, os.PathLike)):
        return OwnerKey.load_or_create(key) if create else OwnerKey.load(key)
    raise UserInputError(f"owner_key must be an OwnerKey or a key file path, not {type(key).__name__}")
