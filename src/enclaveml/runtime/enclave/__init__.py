"""The trusted side of the runtime: what runs inside the enclave worker process (enclave side).

`ops.py`: the registry of operations (name -> handler, checked arguments, inline flag);
`main.py`: the worker main every enclave worker runs (`run_worker`).
"""
