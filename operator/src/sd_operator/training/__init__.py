"""LoRA training: dataset checks and the sd-scripts wrapper."""
