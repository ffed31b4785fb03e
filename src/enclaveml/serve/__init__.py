"""Infenclave serving: the untrusted host server and the enclave worker's serving ops.

Trust sides, by module: `app` (routes), `service` (what they do), `upload`, `batcher`, `store`,
`metrics`, `host` run in the host (untrusted); `worker` (its ops) and `enclave` run in the enclave
process. The wire formats are `enclaveml.protocol`'s; the channel between host and enclave, the
worker's main and its supervision are `enclaveml.runtime`'s.
"""
