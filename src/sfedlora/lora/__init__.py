"""The model side: γ of each scaling rule, the base model with its LoRA adapter, the CPU demo's tiny LLaMA."""
