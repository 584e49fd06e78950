"""Recipes: named, coherent groups of settings (`recipe = "dp"`) a config asks for in one line.

A recipe is applied to the raw tree, before validation. Each of its groups is filled in only
when the config (file and ``--set``) sets none of that group's fields: a group the user touched
is the user's, whole, because half a group is incoherent (SGD's rate of 1.0 with AdamW, a server
step meant for FedAdam under FedAvg). Settings that stand alone are groups of one. The resolved
config then holds every value explicitly, so a config survives dump -> load unchanged, and a run
folder's `config.toml` says what ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Tree = dict[str, Any]


@dataclass(frozen=True)
class Group:
    name: str
    why: str
    values: dict[str, Any]  # dotted field -> value
    methods: tuple[str, ...] = ()  # the `lora.method`s it applies to (empty: every one)


# The DP fine-tuning literature's recipe (Li et al. 2022, "Large language models can be strong
# differentially private learners"; Yu et al. 2022; FFA-LoRA, Sun et al. 2024), made federated with
# FedAdam (Reddi et al. 2021). Measured on bank-complaints (README, bench/utility.py).
DP = (
    Group(
        "local optimizer",
        "plain SGD at a constant rate at the sites; the adaptivity is the coordinator's",
        {"train.optimizer": "sgd", "train.lr": 1.0, "train.schedule": "constant"},
    ),
    Group(
        "local steps",
        "one step per site and round: with one local step the sites' skewed label mixes cannot "
        "pull the model apart between averages (no client drift), and the average is a gradient "
        "of all the sites' records",
        {"train.local_steps": 1},
    ),
    Group(
        "batch",
        "a large Poisson batch: DP-SGD's noise is divided by the batch while every step costs "
        "epsilon (for sites of about 1,000 records; larger sites can take more)",
        {"train.batch_size": 256},
    ),
    Group(
        "server optimizer",
        "Adam at the coordinator on the noised average, its step decayed linearly over the rounds: "
        "its momentum averages the noise over rounds and the decay keeps the last rounds' noise "
        "from undoing the first rounds' learning (post-processing: no privacy cost)",
        {
            "federation.server_optimizer": "fedadam",
            "federation.server_lr": 0.12,
            "federation.server_schedule": "linear",
        },
    ),
    Group(
        "adapter rank",
        "rank-2 FFA-LoRA: the noise's norm grows with the square root of the trained parameters",
        {"lora.r": 2},
    ),
    Group(
        "adapted layers",
        "the top layer only: fewer trained parameters, and backward passes stop there",
        {"lora.layers": [-1]},
        methods=("lora", "dora", "partial"),  # IA3 and prompt tuning take no layers, `head` none
    ),
    Group(
        "frozen-layer cache",
        "the frozen layers below the adapted ones run once per record, not at every step: "
        "the steps cost only the trained layers, so larger batches and more rounds fit the "
        "same time (the frozen layers then run without dropout)",
        {"train.cache_frozen": True},
    ),
)

RECIPES: dict[str, tuple[Group, ...]] = {"none": (), "dp": DP}


def _has(tree: Tree, dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _put(tree: Tree, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def apply_recipe(tree: Tree) -> tuple[list[str], list[str]]:
    """Fill in the groups of ``tree["recipe"]`` that the tree leaves wholly unset (in place).

    Returns the names of the groups applied and of those left to the user's own values. An
    unknown recipe is left for validation to report, naming the field.
    """
    groups = RECIPES.get(str(tree.get("recipe", "none")), ())
    applied, kept = [], []
    lora = tree.get("lora")
    method = lora.get("method", "lora") if isinstance(lora, dict) else "lora"
    for group in groups:
        if group.methods and method not in group.methods:
            continue
        if any(_has(tree, key) for key in group.values):
            kept.append(group.name)
            continue
        for key, value in group.values.items():
            _put(tree, key, list(value) if isinstance(value, list) else value)
        applied.append(group.name)
    return applied, kept
