"""tuneloop: keeps fine-tuned LoRA adapters good after they ship.

This package holds only what every subsystem shares: config, store, registry, events and the CLI.
"""

__version__ = "0.1.0"
