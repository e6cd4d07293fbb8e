"""flowertune-sfed: Flower's FlowerTune LLM app trained with SFed-LoRA."""
