"""align: the RLHF preference-alignment loop on one GPU, as LoRA adapters over one base."""

__version__ = "0.1.0"
