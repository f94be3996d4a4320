"""gRPC plumbing shared by every service: server building blocks, interceptors, rich errors."""
