"""Generated protobuf and gRPC code of the specdec.v1 package (protos/generate.py writes it)."""
