"""Generated gRPC code of pdserve's protos (``make protos`` regenerates it; committed)."""
