"""The node's core: data plane, routing, policy, splice. No gRPC imports here."""
