"""From records to tensors, and evaluation, for causal LMs and sequence classifiers.

Causal LM: the prompt is rendered with the tokenizer's chat template; the loss covers the answer
tokens (and the end-of-turn token) only. Classification data on a causal LM becomes a prompt (from
``data.prompt``) whose answer is the label; accuracy picks the label the model scores highest.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common.core.batches import IGNORE, Encoded, collate
from common.core.config import Config
from common.core.errors import DataError
from common.core.frozen import skipping, with_cache
from common.core.records import Record

logger = logging.getLogger(__name__)


def prepare_prompt(record: Record, cfg: Config) -> list[dict[str, str]]:
    """Classification records on a causal LM get the instruction template around their text."""
    if record.label is None or cfg.model.task == "seq-cls":
        return record.messages
    options = ", ".join(cfg.data.labels)
    text = record.messages[-1]["content"]
    content = cfg.data.prompt_template.format(text=text, options=options)
    return [*record.messages[:-1], {"role": "user", "content": content}]


def _render(tok: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    if tok.chat_template:
        out: Any = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(out, "keys"):  # some tokenizers return a BatchEncoding
            out = out["input_ids"]
        return [int(i) for i in out]
    text = "\n".join(m["content"] for m in messages) + "\n"
    return list(tok(text, add_special_tokens=False)["input_ids"])


def prompt_ids(
    tok: PreTrainedTokenizerBase, messages: list[dict[str, str]], budget: int
) -> list[int]:
    """Render the prompt within ``budget`` tokens by shortening its longest message."""
    ids = _render(tok, messages)
    if len(ids) <= budget:
        return ids
    longest = max(range(len(messages)), key=lambda i: len(messages[i]["content"]))
    content_ids = tok(messages[longest]["content"], add_special_tokens=False)["input_ids"]
    keep = max(1, len(content_ids) - (len(ids) - budget) - 2)
    cut = str(tok.decode(content_ids[:keep]))
    shorter = [dict(m) for m in messages]
    shorter[longest]["content"] = cut
    return _render(tok, shorter)[-budget:]


def answer_ids(tok: PreTrainedTokenizerBase, answer: str) -> list[int]:
    ids = list(tok(answer, add_special_tokens=False)["input_ids"])
    if tok.eos_token_id is not None:
        ids.append(int(tok.eos_token_id))
    return ids


def encode(records: list[Record], tok: PreTrainedTokenizerBase, cfg: Config) -> list[Encoded]:
    max_len = cfg.model.max_length
    out: list[Encoded] = []
    if cfg.model.task == "seq-cls":
        index = {label: i for i, label in enumerate(cfg.data.labels)}
        for r in records:
            if r.label is None:
                raise DataError(f"{r.where}: `label` is required for a sequence classifier")
            text = "\n".join(m["content"] for m in r.messages)
            ids = tok(text, truncation=True, max_length=max_len)["input_ids"]
            out.append(Encoded(list(ids), index[r.label]))
        return out
    for r in records:
        ans = answer_ids(tok, r.answer)[: max_len // 2]
        prompt = prompt_ids(tok, prepare_prompt(r, cfg), max_len - len(ans))
        out.append(Encoded(prompt + ans, [IGNORE] * len(prompt) + ans))
    return out


def input_logits(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """A causal LM's logits at the input's own positions: prompt tuning (`lora.method` =
    "prompt") puts its virtual tokens in front, and their logits predict nothing of ours."""
    if logits.dim() == 3 and logits.size(1) > input_ids.size(1):
        return logits[:, -input_ids.size(1) :]
    return logits


def _forward(model: nn.Module, batch: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
    """Logits of the last ``keep`` positions only (0 = all): the answer sits at the end."""
    kwargs = {k: v for k, v in batch.items() if k != "labels"}
    if keep:
        try:
            return model(**kwargs, logits_to_keep=keep).logits
        except TypeError:  # architectures without `logits_to_keep`
            pass
    return input_logits(model(**kwargs).logits, batch["input_ids"])


def answer_span(labels: torch.Tensor) -> int:
    """Positions needed to score every target: from one before the first target to the end."""
    has = (labels != IGNORE).any(0).nonzero()
    return int(labels.size(1) - has.min()) + 1 if len(has) else 1


def causal_logits(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits predicting each kept target, the targets): shapes (B, K-1, V) and (B, K-1)."""
    keep = min(answer_span(batch["labels"]), batch["labels"].size(1))
    logits = _forward(model, batch, keep)[:, -keep:]
    # Shift: position t predicts token t+1.
    return logits[:, :-1], batch["labels"][:, -keep + 1 :]


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean loss over the batch's target tokens (or records) and how many there were."""
    if batch["labels"].dim() == 1:
        logits = _forward(model, batch, 0)
        return nn.functional.cross_entropy(logits.float(), batch["labels"]), len(batch["labels"])
    logits, targets = causal_logits(model, batch)
    flat = logits.reshape(-1, logits.size(-1)).float()
    count = int((targets != IGNORE).sum())
    loss = nn.functional.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE)
    return loss, count


def _scored(
    model: nn.Module,
    encoded: list[Encoded],
    cfg: Config,
    batch_size: int,
    pad: int,
    firsts: list[int],
) -> tuple[float, int, list[int]]:
    """Summed loss, its count, and the predicted label indices (seq-cls, or ``firsts``)."""
    total, count, preds = 0.0, 0, []
    for i in range(0, len(encoded), batch_size):
        batch = collate(encoded[i : i + batch_size], pad)
        if cfg.model.task == "seq-cls":
            logits = _forward(model, batch, 0).float()
            loss, n = nn.functional.cross_entropy(logits, batch["labels"]), len(logits)
            preds += logits.argmax(-1).tolist()
        else:
            logits, targets = causal_logits(model, batch)
            n = int((targets != IGNORE).sum())
            flat = logits.reshape(-1, logits.size(-1)).float()
            loss = nn.functional.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE)
            if firsts:
                start = (targets != IGNORE).int().argmax(1)
                at_start = logits[torch.arange(len(start)), start][:, firsts]
                preds += at_start.argmax(-1).tolist()
        total, count = total + float(loss) * n, count + n
    return total, count, preds


@torch.no_grad()
def evaluate(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    records: list[Record],
    cfg: Config,
    batch_size: int = 16,
    predictions: list[int] | None = None,
) -> dict[str, float]:
    """Loss on the answers and, for labelled records, accuracy of the highest-scored label
    (each record's label index is appended to ``predictions`` when given).

    One forward pass per batch gives both when the labels' first tokens differ (the usual case):
    the logits that predict the answer's first token rank the labels. With `train.cache_frozen`
    the layers below the lowest trained one run once for these records (the same eval-mode pass,
    so the same figures), not at every evaluation.
    """
    model.eval()
    labelled = bool(cfg.data.labels) and all(r.label is not None for r in records)
    firsts = _label_first_tokens(tok, cfg) if labelled and cfg.model.task != "seq-cls" else []
    encoded = encode(records, tok, cfg)
    skip: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if cfg.train.cache_frozen:
        encoded, prefix = with_cache(
            model, encoded, _pad(tok), [], precision=cfg.train.cache_precision
        )
        skip = skipping(model, prefix) if prefix is not None else skip
    with skip:
        total, count, preds = _scored(model, encoded, cfg, batch_size, _pad(tok), firsts)
    metrics = {"loss": total / max(count, 1), "examples": float(len(records))}
    if labelled:
        if not preds:  # labels share a first token: score each label in full
            preds = _classify_lm(model, tok, records, cfg, batch_size)
        if predictions is not None:
            predictions.extend(preds)
        hits = sum(cfg.data.labels[p] == r.label for p, r in zip(preds, records, strict=True))
        metrics["accuracy"] = hits / max(len(records), 1)
    if not math.isfinite(metrics["loss"]):
        logger.warning("evaluation loss is not finite")
    return metrics


@torch.no_grad()
def record_nll(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    records: list[Record],
    cfg: Config,
    batch_size: int = 16,
) -> list[float]:
    """Each record's negative log-likelihood of its answer (summed over the answer's tokens;
    for a sequence classifier, of its label): what membership-inference attacks and canary
    exposure score."""
    model.eval()
    encoded = encode(records, tok, cfg)
    out: list[float] = []
    for i in range(0, len(encoded), batch_size):
        batch = collate(encoded[i : i + batch_size], _pad(tok))
        if cfg.model.task == "seq-cls":
            logits = _forward(model, batch, 0).float()
            nll = nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
        else:
            logits, targets = causal_logits(model, batch)
            flat = nn.functional.cross_entropy(
                logits.float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none"
            )
            nll = flat.sum(-1)
        out += [float(x) for x in nll]
    return out


def record_grad_norms(
    model: nn.Module, tok: PreTrainedTokenizerBase, records: list[Record], cfg: Config
) -> list[float]:
    """Each record's gradient norm over the trained parameters, one record at a time (what
    DP-SGD clips to `privacy.record.max_grad_norm`); the model's gradients are left cleared."""
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    was_training = model.training
    model.train()
    for e in encode(records, tok, cfg):
        model.zero_grad(set_to_none=True)
        loss, _ = batch_loss(model, collate([e], _pad(tok)))
        loss.backward()
        sq = sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None)
        norms.append(math.sqrt(sq))
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return norms


def _pad(tok: PreTrainedTokenizerBase) -> int:
    return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


def _label_first_tokens(tok: PreTrainedTokenizerBase, cfg: Config) -> list[int]:
    """First token of each label, or [] when two labels share one."""
    firsts = [answer_ids(tok, label)[0] for label in cfg.data.labels]
    return firsts if len(set(firsts)) == len(firsts) else []


def _classify_lm(model, tok, records, cfg, batch_size) -> list[int]:
    """Score each label by the summed log-probability of its tokens after the prompt."""
    label_ids = [
        list(tok(label, add_special_tokens=False)["input_ids"]) for label in cfg.data.labels
    ]
    budget = cfg.model.max_length - max(len(ids) for ids in label_ids) - 1
    prompts = [prompt_ids(tok, prepare_prompt(r, cfg), budget) for r in records]
    return _full_choice(model, prompts, label_ids, _pad(tok), batch_size)


def _full_choice(model, prompts, label_ids, pad, batch_size) -> list[int]:
    preds: list[int] = []
    for p in prompts:
        seqs = [Encoded(p + ids, [IGNORE] * len(p) + ids) for ids in label_ids]
        b = collate(seqs, pad)
        logits = _forward(model, b, 0)
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        targets = b["labels"][:, 1:]
        picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores = (picked * (targets != IGNORE)).sum(-1)
        preds.append(int(scores.argmax()))
    return preds
