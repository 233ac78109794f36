"""Feature-extraction throughput: the batched torch FrontEnd against librosa clip by clip.

Reads real Speech Commands clips from ../shared/data/speech_commands (skips with a
message and exit status 0 when it is absent), decodes them once up front and fits
them to the keyword clip length, then times only the front ends on the same clips:

- librosa, per clip: ``melspectrogram`` + ``power_to_db`` (log-mel), ``mfcc`` from
  that log-mel, and the same per-utterance normalisation the FrontEnd applies.
- FrontEnd (kinds logmel + mfcc), batched with ``--batch`` clips per call.
- FrontEnd with one clip per call, for reference.

Prints a markdown table with clips/s and the speed-up over librosa.

    python bench/bench_features.py [--clips 500] [--batch 64] [--repeats 5] [--device cpu] [--threads N]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import librosa
import numpy as np
import soundfile as sf
import torch

from fedser.common.features import FeatureSpec, FrontEnd, fit_length

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "speech_commands"


def pick_clips(root: Path, n: int) -> list[Path]:
    """``n`` clips spread evenly over the sorted list of all keyword clips (no background noise)."""
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".flac", ".wav") and "_background_noise_" not in p.parts)
    if len(paths) <= n:
        return paths
    idx = np.linspace(0, len(paths) - 1, n).round().astype(int)
    return [paths[i] for i in idx]


def decode(path: Path, sample_rate: int) -> np.ndarray:
    try:
        from fedser.common.audio import load  # the project's decoder, once it exists
    except ImportError:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
        if sr != sample_rate:
            raise SystemExit(f"{path}: {sr} Hz, expected {sample_rate} Hz")
        return data.mean(axis=1)
    return load(path, sample_rate=sample_rate)


def librosa_features(y: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """(T,) -> (n_mels + n_mfcc, frames), the same features as FrontEnd(kinds=logmel, mfcc)."""
    mel = librosa.feature.melspectrogram(
        y=y,
        sr=spec.sample_rate,
        n_fft=spec.n_fft,
        win_length=spec.win_length,
        hop_length=spec.hop_length,
        n_mels=spec.n_mels,
        center=True,
        pad_mode="constant",
        power=2.0,
    )
    logmel = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=80.0)
    mfcc = librosa.feature.mfcc(S=logmel, n_mfcc=spec.n_mfcc)
    feats = np.concatenate([logmel, mfcc])
    feats = feats - feats.mean(axis=1, keepdims=True)
    return feats / np.maximum(feats.std(axis=1, keepdims=True), 1e-3)


def best_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each function over ``repeats`` rounds.

    The functions take turns within each round, so load from other processes on the
    machine falls on all of them alike instead of on whichever happened to run then.
    """
    for fn in fns.values():
        fn()  # warm-up: allocators, FFT plans, filterbank caches
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=500, help="number of clips (default 500)")
    parser.add_argument("--batch", type=int, default=64, help="FrontEnd batch size (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats, best is reported (default 5)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Speech Commands folder")
    parser.add_argument("--device", default="cpu", help="torch device for the FrontEnd (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's default)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    if not args.data.is_dir():
        print(f"skipped: Speech Commands not found at {args.data}")
        return 0
    paths = pick_clips(args.data, args.clips)
    if not paths:
        print(f"skipped: no audio clips under {args.data}")
        return 0

    spec = FeatureSpec(kinds=("logmel", "mfcc"))
    n = spec.clip_samples("kws")
    waves = np.stack([fit_length(decode(p, spec.sample_rate), n, "center") for p in paths])  # (N, T)
    device = torch.device(args.device)
    front_end = FrontEnd(spec).to(device).eval()
    batch_t = torch.from_numpy(waves).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run_librosa() -> None:
        for y in waves:
            librosa_features(y, spec)

    def run_front_end(batch: int) -> Callable[[], None]:
        def go() -> None:
            with torch.inference_mode():
                for i in range(0, len(batch_t), batch):
                    front_end(batch_t[i : i + batch])
            sync()

        return go

    times = best_times(
        {
            "librosa, per clip": run_librosa,
            f"FrontEnd, batch {args.batch}": run_front_end(args.batch),
            "FrontEnd, batch 1": run_front_end(1),
        },
        args.repeats,
    )
    t_librosa = times["librosa, per clip"]

    # Same features both ways (the bench would be meaningless otherwise).
    with torch.inference_mode():
        ours = front_end(batch_t[:1])[0].cpu().numpy()
    diff = float(np.abs(ours - librosa_features(waves[0], spec)).max())

    k = len(waves)
    print(f"clips: {k} x {n / spec.sample_rate:.1f} s from {args.data}")
    print(f"features: {spec.kinds} ({spec.n_features()} x {spec.n_frames(n)}), n_fft {spec.n_fft}, hop {spec.hop_length}")
    print(f"torch {torch.__version__}, librosa {librosa.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, device {device}")
    print(f"max |FrontEnd - librosa| on clip 0 after normalisation: {diff:.2e}")
    print()
    print("| pipeline | seconds | clips/s | vs librosa |")
    print("|---|---:|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {t:.3f} | {k / t:,.0f} | {t_librosa / t:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
