"""specdec: the library shared by the three services.

sampling (the math), lm (batched forwards over per-sequence KV caches), models (loading),
sessions (TTL and memory budget), messages and wire (domain objects and their protobuf forms),
errors and validation, config (typed command lines), metrics; rpc/ (gRPC plumbing every service
uses) and model_service/ (the runtime and batching scheduler of the two model services).
"""
