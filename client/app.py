"""The client agent (ClientApp). Its handler is ``fedlora.client.handler.train``.

This module imports no torch: Flower's simulation runtime loads the ClientApp before it
starts its Ray backend, in the process where the ServerApp imports and sets up, so a heavy
import here would hold Ray back until it was done. Torch and the model load in each process
that trains, on its first message.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    from fedlora.client.handler import train as handle  # lazy: torch and transformers, where a client trains

    return handle(msg, context)
