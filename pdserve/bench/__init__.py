"""``pdserve bench``: a load generator over the public gRPC API (``runner``), its workloads,
statistics (``stats``: pure) and files (``report``)."""
