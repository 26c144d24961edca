"""Deployment: the coordinator, the client agent, certificates and process supervision."""
