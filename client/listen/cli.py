"""``fedser-client listen``: its options and the command that wires a source to a ``Listener``.

Events go to stdout as they happen (text, or one JSON object a line with ``--json``); notices
and the closing real-time factor go to stderr, so stdout stays a clean event stream to pipe.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, BinaryIO, TextIO

from fedser.client.vad import VAD_KINDS, VADConfig
from fedser.common.errors import ConfigError

from .config import DECISIONS, RECURRENT_MODES, STDIN_FORMATS, ListenConfig

if TYPE_CHECKING:
    from .listener import Event


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``fedser-client listen``."""
    p.add_argument("--model", required=True, metavar="BUNDLE",
                   help="run directory, model.fedser bundle, or a file from `fedser export` (.pt / .onnx)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", metavar="FILE", help="audio file, or - for stdin (WAV stream or raw samples)")
    src.add_argument("--mic", action="store_true", help="listen to the default microphone (needs sounddevice)")
    p.add_argument("--json", action="store_true", help="one JSON object per event")
    p.add_argument("--format", choices=STDIN_FORMATS, default="auto", dest="stdin_format",
                   help="stdin: wav, f32 (raw float32), s16 (raw 16-bit PCM); auto = wav if it has a header, "
                        "else f32")
    p.add_argument("--rate", type=int, default=None, help="sample rate of raw stdin samples (default: the model's)")
    p.add_argument("--device", default=None, help="input device for --mic (name or index)")
    d = ListenConfig()
    p.add_argument("--decision", choices=DECISIONS, default=d.decision,
                   help="segment (default): decide each voiced segment that fits in the keyword window once, on "
                        "the window centred on it, when it ends; sliding: decide every hop over the last window "
                        "(quicker to report, less accurate; segments longer than the window always slide)")
    p.add_argument("--threshold", type=float, default=d.threshold, help=f"keyword probability (default {d.threshold})")
    p.add_argument("--refractory", type=float, default=d.refractory_s,
                   help=f"sliding decisions: seconds after a keyword during which no other is reported "
                        f"(default {d.refractory_s})")
    p.add_argument("--hop", type=float, default=d.hop_s, help=f"hop in seconds (default {d.hop_s})")
    p.add_argument("--smooth", type=float, default=d.smooth_s,
                   help=f"sliding decisions: seconds of keyword probabilities averaged (default {d.smooth_s})")
    p.add_argument("--recurrent", choices=RECURRENT_MODES, default="window",
                   help="window (default): run every window scored whole; crnn bundles only, with sliding "
                        "decisions: state = carry the GRU state within voiced segments, reset at their end; "
                        "carry = never reset (only to measure what the reset is worth)")
    p.add_argument("--vad", choices=VAD_KINDS, default=VADConfig().kind,
                   help="voice-activity detector: Silero's neural VAD (default), or energy over a noise floor")
    p.add_argument("--no-emotion", action="store_true", help="do not classify the emotion of segments")
    p.add_argument("--no-keywords", action="store_true", help="do not spot keywords")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the model (default 1)")


def run(args: argparse.Namespace, stdin: BinaryIO | None = None, stdout: TextIO | None = None) -> int:
    """``fedser-client listen``: print events as they happen; returns the exit code."""
    # The model stack loads here, not at import: `fedser-client` imports this module for its options.
    import torch

    from fedser.client.runtime import open_model

    from .listener import Listener, to_stderr
    from .sources import file_chunks, mic_chunks, open_microphone, stream_chunks

    out = stdout or sys.stdout
    if args.threads < 1:
        raise ConfigError(f"--threads: expected at least 1; got {args.threads}")
    if args.mic:
        open_microphone(args.device)  # fail before loading the model
    torch.set_num_threads(args.threads)
    runtime = open_model(args.model, threads=args.threads)
    to_stderr(f"model: {runtime.describe()}")
    cfg = ListenConfig(hop_s=args.hop, threshold=args.threshold, refractory_s=args.refractory,
                       smooth_s=args.smooth, keywords=not args.no_keywords, emotion=not args.no_emotion,
                       recurrent=args.recurrent, decision=args.decision, vad=VADConfig(kind=args.vad))
    sr = runtime.spec.sample_rate
    if args.mic:
        chunks = mic_chunks(sr, block_s=cfg.hop_s, device=args.device)
    elif args.input == "-":
        chunks = stream_chunks(stdin or sys.stdin.buffer, sr, args.stdin_format, args.rate, block_s=cfg.hop_s)
    else:
        chunks = file_chunks(args.input, sr)
    listener = Listener(runtime, cfg)
    t0 = time.perf_counter()

    def emit(events: list[Event]) -> None:
        for e in events:
            print(json.dumps(e.to_dict()) if args.json else str(e), file=out, flush=True)

    try:
        try:
            for chunk in chunks:
                emit(listener.feed(chunk))
        except KeyboardInterrupt:
            pass
        emit(listener.flush())
    except BrokenPipeError:
        # The reader went away (`listen ... | head`): stop quietly, as other Unix tools do.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if not args.mic:
        wall = time.perf_counter() - t0
        to_stderr(f"processed {listener.time:.1f} s of audio in {wall:.2f} s "
                  f"(real-time factor {wall / max(listener.time, 1e-9):.3f})")
    return 0
