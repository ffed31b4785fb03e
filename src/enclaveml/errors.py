"""Every failure enclaveml reports, named once (the habit of pyca/cryptography's `exceptions`).

All trust side. Each class is one kind of failure; its message says which rule failed, and it
never carries plaintext inputs, labels or keys.
"""

from __future__ import annotations


class EnclaveMLError(Exception):
    """Base of every error this package raises on purpose."""


class UserInputError(EnclaveMLError):
    """A user's argument or file is unusable (bad path, bad index, unknown name)."""


class UnknownModel(UserInputError):
    """No zoo model or deployment has that name."""


class DataError(UserInputError):
    """A data folder or an image is missing, empty, unreadable or of the wrong shape."""


class PartitionError(UserInputError):
    """A partition point is out of range or the model cannot be split there."""


class TrustError(EnclaveMLError):
    """Base of the failures that mean: do not trust this message or this peer."""


class TamperedMessage(TrustError):
    """A ciphertext or signature failed authentication (or was truncated)."""


class ReplayedMessage(TrustError):
    """A request was seen before or is outside the freshness window."""


class EvidenceRejected(TrustError):
    """Attestation evidence failed cryptographic verification."""


class PolicyViolation(TrustError):
    """Evidence verified but a policy rule refused it; the message names the rule."""


class Unauthorized(TrustError):
    """A signed command did not come from the key that owns the resource."""
