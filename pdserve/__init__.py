"""pdserve. Its layers, lowest first; a layer imports only layers below it (``tests/test_layers.py``):

- ``pdserve.base``: types, config, environment, small OS helpers. Imports nothing of ours.
- ``kv_transfer``: the vLLM KV connector and its transports.
- ``pdserve.engine``: the vLLM engine host, the Ray actor base the workers share and their
  request servers (TCP and gRPC).
- ``prefill_worker``, ``decode_worker``: the Ray actors.
- ``router``: the gRPC and HTTP front ends, the request path, routing policies, metrics.
- ``pdserve.client``, ``pdserve.sim``, ``pdserve.bench``: the gRPC client, the simulators and the
  benchmarks (tools over the router's policies and the client).
- The composition root, the other modules of this package (``cli``, ``launch``, ``cluster``,
  ``ray_head``, ``model``, ``profile``, ``contention``, ``chaos``, ``ab_run``): builds and runs everything; nothing
  imports it.
"""
