"""A site's local round data-parallel over several processes (`train.workers`), with
torch.distributed's gloo backend on CPU.

The site process forks ``workers`` children; each holds a copy of the model (copy-on-write),
runs the same round (:func:`client.train.train_round`) with :class:`DataParallelStepper`, and
takes rows ``rank::workers`` of every micro-batch. Before each optimizer step the gradients are
summed over the workers (all-reduce) as token-weighted sums, so the step is the one a single
process takes on the whole micro-batch: the same batches, the same mean loss, the same clipping
and optimizer; every worker steps identically. Rank 0 hands the trained weights and the round's
losses back to the site process, which loads them into its own model.

With `train.device` = "cuda" (experimental: no GPU machine was available to run it, so no test
here has run it) each worker moves its copy of the model to its own GPU (``cuda:rank``) and the
sums go over NCCL instead of gloo; the site process itself stays on CPU. DeepSpeed ZeRO is not
built.

Not with record-level DP (refused by the config): DP-SGD over workers needs Opacus' distributed
optimizer and one noise draw per step across them, which is not built.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from client.train import PlainStepper, Stepper, TrainResult, train_round
from common.core.config import TrainConfig
from common.core.errors import ModelError
from common.core.tasks import Encoded, batch_loss

logger = logging.getLogger(__name__)


class DataParallelStepper(PlainStepper):
    """:class:`client.train.PlainStepper` with each micro-batch split over the workers."""

    def __init__(self, rank: int, world: int, device: torch.device | None = None) -> None:
        self.rank, self.world = rank, world
        self.device = device or torch.device("cpu")

    def step(self) -> list[float]:
        micro_batches = next(self.steps)
        losses = []
        for mb in micro_batches:
            shard = {k: v[self.rank :: self.world].to(self.device) for k, v in mb.items()}
            if len(shard["labels"]):
                loss, count = batch_loss(self.model, shard)
            else:  # fewer rows than workers: this one has nothing to add
                loss, count = torch.zeros((), device=self.device), 0
            # NCCL sums CUDA tensors only
            counts = torch.tensor([float(count), float(loss.detach()) * count], device=self.device)
            dist.all_reduce(counts)  # the micro-batch's targets, and its summed loss
            total = max(float(counts[0]), 1.0)
            if count:
                (loss * (count / total) / len(micro_batches)).backward()
            losses.append(float(counts[1]) / total)
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)  # the sum of token-weighted shares: the whole batch's mean
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return losses


def _worker(
    rank: int,
    world: int,
    store: str,
    model: nn.Module,
    examples: list[Encoded],
    cfg: TrainConfig,
    kwargs: dict[str, Any],
    results: Any,
) -> None:
    try:
        torch.set_num_threads(max(1, cfg.threads))
        backend, device = worker_device(cfg, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            model.to(device)
        dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
        try:
            one = cfg.model_copy(update={"workers": 1})
            stepper = DataParallelStepper(rank, world, device)
            result = train_round(model, examples, one, stepper=stepper, **kwargs)
        finally:
            dist.destroy_process_group()
        if rank == 0:
            trained = {
                k: p.detach().cpu().numpy().copy()
                for k, p in model.named_parameters()
                if p.requires_grad
            }
            results.put(("ok", trained, result))
    except BaseException:  # reported to the site process, which raises it with the cause
        results.put(("error", traceback.format_exc(), None))


def worker_device(cfg: TrainConfig, rank: int) -> tuple[str, torch.device]:
    """The process-group backend and the device of worker ``rank``: gloo on CPU, or NCCL with
    one GPU per worker (`train.device` = "cuda", experimental)."""
    if cfg.device == "cuda":
        return "nccl", torch.device(f"cuda:{rank}")
    return "gloo", torch.device("cpu")


def check_devices(cfg: TrainConfig) -> None:
    """Refuse, naming the fields, a multi-GPU round on a site without a GPU per worker (before
    any process starts: a worker would fail on a missing device in the middle of the group)."""
    if cfg.device != "cuda":
        return
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found < cfg.workers:
        raise ModelError(
            f'`train.device` = "cuda" with `train.workers` = {cfg.workers} needs a GPU per worker; '
            f"this site has {found}"
        )


def _first_report(results: Any, procs: list[Any]) -> tuple[str, Any, Any]:
    """Rank 0's result, or the first error a worker reports. A worker that dies without
    reporting (killed for memory, a crash in native code) is an error too, never a hang: the
    others would wait for it in an all-reduce forever."""
    while True:
        if not results.empty():
            return results.get()
        dead = next((p for p in procs if p.exitcode not in (None, 0)), None)
        if dead is not None:
            time.sleep(0.5)  # its own report may still be on its way
            if not results.empty():
                return results.get()
            rank = procs.index(dead)
            why = f"worker {rank} exited with code {dead.exitcode} without reporting"
            return "error", why, None
        time.sleep(0.02)


def train_round_parallel(
    model: nn.Module, examples: list[Encoded], cfg: TrainConfig, **kwargs: Any
) -> TrainResult:
    """:func:`client.train.train_round` over `train.workers` forked processes (gloo)."""
    world = cfg.workers
    check_devices(cfg)
    ctx = mp.get_context("fork")
    results = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="fedtune-gloo-") as tmp:
        store = str(Path(tmp) / "store")
        procs = [
            ctx.Process(
                target=_worker,
                args=(rank, world, store, model, examples, cfg, kwargs, results),
                daemon=True,
            )
            for rank in range(world)
        ]
        for proc in procs:
            proc.start()
        status, payload, result = _first_report(results, procs)
        for proc in procs:
            if status != "ok":  # the others wait for it in an all-reduce: stop them
                proc.kill()
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    if status != "ok":
        raise ModelError(f"`train.workers` = {world}: a worker failed:\n{payload}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, value in payload.items():
            params[k].copy_(torch.from_numpy(np.ascontiguousarray(value)))
    return result


def train_site_round(
    model: nn.Module,
    examples: list[Encoded],
    cfg: TrainConfig,
    *,
    stepper: Stepper | None = None,
    **kwargs: Any,
) -> TrainResult:
    """A site's local round: over `train.workers` processes when there are several (plain
    training only; DP-SGD's stepper runs in this process), else :func:`train_round`."""
    if cfg.workers > 1 and stepper is None:
        kwargs.pop("cache_dir", None)  # `train.cache_frozen` is refused with workers
        return train_round_parallel(model, examples, cfg, **kwargs)
    return train_round(model, examples, cfg, stepper=stepper, **kwargs)
