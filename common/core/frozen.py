"""`train.cache_frozen`: run the frozen layers below the lowest trained one once per record, not
once per step.

When only the top of a model trains (the DP recipe's `lora.layers = [-1]`, `partial`), the hidden
states entering the lowest trained layer are a fixed function of each record: the layers below
hold no trained weight. A site computes them once (:func:`prefix_states`, in eval mode, so without
the frozen layers' dropout), keeps them in memory across rounds (:data:`_CACHE`, keyed by the
records, the layer and the weights below it), and every step then runs only the embeddings
lookup, the layers from the lowest trained one up and the head (:func:`skipping`).

Privacy is unchanged: each record still enters each step once, through the same function; DP-SGD
clips and noises the same per-record gradients (the trained weights are all above the cache).
What changes is the frozen layers' dropout (none: the cache is the eval-mode pass) and the cost.

How it runs, for any model whose layers are one ``nn.ModuleList`` and return their hidden
states as a tensor (BERT and Llama families in transformers 5): the skipped layers are swapped
for :class:`PassThrough` during the round, the last of them returns the cached states of the
batch, which ``common.core.batches.collate`` pads like the input ids (``frozen_hidden``) and a
pre-hook on the model takes out of the forward call. Evaluation uses the same cache. Before the
cache is used, it is checked: a few records' logits through the cache must equal the full
model's, and their cached states those the frozen layers give them now; otherwise the site trains
without it and says so.

`train.cache_precision = "bf16"` runs the pass under bfloat16 autocast (twice as fast on a CPU
with bfloat16 instructions: 1,024 hospital-coding descriptions through SmolLM2 on one core,
16.9 s against 31.0 s). The states then differ from float32's by about 1% in norm (median 0.9%
on those descriptions); they are kept in float32 and everything above them runs as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from common.core.adapters import EMBEDDING, LAYER_INDEX
from common.core.batches import FROZEN_HIDDEN as KEY
from common.core.batches import Encoded, collate

logger = logging.getLogger(__name__)

CACHE_BYTES = 4 << 30  # at most this much cached per process (least recently used goes first)
CHECK_RECORDS = 8
PROBE_SEED = 20240607  # `with_cache(private=True)`: the public stand-ins' token ids
PROBE_LENGTHS = (3, 4, 5, 6, 7, 8, 5, 8)  # within any `model.max_length` (more than 8)
# How far a record's cached states may be from the frozen layers' float32 output (in norm): the
# same numbers up to summation order, or bfloat16's rounding through every frozen layer.
CLOSE = {"fp32": 1e-4, "bf16": 5e-2}


@dataclass
class Cached(Encoded):
    """A record with the hidden states its frozen layers produce: (tokens, hidden)."""

    hidden: Tensor | None = None


@dataclass(frozen=True)
class Prefix:
    layers: nn.ModuleList  # the model's stack of layers
    skip: int  # layers[:skip] are frozen and skipped: layers[skip] is the lowest trained one


class PassThrough(nn.Module):
    """A skipped layer: returns the hidden states it is given (the last one: the cached ones)."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states


def layer_stack(model: nn.Module) -> nn.ModuleList | None:
    """The model's one stack of layers (`...layer`, `...layers`, `...h`, `...blocks`)."""
    found = [
        module
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and name.rsplit(".", 1)[-1] in ("layer", "layers", "h", "blocks")
        and len(module) > 0
    ]
    return found[0] if len(found) == 1 else None


def plan(model: nn.Module) -> tuple[Prefix | None, str]:
    """Which layers a round may skip, or why none (the reason is logged)."""
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    if not trained:
        return None, "nothing trains"
    below = [n for n in trained if EMBEDDING.search(n) and not LAYER_INDEX.search(n)]
    if below or any("prompt_encoder" in n for n in trained):
        return None, "input-side weights train (embeddings or virtual tokens)"
    layers = layer_stack(model)
    if layers is None:
        return None, "the model's layers are not one stack"
    indices = [int(m.group(1)) for n in trained if (m := LAYER_INDEX.search(n))]
    skip = min(indices) if indices else len(layers)
    if skip == 0:
        return None, "the lowest layer trains"
    return Prefix(layers, skip), ""


def _fingerprint(
    model: nn.Module,
    examples: list[Encoded],
    frozen: Sequence[Tensor],
    skip: int,
    precision: str = "fp32",
) -> str:
    """The model's kind, the records, the skipped layer count, the pass's precision and the
    weights below that could change between rounds (those a `train.unfreeze` stage holds back):
    what the cached states depend on. (A base model swapped for another of the same kind is
    caught by the check against the frozen layers' output.)"""
    h = hashlib.blake2b(digest_size=16)
    config = getattr(model, "config", None)
    h.update(repr((type(model).__name__, getattr(config, "to_json_string", str)())).encode())
    h.update(str(skip).encode())
    if precision != "fp32":  # float32 files keep the names they had
        h.update(precision.encode())
    for e in examples:
        h.update(len(e.input_ids).to_bytes(4, "little"))
        h.update(torch.tensor(e.input_ids, dtype=torch.int64).numpy().tobytes())
    for t in frozen:
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class _Stop(Exception):
    """Raised by the capture hook: nothing above the skipped layers needs to run."""


def _padded_span(e: Encoded, width: int) -> slice:
    n = len(e.input_ids)
    return slice(width - n, width) if isinstance(e.labels, list) else slice(0, n)


def resolve_precision(model: nn.Module, precision: str) -> str:
    """`auto`: `bf16` where bfloat16 is fast (a GPU, or a CPU with bfloat16 instructions:
    AVX512-BF16 or AMX), else `fp32` (on a CPU without them bfloat16 is emulated, and slower)."""
    if precision != "auto":
        return precision
    device = next(model.parameters()).device.type
    fast = device == "cuda" or (device == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    chosen = "bf16" if fast else "fp32"
    if ("precision", chosen) not in _SAID:
        _SAID.add(("precision", chosen))
        logger.info("`train.cache_precision` = auto: %s on this %s", chosen, device)
    return chosen


def _precision(model: nn.Module, precision: str) -> contextlib.AbstractContextManager[object]:
    if precision == "fp32":
        return contextlib.nullcontext()
    device = next(model.parameters()).device.type
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


@torch.no_grad()
def prefix_states(
    model: nn.Module,
    prefix: Prefix,
    examples: list[Encoded],
    pad_id: int,
    batch_size: int = 64,
    precision: str = "fp32",
) -> list[Tensor]:
    """Each record's hidden states out of ``layers[skip - 1]`` (eval mode): (tokens, hidden), in
    the model's dtype; ``precision`` "bf16" runs the layers under bfloat16 autocast.

    Records run in batches of one length (sorted, then put back in order), so none is padded:
    each record's states are a function of that record and the model alone, whatever else the
    site holds (under DP-SGD no record's computation may depend on another's: padded to a
    batch's longest, a model crafted to overflow on padding would make a short record's states
    depend on its batch-mates' lengths), and no pass is spent on padding (on hospital-coding's
    descriptions, 5 to 31 tokens, batches in record order took twice as long as sorted ones)."""
    dtype = next(model.parameters()).dtype
    captured: list[Tensor] = []

    def capture(_m: nn.Module, _args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    was_training = model.training
    model.eval()
    handle = prefix.layers[prefix.skip - 1].register_forward_hook(capture)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    groups: list[list[int]] = []
    for i in order:  # consecutive records of one length, at most `batch_size` together
        n = len(examples[i].input_ids)
        if groups and len(groups[-1]) < batch_size and len(examples[groups[-1][0]].input_ids) == n:
            groups[-1].append(i)
        else:
            groups.append([i])
    out: dict[int, Tensor] = {}
    try:
        for picked in groups:
            chunk = [examples[i] for i in picked]
            batch = collate(chunk, pad_id)
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            captured.clear()
            with contextlib.suppress(_Stop), _precision(model, precision):
                model(**inputs)
            states = captured[0].to(dtype)  # the model's dtype (float32, or 16-bit weights)
            width = states.size(1)
            for row, (i, e) in enumerate(zip(picked, chunk, strict=True)):
                out[i] = states[row, _padded_span(e, width)].clone()
    finally:
        handle.remove()
        model.train(was_training)
    return [out[i] for i in range(len(examples))]


# The check's own reference to the pass: what it compares a cache with is the frozen layers'
# output, whatever built the cache (tests replace `prefix_states` to count or spoil the builds).
_exact_states = prefix_states


@contextlib.contextmanager
def skipping(model: nn.Module, prefix: Prefix) -> Iterator[None]:
    """Within: the model runs from the cache; every call must carry ``frozen_hidden``."""
    slot: dict[str, Tensor] = {}

    def take(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if KEY not in kwargs:
            raise RuntimeError(f"the frozen layers are skipped: the batch must carry `{KEY}`")
        slot["states"] = kwargs.pop(KEY)
        return args, kwargs

    def give(_m: nn.Module, _args: Any, _output: Any) -> Tensor:
        return slot.pop("states")

    originals = [prefix.layers[i] for i in range(prefix.skip)]
    for i in range(prefix.skip):
        prefix.layers[i] = PassThrough()
    handles = [
        model.register_forward_pre_hook(take, with_kwargs=True),
        prefix.layers[prefix.skip - 1].register_forward_hook(give),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for i, layer in enumerate(originals):
            prefix.layers[i] = layer


def _logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs).logits.float()


@torch.no_grad()
def _disagrees(
    model: nn.Module, prefix: Prefix, cached: list[Encoded], pad_id: int, precision: str = "fp32"
) -> str:
    """Why the cache cannot be used, or "" when, on a few records (eval mode), their cached
    states are those the frozen layers give them now (a saved file, or a bfloat16 pass, within
    :data:`CLOSE`) and skipping the frozen layers with those states gives the full model's
    logits (the model's layers depend on nothing but their input)."""
    sample = cached[:CHECK_RECORDS]
    plain = [Encoded(e.input_ids, e.labels) for e in sample]
    exact = _exact_states(model, prefix, plain, pad_id)
    sixteen = next(model.parameters()).dtype != torch.float32
    close = CLOSE["bf16" if sixteen else precision]
    for e, now in zip(sample, exact, strict=True):
        kept = e.hidden if isinstance(e, Cached) else None
        gap = float((kept - now).float().norm()) if kept is not None else float("inf")
        if not gap <= close * float(now.float().norm()) + 1e-6:
            return (
                f"a record's cached states are {gap / float(now.float().norm()):.2g} of their "
                f"norm away from what the frozen layers give it now (at most {close:g})"
            )
    was_training = model.training
    model.eval()
    try:
        batch = collate(_attach(plain, exact), pad_id)
        full = _logits(model, collate(plain, pad_id))
        with skipping(model, prefix):
            fast = _logits(model, batch)
    finally:
        model.train(was_training)
    if full.dim() == 3:  # a causal LM's logits per position: padding's are nobody's
        real = batch["attention_mask"].bool()
        full, fast = full[real], fast[real]
    # float32: the same numbers up to summation order; 16-bit weights round every layer
    tol = 3e-2 if sixteen else 1e-4
    if torch.allclose(fast, full, rtol=tol, atol=tol * float(full.abs().max()) + 1e-5):
        return ""
    return (
        "skipping the frozen layers changes the logits: the model's layers may depend on more "
        "than their input"
    )


_CACHE: OrderedDict[str, list[Tensor]] = OrderedDict()
_SAID: set[object] = set()


def _remember(key: str, states: list[Tensor]) -> None:
    _CACHE[key] = states
    _CACHE.move_to_end(key)
    total = sum(t.numel() * t.element_size() for v in _CACHE.values() for t in v)
    while len(_CACHE) > 1 and total > CACHE_BYTES:
        _, dropped = _CACHE.popitem(last=False)
        total -= sum(t.numel() * t.element_size() for t in dropped)


FILES_KEPT = 4  # cache files a site folder keeps (the newest): one per record set and layer


def _load(folder: Path | None, key: str, examples: list[Encoded]) -> list[Tensor] | None:
    path = folder / f"{key}.safetensors" if folder is not None else None
    if path is None or not path.is_file():
        return None
    try:
        saved = load_file(path)
        lengths = saved["lengths"].tolist()
        if lengths != [len(e.input_ids) for e in examples]:
            return None
        os.utime(path)  # recently used: kept when older files are pruned
        return list(torch.split(saved["states"], lengths))
    except Exception as err:  # a torn or foreign file is rebuilt, never trusted
        logger.warning("`train.cache_frozen`: %s unreadable (%s): rebuilding it", path, err)
        return None


def _save(folder: Path, key: str, states: list[Tensor]) -> None:
    """Next to the site's ledger, readable by the site's user only (the states are derived from
    its records, and protected like them); written whole or not at all."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / f"{key}.safetensors"
    tmp = folder / f".{key}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    lengths = torch.tensor([len(t) for t in states], dtype=torch.int64)
    save_file({"states": torch.cat(states).contiguous(), "lengths": lengths}, tmp)
    os.replace(tmp, path)
    files = sorted(folder.glob("*.safetensors"), key=lambda f: f.stat().st_mtime, reverse=True)
    for old in files[FILES_KEPT:]:
        old.unlink(missing_ok=True)


def probes(examples: list[Encoded], model: nn.Module, pad_id: int) -> list[Encoded]:
    """Public stand-ins for a site's records in the cache's check: token ids drawn from a fixed
    seed (never the pad id), a few lengths, labelled as the task's records are (a list of
    targets for a causal LM, a class for a classifier)."""
    embed: Any = model.get_input_embeddings  # nn.Module's attribute typing makes it a Tensor
    vocab = int(embed().weight.size(0))
    gen = torch.Generator().manual_seed(PROBE_SEED)
    causal = isinstance(examples[0].labels, list)
    out = []
    for n in PROBE_LENGTHS:
        ids = torch.randint(0, vocab, (n,), generator=gen)
        ids[ids == pad_id] = (pad_id + 1) % vocab
        out.append(Encoded(ids.tolist(), ids.tolist() if causal else 0))
    return out


def with_cache(
    model: nn.Module,
    examples: list[Encoded],
    pad_id: int,
    held_back: list[nn.Parameter],
    folder: Path | None = None,
    precision: str = "fp32",
    private: bool = False,
) -> tuple[list[Encoded], Prefix | None]:
    """The round's records with their cached states and the layers to skip; the records as they
    are and None where the model cannot skip (logged, with the reason).

    Kept in this process's memory and, with ``folder`` (a site's state folder), on disk, so a
    site whose every round is a new process (Flower's Deployment Engine) builds it once too.

    ``private`` (DP-SGD): whether the cache is used is decided on :func:`probes`, public
    stand-ins, never on the site's records: the decision changes every record's computation
    (the frozen layers' dropout), so it must not depend on which records the site holds (a
    model crafted to overflow on one token would otherwise switch it by that token's presence
    among the records checked). The states themselves are each record's own (:func:`
    prefix_states`); a file read back is checked by its key and lengths only."""
    prefix, why = plan(model)
    if prefix is None or not examples:
        why = why or "no records"
        # once per reason and process: evaluation asks every round
        (logger.debug if why in _SAID else logger.info)("`train.cache_frozen`: not used (%s)", why)
        _SAID.add(why)
        return examples, None
    below = {id(p) for layer in list(prefix.layers)[: prefix.skip] for p in layer.parameters()}
    frozen = [p for p in held_back if id(p) in below]
    precision = resolve_precision(model, precision)
    key = _fingerprint(model, examples, frozen, prefix.skip, precision)
    states = _CACHE.get(key)
    if states is not None:
        _CACHE.move_to_end(key)
        return _attach(examples, states), prefix
    states = _load(folder, key, examples)
    built = states is None
    if states is None:
        states = prefix_states(model, prefix, examples, pad_id, precision=precision)
    cached = _attach(examples, states)
    if private:
        stand_ins = probes(examples, model, pad_id)
        checked = _attach(
            stand_ins, prefix_states(model, prefix, stand_ins, pad_id, precision=precision)
        )
        why = _disagrees(model, prefix, checked, pad_id, precision)
    else:
        why = _disagrees(model, prefix, cached, pad_id, precision)
    if why:
        logger.warning(
            "`train.cache_frozen`: the cache does not reproduce this model's output (%s): "
            "running without it",
            why,
        )
        return examples, None
    _remember(key, states)
    if built and folder is not None:
        _save(folder, key, states)
    logger.info(
        "`train.cache_frozen`: the %d frozen layers below the lowest trained one %s for these "
        "%d records, not at every step",
        prefix.skip,
        "ran once" if built else "were read from the site's cache",
        len(examples),
    )
    return cached, prefix


def _attach(examples: list[Encoded], states: list[Tensor]) -> list[Encoded]:
    return [Cached(e.input_ids, e.labels, hidden=h) for e, h in zip(examples, states, strict=True)]
