"""Machine learning: models, adapters, data, training, privacy and evaluation."""
