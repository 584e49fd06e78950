"""Empirical privacy auditing: how much an attacker learns from a model, against what it claims.

Three measures, all from attack scores (higher = "more likely a member"):

- **Membership inference** (members against held-out non-members): ROC AUC (the Mann-Whitney
  statistic, ties counted half) and the true-positive rate at a 1% false-positive rate.
- **Canary exposure** (Carlini et al. 2019, "The Secret Sharer"): a canary's secret is ranked
  among candidate secrets by the model's likelihood; exposure = log2(candidates) - log2(rank).
  A secret the model never saw sits near the middle (exposure about 1 bit); a memorized one
  ranks first (log2 of the candidate count).
- **A lower bound on epsilon** from one training run (Steinke, Nasr, Jagielski 2023, "Privacy
  Auditing with One (1) Training Run", Theorem 3 with its delta term): m canaries are each
  included with probability 1/2, independently; the auditor guesses "in" for the k+ highest
  scores and "out" for the k- lowest. Under (epsilon, delta)-DP of each canary, the number of
  correct guesses is at most Binomial(r, e^eps / (1 + e^eps)) in tail (plus a delta term), so a
  count that tail makes unlikely (p < beta) refutes epsilon. The bound is the largest refuted
  epsilon, at confidence 1 - beta. The guess counts tried are fixed in advance and the p-value
  is Bonferroni-corrected over them, so picking the best one does not inflate the bound.

A lower bound that exceeds the epsilon a model claims means the claim is false (a bug, or noise
that was not added): publishing with such an audit is refused (server/publishing/publish.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

Scores = Sequence[float] | np.ndarray
# Guess counts tried on each side, as shares of the canaries; fixed before looking at scores.
GUESS_SHARES = (0.02, 0.05, 0.1, 0.2, 0.3)


def auc(member_scores: Scores, nonmember_scores: Scores) -> float:
    """P(score of a random member > score of a random non-member), ties counted half."""
    a, b = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    if not len(a) or not len(b):
        raise ValueError("AUC needs members and non-members")
    ranks = stats.rankdata(np.concatenate([a, b]))  # average ranks: ties count half
    u = ranks[: len(a)].sum() - len(a) * (len(a) + 1) / 2
    return float(u / (len(a) * len(b)))


def tpr_at_fpr(member_scores: Scores, nonmember_scores: Scores, fpr: float = 0.01) -> float:
    """Share of members scored strictly above a threshold that at most ``fpr`` of the
    non-members pass (the threshold is the non-members' (1 - fpr) quantile, taken high)."""
    a, b = np.asarray(member_scores, float), np.sort(np.asarray(nonmember_scores, float))
    allowed = math.floor(fpr * len(b))  # non-members allowed above the threshold
    threshold = b[len(b) - allowed - 1] if allowed < len(b) else -math.inf
    return float((a > threshold).mean())


def exposure(true_score: float, candidate_scores: Scores) -> float:
    """Exposure of a secret among ``candidate_scores`` (the others; higher = more likely):
    log2(n) - log2(rank), n counting the secret itself, ties ranked against it."""
    others = np.asarray(candidate_scores, float)
    rank = 1 + int((others >= true_score).sum())
    return math.log2(len(others) + 1) - math.log2(rank)


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P(at least v of r guesses correct) for m canaries under (eps, delta)-DP: Theorem 3 of
    Steinke, Nasr, Jagielski (2023): the binomial tail plus its delta term."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1.0 / (1.0 + math.exp(-eps))  # accuracy of eps-DP randomized response
    tail = float(stats.binom.sf(v - 1, r, q))
    alpha, running = 0.0, 0.0
    for i in range(1, v + 1):  # alpha = max_i P[v > Bin(r, q) >= v - i] / i
        running += float(stats.binom.pmf(v - i, r, q))
        alpha = max(alpha, running / i)
    return min(1.0, tail + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float) -> float:
    """The largest epsilon that ``v`` correct of ``r`` guesses refutes at p < beta; 0 if none."""
    if r == 0 or p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, hi * 2
        if hi > 1e3:  # refuted past any epsilon worth naming
            return lo
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < beta else (lo, mid)
    return lo


@dataclass(frozen=True)
class OneRunAudit:
    canaries: int
    included: int
    guesses: int  # r: the k+ "in" and k- "out" guesses of the best guess count
    correct: int  # v
    epsilon_lower_bound: float
    delta: float
    confidence: float
    guess_counts_tried: list[int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def one_run_audit(
    scores: Scores,
    included: Sequence[bool] | np.ndarray,
    delta: float,
    beta: float = 0.05,
    shares: Sequence[float] = GUESS_SHARES,
) -> OneRunAudit:
    """Steinke-Nasr-Jagielski audit of canaries scored by an attack (higher = "in").

    For each guess count k in ``shares`` of m: guess "in" for the k highest scores and "out"
    for the k lowest. Each count is tested at beta / (number of counts) (Bonferroni); the
    reported bound is the largest, with its r and v.
    """
    s, inc = np.asarray(scores, float), np.asarray(included, bool)
    m = len(s)
    if m != len(inc) or m < 2:
        raise ValueError("the audit needs at least two canaries, each with a score")
    order = np.argsort(s, kind="stable")
    counts = sorted({max(1, round(share * m)) for share in shares if round(share * m) * 2 <= m})
    counts = counts or [1]
    per_test = beta / len(counts)
    best = (0.0, 0, 0)
    for k in counts:
        top, bottom = order[-k:], order[:k]
        v = int(inc[top].sum() + (~inc[bottom]).sum())
        bound = epsilon_lower_bound(m, 2 * k, v, delta, per_test)
        if bound > best[0] or best[1] == 0:
            best = (bound, 2 * k, v)
    return OneRunAudit(
        canaries=m,
        included=int(inc.sum()),
        guesses=best[1],
        correct=best[2],
        epsilon_lower_bound=best[0],
        delta=delta,
        confidence=1 - beta,
        guess_counts_tried=counts,
    )


def membership(member_scores: Scores, nonmember_scores: Scores) -> dict[str, float]:
    """The attack's AUC and TPR at 1% FPR, with the counts they rest on."""
    return {
        "auc": auc(member_scores, nonmember_scores),
        "tpr_at_1pct_fpr": tpr_at_fpr(member_scores, nonmember_scores, 0.01),
        "members": len(member_scores),
        "nonmembers": len(nonmember_scores),
    }


def claimed_epsilon(privacy: dict[str, Any] | None) -> dict[str, Any] | None:
    """The record-level (epsilon, delta) a run's privacy summary claims for one record of any
    site, or None without DP: the weakest site's record-level figure, or the institution-level
    one for holders of the published model when that is smaller (changing one record changes
    one institution's data, so the institution-level guarantee covers a record too)."""
    if not privacy:
        return None
    claims: list[dict[str, Any]] = []
    record = privacy.get("record_epsilon") or {}
    if record:
        site = max(record, key=lambda s: record[s])
        delta = (privacy.get("record_delta") or {}).get(site)
        claims.append(
            {
                "epsilon": float(record[site]),
                "delta": float(delta or 0.0),
                "from": f"record level, {site} (the largest of {len(record)} sites)",
            }
        )
    if privacy.get("institution_epsilon") is not None:
        claims.append(
            {
                "epsilon": float(privacy["institution_epsilon"]),
                "delta": float(privacy.get("institution_delta") or 0.0),
                "from": "institution level, for holders of the published model",
            }
        )
    return min(claims, key=lambda c: c["epsilon"]) if claims else None
