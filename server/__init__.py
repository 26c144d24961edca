"""The coordinator side: Flower ServerApp and the round loop."""
