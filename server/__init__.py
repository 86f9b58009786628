"""Central side of fedseg: the ServerApp, the federated k-means strategy and its workflow."""
