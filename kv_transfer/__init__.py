"""pdserve's KV-transfer layer: a vLLM KV connector with a gRPC transport.

Design: **pull**. The prefill engine computes the prompt and one token; its connector keeps the
request's blocks (vLLM's delay-free) and returns a ``KvHandle`` (host, port, request id, token
count). The router passes the handle to the decode instance it chose *after* the prefill; the
decode engine's connector claims the prompt tokens as an asynchronous external load, vLLM
allocates the blocks and parks the request, and a worker thread streams the blocks from the
prefill's KV server straight into them (CRC32 per chunk), then releases the sender's blocks.

Why pull rather than layer-wise push: (1) the receiver writes into blocks its own scheduler
allocated, so there is no staging buffer and no state for KV that arrives before its request;
(2) the decode instance is chosen from load measured after the prefill, when it is most recent;
(3) backpressure is natural: a decode engine without free blocks simply does not start the pull.
What it costs: the transfer does not overlap the prefill compute. It does not delay the first
token, which the router streams from the prefill result; it delays the second. At this model's
size on loopback the whole transfer takes milliseconds (see docs/).

Bounds: the sender frees blocks on release or when ``lease_s`` expires (never under a pull in
flight); the receiver gives up after ``load_timeout_s`` and reports the load failed, and vLLM's
``kv_load_failure_policy=recompute`` recomputes the prompt. A checksum mismatch is a failure.

Modules: ``handle`` (pure data, router-safe), ``transport`` (gRPC, router-safe), ``layout``
(torch), ``messages``, ``scheduler_side``, ``worker_side``, ``connector`` (vLLM).
"""
