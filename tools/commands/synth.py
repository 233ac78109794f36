"""``fedser synth``: a small multi-speaker emotion + commands corpus spoken by espeak-ng (``fedser.tools.synth``)."""
from __future__ import annotations

from fedser.tools import synth

HELP = "synthesize a small multi-speaker emotion + commands corpus with espeak-ng"


def _word_list(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (emotion/ and commands/ go inside)")
    p.add_argument("--speakers", type=int, default=16, help="number of synthetic speakers, 1..99 (default 16)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    p.add_argument("--emotions", type=_word_list, default=list(synth.DEFAULT_EMOTIONS), metavar="LIST",
                   help=f"comma-separated, among {','.join(synth.EMOTION_CODES)} (default {','.join(synth.DEFAULT_EMOTIONS)})")
    p.add_argument("--statements", type=int, default=2, help="RAVDESS statements per emotion, 1..2 (default 2)")
    p.add_argument("--repetitions", type=int, default=2, help="repetitions per statement (default 2)")
    p.add_argument("--command-repetitions", type=int, default=2,
                   help="clips per command word and speaker (default 2)")
    p.add_argument("--unknown-words", type=_word_list, default=list(synth.UNKNOWN_WORDS), metavar="LIST",
                   help=f"comma-separated non-command words (default {','.join(synth.UNKNOWN_WORDS)})")
    p.add_argument("--unknown-repetitions", type=int, default=1, help="clips per unknown word and speaker (default 1)")
    p.add_argument("--noise-seconds", type=float, default=30.0,
                   help="length of each background noise file; 0 writes none (default 30)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU cores, at most 8)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier synthesis in DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    report = synth.synthesize_corpus(
        args.out, n_speakers=args.speakers, seed=args.seed, emotions=args.emotions, statements=args.statements,
        repetitions=args.repetitions, command_repetitions=args.command_repetitions,
        unknown_words=args.unknown_words, unknown_repetitions=args.unknown_repetitions,
        noise_seconds=args.noise_seconds, workers=args.workers, overwrite=args.overwrite,
        progress=not args.quiet)
    print(report.summary())
    return 0
