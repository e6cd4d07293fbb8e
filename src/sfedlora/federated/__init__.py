"""The federated math every runtime shares: methods, mixed ranks, the server's checks,
the client and server steps, evaluation, the round loop."""
