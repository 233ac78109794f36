"""Streaming keyword spotting on real speech: detection, false alarms, latency, speed, exports.

Builds continuous streams from real Speech Commands clips of speakers the model was not
trained on (../shared/data/speech_commands; skips with exit status 0 when absent): each
word is trimmed to its voiced part, scaled to -26 dBFS RMS and followed by 0.3-1.5 s of
one background-noise recording (``_background_noise_``) at the stream's SNR; a fifth of
the words are non-keywords (``_unknown_``). The ground-truth timeline of every word is
kept. Then, for each model and streaming mode, it reports:

- detection rate of command words (the first keyword event whose 1 s window covers
  most of the word names the right word) next to the same model's per-clip accuracy
  on the same words (the 1 s of the same stream centred on each word);
- false alarms: events on non-keywords or noise within the speech streams, and per
  hour on noise-only audio (every background recording at the streams' noise levels);
- latency from the end of the word to the event (median and 90th percentile);
- real-time factor of the whole listener (conditioning, VAD, KWS, smoothing) with one
  torch thread, for the bundle, its TorchScript and its ONNX export;
- size and per-window latency (one 1 s window, batch 1) of each exported format.

    python bench/bench_streaming.py [--model RUN_DIR ...] [--data DIR] [--quick]

Without ``--model`` it trains a KWS model once (``fedser train --task kws``, 20 epochs;
5 with ``--quick``) into ``$FEDSER_CACHE/bench-streaming-model`` and reuses it.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_DATA, Report, data_or_skip, load_average, load_note, machine_line, md_table  # noqa: E402

from fedser.common import audio  # noqa: E402
from fedser.common.corpora import load_corpus  # noqa: E402
from fedser.client.runtime import open_model  # noqa: E402
from fedser.common.features import fit_length  # noqa: E402
from fedser.common.taxonomy import COMMAND_WORDS, UNKNOWN  # noqa: E402
from fedser.client.listen.listener import KeywordEvent, ListenConfig, Listener  # noqa: E402

WORD_DBFS = -26.0
SNRS = (20.0, 10.0, 5.0)
SWEEP = (0.3, 0.5, 0.7, 0.9)
GAP = (0.3, 1.5)
UNKNOWN_SHARE = 0.2


@dataclass
class Word:
    label: str
    start: float
    end: float


@dataclass
class Stream:
    wave: np.ndarray
    words: list[Word]
    snr: float
    noise: str


def rms_db(x: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(np.square(x, dtype=np.float64)) + 1e-12))


def trim(wave: np.ndarray, sr: int, below_peak_db: float = 30.0, margin_s: float = 0.05) -> np.ndarray:
    """The voiced part of a clip: 10 ms frames within ``below_peak_db`` of the loudest, plus a margin."""
    hop = sr // 100
    n = wave.size // hop
    if n == 0:
        return wave
    e = 10 * np.log10(np.mean(np.square(wave[: n * hop].reshape(n, hop), dtype=np.float64), axis=1) + 1e-12)
    on = np.flatnonzero(e > e.max() - below_peak_db)
    m = int(margin_s * sr)
    return wave[max(0, on[0] * hop - m): min(wave.size, (on[-1] + 1) * hop + m)]


def scaled(x: np.ndarray, dbfs: float) -> np.ndarray:
    return (x * 10 ** ((dbfs - rms_db(x)) / 20)).astype(np.float32)


def build_stream(words: list[tuple[str, np.ndarray]], noise: np.ndarray, snr: float, sr: int,
                 rng: np.random.Generator, noise_name: str) -> Stream:
    """Words (already trimmed) separated by random gaps over a continuous noise bed at ``snr`` dB."""
    pieces, timeline = [], []
    t = int(rng.uniform(*GAP) * sr)  # noise before the first word too
    for label, w in words:
        w = scaled(w, WORD_DBFS)
        timeline.append(Word(label, t / sr, (t + w.size) / sr))
        pieces.append((t, w))
        t += w.size + int(rng.uniform(*GAP) * sr)
    total = t
    # A random stretch of the recording, repeated cyclically when the stream is longer.
    bed = np.roll(np.resize(noise, max(total, noise.size)), -int(rng.integers(0, noise.size)))[:total]
    out = scaled(bed, WORD_DBFS - snr)
    for t0, w in pieces:
        out[t0:t0 + w.size] += w
    return Stream(np.clip(out, -1.0, 1.0), timeline, snr, noise_name)


def owner_of(stream: Stream, t: float, window: float) -> int | None:
    """The word an event at ``t`` is about: the one most covered by the window ``[t - window, t]``
    the model saw (at least half of the word), or None."""
    best, best_share = None, 0.5
    for i, w in enumerate(stream.words):
        share = (min(w.end, t) - max(w.start, t - window)) / (w.end - w.start)
        if share >= best_share:
            best, best_share = i, share
    return best


def score(stream: Stream, events: list[KeywordEvent], window: float = 1.0) -> dict:
    """Hits, wrong keywords, misses, false alarms and latencies of ``events`` against the timeline.

    Each event belongs to the word its window covered best; the first event of a command word
    decides hit or wrong keyword; every other event (a second one for the same word, one on a
    non-keyword or on noise) is a false alarm.
    """
    first: dict[int, KeywordEvent] = {}
    false_alarms = 0
    for ev in events:
        owner = owner_of(stream, ev.time, window)
        if owner is None or stream.words[owner].label == UNKNOWN or owner in first:
            false_alarms += 1
        else:
            first[owner] = ev
    commands = [i for i, w in enumerate(stream.words) if w.label != UNKNOWN]
    hits = [i for i in commands if i in first and first[i].keyword == stream.words[i].label]
    subs = [i for i in commands if i in first and first[i].keyword != stream.words[i].label]
    return {"commands": len(commands), "hits": len(hits), "subs": len(subs), "false_alarms": false_alarms,
            "latency": [first[i].time - stream.words[i].end for i in hits]}


def per_clip(runtime, stream: Stream, sr: int) -> list[tuple[bool, float]]:
    """(top-1 correct, top-1 probability) of the 1 s of the stream centred on each command word."""
    n = runtime.spec.clip_samples("kws")
    clips, labels = [], []
    for w in stream.words:
        if w.label == UNKNOWN:
            continue
        centre = int((w.start + w.end) / 2 * sr)
        lo = max(0, centre - n // 2)
        clips.append(fit_length(stream.wave[lo:lo + n], n, mode="start"))
        labels.append(w.label)
    if not clips:
        return []
    probs = np.concatenate([runtime.probs(np.stack(clips[i:i + 64]))["kws"] for i in range(0, len(clips), 64)])
    names = runtime.classes["kws"]
    return [(names[int(k)] == lab, float(p)) for k, p, lab in zip(probs.argmax(1), probs.max(1), labels)]


def run_listener(runtime, wave: np.ndarray, cfg: ListenConfig) -> tuple[list, float, float]:
    """Keyword events, wall seconds and CPU seconds for one stream, fed in chunks of one hop."""
    listener = Listener(runtime, cfg, notice=lambda s: None)
    chunk = listener.hop
    events = []
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, wave.size, chunk):
        events += listener.feed(wave[i:i + chunk])
    events += listener.flush()
    return ([e for e in events if isinstance(e, KeywordEvent)], time.perf_counter() - t0,
            time.process_time() - c0)


def evaluate(runtime, streams: list[Stream], noise_streams: list[np.ndarray], cfg: ListenConfig,
             clips: dict[int, list[tuple[bool, float]]]) -> dict:
    """Per-SNR detection, wrong keywords, false alarms, latency; noise-only false alarms; timing."""
    sr = runtime.spec.sample_rate
    out: dict = {"snr": {}, "wall": 0.0, "cpu": 0.0, "audio": 0.0}
    for i, s in enumerate(streams):
        events, wall, cpu = run_listener(runtime, s.wave, cfg)
        r = score(s, events, runtime.spec.kws_seconds)
        a = out["snr"].setdefault(s.snr, {"commands": 0, "hits": 0, "subs": 0, "false_alarms": 0, "latency": [],
                                          "clip_ok": 0, "clip_ok_thr": 0, "seconds": 0.0})
        for k in ("commands", "hits", "subs", "false_alarms"):
            a[k] += r[k]
        a["latency"] += r["latency"]
        a["seconds"] += s.wave.size / sr
        a["clip_ok"] += sum(ok for ok, _ in clips[i])
        a["clip_ok_thr"] += sum(ok and p >= cfg.threshold for ok, p in clips[i])
        out["wall"] += wall
        out["cpu"] += cpu
        out["audio"] += s.wave.size / sr
    out["noise_fa"], out["noise_s"], out["noise_by_kind"] = 0, 0.0, {}
    for name, wave in noise_streams:
        events, wall, cpu = run_listener(runtime, wave, cfg)
        out["noise_fa"] += len(events)
        out["noise_by_kind"][name] = out["noise_by_kind"].get(name, 0) + len(events)
        out["noise_s"] += wave.size / sr
        out["wall"] += wall
        out["cpu"] += cpu
        out["audio"] += wave.size / sr
    return out


def pct(a: float, b: float) -> str:
    return f"{a / b:.1%}" if b else "—"


def ensure_model(data: Path, quick: bool) -> Path:
    cache = Path(os.environ.get("FEDSER_CACHE", Path.home() / ".cache" / "fedser"))
    out = cache / ("bench-streaming-model" + ("-quick" if quick else ""))
    if (out / "model.fedser").exists() and (out / "metrics.json").exists():
        return out
    epochs = 5 if quick else 20
    print(f"training a KWS model for the bench ({epochs} epochs) into {out} ...", flush=True)
    subprocess.run([sys.executable, "-m", "fedser.tools.cli", "train", "--task", "kws", "--data",
                    str(data / "speech_commands"), "--out", str(out), "--epochs", str(epochs), "--quiet"],
                   check=True)
    return out


def window_latency(runtime, n: int, repeats: int) -> float:
    """Median milliseconds of one ``probs`` call on one window."""
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32) * 0.05
    for _ in range(5):
        runtime.probs(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runtime.probs(x)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="corpus root holding speech_commands/")
    ap.add_argument("--model", action="append", default=None, metavar="RUN_DIR",
                    help="KWS run directory (repeat for several; default: train one once)")
    ap.add_argument("--quick", action="store_true", help="fewer words per SNR, shorter noise-only audio")
    ap.add_argument("--words", type=int, default=None, help="command words per SNR (default 300; 60 with --quick)")
    ap.add_argument("--threshold", type=float, default=ListenConfig().threshold)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not data_or_skip(args.data, "speech_commands", "speech_commands/_background_noise_"):
        return 0
    torch.set_num_threads(1)
    load_before = load_average()
    report = Report("streaming" + ("_quick" if args.quick else ""),
                    "Streaming keyword spotting (fedser-client listen)")
    report.add(f"Machine: {machine_line()}.")
    models = [Path(m) for m in args.model] if args.model else [ensure_model(args.data, args.quick)]
    rng = np.random.default_rng(args.seed)
    root = args.data / "speech_commands"
    corpus = load_corpus(root)
    noise_files = sorted((root / "_background_noise_").glob("*.flac"))
    noises = {p.stem: audio.load(p, max_seconds=None) for p in noise_files}
    cfg = ListenConfig(threshold=args.threshold)

    for model_dir in models:
        bundle_rt = open_model(model_dir)
        sr = bundle_rt.spec.sample_rate
        seen = set(bundle_rt.meta.get("train_speakers") or [])
        utts = [u for u in corpus.utterances
                if u.speaker not in seen and (u.label in COMMAND_WORDS or u.label == UNKNOWN)]
        commands = [u for u in utts if u.label in COMMAND_WORDS]
        unknown = [u for u in utts if u.label == UNKNOWN]
        n_words = min(len(commands), args.words or (60 if args.quick else 300))
        enc = bundle_rt.model_config.encoder
        report.add("")
        report.add(f"## Model {model_dir} ({enc} encoder)")
        report.add("")
        report.add(f"Test speakers only: {len(commands)} command clips and {len(unknown)} `_unknown_` clips of "
                   f"{len({u.speaker for u in utts})} speakers not seen in training; {n_words} command words per "
                   f"SNR plus {UNKNOWN_SHARE:.0%} non-keywords, words at {WORD_DBFS:.0f} dBFS, gaps "
                   f"{GAP[0]}-{GAP[1]} s, noise beds from {', '.join(noises)}; threshold {cfg.threshold}, "
                   f"hop {cfg.hop_s} s; sliding decisions: refractory {cfg.refractory_s} s, smoothing "
                   f"{cfg.smooth_s} s.")

        def clip(u) -> np.ndarray:
            return trim(audio.load(u.path, sample_rate=sr, max_seconds=2.0), sr)

        streams: list[Stream] = []
        for snr in SNRS:
            picked = [commands[i] for i in rng.permutation(len(commands))[:n_words]]
            extra = [unknown[i] for i in rng.permutation(len(unknown))[:int(round(UNKNOWN_SHARE * len(picked)))]]
            order = picked + extra
            rng.shuffle(order)
            # One stream per noise recording, the words dealt out in turn.
            for k, (name, noise) in enumerate(noises.items()):
                part = [(u.label, clip(u)) for u in order[k::len(noises)]]
                if part:
                    streams.append(build_stream(part, noise, snr, sr, rng, name))
        audio_s = sum(s.wave.size for s in streams) / sr
        noise_only_s = 30.0 if args.quick else None
        noise_streams = []
        for snr in SNRS:
            for name, noise in noises.items():
                bed = np.roll(noise, -int(rng.integers(0, noise.size)))  # not the recording's own fade-in
                bed = bed if noise_only_s is None else bed[: int(noise_only_s * sr)]
                noise_streams.append((name, scaled(bed, WORD_DBFS - snr)))
        noise_s = sum(n.size for _, n in noise_streams) / sr

        clips = {i: per_clip(bundle_rt, st, sr) for i, st in enumerate(streams)}
        # The default (segment decisions, Silero VAD), sliding decisions and the energy VAD beside it,
        # crnn's recurrent modes (which decide sliding).
        settings = [("segment", "window", "silero"), ("sliding", "window", "silero"), ("segment", "window", "energy")]
        if enc == "crnn":
            settings += [("sliding", "state", "silero"), ("sliding", "carry", "silero")]
        rows, rtf_rows = [], []
        done: dict[tuple[str, str, str, float], dict] = {}
        for decision, recurrent, vad in settings:
            mode = f"{decision}{'' if recurrent == 'window' else f', {recurrent} state'}, {vad} VAD"
            r = evaluate(bundle_rt, streams, noise_streams,
                         replace(cfg, decision=decision, recurrent=recurrent, vad=replace(cfg.vad, kind=vad)), clips)
            done[decision, recurrent, vad, cfg.threshold] = r
            for snr, a in r["snr"].items():
                lat = np.array(a["latency"] or [np.nan])
                rows.append([mode, f"{snr:.0f} dB", a["commands"], pct(a["clip_ok"], a["commands"]),
                             pct(a["clip_ok_thr"], a["commands"]), pct(a["hits"], a["commands"]),
                             f"{100 * (a['hits'] - a['clip_ok']) / a['commands']:+.1f}",
                             pct(a["subs"], a["commands"]), f"{a['false_alarms'] / (a['seconds'] / 3600):.0f}",
                             f"{np.nanmedian(lat):.2f}", f"{np.nanpercentile(lat, 90):.2f}"])
            tot = {k: sum(a[k] for a in r["snr"].values()) for k in ("commands", "hits", "clip_ok", "clip_ok_thr",
                                                                   "subs")}
            rows.append([mode, "all", tot["commands"], pct(tot["clip_ok"], tot["commands"]),
                         pct(tot["clip_ok_thr"], tot["commands"]), pct(tot["hits"], tot["commands"]),
                         f"{100 * (tot['hits'] - tot['clip_ok']) / tot['commands']:+.1f}",
                         pct(tot["subs"], tot["commands"]), "", "", ""])
            by_kind = ", ".join(f"{k} {v}" for k, v in r["noise_by_kind"].items() if v)
            rows.append([mode, "noise only", "", "", "", "", "", "",
                         f"{r['noise_fa'] / (r['noise_s'] / 3600):.0f} ({r['noise_fa']} in {r['noise_s'] / 60:.0f} min"
                         f"{': ' + by_kind if by_kind else ''})", "", ""])
            rtf_rows.append([f"bundle (PyTorch), {mode}", f"{r['audio']:.0f}", f"{r['cpu'] / r['audio']:.4f}",
                             f"{r['wall'] / r['audio']:.4f}"])
        report.add("")
        report.add(f"{len(streams)} speech streams, {audio_s / 60:.1f} min; noise-only audio {noise_s / 60:.1f} min. "
                   f"Threshold {cfg.threshold}. Per-clip accuracy: top-1 of the 1 s of the same stream centred on "
                   f"the word; 'p >= threshold': top-1 right and at least as confident as a detection must be.")
        report.add("")
        report.add(md_table(["decision / VAD", "SNR", "command words", "per-clip accuracy", "per-clip, p >= threshold",
                             "streaming detection", "detection - per-clip (points)", "wrong keyword",
                             "false alarms / h", "latency median (s)", "latency p90 (s)"], rows))
        sweep = []
        for thr in SWEEP:
            r = done.get((cfg.decision, "window", cfg.vad.kind, thr)) or evaluate(
                bundle_rt, streams, noise_streams, replace(cfg, threshold=thr), clips)
            tot = {k: sum(a[k] for a in r["snr"].values()) for k in ("commands", "hits", "clip_ok", "clip_ok_thr",
                                                                   "subs", "false_alarms")}
            speech_h = sum(a["seconds"] for a in r["snr"].values()) / 3600
            sweep.append([f"{thr:.1f}", pct(tot["clip_ok"], tot["commands"]), pct(tot["clip_ok_thr"], tot["commands"]),
                          pct(tot["hits"], tot["commands"]), pct(tot["subs"], tot["commands"]),
                          f"{tot['false_alarms'] / speech_h:.0f}", f"{r['noise_fa'] / (r['noise_s'] / 3600):.0f}"])
        report.add("")
        report.add(f"Threshold sweep ({cfg.decision} decisions, {cfg.vad.kind} VAD, all SNRs):")
        report.add("")
        report.add(md_table(["threshold", "per-clip accuracy", "per-clip, p >= threshold", "streaming detection",
                             "wrong keyword", "false alarms / h (speech streams)", "false alarms / h (noise only)"],
                            sweep))

        # Exports: size, per-window latency, listener real-time factor.
        with tempfile.TemporaryDirectory() as tmp:
            exports = {}
            for fmt, suffix in (("torchscript", ".pt"), ("onnx", ".onnx")):
                out = Path(tmp) / f"model{suffix}"
                subprocess.run([sys.executable, "-m", "fedser.tools.cli", "export", str(model_dir), "--format",
                                fmt, "--out", str(out), "--clips", "16"], check=True, capture_output=True)
                exports[fmt] = (out, open_model(out, threads=1))
            n = bundle_rt.spec.clip_samples("kws")
            lat_rows = [["bundle (PyTorch eager)", f"{(Path(model_dir) / 'model.fedser').stat().st_size / 1024:.0f}",
                         f"{window_latency(bundle_rt, n, 200):.2f}"]]
            sample = streams[: max(1, len(streams) // 3)]
            sample_s = sum(s.wave.size for s in sample) / sr
            for fmt, (path, rt) in exports.items():
                lat_rows.append([fmt, f"{path.stat().st_size / 1024:.0f}", f"{window_latency(rt, n, 200):.2f}"])
                timing = [run_listener(rt, s.wave, cfg)[1:] for s in sample]
                rtf_rows.append([f"{fmt} export, {cfg.decision}, {cfg.vad.kind} VAD", f"{sample_s:.0f}",
                                 f"{sum(c for _, c in timing) / sample_s:.4f}",
                                 f"{sum(w for w, _ in timing) / sample_s:.4f}"])
        report.add("")
        report.add("Real-time factor of the whole listener (processing time / audio time; 1 torch / ONNX Runtime "
                   f"thread; streams fed in {cfg.hop_s * 1000:.0f} ms chunks; target <= 0.05). CPU time is what the listener needs of "
                   "one core; wall time also counts waiting for a core on this shared machine:")
        report.add("")
        report.add(md_table(["model", "audio (s)", "real-time factor (CPU)", "real-time factor (wall)"], rtf_rows))
        report.add("")
        report.add("Exported model size and latency of one 1 s window (batch 1, 1 thread, median of 200):")
        report.add("")
        report.add(md_table(["format", "size (KiB)", "ms per window"], lat_rows))

    report.add("")
    report.add(load_note(load_before, load_average()))
    report.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
