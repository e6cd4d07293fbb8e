"""The embedded runtime: how a round's clients are computed (per client, worker processes,
the fused engine) and the simulator."""
