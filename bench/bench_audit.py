"""Privacy audit: attribute and membership inference under no DP, sample-level, user-level and both.

Emotion federations of RAVDESS + EmoDB speakers (one device per speaker) are simulated in this
process with the device's own round (``fedser.client.update.train_round``: DP-SGD, then clip and
noise) and the server's aggregation, once per privacy setting and user-level noise level, at the project's default privacy
settings over 20 rounds x 5 local epochs (long enough for the no-DP model to learn). Each final
model is attacked:

* attribute (gender) inference from updates every speaker sends from that global model, and from
  what secure aggregation would show instead: per-round sums over random cohorts, disaggregated;
* membership, sample level: training utterances of member speakers vs their held-back ones;
* membership, speaker level: member speakers' held-back utterances vs speakers never trained on.

    python bench/bench_audit.py [--quick] [--jobs 2] [--data DIR]
    python bench/bench_audit.py --attribute-draws 6 --jobs 2   # the no-DP gender attack over 6 draws
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_DATA,
    RESULTS_DIR,
    Report,
    data_or_skip,
    load_average,
    load_note,
    machine_line,
    md_table,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="corpus root (default ../shared/data)")
    p.add_argument("--quick", action="store_true", help="few speakers, rounds and updates (a smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=None,
                   help="federated rounds (default 20; 1 with --quick)")
    p.add_argument("--local-epochs", type=int, default=None, help="local epochs per round (default 5; 1 with --quick)")
    p.add_argument("--jobs", type=int, default=1, help="federations run side by side in forked processes")
    p.add_argument("--attribute-draws", type=int, default=0, metavar="N",
                   help="instead of the full audit: the no-DP federation and its gender attack for N draws "
                        "(seeds SEED..SEED+N-1: member speakers, their utterance splits, the federation, the "
                        "attack's updates), each with its luck band, and their mean against the band of a mean")
    p.add_argument("--central-epochs", type=int, default=None,
                   help="epochs of the centrally trained no-DP target, long enough to memorise (default 100; 2 with --quick)")
    args = p.parse_args(argv)
    if not data_or_skip(args.data, "ravdess", "emodb"):
        return 0

    import numpy as np
    import torch
    from fedser.tools.audit.attacks import (
        auc_chance_band,
        calibrated_attack,
        loss_attack,
        roc_summary,
        speaker_scores,
    )
    from fedser.tools.audit.inputs import speaker_genders
    from fedser.tools.audit.protocol import (
        concat,
        example_scores,
        reference_confidences,
        simulate_federation,
        speaker_parts,
    )
    from fedser.tools.audit.report import roc_png
    from fedser.tools.audit.runner import SUM_ROUNDS_PER_SPEAKER, attribute_audit
    from fedser.common.cache import FeatureCache
    from fedser.tools.commands.args import default_cache_dir
    from fedser.common.corpora import load_corpora
    from fedser.common.data import build_task_data
    from fedser.common.features import FeatureSpec
    from fedser.common.models import ModelConfig, build_model
    from fedser.common.params import arrays_to_state, state_to_arrays
    from fedser.server.plots import curves_png
    from fedser.common.training import TrainConfig, evaluate_task, train_task

    torch.set_num_threads(1)
    quick = args.quick
    name = "audit_quick" if quick else "audit"
    if args.rounds or args.local_epochs:
        name += f"_r{args.rounds or 'default'}e{args.local_epochs or 'default'}"
    rep = Report(name, "Privacy audit: what updates and models leak, with and without DP")
    load0 = load_average()
    t0 = time.perf_counter()
    spec = FeatureSpec()
    mc = ModelConfig(n_features=spec.n_features())
    corpus = load_corpora([args.data / "ravdess", args.data / "emodb"])
    utts = [u for u in corpus.utterances if u.task == "emotion"]
    genders = speaker_genders(utts)
    data = build_task_data(utts, spec, "emotion", FeatureCache(default_cache_dir() / "features"), progress=False)
    speakers = speaker_parts(data)
    if args.attribute_draws:
        return attribute_draws(args, speakers, genders, spec, mc)
    insiders, outsiders, train_parts, held_parts = draw(speakers, genders, args.seed, quick)
    members, held = concat(train_parts), concat(held_parts)
    non_members = concat([speakers[s] for s in outsiders])
    attack_speakers = {s: speakers[s] for s in (insiders + outsiders)}

    # The federations are longer than the project's default run (3 rounds x 1 local epoch): a
    # model that has barely left its random start (emotion UAR at chance after 3 rounds) leaks
    # nothing, and an audit must show what DP hides in a model that did learn. The privacy
    # settings are the project's defaults (device budget epsilon 8, user-level z=1 in the run
    # settings' default noise mode, C=2). The "no DP, central" row trains the same members for many epochs: the setting where
    # a model memorises, and the check that the membership attacks can find memorisation.
    rounds = args.rounds or (1 if quick else 20)
    local_epochs = args.local_epochs or (1 if quick else 5)
    central_epochs = args.central_epochs or (2 if quick else 100)
    k_updates = 2 if quick else 6
    n_perm = 4 if quick else 12     # label shufflings for the attribute attack's chance band
    n_ref_central = 1 if quick else 2
    n_ref_fed = 1 if quick else 4
    base = default_protocol(len(insiders), rounds, local_epochs)
    mode = base.noise_mode
    other_mode = "distributed" if mode == "local" else "local"
    rep.add(machine_line() + ".")
    rep.add("")
    rep.add(f"Data: RAVDESS + EmoDB emotion, {len(speakers)} speakers ({sum(g == 'm' for g in genders.values())} m). "
            f"Federation: {len(insiders)} member speakers, one device each, 70% of each speaker's utterances "
            f"trained on ({len(members)} utterances), 30% held back ({len(held)}); {len(outsiders)} non-member "
            f"speakers ({len(non_members)} utterances) for utility and speaker-level membership. {rounds} rounds x "
            f"{local_epochs} local epochs, batch 16, Adam lr 0.003, every device every round; update clip C=2.0; "
            f"DP-SGD noise calibrated to a device budget of epsilon 8 (delta 1e-5) over the run, max grad norm 1.0; "
            f"user-level noise in {mode} mode, m={len(insiders)}. Attribute inference: {k_updates} updates per "
            f"speaker from each final model, all {len(attack_speakers)} speakers as shadow/target in grouped "
            f"cross-validation, each corpus's updates centred on its shadow updates' mean. Calibrated membership "
            f"(log-odds of the true label minus its mean under reference models that did not train on the "
            f"example): {n_ref_fed} reference federations for the federated rows (the same protocol without DP, "
            f"one device per speaker of a random half of all candidates) and {n_ref_central} reference models for "
            f"the central row (no DP, no augmentation, {central_epochs} epochs, random halves). Row 'no DP, "
            f"central': the same member utterances trained on centrally for {central_epochs} epochs without DP and "
            "without augmentation, the setting in which a model can memorise, attacked by the same membership "
            "attacks. Membership from updates (the curious server's view): each attribute-inference update scores "
            "every utterance of its speaker by the cosine between the update and the utterance's negative loss "
            "gradient at the global model; members are the utterances it trained on, non-members the speaker's "
            f"others. Attribute inference from sums (the view secure aggregation leaves the server): "
            f"{SUM_ROUNDS_PER_SPEAKER * len(attack_speakers)} rounds, each the sum of the updates of a random half "
            "of the speakers (each sending its attack updates in turn, the model held at the final one: the "
            "attacker's best case), disaggregated by least squares over the known cohorts into one estimated "
            "update per speaker, then the same classifier.")
    rep.add("")

    pool = concat([members, held, non_members])
    n_m, n_h = len(members), len(held)
    sample_labels = np.r_[np.ones(n_m), np.zeros(n_h)]
    ref_central = reference_confidences(mc, spec, pool, n_ref_central, central_epochs, seed=args.seed,
                                        augment=False, progress=True)
    ref_fed = reference_confidences(mc, spec, pool, n_ref_fed, central_epochs, seed=args.seed + 1,
                                    progress=True, federation=base)

    def membership(arrays, refs):
        model = build_model(mc)
        arrays_to_state(arrays, model)
        losses, conf = example_scores(model, pool)
        out = {}
        for att, s in (("loss", loss_attack(losses)), ("calibrated", calibrated_attack(conf, *refs))):
            out[f"sample/{att}"] = roc_summary(sample_labels, s[:n_m + n_h])
            pos = speaker_scores(s[n_m:n_m + n_h], held.speakers)
            neg = speaker_scores(s[n_m + n_h:], non_members.speakers)
            out[f"speaker/{att}"] = roc_summary([1] * len(pos) + [0] * len(neg),
                                                list(pos.values()) + list(neg.values()))
        return out, evaluate_task(model, non_members)["uar"]

    torch.manual_seed(args.seed)
    init = state_to_arrays(build_model(mc))
    n_med = int(np.median([len(d) for d in train_parts]))

    def federated_row(label, protocol, k=k_updates):
        t = time.perf_counter()
        arrays = simulate_federation(mc, spec, train_parts, protocol, seed=args.seed, progress=True, init=init)
        mi, utility = membership(arrays, ref_fed)
        ai, _, update_mi = attribute_audit(arrays, mc, spec, attack_speakers, genders, protocol, updates_per_speaker=k,
                                seed=args.seed, progress=True,
                                chance_permutations=n_perm if protocol.setting == "no DP" else 0,
                                sum_rounds=SUM_ROUNDS_PER_SPEAKER * len(attack_speakers))
        mi["update/alignment"] = update_mi
        out = {"label": label, "eps": protocol.epsilons(n_med), "utility": utility, "ai": ai, "mi": mi,
               "seconds": time.perf_counter() - t}
        print(f"  {label}: utility {utility:.3f}, attribute UAR {ai.uar:.3f}, membership AUC "
              f"{mi['sample/calibrated'].auc:.3f} / speaker {mi['speaker/calibrated'].auc:.3f}",
              file=sys.stderr, flush=True)
        return out

    # Local noise (the default while there is no secure aggregation) puts z*C on every update;
    # distributed noise puts z*C/sqrt(m) on each, so that only the sum carries z*C: less noise in
    # the model, but the server reads each update with the smaller noise. The other mode's row
    # shows the difference.
    runs = [("no DP", base.variant("no DP")), ("sample-level DP", base.variant("sample-level DP")),
            ("user-level DP", base.variant("user-level DP")), ("both", base.variant("both")),
            (f"user-level DP, {other_mode} noise",
             dataclasses.replace(base.variant("user-level DP"), noise_mode=other_mode))]
    # The privacy/utility curve varies the user-level noise z (default mode, DP-SGD off: the
    # server-side knob). z=0 and z=1 are the "no DP" and "user-level DP" rows themselves.
    curve_only = [(f"curve z={z:g}", dataclasses.replace(base.variant("user-level DP"), noise_multiplier=z))
                  for z in CURVE_Z if z not in (0.0, base.noise_multiplier)]
    t = time.perf_counter()
    torch.manual_seed(args.seed)
    central = build_model(mc)
    train_task(central, "emotion", members, None,
               TrainConfig(epochs=central_epochs, batch_size=16, lr=3e-3, seed=args.seed), spec, None, progress=False)
    mi, utility = membership(state_to_arrays(central), ref_central)
    results = [{"label": "no DP, central", "eps": None, "utility": utility, "ai": None, "mi": mi,
                "seconds": time.perf_counter() - t}]
    # DP-SGD federations take several times longer: start them first so the workers finish together.
    jobs = sorted(runs + curve_only, key=lambda job: not job[1].dp)
    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # Forked workers inherit the features, the splits and the reference models.
        global _ROW
        _ROW = federated_row
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("fork")) as pool_ex:
            done = list(pool_ex.map(_row_in_worker, jobs))
    else:
        done = [federated_row(label, protocol) for label, protocol in jobs]
    order = [label for label, _ in runs + curve_only]
    results += sorted(done, key=lambda r: order.index(r["label"]))
    by_label = {r["label"]: r for r in results}

    def fmt_eps(e):
        return "inf" if np.isinf(e) else f"{e:.2f}"

    table = []
    for r in results:
        mi = r["mi"]
        ai = r["ai"]
        table.append([r["label"], fmt_eps(r["eps"]["sample"]) if r["eps"] else "inf",
                      fmt_eps(r["eps"]["user"]) if r["eps"] else "—", f"{r['utility']:.3f}",
                      f"{ai.uar:.3f}" if ai else "—", f"{ai.auc:.3f}" if ai else "—",
                      f"{ai.uar_per_update:.3f}" if ai else "—",
                      f"{mi['sample/loss'].auc:.3f}", f"{mi['sample/calibrated'].auc:.3f}",
                      f"{mi['sample/calibrated'].tpr_at_low_fpr:.3f}", f"{mi['speaker/loss'].auc:.3f}",
                      f"{mi['speaker/calibrated'].auc:.3f}",
                      f"{mi['update/alignment'].auc:.3f}" if "update/alignment" in mi else "—",
                      f"{ai.from_sums.uar:.3f}" if ai else "—", f"{r['seconds']:.0f}"])
    table = [row for row in table if not row[0].startswith("curve")]
    chance_uar = by_label["no DP"]["ai"].chance_uar
    spk = by_label["no DP"]["mi"]["speaker/calibrated"]
    band_sample = auc_chance_band(n_m, n_h, seed=args.seed)
    band_speaker = auc_chance_band(spk.n_pos, spk.n_neg, seed=args.seed)
    upd = by_label["no DP"]["mi"]["update/alignment"]
    band_update = auc_chance_band(upd.n_pos, upd.n_neg, seed=args.seed)
    rep.add("### Attacks x settings (chance: UAR 0.5, AUC 0.5, TPR@1%FPR 0.01)")
    rep.add("")
    rep.add(md_table(["setting", "sample eps", "user eps", "utility: emotion UAR (unseen speakers)",
                      "attribute UAR (clients)", "attribute AUC (clients)", "attribute UAR (updates)",
                      "membership AUC, loss", "membership AUC, calibrated", "TPR@1%FPR, calibrated",
                      "speaker-level AUC, loss", "speaker-level AUC, calibrated",
                      "membership AUC from updates (gradient alignment)",
                      "attribute UAR (clients) from per-round sums", "seconds"], table))
    rep.add("")
    rep.add(f"Chance bands (95th percentile of what luck gives): attribute UAR over {len(attack_speakers)} clients "
            f"{chance_uar:.3f} ({n_perm} runs of the no-DP attack with the speakers' genders shuffled); "
            f"sample-level membership AUC over {n_m} + {n_h} utterances {band_sample:.3f}; speaker-level "
            f"membership AUC over {spk.n_pos} member and {spk.n_neg} non-member speakers {band_speaker:.3f}; "
            f"membership from updates over {upd.n_pos} + {upd.n_neg} (update, utterance) pairs {band_update:.3f} "
            "(labels shuffled 1000 times). A figure below its band is indistinguishable from luck.")
    rep.add("")
    rep.add("Epsilons come from Opacus accountants: sample-level for a device with the median member's data "
            "over all rounds, user-level from the server's accountant (q = 1, every device every round) at noise "
            "multiplier z. With local noise the aggregate carries more than z (about z*sqrt(m) for equal "
            "devices), so there the user epsilon printed is an upper bound.")
    curve = []
    for z in CURVE_Z:
        r = by_label["no DP" if z == 0 else "user-level DP" if z == base.noise_multiplier else f"curve z={z:g}"]
        curve.append({"user-level z": z, "user eps": fmt_eps(r["eps"]["user"]), "utility (emotion UAR)": r["utility"],
                      "attribute UAR": r["ai"].uar, "attribute AUC": r["ai"].auc,
                      "membership AUC (calibrated)": r["mi"]["sample/calibrated"].auc,
                      "speaker-level AUC (calibrated)": r["mi"]["speaker/calibrated"].auc, "seconds": r["seconds"]})
    rep.add("")
    rep.add(f"### Privacy/utility curve (user-level noise z varied, {mode} mode, m={len(insiders)}, DP-SGD off; "
            f"{rounds} rounds x {local_epochs} local epochs, {k_updates} updates per speaker)")
    rep.add("")
    rep.add(md_table(["user-level z", "user eps", "utility: emotion UAR", "attribute UAR", "attribute AUC",
                      "membership AUC (calibrated)", "speaker-level AUC (calibrated)", "seconds"],
                     [[f"{r['user-level z']:g}", r["user eps"], f"{r['utility (emotion UAR)']:.3f}",
                       f"{r['attribute UAR']:.3f}", f"{r['attribute AUC']:.3f}",
                       f"{r['membership AUC (calibrated)']:.3f}", f"{r['speaker-level AUC (calibrated)']:.3f}",
                       f"{r['seconds']:.0f}"] for r in curve]))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    curves_png(curve, "user-level z", [("UAR / AUC", ["utility (emotion UAR)", "attribute UAR",
                                                     "membership AUC (calibrated)",
                                                     "speaker-level AUC (calibrated)"])],
               RESULTS_DIR / f"{name}_curve.png", title="privacy/utility over user-level noise (DP-SGD off)")
    roc_png([(f"{r['label']} {a}", r["mi"][a]) for r in results if r["label"] in ("no DP, central", "no DP", "both")
             for a in ("sample/loss", "sample/calibrated", "speaker/calibrated")],
            RESULTS_DIR / f"{name}_roc.png", "membership inference on the final model")
    rep.add("")
    rep.add(f"![curve]({name}_curve.png) ![roc]({name}_roc.png)")
    rep.add("")
    rep.add("### Targets")
    rep.add("")
    rep.add(md_table(["target", "measured", "met"], targets(table, uar_bar=max(0.75, chance_uar),
                                                            speaker_bar=max(0.60, band_speaker),
                                                            update_bar=max(0.55, band_update),
                                                            uar_band=chance_uar)))
    rep.add("")
    rep.add(f"Wall time {time.perf_counter() - t0:.0f} s; {load_note(load0, load_average())}.")
    rep.save()
    return 0


def default_protocol(members: int, rounds: int, local_epochs: int):
    """The audit's federation at the project's default privacy settings (device budget epsilon 8,
    user-level z=1 in the run settings' default noise mode, C=2), every member every round."""
    from fedser.server.settings import RunSettings
    from fedser.tools.audit.protocol import Protocol

    return Protocol(clip_norm=2.0, noise_multiplier=1.0, noise_mode=RunSettings(run_dir="-").noise_mode,
                    expected_clients=members, total_clients=members, dp=True, max_epsilon=8.0,
                    rounds=rounds, local_epochs=local_epochs, batch_size=16, learning_rate=3e-3)


def draw(speakers: dict, genders: dict, seed: int, quick: bool):
    """One draw of the audit's federation: (member speakers, non-member speakers, each member's
    training utterances, each member's held-back ones)."""
    import numpy as np
    from fedser.tools.audit.protocol import subset

    rng = np.random.default_rng(seed)
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
    return insiders, outsiders, train_parts, held_parts


def _attribute_draw(job) -> dict:
    """The no-DP federation of one draw and the gender attack on its final model."""
    import torch
    from fedser.common.models import build_model
    from fedser.common.params import arrays_to_state, state_to_arrays
    from fedser.common.training import evaluate_task
    from fedser.tools.audit.protocol import concat, simulate_federation
    from fedser.tools.audit.runner import attribute_audit

    seed, speakers, genders, spec, mc, protocol, quick = job
    torch.set_num_threads(1)
    t = time.perf_counter()
    insiders, outsiders, train_parts, _ = draw(speakers, genders, seed, quick)
    torch.manual_seed(seed)
    init = state_to_arrays(build_model(mc))
    arrays = simulate_federation(mc, spec, train_parts, protocol, seed=seed, progress=False, init=init)
    model = build_model(mc)
    arrays_to_state(arrays, model)
    utility = evaluate_task(model, concat([speakers[s] for s in outsiders]))["uar"]
    ai, _, _ = attribute_audit(arrays, mc, spec, {s: speakers[s] for s in insiders + outsiders}, genders, protocol,
                               updates_per_speaker=2 if quick else 6, seed=seed,
                               chance_permutations=4 if quick else 12)
    print(f"  draw {seed}: utility {utility:.3f}, attribute UAR {ai.uar:.3f} (band {ai.chance_uar:.3f})",
          file=sys.stderr, flush=True)
    return {"seed": seed, "utility": utility, "ai": ai, "members": len(insiders),
            "attacked": len(insiders) + len(outsiders), "seconds": time.perf_counter() - t}


def attribute_draws(args, speakers: dict, genders: dict, spec, mc) -> int:
    """Gender inference from updates without DP over several draws: how far one draw's figure is
    from what the attack does on average, and whether the mean clears the band a mean reaches by
    luck (the i-th shuffled run of every draw averaged, its 95th percentile over i)."""
    import numpy as np
    from fedser.tools.audit.attacks import luck_band

    quick = args.quick
    n = args.attribute_draws
    rounds = args.rounds or (1 if quick else 20)
    local_epochs = args.local_epochs or (1 if quick else 5)
    members = len(draw(speakers, genders, args.seed, quick)[0])   # the same count in every draw
    protocol = default_protocol(members, rounds, local_epochs).variant("no DP")
    name = f"audit_attribute_draws{'_quick' if quick else ''}"
    rep = Report(name, "Gender inference from updates without DP, over several draws")
    load0 = load_average()
    t0 = time.perf_counter()
    jobs = [(args.seed + i, speakers, genders, spec, mc, protocol, quick) for i in range(n)]
    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("fork")) as pool_ex:
            done = list(pool_ex.map(_attribute_draw, jobs))
    else:
        done = [_attribute_draw(job) for job in jobs]
    uars = [r["ai"].uar for r in done]
    mean_band = luck_band(np.mean([r["ai"].chance_uars for r in done], axis=0))
    mean_uar = float(np.mean(uars))
    rep.add(machine_line() + ".")
    rep.add("")
    rep.add(f"Data: RAVDESS + EmoDB emotion, {len(speakers)} speakers ({sum(g == 'm' for g in genders.values())} m). "
            f"Each draw (seed) picks the {done[0]['members']} member speakers (one device each), the 70% of "
            f"each one's utterances it trains on, runs the federation without DP ({rounds} rounds x "
            f"{local_epochs} local epochs, batch 16, Adam lr 0.003, every device every round, update clip "
            f"C=2.0) and attacks its final model as `bench_audit.py` does: {2 if quick else 6} updates per "
            f"speaker from each of the {done[0]['attacked']} member and non-member speakers, grouped cross-validation, each corpus's updates centred "
            "on its shadow updates' mean. Luck band: the 95th percentile of the attack's UAR with the speakers' "
            f"genders shuffled ({4 if quick else 12} shufflings per draw); for the mean, the i-th shuffled run "
            "of every draw is averaged and the 95th percentile taken over i.")
    rep.add("")
    rows = [[str(r["seed"]), f"{r['utility']:.3f}", f"{r['ai'].uar:.3f}", f"{r['ai'].auc:.3f}",
             f"{r['ai'].chance_uar:.3f}", "yes" if r["ai"].uar > r["ai"].chance_uar else "no",
             f"{r['seconds']:.0f}"] for r in done]
    rows.append([f"mean of {n}", f"{np.mean([r['utility'] for r in done]):.3f}", f"**{mean_uar:.3f}**",
                 f"{np.mean([r['ai'].auc for r in done]):.3f}", f"{mean_band:.3f}",
                 "yes" if mean_uar > mean_band else "no", ""])
    rep.add(md_table(["draw (seed)", "utility: emotion UAR (non-members)", "attribute UAR (clients)",
                      "attribute AUC (clients)", "luck band (UAR)", "above its band", "seconds"], rows))
    rep.add("")
    rep.add(f"UAR over draws: min {min(uars):.3f}, max {max(uars):.3f}, standard deviation "
            f"{np.std(uars, ddof=1) if n > 1 else 0.0:.3f}.")
    rep.add("")
    rep.add(md_table(["target", "measured", "met"],
                     [[f"no DP: attribute UAR >= 0.75 and above its luck band ({mean_band:.3f}), mean of {n} draws",
                       f"{mean_uar:.3f}", "yes" if mean_uar >= max(0.75, mean_band) else "**no**"]]))
    rep.add("")
    rep.add(f"Wall time {time.perf_counter() - t0:.0f} s; {load_note(load0, load_average())}.")
    rep.save()
    return 0


_ROW = None


def _row_in_worker(job):
    import torch

    torch.set_num_threads(1)
    return _ROW(*job)


CURVE_Z = (0.0, 0.3, 1.0, 3.0)
COLUMNS = {"utility": 3, "attribute": 4, "attribute AUC": 5, "loss": 7, "calibrated": 8, "speaker": 11, "update": 12,
           "sums": 13}


def targets(table: list[list[str]], uar_bar: float = 0.75, speaker_bar: float = 0.60,
            update_bar: float = 0.55, uar_band: float = 0.60) -> list[list[str]]:
    """The targets against the measured rows: the attacks work without DP, fail at the defaults, and
    the defaults keep the model's utility.

    ``uar_bar``: the attribute UAR an attack that works reaches (0.75, and above the permutation
    band ``uar_band``); ``speaker_bar``, ``update_bar``: clearly above chance for the speaker-level
    membership AUC and membership from updates.
    """
    rows = {r[0]: r for r in table}
    out = []

    def add(what: str, setting: str, col: str, ok) -> None:
        if setting not in rows:
            return
        v = float(rows[setting][COLUMNS[col]])
        out.append([what, f"{v:.3f}", "yes" if ok(v) else "**no**"])

    add(f"no DP: attribute UAR >= 0.75 and above its luck band {uar_band:.3f} (>= {uar_bar:.3f})", "no DP",
        "attribute", lambda v: v >= uar_bar)
    add("no DP: attribute AUC clearly above 0.5 (>= 0.65)", "no DP", "attribute AUC", lambda v: v >= 0.65)
    add("no DP, central: membership AUC (loss) clearly above 0.5 (>= 0.60)", "no DP, central", "loss",
        lambda v: v >= 0.60)
    add("no DP, central: membership AUC (calibrated) above the loss attack", "no DP, central", "calibrated",
        lambda v: v > float(rows["no DP, central"][COLUMNS["loss"]]))
    add("no DP: membership AUC (loss) clearly above 0.5 (>= 0.60)", "no DP", "loss", lambda v: v >= 0.60)
    add("no DP: membership AUC (calibrated) clearly above 0.5 (>= 0.60)", "no DP", "calibrated",
        lambda v: v >= 0.60)
    add(f"no DP: speaker-level membership AUC (calibrated) clearly above 0.5 (>= {speaker_bar:.3f})", "no DP",
        "speaker", lambda v: v >= speaker_bar)
    add(f"no DP: membership AUC from updates clearly above 0.5 (>= {update_bar:.3f})", "no DP", "update",
        lambda v: v >= update_bar)
    add(f"no DP, secure aggregation: attribute UAR from per-round sums above its luck band ({uar_band:.3f}; "
        "the attack on sums works)", "no DP", "sums", lambda v: v > uar_band)
    add(f"defaults (both): attribute UAR <= 0.60 and inside its luck band ({uar_band:.3f})", "both", "attribute",
        lambda v: v <= min(0.60, uar_band))
    add(f"user-level DP, distributed noise (what secure aggregation is for): attribute UAR from per-round sums "
        f"inside its luck band ({uar_band:.3f})", "user-level DP, distributed noise", "sums",
        lambda v: v <= uar_band)
    add("defaults (both): membership AUC (loss) <= 0.55", "both", "loss", lambda v: v <= 0.55)
    add("defaults (both): membership AUC (calibrated) <= 0.55", "both", "calibrated", lambda v: v <= 0.55)
    add("defaults (both): speaker-level membership AUC (calibrated) <= 0.55", "both", "speaker",
        lambda v: v <= 0.55)
    add("defaults (both): membership AUC from updates <= 0.55", "both", "update", lambda v: v <= 0.55)
    if "no DP" in rows:
        base = float(rows["no DP"][COLUMNS["utility"]])
        add(f"defaults (both): utility >= 0.95x no DP ({0.95 * base:.3f})", "both", "utility",
            lambda v: v >= 0.95 * base)
    return out


if __name__ == "__main__":
    sys.exit(main())
