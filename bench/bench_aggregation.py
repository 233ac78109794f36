"""Aggregation time: fedser's heterogeneous FedAvg against Flower's own FedAvg aggregation.

For 10 / 100 / 1000 client updates of the default model (``build_model(ModelConfig())``)
it times

- fedser on mixed tiers (widths 1.0 / 0.5 / 0.25 in turn, heads emotion / kws / both),
- fedser on full-width, both-head updates,
- Flower on the same full-width updates (it cannot aggregate slices), twice:
  ``flwr.server.strategy.aggregate.aggregate`` on lists of ndarrays, and
  ``aggregate_arrayrecords``, which ``flwr.serverapp.strategy.FedAvg`` uses in the
  Message API (it includes turning each ``Array`` back into an ndarray).

Building the updates is not timed; each figure is the best of ``--repeats`` runs.
Prints a markdown table. Run::

    python bench/bench_aggregation.py [--encoder cnn] [--clients 10 100 1000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import gc
import platform
import time
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.server.strategy.aggregate import aggregate as flwr_aggregate
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedser.server.aggregation import ClientUpdate, aggregate

WIDTHS = (1.0, 0.5, 0.25)
HEAD_SETS = ({"emotion", "kws"}, {"emotion"}, {"kws"})


def model_layout(encoder: str):
    """(global state, head_of, index_for(width)) of the real fedser model."""
    from fedser.common.models import ModelConfig, build_model, head_of
    from fedser.common.params import state_to_arrays
    from fedser.common.slicing import slice_index

    cfg = ModelConfig(encoder=encoder)
    state = state_to_arrays(build_model(cfg))
    return state, head_of, lambda width: slice_index(cfg, width)


def make_updates(state, index_for, n_clients: int, *, mixed: bool, rng) -> list[ClientUpdate]:
    indices = {w: index_for(w) for w in WIDTHS}
    updates = []
    for i in range(n_clients):
        width = WIDTHS[i % 3] if mixed else 1.0
        heads = set(HEAD_SETS[(i // 3) % 3]) if mixed else {"emotion", "kws"}
        index = indices[width]
        delta = {
            name: rng.standard_normal(tuple(np.size(a) for a in index[name]), dtype=np.float32) * 0.01
            for name in state
        }
        updates.append(ClientUpdate(i, delta, index, int(rng.integers(10, 500)), heads, width))
    return updates


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="cnn", help="fedser encoder (default: cnn, the default ModelConfig)")
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    state, head_of, index_for = model_layout(args.encoder)
    n_params = sum(a.size for a in state.values())
    rng = np.random.default_rng(args.seed)
    names = list(state)
    rows = []
    for n in args.clients:
        mixed = make_updates(state, index_for, n, mixed=True, rng=rng)
        full = make_updates(state, index_for, n, mixed=False, rng=rng)
        # Flower aggregates weights, not deltas: give it global + delta of the same updates.
        weights = [[state[k] + u.delta[k] for k in names] for u in full]
        results = [(ws, u.num_examples) for ws, u in zip(weights, full)]
        replies = [
            RecordDict({
                "arrays": ArrayRecord({k: Array(w) for k, w in zip(names, ws)}),
                "metrics": MetricRecord({"num-examples": u.num_examples}),
            })
            for ws, u in zip(weights, full)
        ]
        t_mixed = best_of(args.repeats, lambda: aggregate(state, mixed, head_of))
        t_full = best_of(args.repeats, lambda: aggregate(state, full, head_of))
        t_flwr = best_of(args.repeats, lambda: flwr_aggregate(results))
        t_flwr_msg = best_of(args.repeats, lambda: aggregate_arrayrecords(replies, "num-examples"))
        # Same numbers as Flower (sanity check, not timed).
        ours, _ = aggregate(state, full, head_of)
        for k, ref in zip(names, flwr_aggregate(results)):
            if not np.allclose(ours[k], ref, rtol=1e-5, atol=1e-5):
                raise SystemExit(f"fedser and Flower disagree on {k!r}")
        rows.append((n, t_mixed, t_full, t_flwr, t_flwr_msg))
        del mixed, full, weights, results, replies

    print(f"Model: fedser {args.encoder!r} encoder, {n_params:,} parameters in {len(state)} arrays; "
          f"best of {args.repeats}; {platform.processor() or platform.machine()}, "
          f"numpy {np.__version__}\n")
    print("| clients | fedser mixed tiers (s) | fedser full width (s) | Flower `aggregate` (s) "
          "| Flower FedAvg `aggregate_arrayrecords` (s) | `aggregate` / fedser full | "
          "`aggregate_arrayrecords` / fedser full |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, t_mixed, t_full, t_flwr, t_msg in rows:
        print(f"| {n} | {t_mixed:.4f} | {t_full:.4f} | {t_flwr:.4f} | {t_msg:.4f} "
              f"| {t_flwr / t_full:.2f}x | {t_msg / t_full:.2f}x |")
    worst = max(t for row in rows for t in row[1:3])
    print(f"\nSlowest fedser aggregation: {worst:.3f} s (target <= 1 s for 1000 clients).")


if __name__ == "__main__":
    main()
