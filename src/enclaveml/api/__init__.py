"""The Python API behind `enclaveml`'s top-level names: thin, typed wrappers over the library.

Each module serves one role and calls the same functions as the CLI command of that role:
`models` (an nn.Module, zoo name or `module:factory` in), `assessment` (owner: `assess`),
`bundles` (owner: `partition`), `keys` (owner: `OwnerKey`), `inference` (owner and client:
`Client`), `servers` (host: a local `enclaveml serve` for trying things on one machine) and
`caltrain` (participant, owner, auditor). Nothing here is imported until a name is used.
"""
