"""Generated protobuf/gRPC stubs (scripts/gen-proto); never edit by hand."""
