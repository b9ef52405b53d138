"""lorascope: serve hundreds to tens of thousands of LoRA adapters on one base model, and measure it."""
