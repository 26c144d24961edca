"""Code that fedlora writes into exported model folders, for transformers to load with
``trust_remote_code=True``. It imports transformers and torch only, never fedlora: whoever
loads an export needs neither fedlora nor this package."""
