"""The client-facing front end: gRPC/HTTP API, request features, method selection, worker choice."""
