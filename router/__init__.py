"""pdserve's router: the gRPC front end that owns every request's state and routes its prefill
and decode phases to the two pools. Never imports torch or vLLM (a test checks this)."""
