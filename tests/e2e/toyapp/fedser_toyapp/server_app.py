"""Toy ServerApp: send an array to every node, collect the replies, write a JSON report."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


def _wait_for_nodes(grid: Grid, n: int, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n or time.monotonic() > deadline:
            return nodes
        time.sleep(0.2)


@app.main()
def main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config["num-server-rounds"])
    nodes = _wait_for_nodes(grid, int(context.run_config["min-nodes"]))
    weights = np.zeros(4, dtype=np.float32)
    report: dict = {"nodes": nodes, "rounds": [], "run_config": dict(context.run_config)}
    for server_round in range(1, rounds + 1):
        content = RecordDict({
            "arrays": ArrayRecord({"w": Array(weights)}),
            "config": ConfigRecord({"server-round": server_round}),
        })
        messages = [
            Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN,
                    group_id=str(server_round))
            for node in nodes
        ]
        started = time.monotonic()
        replies = list(grid.send_and_receive(messages, timeout=float(context.run_config["round-timeout"])))
        report.setdefault("round_seconds", []).append(time.monotonic() - started)
        report.setdefault("sent", []).append(len(messages))
        entries = []
        for reply in replies:
            if reply.has_error():
                entries.append({"node": reply.metadata.src_node_id, "error": reply.error.reason})
                continue
            metrics = reply.content["metrics"]
            new = reply.content["arrays"]["w"].numpy()
            entries.append({
                "node": reply.metadata.src_node_id,
                "w": new.tolist(),
                "metrics": {k: metrics[k] for k in metrics},
                "node_config": json.loads(reply.content["info"]["node-config"]),
                "run_config": json.loads(reply.content["info"]["run-config"]),
            })
        report["rounds"].append(entries)
        ok = [e for e in entries if "w" in e]
        if ok:
            weights = np.mean([np.asarray(e["w"], dtype=np.float32) for e in ok], axis=0)
    report["final"] = weights.tolist()
    path = context.run_config["result-path"]
    if path:
        Path(path).write_text(json.dumps(report, indent=1))
