"""The attacks, as pure computation over feature vectors and per-example losses.

* :func:`attribute_inference`: an honest-but-curious server learns gender from updates. Shadow
  clients (known gender) train a classifier on features of their updates; the classifier
  predicts each target client's gender from that client's updates (soft vote over its updates).
  Clients are split by speaker (grouped, stratified cross-validation), so every client is a
  target once and never a shadow in the same fold. Updates are first centred on the mean shadow
  update of their population (corpus): language and recording conditions move every update of a
  corpus the same way, and with few clients per fold that shared offset would otherwise be learnt
  in place of the attribute.
  Metric: UAR over target clients (chance 0.5).
* :func:`loss_attack` / :func:`calibrated_attack`: membership inference on a model. The loss
  attack scores an example by its negative loss; the calibrated attack (difficulty calibration,
  Watson et al., ICLR 2022, on LiRA's logit-scaled confidence, Carlini et al., S&P 2022)
  subtracts the confidence the example has under reference models that did not train on it, so
  an example that is merely easy no longer looks like a member. Logit scaling matters: a loss
  saturates at 0 for every well-fitted example, member or not, while the log-odds keep growing
  the more a model has memorised an example.
* :func:`speaker_scores`: speaker-level membership, the mean score of a speaker's utterances.
* :func:`observed_sums` / :func:`disaggregate`: what a server sees under secure aggregation (one
  sum per round over a cohort it chose) and how it undoes the sum: with random cohorts and more
  rounds than devices, least squares over the known cohorts estimates each device's update,
  which the attribute attack then reads (gradient disaggregation, Lam et al., ICML 2021;
  client-specific property inference against secure aggregation, Kerkouche et al., 2023). Noise
  in the sums is what defeats it.
* :func:`gradient_alignment`: membership from one update (the curious server's view): an
  update is the sum of the steps a device took down its own examples' loss gradients, so it
  points along the negative gradient of an example it trained on more than along that of one it
  did not (white-box attack on updates, Nasr et al., S&P 2019).
* :func:`chance_band`: the UAR an attribute attack reaches by luck (shuffled labels);
  :func:`chance_uars`: each shuffled run's UAR; :func:`luck_band`: the band of such runs.
* :func:`auc_chance_band`: the ROC AUC any score reaches by luck on the same labels.
* :func:`roc_summary`: ROC AUC and TPR at 1 % FPR (chance: 0.5 and 0.01).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .inputs import AuditInputError

LOW_FPR = 0.01


@dataclass
class RocSummary:
    auc: float
    tpr_at_low_fpr: float          # TPR at FPR <= LOW_FPR
    fpr: np.ndarray = field(repr=False)
    tpr: np.ndarray = field(repr=False)
    n_pos: int = 0
    n_neg: int = 0


def roc_summary(labels: Sequence[int], scores: Sequence[float]) -> RocSummary:
    """ROC of ``scores`` for ``labels`` (1 = member / positive class)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise AuditInputError(f"labels {y.shape} and scores {s.shape} must be 1-d of one length")
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        raise AuditInputError(f"a ROC needs both classes; got {n_pos} positive and {n_neg} negative examples")
    fpr, tpr, _ = roc_curve(y, s)
    low = tpr[fpr <= LOW_FPR]
    return RocSummary(float(roc_auc_score(y, s)), float(low.max()) if low.size else 0.0, fpr, tpr, n_pos, n_neg)


# ----------------------------------------------------------------------------- attribute inference


@dataclass
class AttributeResult:
    uar: float                     # UAR over target clients (soft vote over each client's updates)
    uar_per_update: float          # UAR over single updates
    auc: float                     # ROC AUC of the client-level score
    n_clients: int
    n_updates: int
    client_prob: dict[str, float]  # client -> P(positive class) from the folds it was a target in
    client_label: dict[str, int]
    roc: RocSummary | None = None
    chance_uar: float | None = None  # 95th percentile of the UAR with shuffled labels (chance_band)
    chance_uars: list[float] | None = None  # each shuffled run's UAR (chance_uars)
    from_sums: "AttributeResult | None" = None  # the same attack on updates estimated from per-round sums


def _centred(rows: np.ndarray, populations: np.ndarray, means: dict) -> np.ndarray:
    """A copy of ``rows`` with each population's mean (``means[name]``) subtracted from its rows."""
    out = rows.copy()
    for name, mean in means.items():
        out[populations == name] -= mean
    return out


def attribute_inference(features: np.ndarray, labels: Sequence[int], clients: Sequence[str], *,
                        populations: Sequence[str] | None = None, n_splits: int = 5, seed: int = 0,
                        C: float = 0.05, targets: np.ndarray | None = None,
                        target_clients: Sequence[str] | None = None) -> AttributeResult:
    """Cross-validated attribute inference from updates.

    Args:
        features: (n_updates, d) attack features (``protocol.update_features``).
        labels: the attribute of each update's client (0/1).
        clients: the client (speaker) each update came from; folds never split a client.
        populations: the population (corpus) of each update's client; each population's updates
            are centred on their own mean before the classifier sees them (None: one population).
        n_splits: folds (lowered to the number of clients of the rarer class).
        C: inverse L2 strength of the logistic regression (strong regularisation: few shadow
            clients, many features).
        targets, target_clients: other views of the clients to score in place of their rows of
            ``features`` (e.g. updates estimated from sums, ``disaggregate``): each fold still trains
            on the shadow clients' ``features``, which an attacker that simulates its shadow devices
            has, and scores the fold's target clients' ``targets`` rows.

    Raises AuditInputError when a client carries both labels or a class has fewer than 2 clients.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    g = np.asarray(clients)
    if X.ndim != 2 or X.shape[0] != y.shape[0] or y.shape[0] != g.shape[0]:
        raise AuditInputError(f"features {X.shape}, labels {y.shape} and clients {g.shape} do not match")
    client_label: dict[str, int] = {}
    for c, lab in zip(g.tolist(), y.tolist()):
        if client_label.setdefault(c, lab) != lab:
            raise AuditInputError(f"client {c!r} has updates with both attribute values")
    per_class = [sum(1 for v in client_label.values() if v == k) for k in (0, 1)]
    if min(per_class) < 2:
        raise AuditInputError(f"attribute inference needs at least 2 clients of each class (shadow and target); "
                              f"got {per_class[0]} and {per_class[1]}: give more speakers of known gender")
    k = max(2, min(n_splits, min(per_class)))
    prob = np.full(len(y), np.nan)
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    X = np.nan_to_num(X, nan=0.0, posinf=0.0, neginf=0.0)
    pop = np.zeros(len(y), dtype=int) if populations is None else np.asarray(populations)
    if pop.shape != y.shape:
        raise AuditInputError(f"populations {pop.shape} do not match {y.shape[0]} updates")
    if targets is not None:
        T = np.nan_to_num(np.asarray(targets, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        tg = np.asarray(target_clients)
        if T.ndim != 2 or T.shape[1] != X.shape[1] or tg.shape != (T.shape[0],) or not set(tg) <= set(client_label):
            raise AuditInputError(f"targets {T.shape} of clients {tg.shape} do not match features {X.shape}")
        of_client = dict(zip(g.tolist(), pop.tolist()))
        tpop = np.array([of_client[c] for c in tg.tolist()])
        tprob = np.full(T.shape[0], np.nan)
    for train, test in cv.split(X, y, g):
        if len(set(y[train].tolist())) < 2:
            continue
        # Centre on the shadow updates of each population only: a mean over all updates would carry
        # the target fold's class balance into every score (in high dimensions, a large bias).
        shadow_means = {name: X[train[pop[train] == name]].mean(axis=0) for name in np.unique(pop[train])}
        Xc = _centred(X, pop, shadow_means)
        # Balanced classes: otherwise a fold's class imbalance tilts the prediction against the
        # target's own class.
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000, class_weight="balanced"))
        clf.fit(Xc[train], y[train])
        prob[test] = clf.predict_proba(Xc[test])[:, 1]
        if targets is not None:
            rows = np.flatnonzero(np.isin(tg, g[test]))
            tprob[rows] = clf.predict_proba(_centred(T[rows], tpop[rows], shadow_means))[:, 1]
    if targets is not None:   # the targets' own rows are what is scored
        prob, g, y = tprob, tg, np.array([client_label[c] for c in tg.tolist()])
    done = ~np.isnan(prob)
    client_prob = {c: float(np.mean(prob[(g == c) & done])) for c in client_label if ((g == c) & done).any()}
    names = sorted(client_prob)
    yc = np.array([client_label[c] for c in names])
    pc = np.array([client_prob[c] for c in names])
    uar = float(balanced_accuracy_score(yc, (pc > 0.5).astype(int)))
    uar_u = float(balanced_accuracy_score(y[done], (prob[done] > 0.5).astype(int)))
    roc = roc_summary(yc, pc) if len(set(yc.tolist())) == 2 else None
    return AttributeResult(uar, uar_u, roc.auc if roc else float("nan"), len(names), int(done.sum()),
                           client_prob, client_label, roc)


LUCK_QUANTILE = 0.95   # a figure means something only above this quantile of what luck gives


def luck_band(uars: Sequence[float] | np.ndarray, quantile: float = LUCK_QUANTILE) -> float:
    """The band of shuffled-label UARs (``chance_uars``, or the mean of several audits' runs)."""
    return float(np.quantile(uars, quantile))


def chance_band(features: np.ndarray, labels: Sequence[int], clients: Sequence[str], *,
                populations: Sequence[str] | None = None, permutations: int = 20, seed: int = 0,
                quantile: float = LUCK_QUANTILE) -> float:
    """The UAR the attack reaches by luck: its ``quantile`` over ``permutations`` runs with the
    clients' labels shuffled (whole clients keep one label; class counts are kept).

    With a few dozen target clients the UAR of an attack that learns nothing spreads widely around
    0.5; a measured UAR means something only above this band.
    """
    return luck_band(chance_uars(features, labels, clients, populations=populations,
                                 permutations=permutations, seed=seed), quantile)


def chance_uars(features: np.ndarray, labels: Sequence[int], clients: Sequence[str], *,
                populations: Sequence[str] | None = None, permutations: int = 20, seed: int = 0) -> list[float]:
    """The attack's UAR in each of ``permutations`` runs with the clients' labels shuffled (the
    values :func:`chance_band` takes its quantile of; the i-th of several audits' lists can be
    averaged into the band of their mean)."""
    if permutations < 1:
        raise AuditInputError(f"permutations must be >= 1; got {permutations}")
    g = np.asarray(clients)
    y = np.asarray(labels, dtype=int)
    names = sorted(set(g.tolist()))
    client_label = {c: int(y[g == c][0]) for c in names}
    rng = np.random.default_rng(seed)
    uars = []
    for i in range(permutations):
        shuffled = dict(zip(names, rng.permutation([client_label[c] for c in names]).tolist()))
        uars.append(attribute_inference(features, [shuffled[c] for c in g.tolist()], g, populations=populations,
                                        seed=seed + i + 1).uar)
    return uars


def auc_chance_band(n_pos: int, n_neg: int, *, permutations: int = 1000, seed: int = 0,
                    quantile: float = 0.95) -> float:
    """The ROC AUC a score with no signal reaches by luck on ``n_pos`` positives and ``n_neg``
    negatives: its ``quantile`` over ``permutations`` random labellings of distinct scores.

    With 18 member and 8 non-member speakers an AUC of 0.7 happens by chance about one time in
    twenty; with a thousand utterances the band hugs 0.5.
    """
    if permutations < 1:
        raise AuditInputError(f"permutations must be >= 1; got {permutations}")
    if n_pos < 1 or n_neg < 1:
        raise AuditInputError(f"a ROC needs both classes; got {n_pos} positive and {n_neg} negative examples")
    rng = np.random.default_rng(seed)
    n = n_pos + n_neg
    # With distinct scores the AUC is the Mann-Whitney statistic of the positives' ranks: a random
    # labelling is a random set of n_pos ranks out of 1..n.
    rank_sums = np.concatenate([
        rng.permuted(np.tile(np.arange(1, n + 1), (k, 1)), axis=1)[:, :n_pos].sum(axis=1)
        for k in np.diff(np.r_[0:permutations:100, permutations])])
    aucs = (rank_sums - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return float(np.quantile(aucs, quantile))


# ----------------------------------------------------------------------------- membership inference


def loss_attack(losses: Sequence[float]) -> np.ndarray:
    """Membership score of the loss-threshold attack (Yeom et al., 2018): higher = more likely a member."""
    return -np.asarray(losses, dtype=np.float64)


def calibrated_attack(confidences: Sequence[float], ref_confidences: np.ndarray,
                      ref_trained_on: np.ndarray) -> np.ndarray:
    """Difficulty-calibrated score: the target's confidence minus its mean under OUT reference models.

    ``confidences`` (N,) and ``ref_confidences`` (K, N) are per-example statistics that grow with
    fit, the logit-scaled confidence of ``protocol.example_confidences`` (a negated loss works too);
    ``ref_trained_on`` (K, N) says which reference model trained on which example. An example with
    no OUT reference model falls back on the mean over all K.
    """
    conf = np.asarray(confidences, dtype=np.float64)
    ref = np.asarray(ref_confidences, dtype=np.float64)
    inside = np.asarray(ref_trained_on, dtype=bool)
    if ref.ndim != 2 or ref.shape != inside.shape or ref.shape[1] != conf.shape[0]:
        raise AuditInputError(f"reference scores {ref.shape} / masks {inside.shape} do not fit {conf.shape[0]} examples")
    out = ~inside
    n_out = out.sum(axis=0)
    mean_out = np.where(n_out > 0, (ref * out).sum(axis=0) / np.maximum(n_out, 1), ref.mean(axis=0))
    return conf - mean_out


def gradient_alignment(update: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """Membership scores of examples for one update: the cosine between the update (flattened,
    shape (P,)) and each example's negative loss gradient at the model the update started from
    (rows of ``gradients``, shape (N, P)). Higher = more likely the update trained on the example.
    """
    u = np.asarray(update, dtype=np.float64).ravel()
    g = np.asarray(gradients, dtype=np.float64)
    if g.ndim != 2 or g.shape[1] != u.shape[0]:
        raise AuditInputError(f"gradients {g.shape} do not fit an update of {u.shape[0]} values")
    norms = np.linalg.norm(g, axis=1) * np.linalg.norm(u)
    return -(g @ u) / np.where(norms > 0, norms, 1.0)


def observed_sums(updates: Sequence[Sequence[np.ndarray]], rounds: int, cohort_share: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-round sums a server sees under secure aggregation: ``rounds`` rounds, each over a random
    cohort of ``cohort_share`` of the devices; device i sends its updates ``updates[i]`` in turn
    (vectors of one length), as a device sends a fresh update each round it is drawn.
    -> (cohorts (rounds, devices) of 0/1, sums (rounds, P))."""
    n = len(updates)
    m = min(n, max(1, int(round(cohort_share * n))))
    if n < 2 or rounds < 1 or any(len(u) == 0 for u in updates):
        raise AuditInputError(f"sums need >= 2 devices with updates and >= 1 round; got {n} devices, {rounds} rounds")
    cohorts = np.zeros((rounds, n))
    sums = np.zeros((rounds, np.asarray(updates[0][0]).size))
    used = [0] * n
    for r in range(rounds):
        for i in rng.choice(n, size=m, replace=False).tolist():
            cohorts[r, i] = 1.0
            sums[r] += np.ravel(updates[i][used[i] % len(updates[i])])
            used[i] += 1
    return cohorts, sums


def disaggregate(cohorts: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """Least-squares estimate of each device's update (rows, shape (devices, P)) from per-round
    ``sums`` over known ``cohorts`` (0/1, shape (rounds, devices)): exact when the cohorts have
    full column rank and each device's update is the same in every round it joined."""
    a, b = np.asarray(cohorts, dtype=np.float64), np.asarray(sums, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise AuditInputError(f"cohorts {a.shape} and sums {b.shape} do not describe the same rounds")
    return np.linalg.lstsq(a, b, rcond=None)[0]


def speaker_scores(scores: Sequence[float], speakers: Sequence[str]) -> dict[str, float]:
    """Speaker-level membership score: the mean of the speaker's utterance scores."""
    s = np.asarray(scores, dtype=np.float64)
    out: dict[str, list[float]] = {}
    for v, spk in zip(s.tolist(), speakers):
        out.setdefault(spk, []).append(v)
    return {k: float(np.mean(v)) for k, v in out.items()}
