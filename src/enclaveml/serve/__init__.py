"""Infenclave serving: the untrusted host server, the enclave worker and the channel between them.

Trust sides, by module: `app` (routes), `service` (what they do), `upload`, `batcher`, `store`,
`metrics`, `host` run in the host (untrusted); `worker` and `enclave` run in the enclave process;
`channel` is used by both. The wire formats are `enclaveml.protocol`'s.
"""
