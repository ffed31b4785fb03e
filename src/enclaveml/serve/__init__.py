"""Infenclave serving: the untrusted host server and the enclave worker's serving ops.

Trust sides, by module: `app`, `batcher`, `store`, `metrics`, `host` run in the host (untrusted);
`worker` (its ops) and `enclave` run in the enclave process; `protocol` is used by both. The
channel between them, the worker's main and its supervision are `enclaveml.runtime`'s.
"""
