"""`model.head_pooling = "mean"`: an encoder classifier's head reads the mean of the last hidden
states over the record's tokens, not the model's own pooler output.

Why. BERT's pooler (the first token through a dense layer and tanh) is what BERT's pre-training
(next-sentence prediction) shaped; a sentence encoder such as all-MiniLM-L6-v2 was trained to
give the mean of its last hidden states instead (its sentence embedding), and there the pooler
is an untrained leftover. A head that trains alone (`lora.method = "head"`, the DP recipe of
bank-complaints) can read no better than its input: on bank-complaints the whitened head's
ceiling without DP was 0.661 on the pooler's output and 0.680 to 0.682 on the mean (a head-only
replica on the head inputs this code gives; README). One real DP run at epsilon 8 gave 0.657
either way: the gain is within a DP run's spread.

Privacy: the pooling is a fixed function of the frozen model's output, with no weights; DP-SGD's
guarantee is unchanged (Opacus clips and noises the gradients of the weights that train,
whatever their input is).

How. The encoder's ``pooler`` is replaced by :class:`MeanPool` (no weights), and a forward
pre-hook on the encoder hands it the call's attention mask. The model's config records
``fedtune_head_pooling = "mean"``, so a folder it is saved to (`publish`) says how its head
reads, and :func:`install_saved` puts the pooling back on whatever loads such a folder through
fedtune. The folder has no pooler weights: a loader that does not know the key says so (it
warns that ``pooler.dense`` is newly initialized) rather than keeping a pooler the head never
read; the model card says how to pool.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from common.core.errors import ModelError

logger = logging.getLogger(__name__)

CONFIG_KEY = "fedtune_head_pooling"  # in the model's config.json: "mean" when installed


class MeanPool(nn.Module):
    """The mean of the hidden states over the tokens the attention mask keeps (all when none)."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: Tensor | None = None

    def forward(self, hidden_states: Tensor) -> Tensor:
        if hidden_states.dim() != 3:  # (records, tokens, hidden): what BERT's pooler is given
            raise ModelError(
                f'`model.head_pooling` = "mean": the pooler got a {hidden_states.dim()}-D input, '
                "not each token's hidden state; this model's head cannot read a mean"
            )
        mask = self.mask
        if mask is None:  # a call without a mask: every token is the record's
            return hidden_states.mean(1)
        if mask.shape != hidden_states.shape[:2]:
            raise ModelError(
                f'`model.head_pooling` = "mean": an attention mask of {tuple(mask.shape)} for '
                f"hidden states of {tuple(hidden_states.shape[:2])}"
            )
        return masked_mean(hidden_states, mask)


def masked_mean(hidden_states: Tensor, mask: Tensor) -> Tensor:
    """(records, tokens, hidden) -> (records, hidden): the mean over the tokens ``mask`` keeps."""
    keep = mask.to(hidden_states.device).bool().unsqueeze(-1)
    # `where`, not a product: a padded position's state never reaches the mean, even when not
    # finite (0 x Inf is NaN)
    kept = torch.where(keep, hidden_states, torch.zeros_like(hidden_states))
    return kept.sum(1) / keep.sum(1).clamp(min=1).to(hidden_states.dtype)


def _take_mask(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1:
        mask = args[1]  # BertModel.forward(input_ids, attention_mask, ...)
    pool = module.get_submodule("pooler")
    if isinstance(pool, MeanPool):
        pool.mask = mask if isinstance(mask, Tensor) else None


# Classifiers whose head reads the pooler's output, and whose pooler is given every token's
# state (ALBERT and BigBird give theirs the first token alone; RoBERTa's and DistilBERT's heads
# read the first token themselves): checked in transformers' sources, not guessed.
MODEL_TYPES = ("bert",)
DECODER_HEAD = "score"  # transformers' decoder classifiers (Llama, Qwen2...): `score` reads every
# position's hidden state and the logits of the last non-padding token are kept
DECODER_BOX = "_fedtune_pool_mask"  # on a decoder's backbone: where the call's mask is kept


def _decoder_hooks(box: dict[str, Tensor | None]) -> tuple[Any, Any]:
    """The backbone's pre-hook that keeps each call's attention mask in ``box``, and the head's
    that gives every position the record's mean, so whichever position the model keeps the
    logits of (the last real token) holds the mean's. Closures, not module attributes: PEFT
    deep-copies the head (`modules_to_save`), and a copy's hooks are these same functions."""

    def take_mask(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        box["mask"] = mask if isinstance(mask, Tensor) else None

    def mean_before_head(_head: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        if hidden.dim() != 3:
            raise ModelError(
                f'`model.head_pooling` = "mean": the head got a {hidden.dim()}-D input, not '
                "each token's hidden state"
            )
        mask = box["mask"]
        if mask is None:  # a call without a mask: every token is the record's
            mean = hidden.mean(1)
        elif mask.shape != hidden.shape[:2]:
            raise ModelError(
                f'`model.head_pooling` = "mean": an attention mask of {tuple(mask.shape)} for '
                f"hidden states of {tuple(hidden.shape[:2])}"
            )
        else:
            mean = masked_mean(hidden, mask)
        return (mean.unsqueeze(1).expand_as(hidden), *args[1:])

    return take_mask, mean_before_head


def _decoder_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """A decoder classifier's backbone and `score` head, or None if the model is not one."""
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    head = getattr(model, DECODER_HEAD, None)
    if isinstance(backbone, nn.Module) and isinstance(head, nn.Linear):
        return backbone, head
    return None


def encoder_of(model: nn.Module) -> nn.Module:
    """The encoder under a classifier whose head reads its pooler's output (BERT)."""
    kind = getattr(getattr(model, "config", None), "model_type", "")
    prefix = getattr(model, "base_model_prefix", "")
    encoder = getattr(model, prefix, None) if prefix else None
    if kind not in MODEL_TYPES or not isinstance(getattr(encoder, "pooler", None), nn.Module):
        raise ModelError(
            f'`model.head_pooling` = "mean": {type(model).__name__} (`{kind}`) has no pooler '
            f"over every token for its head to read, nor a decoder's `{DECODER_HEAD}` head "
            f"({', '.join(MODEL_TYPES)} or a decoder classifier such as Llama's only)"
        )
    assert encoder is not None
    return encoder


def install(model: nn.Module) -> None:
    """Mean pooling in place of the encoder's pooler, or before a decoder's head, from now on
    (in place; idempotent)."""
    kind = getattr(getattr(model, "config", None), "model_type", "")
    decoder = _decoder_parts(model) if kind not in MODEL_TYPES else None
    if decoder is not None:
        backbone, head = decoder
        if not hasattr(backbone, DECODER_BOX):
            box: dict[str, Tensor | None] = {"mask": None}
            object.__setattr__(backbone, DECODER_BOX, box)
            take_mask, mean_before_head = _decoder_hooks(box)
            backbone.register_forward_pre_hook(take_mask, with_kwargs=True)
            # first among the head's pre-hooks: `model.head_input`'s maps read the mean
            head.register_forward_pre_hook(mean_before_head, prepend=True)
            decoder_config: Any = model.config
            decoder_config.update({CONFIG_KEY: "mean"})
            logger.info(
                '`model.head_pooling` = "mean": the head reads the mean of the last hidden '
                "states over each record's tokens, not its last token's"
            )
        return
    encoder = encoder_of(model)
    if isinstance(encoder.pooler, MeanPool):
        return
    encoder.pooler = MeanPool()
    encoder.register_forward_pre_hook(_take_mask, with_kwargs=True)
    config: Any = model.config
    config.update({CONFIG_KEY: "mean"})
    logger.info('`model.head_pooling` = "mean": the head reads the mean of the last hidden states')


def install_saved(model: nn.Module) -> bool:
    """Put back the pooling a saved model's config records (a published folder); True if any."""
    saved = getattr(model.config, CONFIG_KEY, None)
    if saved is None:
        return False
    if saved != "mean":
        raise ModelError(f"the model's config.json has `{CONFIG_KEY}` = {saved!r}; only 'mean'")
    install(model)
    return True
