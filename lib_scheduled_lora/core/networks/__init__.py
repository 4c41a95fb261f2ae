"""LoRA-family network files: reading them and computing each layer's weight difference."""
