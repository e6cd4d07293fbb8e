"""The Flower runtime: a ServerApp and a ClientApp over the simulator's own round functions."""
