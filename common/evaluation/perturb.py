"""Seeded perturbations of a record's input text, for robustness: each is a function of the text
and a ``random.Random``; the report lists each one with its rate and seed.

- ``typos``: in a share of the words longer than three letters, two neighbouring letters swap;
- ``case``: a share of the words change case (upper, lower or title);
- ``whitespace``: a share of the spaces become two spaces, a tab or a newline;
- ``word_drop``: a share of the words are dropped (never all of them).
"""

from __future__ import annotations

import random
from collections.abc import Callable

RATE = 0.1


def typos(text: str, rng: random.Random, rate: float = RATE) -> str:
    words = text.split(" ")
    for i, w in enumerate(words):
        if len(w) > 3 and w.isalpha() and rng.random() < rate:
            j = rng.randrange(len(w) - 1)
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


def case(text: str, rng: random.Random, rate: float = RATE) -> str:
    words = text.split(" ")
    for i, w in enumerate(words):
        if w and rng.random() < rate:
            words[i] = rng.choice((w.upper(), w.lower(), w.title()))
    return " ".join(words)


def whitespace(text: str, rng: random.Random, rate: float = RATE) -> str:
    words = text.split(" ")
    out = [words[0]]
    for w in words[1:]:
        out.append(rng.choice(("  ", "\t", "\n")) if rng.random() < rate else " ")
        out.append(w)
    return "".join(out)


def word_drop(text: str, rng: random.Random, rate: float = RATE) -> str:
    words = text.split(" ")
    kept = [w for w in words if rng.random() >= rate]
    return " ".join(kept) if kept else words[0]


PERTURBATIONS: dict[str, Callable[[str, random.Random, float], str]] = {
    "typos": typos,
    "case": case,
    "whitespace": whitespace,
    "word_drop": word_drop,
}


def perturb_texts(texts: list[str], name: str, seed: int, rate: float = RATE) -> list[str]:
    """Every text perturbed by ``name``, from one generator seeded with ``seed``."""
    rng = random.Random(f"{name}:{seed}")
    fn = PERTURBATIONS[name]
    return [fn(t, rng, rate) for t in texts]
