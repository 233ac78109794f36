"""Peak memory of the device agent's training path against the 600 MB target.

Each row is a fresh process, so nothing one measurement loads inflates another:

* ``python``: the interpreter alone;
* ``import torch``: the floor every fedser process pays;
* ``import ClientApp``: ``fedser.client.app`` (torch, torchaudio, Opacus, Flower);
* ``ClientApp profile query``: the query with which the server's strategy profiles the device
  before each round;
* ``ClientApp train instruction``: what ``flwr-clientapp`` does on a device for the round's
  train instruction, through the real ClientApp: the server's own strategy builds the query and
  train instructions, then the ClientApp profiles the device and trains one DP-SGD round on its
  data (default model, Opacus, ledger written);
* ``ClientApp train instruction, 1 thread``: the same with ``torch.set_num_threads(1)``, as on a
  small board;
* ``ClientApp evaluate instruction``: the round's evaluate instruction, in a process of its own as
  Flower runs it (one ``flwr-clientapp`` process per instruction);
* the resident agent, its feature preparation, and a train instruction that extracts its own
  features.

The data is the device's folder or manifest (``--data``); by default one synthesized speaker
with the demo corpus's words and emotions, about what one person records. Peak RSS is
``ru_maxrss`` of the process.

    python bench/bench_device_memory.py [--data DIR_OR_CSV] [--epochs 1] [--tier 1.0]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, load_average, load_note, machine_line, md_table, now, peak_rss_mb  # noqa: E402

TARGET_MB = 600.0
# Shared objects that only a CUDA build of torch maps: the CUDA libraries and triton (its GPU
# compiler, which torch's optimizers load through torch._dynamo). PyPI's Linux torch 2.11 wheels
# are such builds on x86-64 and aarch64 alike (their metadata requires the CUDA toolkit and triton);
# the CPU wheels a device installs require neither.
CUDA_LIBRARY = re.compile(r"/nvidia/|/triton/|libtorch_cuda|libc10_cuda|libcudart|libcudnn|libcublas|libnccl|libnv")


def cuda_library_rss_mb() -> float:
    """Resident pages of CUDA libraries mapped into this process now, in MiB (0 off Linux)."""
    total_kb, counting = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(maxsplit=6)
                if re.match(r"^[0-9a-f]+-[0-9a-f]+$", head[0]):
                    counting = len(head) > 5 and bool(CUDA_LIBRARY.search(head[-1]))
                elif counting and head[0] == "Rss:":
                    total_kb += int(head[1])
    except OSError:
        return 0.0
    return total_kb / 1024


def _child(args) -> None:
    """Run one measurement in this (fresh) process and print its result as JSON."""
    import time

    t0 = time.perf_counter()
    if args.child == "python":
        pass
    elif args.child == "torch":
        import torch  # noqa: F401
    elif args.child == "import":
        import fedser.client.app  # noqa: F401
    elif args.child == "agent":
        import fedser.client.cli  # noqa: F401  (what the resident `fedser-client start` process loads)
    elif args.child == "prepare":
        from fedser.client.cli import prepare_features

        prepare_features({"data": args.data, "cache": str(Path(args.state) / "cache")})
    else:
        _client_message(args)
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "cuda_rss_mb": cuda_library_rss_mb(),
                      "seconds": time.perf_counter() - t0}))


def _client_message(args) -> None:
    """One instruction through the real ClientApp, as ``flwr-clientapp`` runs it on a device: a
    fresh process per message, so a train and an evaluate instruction never share a peak."""
    import torch
    from flwr.app import ConfigRecord, Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from fedser.client.app import app
    from fedser.common import keys
    from fedser.common.features import FeatureSpec
    from fedser.common.models import ModelConfig, build_model
    from fedser.common.params import state_to_arrays
    from fedser.common.records import arrays_to_record
    from fedser.server.strategy import HeteroFedAvg

    if args.child == "train-1thread":
        torch.set_num_threads(1)
    # Messages built outside a ServerApp process need the identity Flower gives that process.
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = 1, 1, SUPERLINK_NODE_ID
    spec = FeatureSpec()
    model = ModelConfig(n_features=spec.n_features())
    state = Path(args.state)
    ctx = Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                  node_config={"data": args.data, "tier": args.tier, "max-epsilon": 8.0, "delta": 1e-5,
                               "ledger": str(state / f"ledger-{args.child}.json"),
                               # "train-cold": a cache of its own, so the round extracts every clip itself
                               "cache": str(state / ("cache-cold" if args.child == "train-cold" else "cache"))})

    class Loopback:   # a Grid whose only node is the ClientApp in this process
        def get_node_ids(self):
            return [ctx.node_id]

        def send_and_receive(self, messages, *, timeout=None):
            return [app(m, ctx) for m in messages]

    strategy = HeteroFedAvg(model, spec, clip_norm=2.0, noise_multiplier=1.0, noise_mode="distributed",
                            min_train_nodes=1, min_available_nodes=1, min_evaluate_nodes=1,
                            train_settings={keys.LOCAL_EPOCHS: args.epochs, keys.BATCH_SIZE: 16,
                                            keys.LEARNING_RATE: 3e-3, keys.DP_ENABLED: True,
                                            keys.DP_NOISE_MULTIPLIER: 0.0, "num-rounds": 3,
                                            keys.DP_MAX_GRAD_NORM: 1.0, "timeout": 600.0})
    torch.manual_seed(0)
    arrays = arrays_to_record(state_to_arrays(build_model(model)))
    if args.child == "evaluate":
        # Only the instruction: the profile query that precedes training is a process of its own.
        messages = list(strategy.configure_evaluate(1, arrays, ConfigRecord(), Loopback()))
    else:
        messages = list(strategy.configure_train(1, arrays, ConfigRecord(), Loopback()))
    if len(messages) != 1:
        raise SystemExit(f"the device was not selected: {strategy.outcome}")
    if args.child == "query":
        return   # configure_train has sent the profile query through the ClientApp; nothing else runs
    reply = app(messages[0], ctx)
    if reply.has_error():
        raise SystemExit(f"the device declined: {reply.error.reason}")
    if args.child == "evaluate" and not any(k.endswith("-n") for k in reply.content[keys.METRICS]):
        raise SystemExit("the device evaluated nothing")


def _torch_build() -> str:
    import torch

    return torch.__version__


def _measure(kind: str, args, state: Path) -> dict:
    argv = [sys.executable, __file__, "--child", kind, "--data", str(args.data), "--state", str(state),
            "--epochs", str(args.epochs), "--tier", str(args.tier)]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}{done.stdout[-1000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _default_data(root: Path) -> Path:
    from fedser.common.corpora import load_corpora, write_manifest
    from fedser.tools.synth import synthesize_corpus

    synthesize_corpus(root / "corpus", n_speakers=1, noise_seconds=0.0, workers=2, overwrite=True, progress=False)
    corpus = load_corpora([str(root / "corpus" / "commands"), str(root / "corpus" / "emotion")])
    return write_manifest(corpus.utterances, root / "device" / "data.csv")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="the device's corpus folder or manifest (default: synthesized)")
    p.add_argument("--epochs", type=int, default=1, help="local epochs of the round (default 1)")
    p.add_argument("--tier", type=float, default=1.0, choices=(1.0, 0.5, 0.25))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--state", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="fedser-bench-mem-") as tmp:
        tmp_path = Path(tmp)
        if args.data is None:
            args.data = str(_default_data(tmp_path))
        from fedser.common.corpora import load_corpus

        corpus = load_corpus(args.data)
        rows = []
        for kind, label in (("python", "python"), ("torch", "import torch"), ("import", "import ClientApp"),
                            ("agent", "agent (`fedser-client start`), resident"),
                            ("prepare", "agent's feature preparation (a child process, before joining)"),
                            ("query", "ClientApp profile query (the round's first message)"),
                            ("train", "ClientApp train instruction, features prepared"),
                            ("train-1thread", "ClientApp train instruction, features prepared, 1 thread"),
                            ("evaluate", "ClientApp evaluate instruction, features prepared"),
                            ("train-cold", "ClientApp train instruction, extracting its features")):
            r = _measure(kind, args, tmp_path)
            rows.append((kind, label, r["peak_rss_mb"], r["cuda_rss_mb"], r["seconds"]))
    base = {kind: mb for kind, _, mb, _, _ in rows}["torch"]
    cuda_build = any(cuda > 0 for *_, cuda, _ in rows)
    table = md_table(["process", "peak RSS (MiB)", "over import torch (MiB)", "of the 600 MB target",
                      "CUDA build's libraries' pages (MiB)", "peak without them (MiB)", "seconds"],
                     [(label, f"{mb:.0f}", f"{mb - base:+.0f}", f"{mb / TARGET_MB:.0%}", f"{cuda:.0f}",
                       f"{mb - cuda:.0f}", f"{s:.1f}") for _, label, mb, cuda, s in rows])
    # A round's processes, features prepared as the agent does before joining: each instruction's own.
    rounds = [(mb, cuda) for kind, _, mb, cuda, _ in rows if kind in ("query", "train", "train-1thread", "evaluate")]
    worst = max(mb for mb, _ in rounds)
    worst_cpu = max(mb - cuda for mb, cuda in rounds)
    cold = {kind: (mb, cuda) for kind, _, mb, cuda, _ in rows}["train-cold"]
    text = "\n".join([
        "# Device agent memory", "",
        f"{now()}; {machine_line()}", "",
        f"Device data: {len(corpus.utterances)} utterances of {len(corpus.speakers())} speaker(s) "
        f"({', '.join(sorted(corpus.tasks()))}); tier {args.tier}; {args.epochs} local epoch(s), batch 16, "
        "DP-SGD on, default model.", "",
        table, "",
        f"Peak of a training round (the largest of its instruction processes, features prepared): "
        f"{worst:.0f} MiB, target < {TARGET_MB:.0f} MiB: {'met' if worst < TARGET_MB else 'NOT met'}.", "",
        *([f"This torch build bundles CUDA ({_torch_build()}): PyPI's Linux torch 2.11 wheels, x86-64 and "
           "aarch64 alike, require the CUDA toolkit and triton. A device installs the CPU wheels "
           "(download.pytorch.org/whl/cpu), which map none of those libraries. Without their resident "
           f"pages (measured in each process at its end) a round peaks at about {worst_cpu:.0f} MiB: "
           f"{'within' if worst_cpu < TARGET_MB else 'over'} the target; a train instruction that extracts "
           f"its own features, about {cold[0] - cold[1]:.0f} MiB. That is an estimate (a CPU build was not "
           "installable here), and a lower bound on what a CPU build saves: the CUDA libraries' start-up "
           "also allocates anonymous memory, which is not counted as theirs.", ""]
          if cuda_build else []),
        "On a device the ClientApp runs in its own `flwr-clientapp` process per instruction (Flower "
        "starts one for each message), so a round's train and evaluate instructions never share a "
        "process; the agent (`fedser-client start`, row above) and the SuperNode stay resident beside it "
        "and hold no model or data. The agent prepares the device's features in a child process before "
        "it joins, so rounds read them from the cache; a train instruction that must extract them (cache "
        "off or new recordings) loads the encoders' runtimes too (last row).", "",
        load_note(load_before, load_average()),
    ])
    print(text)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "device_memory.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
