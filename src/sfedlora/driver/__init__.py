"""One run: the experiment driver, its run directory, checkpoints, the collapse rule,
tracking, the memory plan."""
