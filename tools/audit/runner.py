"""``run_audit``: every attack and check against one federated run directory, and its report."""
from __future__ import annotations

import dataclasses
import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from fedser.common.data import TaskData, build_task_data
from fedser.common.features import FeatureSpec
from fedser.common.models import ModelConfig, build_model
from fedser.common.params import arrays_to_state
from fedser.common.secagg import Layout
from .attacks import (
    attribute_inference,
    auc_chance_band,
    calibrated_attack,
    chance_uars,
    disaggregate,
    gradient_alignment,
    luck_band,
    loss_attack,
    observed_sums,
    roc_summary,
    speaker_scores,
)
from .dpchecks import CheckResult, check_clipping, check_ledger, check_noise
from .inputs import (
    MALE,
    AuditInputError,
    RunInfo,
    load_gender_csv,
    load_run,
    speaker_genders,
)
from .protocol import (
    SETTINGS,
    Protocol,
    device_update,
    example_gradients,
    first_layer_name,
    speaker_parts,
    subset,
    update_features,
)
from .report import JSON_FILE, REPORT_FILE, SETTING_KEYS, Row, json_rows, render, roc_png

MIN_SPEAKERS_PER_GENDER = 2
MIN_UTTERANCES = 4          # a speaker with fewer emotion utterances cannot make several distinct updates
PAIRS_KEPT = 16             # (local, sent) update pairs kept per setting for the DP checks
SUM_COHORT_SHARE = 0.5      # the attack on sums: each round's cohort is a random half of the speakers
SUM_ROUNDS_PER_SPEAKER = 3  # and it sees 3 rounds per speaker: more rounds than unknowns


@dataclass
class AuditOptions:
    settings: Sequence[str] = SETTINGS
    updates_per_speaker: int = 4
    subset_share: float = 0.5          # share of a speaker's utterances behind each update
    reference_models: int = 4
    chance_permutations: int = 0       # > 0: measure the attribute attack's chance band by shuffling labels
    max_epsilon: float = 8.0           # device budget the sample-level noise is calibrated to
    gender_csv: str | None = None
    members: Sequence[str] = ()        # manifests of training data (default: RUN_DIR/devices/device-*/data.csv)
    non_members: Sequence[str] = ()    # manifests of unseen data (default: RUN_DIR/devices/test.csv)
    seed: int = 0
    cache: object = None               # FeatureCache
    progress: bool = True


@dataclass
class AuditResult:
    rows: list[Row] = field(default_factory=list)
    checks: list[tuple[str, CheckResult]] = field(default_factory=list)
    epsilons: dict[str, dict[str, float]] = field(default_factory=dict)
    images: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    report: Path | None = None

    @property
    def checks_passed(self) -> bool:
        return all(c.passed for _, c in self.checks)


def attribute_audit(global_arrays, model_config: ModelConfig, spec: FeatureSpec, speakers: dict[str, TaskData],
                    genders: dict[str, str], protocol: Protocol, *, updates_per_speaker: int = 4,
                    subset_share: float = 0.5, seed: int = 0, progress: bool = False,
                    populations: dict[str, str] | None = None, chance_permutations: int = 0,
                    sum_rounds: int = 0):
    """Updates of every speaker under ``protocol`` -> (AttributeResult, kept (local, sent) pairs,
    RocSummary of membership from updates or None).

    Each of a speaker's updates trains on a different random share of its utterances. The same
    updates also serve membership from updates: each update scores every utterance of its
    speaker by ``gradient_alignment``; members are the utterances it trained on, non-members the
    speaker's others (None when ``subset_share`` leaves none out).
    ``populations`` maps a speaker to its corpus (default: the prefix of a merged id, ``emodb:03``).
    ``chance_permutations`` > 0 also measures the chance band (``chance_band``) on these updates.
    ``sum_rounds`` > 0 also attacks what secure aggregation shows (``result.from_sums``): that many
    rounds of sums over random cohorts of half the speakers, each speaker sending its updates in
    turn, disaggregated by least squares into one estimated update per speaker. The model is held
    at ``global_arrays`` throughout, the attacker's best case (a converged model, or a server that
    sends the same one again).
    """
    # Each protocol draws its own subsets and noise: with shared draws, settings whose noise
    # swamps the update would all give the same (lucky or unlucky) figure.
    rng = np.random.default_rng([seed, zlib.crc32(repr(protocol).encode())])
    first = first_layer_name(global_arrays)
    names = list(global_arrays)
    layout = Layout.of({name: np.shape(global_arrays[name]) for name in names}, set(names), with_bit=False)
    at_global = build_model(model_config)
    arrays_to_state(global_arrays, at_global)
    feats, labels, clients, pairs = [], [], [], []
    vectors: dict[str, list[np.ndarray]] = {}
    mi_scores, mi_labels = [], []
    grads, grads_of = None, None
    jobs = [(s, k) for s in speakers for k in range(updates_per_speaker)]
    for j, (spk, k) in enumerate(tqdm(jobs, desc=f"updates ({protocol.setting})", disable=not progress,
                                      unit="update", leave=False)):
        data = speakers[spk]
        n = max(MIN_UTTERANCES // 2, int(round(subset_share * len(data))))
        idx = sorted(rng.choice(len(data), size=min(n, len(data)), replace=False).tolist())
        up = device_update(global_arrays, model_config, spec, subset(data, idx), protocol,
                           seed=seed * 100_003 + j, rng=rng)
        feats.append(update_features(up.sent, first))
        held_back = len(idx) < len(data)
        # One flat vector per update, made only when the sums or membership from updates read it.
        flat = layout.flatten(up.sent, None) if sum_rounds > 0 or held_back else None
        if sum_rounds > 0:
            vectors.setdefault(spk, []).append(flat)
        labels.append(int(genders[spk] == MALE))
        clients.append(spk)
        if len(pairs) < PAIRS_KEPT:
            pairs.append((up.local_delta, up.sent))
        if held_back:
            if grads_of != spk:   # jobs run speaker by speaker: one speaker's gradients at a time
                grads, grads_of = example_gradients(at_global, data, names), spk
            mi_scores.append(gradient_alignment(flat, grads))
            mi_labels.append(np.isin(np.arange(len(data)), idx).astype(int))
    pops = populations or {s: population_of(s) for s in speakers}
    X, pop_list = np.stack(feats), [pops[c] for c in clients]
    result = attribute_inference(X, labels, clients, populations=pop_list, seed=seed)
    if chance_permutations > 0:
        result.chance_uars = chance_uars(X, labels, clients, populations=pop_list,
                                         permutations=chance_permutations, seed=seed)
        result.chance_uar = luck_band(result.chance_uars)
    if sum_rounds > 0:
        order = list(vectors)
        cohorts, sums = observed_sums([vectors[s] for s in order], sum_rounds, SUM_COHORT_SHARE, rng)
        estimates = [layout.unflatten(row)[0] for row in disaggregate(cohorts, sums)]
        # The attacker trains on its shadow devices' own updates (it simulates them) and reads each
        # target from the update the sums give away.
        result.from_sums = attribute_inference(X, labels, clients, populations=pop_list, seed=seed,
                                               targets=np.stack([update_features(e, first) for e in estimates]),
                                               target_clients=order)
    update_mi = roc_summary(np.concatenate(mi_labels), np.concatenate(mi_scores)) if mi_scores else None
    return result, pairs, update_mi


def population_of(speaker: str) -> str:
    """The corpus of a merged speaker id (``emodb:03`` -> ``emodb``); one population without a prefix."""
    return speaker.split(":", 1)[0] if ":" in speaker else ""


def _manifest_data(paths: Sequence[Path | str], spec: FeatureSpec, task: str, cache) -> TaskData | None:
    from fedser.common.corpora import load_corpora

    paths = [str(p) for p in paths if Path(p).exists()]
    if not paths:
        return None
    utts = [u for u in load_corpora(paths).utterances if u.task == task]
    if not utts:
        return None
    return build_task_data(utts, spec, task, cache, progress=False)


def membership_audit(model, model_config: ModelConfig, spec: FeatureSpec, members: TaskData, non_members: TaskData,
                     *, reference_models: int = 4, reference_epochs: int = 8, seed: int = 0, progress: bool = False,
                     speaker_members: TaskData | None = None, federation: Protocol | None = None,
                     init: Mapping[str, np.ndarray] | None = None):
    """Sample- and speaker-level membership on ``model``: dict name -> RocSummary.

    Speaker level scores each speaker by its mean utterance score; member speakers are the
    speakers of ``members`` (or of ``speaker_members`` when given: held-out utterances of training
    speakers), non-member speakers those of ``non_members``. ``federation`` and ``init`` make the
    reference models federations of that protocol (without DP) from that starting model
    (``reference_confidences``), so that they train like the target.
    """
    from .protocol import concat, example_scores, reference_confidences

    pool = concat([members, non_members] + ([speaker_members] if speaker_members is not None else []))
    n_m, n_n = len(members), len(non_members)
    labels = np.r_[np.ones(n_m), np.zeros(n_n)]
    losses, confidences = example_scores(model, pool)
    scores = {"loss": loss_attack(losses)}
    if reference_models > 0:
        ref, inside = reference_confidences(model_config, spec, pool, reference_models, reference_epochs,
                                            seed=seed, progress=progress, federation=federation, init=init)
        scores["calibrated"] = calibrated_attack(confidences, ref, inside)
    out = {}
    for name, s in scores.items():
        out[f"sample/{name}"] = roc_summary(labels, s[: n_m + n_n])
        if speaker_members is not None:
            spk_scores = speaker_scores(s[n_m + n_n:], speaker_members.speakers)
            pos = set(spk_scores)
        else:
            spk_scores = speaker_scores(s[:n_m], members.speakers)
            pos = set(spk_scores)
        neg = speaker_scores(s[n_m:n_m + n_n], non_members.speakers)
        if pos & set(neg):
            raise AuditInputError(f"speakers {sorted(pos & set(neg))[:5]} are both members and non-members")
        if len(pos) >= 2 and len(neg) >= 2:
            out[f"speaker/{name}"] = roc_summary([1] * len(pos) + [0] * len(neg),
                                                 [spk_scores[k] for k in sorted(pos)] + [neg[k] for k in sorted(neg)])
    return out


def run_audit(run_dir: str | Path, data: Sequence[str], out: str | Path, options: AuditOptions | None = None,
              log=print) -> AuditResult:
    """Audit the run in ``run_dir`` with the speakers of ``data``; write ``out/audit.md`` and ROC PNGs."""
    from fedser.common.cache import FeatureCache
    from fedser.common.corpora import load_corpora

    opt = options or AuditOptions()
    info: RunInfo = load_run(run_dir)
    bad = [s for s in opt.settings if s not in SETTINGS]
    if bad:
        raise AuditInputError(f"settings {bad} must be among {SETTINGS}")
    if opt.updates_per_speaker < 1 or not 0 < opt.subset_share <= 1:
        raise AuditInputError("updates per speaker must be >= 1 and the subset share in (0, 1]")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = opt.cache or FeatureCache(None)
    bundle = info.bundle
    mc, spec = bundle.model_config, bundle.feature_spec
    protocol = Protocol.from_run(info.settings, bundle.meta, opt.max_epsilon)
    global_arrays = {k: np.asarray(v) for k, v in bundle.state.items()}
    res = AuditResult()
    res.notes.append(f"Run protocol: C={protocol.clip_norm:g}, user-level noise {protocol.noise_mode} "
                     f"z={protocol.noise_multiplier:g}, m={protocol.expected_clients} of N={protocol.total_clients}, "
                     f"DP-SGD {'on' if protocol.dp else 'off'} (budget {protocol.max_epsilon:g} over "
                     f"{protocol.rounds} rounds, max grad norm {protocol.dp_max_grad_norm:g}), "
                     f"{protocol.local_epochs} local epoch(s), batch {protocol.batch_size}, lr {protocol.learning_rate:g}; "
                     f"setting: {protocol.setting}.")

    # --- attribute inference from updates, under each setting --------------------------------------
    if data:
        missing = [p for p in data if not Path(p).exists()]
        if missing:
            raise AuditInputError(f"--data {', '.join(missing)}: no such file or folder")
        corpus = load_corpora(list(data))
        utts = [u for u in corpus.utterances if u.task == "emotion"]
        extra = load_gender_csv(opt.gender_csv) if opt.gender_csv else None
        genders = speaker_genders(utts, extra)
        if not genders:
            raise AuditInputError(
                f"--data {', '.join(data)}: no speaker of known gender among {len({u.speaker for u in utts})} "
                "emotion speakers (built-in: RAVDESS, EmoDB): give a CSV 'speaker,gender' with --gender-csv")
        known = [u for u in utts if u.speaker in genders]
        populations = {u.speaker: u.corpus or population_of(u.speaker) for u in known}
        all_data = build_task_data(known, spec, "emotion", cache, progress=opt.progress, desc="features (audit)")
        speakers = {s: d for s, d in speaker_parts(all_data).items() if len(d) >= MIN_UTTERANCES}
        counts = {g: sum(1 for s in speakers if genders[s] == g) for g in ("m", "f")}
        if min(counts.values()) < MIN_SPEAKERS_PER_GENDER:
            raise AuditInputError(
                f"too few speakers for a shadow/target split: {counts['m']} male and {counts['f']} female speakers "
                f"with >= {MIN_UTTERANCES} usable emotion utterances; need >= {MIN_SPEAKERS_PER_GENDER} of each "
                "(give more --data, or a --gender-csv covering more speakers)")
        n_typical = int(np.median([len(d) for d in speakers.values()]) * opt.subset_share)
        for setting in opt.settings:
            p = protocol.variant(setting)
            label = setting + (" (run)" if setting == protocol.setting else "")
            result, pairs, update_mi = attribute_audit(global_arrays, mc, spec, speakers, genders, p,
                                                       updates_per_speaker=opt.updates_per_speaker,
                                                       subset_share=opt.subset_share, seed=opt.seed,
                                                       progress=opt.progress, populations=populations,
                                                       chance_permutations=opt.chance_permutations,
                                                       sum_rounds=SUM_ROUNDS_PER_SPEAKER * len(speakers))
            key = SETTING_KEYS[setting]
            res.rows.append(Row("attribute inference (gender) from updates", label,
                                f"UAR over {result.n_clients} target clients", result.uar,
                                0.5 if result.chance_uar is None else result.chance_uar,
                                attack_key="attribute-gender", setting_key=key, metric_key="uar",
                                luck_band=result.chance_uar))
            res.rows.append(Row("attribute inference (gender) from updates", label,
                                f"UAR per update ({result.n_updates})", result.uar_per_update, 0.5,
                                attack_key="attribute-gender", setting_key=key, metric_key="uar-per-update"))
            sums = result.from_sums
            res.rows.append(Row("attribute inference (gender) from per-round sums (secure aggregation)", label,
                                f"UAR over {sums.n_clients} target clients", sums.uar,
                                0.5 if result.chance_uar is None else result.chance_uar,
                                attack_key="attribute-gender-sums", setting_key=key, metric_key="uar",
                                luck_band=result.chance_uar))
            if update_mi is not None:
                band = auc_chance_band(update_mi.n_pos, update_mi.n_neg, seed=opt.seed)
                res.rows.append(Row("membership (sample level, emotion) from updates, gradient alignment", label,
                                    f"ROC AUC ({update_mi.n_pos} trained on / {update_mi.n_neg} held back)",
                                    update_mi.auc, band, attack_key="membership", setting_key=key, metric_key="auc",
                                    luck_band=band))
            res.epsilons[setting] = p.epsilons(max(1, n_typical))
            res.checks.append((label, check_clipping(pairs, p.clip_norm, p.noise_multiplier, p.noise_mode,
                                                     p.expected_clients)))
            res.checks.append((label, check_noise(pairs, p.clip_norm, p.noise_multiplier, p.noise_mode,
                                                  p.expected_clients)))
            log(f"attribute inference, {label}: UAR {result.uar:.3f} over {result.n_clients} clients "
                f"({result.uar_per_update:.3f} per update)")
        res.notes.append(f"Attribute inference: {len(speakers)} speakers of known gender ({counts['m']} m, "
                         f"{counts['f']} f), {opt.updates_per_speaker} updates each (each on a random "
                         f"{opt.subset_share:.0%} of the speaker's utterances) from the run's final global model; "
                         "features: the first layer's update, its per-input-row (mel band) sums and magnitudes, and "
                         "per-array statistics, centred per corpus on the shadow updates' mean; logistic "
                         "regression (balanced classes); "
                         "grouped cross-validation so no speaker is shadow and target at once; soft vote per client. "
                         f"The attack on sums sees what secure aggregation shows: {SUM_ROUNDS_PER_SPEAKER} rounds "
                         "per speaker, each the sum over a random half of the speakers (each sending its updates "
                         "in turn, from the same final model: the attacker's best case), disaggregated by least "
                         "squares over the known cohorts into one update per speaker, then the same classifier. "
                         "Membership from updates scores each of the speaker's utterances by the cosine between "
                         "the update and the utterance's negative loss gradient at the global model; members are "
                         "the utterances the update trained on, non-members the speaker's others. "
                         "Epsilons are for a device with the median speaker's data."
                         + (f" The chance column of the client UAR rows is the 95th percentile of the attack's UAR "
                            f"over {opt.chance_permutations} runs with the speakers' genders shuffled: with few "
                            "speakers, luck alone spreads the UAR widely around 0.5."
                            if opt.chance_permutations else ""))
    else:
        res.notes.append("Attribute inference skipped: no --data with speakers of known gender.")

    # --- membership inference on the final global model ------------------------------------------
    members = list(opt.members) or info.member_manifests
    non_members = list(opt.non_members) or ([info.test_manifest] if info.test_manifest else [])
    model = bundle.build_model()
    done_any = False
    for task in bundle.tasks or ["emotion", "kws"]:
        m_data = _manifest_data(members, spec, task, cache)
        n_data = _manifest_data(non_members, spec, task, cache)
        if m_data is None or n_data is None or len(m_data) < 2 or len(n_data) < 2:
            continue
        rocs = membership_audit(model, mc, spec, m_data, n_data, reference_models=opt.reference_models,
                                seed=opt.seed, progress=opt.progress, federation=protocol, init=info.initial)
        for name, roc in rocs.items():
            level, attack = name.split("/")
            what = "loss threshold" if attack == "loss" else "difficulty-calibrated confidence"
            band = auc_chance_band(roc.n_pos, roc.n_neg, seed=opt.seed)
            keys = {"attack_key": "membership", "setting_key": SETTING_KEYS[protocol.setting]}
            res.rows.append(Row(f"membership ({level} level, {task}), {what}", protocol.setting + " (run)",
                                f"ROC AUC ({roc.n_pos} members / {roc.n_neg} non-members)", roc.auc, band,
                                metric_key="auc", luck_band=band, **keys))
            res.rows.append(Row(f"membership ({level} level, {task}), {what}", protocol.setting + " (run)",
                                "TPR at 1% FPR", roc.tpr_at_low_fpr, 0.01, metric_key="tpr-at-1%-fpr", **keys))
        res.images.append(str(roc_png([(k, v) for k, v in rocs.items()], out / f"roc_membership_{task}.png",
                                      f"membership inference on the final model ({task})")))
        done_any = True
    if done_any:
        res.notes.append("Membership: members are the utterances of the run's device manifests (a device holds a "
                         "share back for evaluation, so a few 'members' were never trained on: AUC is a slight "
                         "underestimate); non-members are the held-out speakers' utterances, so sample-level "
                         "non-members are also unseen speakers. Reference models for calibration: "
                         f"{opt.reference_models} federations of the run's protocol without DP, one device per "
                         "speaker of a random half of the candidates, each started from "
                         + ("the run's own starting model (initial_model.npz: after the server's public "
                            "pretraining, if it had any)" if info.initial is not None else
                            "a random model (the run directory records no initial_model.npz)")
                         + ". The chance "
                         "column of a membership AUC is the 95th percentile of the AUC of a score without signal "
                         "on as many members and non-members (1000 random labellings): with few speakers, luck "
                         "alone reaches well above 0.5.")
    else:
        res.notes.append("Membership inference skipped: the run directory has no device manifests and held-out "
                         "test manifest (pass --members and --non-members).")

    # --- ledgers ----------------------------------------------------------------------------------
    delta = float(info.settings.get("user_delta", 1e-5))
    recomputed = []
    for ledger in info.ledgers:
        c = check_ledger(ledger, delta)
        res.checks.append(("device ledger", c))
        recomputed.append(c.values["epsilon_rdp"])
    reported = [r.get("max-device-epsilon") for r in info.metrics.get("rounds", [])
                if isinstance(r.get("max-device-epsilon"), (int, float))]
    if recomputed and reported:
        top, rep = max(recomputed), max(reported)
        ok = math.isclose(top, rep, rel_tol=1e-3, abs_tol=1e-6)
        res.checks.append(("run", CheckResult("ledger epsilon = reported", ok,
                                              f"largest recomputed device epsilon {top:.4f}; largest epsilon devices "
                                              f"reported to the server {rep:.4f}", {"recomputed": top, "reported": rep})))

    # --- report -----------------------------------------------------------------------------------
    user = ((bundle.meta or {}).get("privacy") or {}).get("user_level") or {}
    run_line = (f"Run `{info.run_dir}`: {bundle.meta.get('rounds', '?')} rounds, encoder {mc.encoder}; "
                f"user-level epsilon of the run (server accountant): {user.get('epsilon', 'n/a')} "
                f"at delta {user.get('delta', delta)}.")
    text = render("fedser privacy audit", run_line, res.rows, res.checks, res.epsilons, res.images, res.notes)
    res.report = out / REPORT_FILE
    res.report.write_text(text)
    (out / JSON_FILE).write_text(json.dumps(json_rows(res.rows, SETTING_KEYS[default_setting()]), indent=2) + "\n")
    return res


def default_setting() -> str:
    """Which of ``SETTINGS`` fedser's default run settings give (DP-SGD on devices, user-level noise)."""
    from fedser.server.settings import RunSettings

    defaults = dataclasses.asdict(RunSettings(run_dir="-"))
    return Protocol.from_run(defaults, {}).setting
