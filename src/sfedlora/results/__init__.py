"""Finished runs and grids of runs: sweeps, summaries, reports, export and evaluation of a saved run."""
