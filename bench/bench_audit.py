"""Privacy audit: attribute and membership inference under no DP, sample-level, user-level and both.

Emotion federations of RAVDESS + EmoDB speakers (one device per speaker) are simulated in this
process with the device's own round (``train_task`` DP-SGD, then ``privatize_update``) and plain
FedAvg, once per privacy setting and user-level noise level. Each final model is attacked:

* attribute (gender) inference from updates every speaker sends from that global model;
* membership, sample level: training utterances of member speakers vs their held-back ones;
* membership, speaker level: member speakers' held-back utterances vs speakers never trained on.

    python bench/bench_audit.py [--quick] [--data DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DEFAULT_DATA, RESULTS_DIR, Report, data_or_skip, load_average, load_note,  # noqa: E402
                     machine_line, md_table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="corpus root (default ../shared/data)")
    p.add_argument("--quick", action="store_true", help="few speakers, rounds and updates (a smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=None,
                   help="federated rounds (default 3, the project's default; 1 with --quick)")
    p.add_argument("--local-epochs", type=int, default=None, help="local epochs per round (default 1, the project's)")
    p.add_argument("--central-epochs", type=int, default=None,
                   help="epochs of the centrally trained no-DP target, long enough to memorise (default 100; 2 with --quick)")
    args = p.parse_args(argv)
    if not data_or_skip(args.data, "ravdess", "emodb"):
        return 0

    import numpy as np
    import torch

    from fedser.common.audit.attacks import calibrated_attack, loss_attack, roc_summary, speaker_scores
    from fedser.common.audit.inputs import speaker_genders
    from fedser.common.audit.protocol import Protocol, concat, reference_losses, simulate_federation, subset
    from fedser.common.audit.report import roc_png
    from fedser.common.audit.runner import _speaker_data, attribute_audit
    from fedser.common.cache import FeatureCache
    from fedser.common.commands.args import default_cache_dir
    from fedser.common.corpora import load_corpora
    from fedser.common.data import build_task_data
    from fedser.common.features import FeatureSpec
    from fedser.common.models import ModelConfig, build_model
    from fedser.common.params import arrays_to_state, state_to_arrays
    from fedser.common.plots import curves_png
    from fedser.common.training import TrainConfig, evaluate_task, train_task

    torch.set_num_threads(1)
    quick = args.quick
    name = "audit_quick" if quick else "audit"
    if args.rounds or args.local_epochs:
        name += f"_r{args.rounds or 3}e{args.local_epochs or 1}"
    rep = Report(name, "Privacy audit: what updates and models leak, with and without DP")
    load0 = load_average()
    t0 = time.perf_counter()
    spec = FeatureSpec()
    mc = ModelConfig(n_features=spec.n_features())
    corpus = load_corpora([args.data / "ravdess", args.data / "emodb"])
    utts = [u for u in corpus.utterances if u.task == "emotion"]
    genders = speaker_genders(utts)
    data = build_task_data(utts, spec, "emotion", FeatureCache(default_cache_dir() / "features"), progress=False)
    speakers = _speaker_data(data)
    rng = np.random.default_rng(args.seed)
    names = sorted(speakers)
    rng.shuffle(names)
    # Non-member speakers: 3 per corpus, half of each gender where possible.
    outsiders = []
    for corpus_name in ("ravdess", "emodb"):
        for g in ("m", "f"):
            pick = [s for s in names if s.startswith(corpus_name) and genders[s] == g and s not in outsiders]
            outsiders += pick[: 1 if quick else 2]
    insiders = [s for s in names if s not in outsiders]
    if quick:
        insiders = insiders[:6]
    train_parts, held_parts = [], []
    for s in insiders:
        d = speakers[s]
        perm = rng.permutation(len(d))
        cut = int(0.7 * len(d))
        train_parts.append(subset(d, sorted(perm[:cut].tolist())))
        held_parts.append(subset(d, sorted(perm[cut:].tolist())))
    members, held = concat(train_parts), concat(held_parts)
    non_members = concat([speakers[s] for s in outsiders])
    attack_speakers = {s: speakers[s] for s in (insiders + outsiders)}

    # Sized so the full bench ends in about 15 minutes on a shared 2-core machine: DP-SGD (Opacus
    # per-sample gradients) dominates, so only the two DP-SGD settings pay for it.
    # The federations follow the project's defaults (3 rounds x 1 local epoch, batch 16). That is
    # only a few optimizer steps per device, too little to memorise anything, so the "no DP,
    # central" row trains the same members for many epochs: the setting where a model memorises.
    rounds = args.rounds or (1 if quick else 3)
    local_epochs = args.local_epochs or 1
    central_epochs = args.central_epochs or (2 if quick else 100)
    ref_epochs = central_epochs
    k_updates = 2 if quick else 6
    n_perm = 4 if quick else 12     # label shufflings for the attribute attack's chance band
    curve_rounds, curve_local_epochs, k_curve = (2, 1, 2) if quick else (24, 2, 4)
    chance_uar: list[float] = []
    n_ref = 1 if quick else 2
    base = Protocol(clip_norm=2.0, noise_multiplier=1.0, noise_mode="distributed",
                    expected_clients=len(insiders), total_clients=len(insiders), dp=True, max_epsilon=8.0,
                    rounds=rounds, local_epochs=local_epochs, batch_size=16, learning_rate=3e-3)
    rep.add(machine_line() + ".")
    rep.add("")
    rep.add(f"Data: RAVDESS + EmoDB emotion, {len(speakers)} speakers ({sum(g == 'm' for g in genders.values())} m). "
            f"Federation: {len(insiders)} member speakers, one device each, 70% of each speaker's utterances "
            f"trained on ({len(members)} utterances), 30% held back ({len(held)}); {len(outsiders)} non-member "
            f"speakers ({len(non_members)} utterances) for utility and speaker-level membership. {rounds} rounds x "
            f"{local_epochs} local epochs, batch 16, Adam lr 0.003, every device every round; update clip C=2.0; "
            f"DP-SGD noise calibrated to a device budget of epsilon 8 (delta 1e-5) over the run, max grad norm 1.0; "
            f"user-level noise distributed over m={len(insiders)}. Attribute inference: {k_updates} updates per "
            f"speaker from each final model, all {len(attack_speakers)} speakers as shadow/target in grouped "
            f"cross-validation, each corpus's updates centred on its shadow updates' mean. Calibrated membership: "
            f"{n_ref} reference "
            f"models (no DP, no augmentation, {ref_epochs} epochs, random halves of all candidates). Row 'no DP, "
            f"central': the same member utterances trained on centrally for {central_epochs} epochs without DP and "
            "without augmentation, the setting in which a model can memorise, attacked by the same membership "
            "attacks.")
    rep.add("")

    pool = concat([members, held, non_members])
    ref, inside = reference_losses(mc, spec, pool, n_ref, ref_epochs, seed=args.seed, augment=False, progress=True)

    def attack_model(arrays, protocol, k_updates=k_updates):
        model = build_model(mc)
        arrays_to_state(arrays, model)
        model.eval()
        from fedser.common.audit.protocol import example_losses

        losses = example_losses(model, pool)
        n_m, n_h = len(members), len(held)
        out = {}
        for att, s in (("loss", loss_attack(losses)), ("calibrated", calibrated_attack(losses, ref, inside))):
            out[f"sample/{att}"] = roc_summary(np.r_[np.ones(n_m), np.zeros(n_h)], s[:n_m + n_h])
            pos = speaker_scores(s[n_m:n_m + n_h], held.speakers)
            neg = speaker_scores(s[n_m + n_h:], non_members.speakers)
            out[f"speaker/{att}"] = roc_summary([1] * len(pos) + [0] * len(neg),
                                                list(pos.values()) + list(neg.values()))
        utility = evaluate_task(model, non_members)["uar"]
        if protocol is None:
            return out, utility, None
        ai, _ = attribute_audit(arrays, mc, spec, attack_speakers, genders, protocol, updates_per_speaker=k_updates,
                                seed=args.seed, progress=True,
                                chance_permutations=n_perm if protocol.setting == "no DP" else 0)
        if ai.chance_uar is not None:
            chance_uar.append(ai.chance_uar)
        return out, utility, ai

    torch.manual_seed(args.seed)
    init = state_to_arrays(build_model(mc))
    # Distributed noise (the default) puts z*C/sqrt(m) on each update, so that the sum carries z*C:
    # without secure aggregation the server reads each update with that smaller noise. The local
    # mode row shows the protection full z*C noise per update gives against a curious server.
    runs = [("no DP", base.variant("no DP")), ("sample-level DP", base.variant("sample-level DP")),
            ("user-level DP", base.variant("user-level DP")), ("both", base.variant("both")),
            ("user-level DP, local noise", dataclasses.replace(base.variant("user-level DP"), noise_mode="local"))]
    # The privacy/utility curve varies the user-level noise z (distributed, DP-SGD off: the
    # server-side knob, and runs without Opacus keep it affordable) over longer federations than
    # the defaults, which are too short for the model to learn emotions at all.
    curve_base = dataclasses.replace(base.variant("user-level DP"), rounds=curve_rounds,
                                     local_epochs=curve_local_epochs)
    curve_runs = [(z, dataclasses.replace(curve_base, noise_multiplier=z, noise_mode="distributed" if z else "none"))
                  for z in CURVE_Z]
    table, curve, rocs = [], [], {}
    t = time.perf_counter()
    torch.manual_seed(args.seed)
    central = build_model(mc)
    train_task(central, "emotion", members, None,
               TrainConfig(epochs=central_epochs, batch_size=16, lr=3e-3, seed=args.seed), spec, None, progress=False)
    mi, utility, _ = attack_model(state_to_arrays(central), None)
    rocs["no DP, central"] = mi
    table.append(["no DP, central", "inf", "—", f"{utility:.3f}", "—", "—", "—", f"{mi['sample/loss'].auc:.3f}",
                  f"{mi['sample/calibrated'].auc:.3f}", f"{mi['sample/calibrated'].tpr_at_low_fpr:.3f}",
                  f"{mi['speaker/calibrated'].auc:.3f}", f"{time.perf_counter() - t:.0f}"])
    print(f"  {table[-1][0]}: {table[-1]}", file=sys.stderr, flush=True)
    n_med = int(np.median([len(d) for d in train_parts]))
    for label, protocol in runs:
        t = time.perf_counter()
        arrays = simulate_federation(mc, spec, train_parts, protocol, seed=args.seed, progress=True, init=init)
        mi, utility, ai = attack_model(arrays, protocol)
        eps = protocol.epsilons(n_med)
        rocs[label] = mi
        e_s = "inf" if np.isinf(eps["sample"]) else f"{eps['sample']:.2f}"
        e_u = "inf" if np.isinf(eps["user"]) else f"{eps['user']:.2f}"
        table.append([label, e_s, e_u, f"{utility:.3f}", f"{ai.uar:.3f}", f"{ai.auc:.3f}", f"{ai.uar_per_update:.3f}",
                      f"{mi['sample/loss'].auc:.3f}", f"{mi['sample/calibrated'].auc:.3f}",
                      f"{mi['sample/calibrated'].tpr_at_low_fpr:.3f}", f"{mi['speaker/calibrated'].auc:.3f}",
                      f"{time.perf_counter() - t:.0f}"])
        print(f"  {label}: {table[-1]}", file=sys.stderr, flush=True)
    for z, protocol in curve_runs:
        t = time.perf_counter()
        arrays = simulate_federation(mc, spec, train_parts, protocol, seed=args.seed, progress=True, init=init)
        mi, utility, ai = attack_model(arrays, protocol, k_updates=k_curve)
        e_u = protocol.epsilons(n_med)["user"]
        curve.append({"user-level z": z, "user eps": "inf" if np.isinf(e_u) else f"{e_u:.2f}",
                      "utility (emotion UAR)": utility, "attribute UAR": ai.uar, "attribute AUC": ai.auc,
                      "membership AUC (calibrated)": mi["sample/calibrated"].auc, "seconds": time.perf_counter() - t})
        print(f"  curve z={z:g}: {curve[-1]}", file=sys.stderr, flush=True)
    rep.add("### Attacks x settings (chance: UAR 0.5, AUC 0.5, TPR@1%FPR 0.01)")
    rep.add("")
    rep.add(md_table(["setting", "sample eps", "user eps", "utility: emotion UAR (unseen speakers)",
                      "attribute UAR (clients)", "attribute AUC (clients)", "attribute UAR (updates)",
                      "membership AUC, loss",
                      "membership AUC, calibrated", "TPR@1%FPR, calibrated", "speaker-level AUC, calibrated",
                      "seconds"], table))
    rep.add("")
    if chance_uar:
        rep.add(f"Chance band of the attribute UAR over {len(attack_speakers)} clients: 95th percentile over "
                f"{n_perm} runs of the no-DP attack with the speakers' genders shuffled = {chance_uar[0]:.3f}; "
                "a client UAR below it is indistinguishable from luck.")
        rep.add("")
    rep.add("Epsilons come from Opacus accountants: sample-level for a device with the median member's data "
            "over all rounds, user-level from the server's accountant (q = 1, every device every round).")
    curve.sort(key=lambda r: r["user-level z"])
    rep.add("")
    rep.add(f"### Privacy/utility curve (user-level noise z varied, distributed over m={len(insiders)}, DP-SGD off; "
            f"{curve_rounds} rounds x {curve_local_epochs} local epochs, {k_curve} updates per speaker)")
    rep.add("")
    rep.add(md_table(["user-level z", "user eps", "utility: emotion UAR", "attribute UAR", "attribute AUC",
                      "membership AUC (calibrated)", "seconds"],
                     [[f"{r['user-level z']:g}", r["user eps"], f"{r['utility (emotion UAR)']:.3f}",
                       f"{r['attribute UAR']:.3f}", f"{r['attribute AUC']:.3f}",
                       f"{r['membership AUC (calibrated)']:.3f}",
                       f"{r['seconds']:.0f}"] for r in curve]))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    curves_png(curve, "user-level z", [("UAR / AUC", ["utility (emotion UAR)", "attribute UAR",
                                                     "membership AUC (calibrated)"])],
               RESULTS_DIR / f"{name}_curve.png", title="privacy/utility over user-level noise (DP-SGD off)")
    roc_png([(f"{k} {a}", v[a]) for k, v in rocs.items() if k in ("no DP, central", "no DP", "both")
             for a in ("sample/loss", "sample/calibrated")],
            RESULTS_DIR / f"{name}_roc.png", "membership inference on the final model")
    rep.add("")
    rep.add(f"![curve]({name}_curve.png) ![roc]({name}_roc.png)")
    rep.add("")
    rep.add("### Targets")
    rep.add("")
    # "Clearly above chance" means above what the attack scores with the genders shuffled, too.
    bar = max(0.65, chance_uar[0]) if chance_uar else 0.65
    rows = targets(table, bar)
    long_no_dp = [r for r in curve if r["user-level z"] == 0]
    if long_no_dp:
        r = long_no_dp[0]
        rows.insert(2, [f"no DP, {curve_rounds}-round federation (curve z=0): attribute UAR >= {bar:.3f}",
                        f"{r['attribute UAR']:.3f}", "yes" if r["attribute UAR"] >= bar else "**no**"])
        rows.insert(3, [f"no DP, {curve_rounds}-round federation (curve z=0): attribute AUC >= 0.65",
                        f"{r['attribute AUC']:.3f}", "yes" if r["attribute AUC"] >= 0.65 else "**no**"])
    rep.add(md_table(["target", "measured", "met"], rows))
    rep.add("")
    rep.add(f"Wall time {time.perf_counter() - t0:.0f} s; {load_note(load0, load_average())}.")
    rep.save()
    return 0


CURVE_Z = (0.0, 0.3, 1.0, 3.0)
COLUMNS = {"attribute": 4, "attribute AUC": 5, "loss": 7, "calibrated": 8, "speaker": 10}


def targets(table: list[list[str]], uar_bar: float = 0.65) -> list[list[str]]:
    """Issue 6's targets against the measured rows: attacks work without DP, fail at the defaults.

    ``uar_bar``: the attribute UAR that counts as clearly above chance (at least the permutation band).
    """
    rows = {r[0]: r for r in table}
    out = []

    def add(what: str, setting: str, col: str, ok) -> None:
        if setting not in rows:
            return
        v = float(rows[setting][COLUMNS[col]])
        out.append([what, f"{v:.3f}", "yes" if ok(v) else "**no**"])

    add(f"no DP: attribute UAR clearly above 0.5 (>= {uar_bar:.3f})", "no DP", "attribute", lambda v: v >= uar_bar)
    add("no DP: attribute AUC clearly above 0.5 (>= 0.65)", "no DP", "attribute AUC", lambda v: v >= 0.65)
    add("no DP, central: membership AUC (loss) clearly above 0.5 (>= 0.60)", "no DP, central", "loss",
        lambda v: v >= 0.60)
    add("no DP, central: membership AUC (calibrated) above the loss attack", "no DP, central", "calibrated",
        lambda v: v > float(rows["no DP, central"][COLUMNS["loss"]]))
    add("no DP: membership AUC (loss) clearly above 0.5 (>= 0.60)", "no DP", "loss", lambda v: v >= 0.60)
    add("no DP: membership AUC (calibrated) clearly above 0.5 (>= 0.60)", "no DP", "calibrated",
        lambda v: v >= 0.60)
    add("defaults (both): attribute UAR <= 0.60", "both", "attribute", lambda v: v <= 0.60)
    add("defaults (both): membership AUC (loss) <= 0.55", "both", "loss", lambda v: v <= 0.55)
    add("defaults (both): membership AUC (calibrated) <= 0.55", "both", "calibrated", lambda v: v <= 0.55)
    return out


if __name__ == "__main__":
    sys.exit(main())
