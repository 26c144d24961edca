"""Python code generated from proto/fedlora/v1 (by proto/generate.py); do not edit."""
