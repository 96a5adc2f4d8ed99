"""Training: data assembly, the PEFT LoRA trainer (plus prompt tuning and full fine-tuning for comparison)."""
