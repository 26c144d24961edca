"""The client agent side: Flower ClientApp and local training."""
