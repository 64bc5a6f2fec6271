"""The control plane: gRPC servicers, the client, generated code, error mapping."""
