"""Toy ClientApp: add one to every array element and reply with metrics."""
from __future__ import annotations

import json

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    w = msg.content["arrays"]["w"].numpy() + 1.0
    server_round = msg.content["config"]["server-round"]
    # Report what the node saw, with Python type names, so the test can check
    # how --node-config and run config values arrive.
    seen = {k: [v, type(v).__name__] for k, v in context.node_config.items()}
    return Message(
        content=RecordDict({
            "arrays": ArrayRecord({"w": Array(w)}),
            "metrics": MetricRecord({"num-examples": 1, "server-round": server_round,
                                     "w-sum": float(w.sum())}),
            "info": ConfigRecord({"node-config": json.dumps(seen),
                                  "run-config": json.dumps(dict(context.run_config))}),
        }),
        reply_to=msg,
    )
