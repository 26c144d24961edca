"""fedlora: federated LoRA fine-tuning of language models on Flower."""

__version__ = "0.1.0"
