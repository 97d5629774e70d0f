"""The gRPC front: server assembly, the servicer (protobuf in, plain types out), TLS/tokens,
reflection. Runs in the front process; the only package that imports grpc's server side."""
