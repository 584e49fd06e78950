"""Record-level DP at a site: DP-SGD (Abadi et al. 2016) with Opacus on a peft LoRA model.

DP-SGD is a wrapper around the one training loop (``client.train.train_round``), not a second
loop: the loop builds the optimizer (AdamW with its decay groups), sets the learning rate of
every step and keeps the losses; :class:`DPStepper` is the loop's step for record-level DP::

    plan, reason = check_budget(site_accountant, cfg, len(examples), budget)  # client.privacy_site
    stepper = DPStepper(cfg.privacy.record, plan, site_accountant.accountant,
                        width=cfg.model.max_length)
    train_round(model, examples, cfg.train, ..., stepper=stepper)
    site_accountant.save()                            # epsilon composes over rounds and restarts

On ``open`` it builds a :class:`DPTrainer` around the loop's model and optimizer:

- Opacus' grad-sample module (``privacy.record.grad_sample_mode``: ``hooks`` or ``ghost``) and
  its DPOptimizer wrapping the SAME optimizer, so weight decay and the schedule act as without DP.
- Each logical step draws its own batch by Poisson sampling at ``plan.sample_rate``
  (:meth:`DPTrainer.draw`; the privacy analysis needs exactly that sampling: nobody else picks
  batches), runs it in physical batches of at most ``train.batch_size // train.grad_accum``
  (Opacus' BatchMemoryManager protocol: earlier ones only clip and accumulate), clips each
  record's gradient to ``privacy.record.max_grad_norm``, adds noise once per logical step, then
  the wrapped optimizer steps. An empty Poisson batch still releases a noise-only step.
- Sampling and noise come from a CSPRNG (``common.privacy.discrete_gaussian.SecureRandom``:
  AES-256-CTR keyed from ``os.urandom``), never from ``train.seed`` nor a Mersenne Twister:
  whoever can replay or predict them can tell which records were drawn and remove the noise.
  Noise follows Opacus' ``secure_mode`` (the sum of four Gaussian draws, halved, against
  floating-point attacks: Holohan et al. arXiv:2107.10138 §5.1); Opacus' own secure mode needs
  torchcsprng, which is not available for the pinned torch, so the draws are ours and the
  optimizer's ``add_noise`` uses them (:func:`secure_optimizer_class`). bench/secagg.py measures
  the cost (``secure_mode_dp_throughput_ratio``). (DPTrainer's ``seed`` is for tests only.)
- The accountant is the site's own (``common.privacy.accounting.GaussianAccountant``), stepped
  once per logical step; a new PrivacyEngine per round would restart epsilon at 0.
- The loss is per record (:func:`per_record_loss`: mean over its own tokens), so the privacy
  unit is one record (one sequence), not one token.
- A record whose gradient is not finite (NaN or Inf: an overflow, e.g. under a global model or
  head map a coordinator crafted) contributes nothing to the step, as if it had not been drawn:
  every record's contribution stays within the clip bound, whatever the model, and the step
  (noise included) is always finite. Without this one such record made the whole sum NaN, so
  whether a site could reply at all depended on its records, outside the accounting. ``hooks``:
  its per-record gradient is zeroed before clipping (:func:`drop_non_finite`); ``ghost``: its
  per-record norm is not finite, and the physical batch is run again without it. A site pads
  every physical batch to ``model.max_length`` (:class:`DPStepper`'s ``width``), not to its
  longest record: padded to the longest, a model crafted to overflow on padding alone would
  make the shorter records non-finite (their weight gradients take 0 x Inf at the padded
  positions), and whether one record drops would depend on another's length. Not closed:
  under ``ghost`` the extra pass takes time, seen from outside (``hooks``, the default, takes
  none).
- Opacus issue #820 (peft >= 0.14): LoRA weights silently not updated when parameters are moved
  or re-materialised after the hooks and optimizer captured them. :func:`check_wiring` refuses
  an optimizer that does not hold exactly the model's trainable parameters, and the first noisy
  step must move them. ``close`` removes the hooks: read the adapter from the peft model.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from opacus.grad_sample import AbstractGradSampleModule
from opacus.grad_sample.utils import get_gsm_class
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import Tensor, nn
from torch.optim import Optimizer

from client.train import micro_batch_size
from common.core.config import RecordDPConfig, TrainConfig
from common.core.errors import ModelError, PrivacyError
from common.core.tasks import Encoded, collate, input_logits
from common.privacy.accounting import GaussianAccountant, RecordPlan
from common.privacy.discrete_gaussian import SecureRandom

logger = logging.getLogger(__name__)

Batch = dict[str, Tensor]
LossFn = Callable[[nn.Module, Batch], Tensor]


def per_record_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Cross-entropy per record, shape (B,): causal LM if labels are (B, T), else classification."""
    if labels.dim() == 1:  # seq-cls: logits (B, C)
        return F.cross_entropy(logits.float(), labels, reduction="none")
    logits, targets = logits[:, :-1], labels[:, 1:]  # predict token t+1 at t: (B, T-1, V), (B, T-1)
    tok = F.cross_entropy(
        logits.transpose(1, 2).float(), targets, ignore_index=ignore_index, reduction="none"
    )  # (B, T-1)
    valid = (targets != ignore_index).sum(dim=1).clamp(min=1)  # (B,)
    return tok.sum(dim=1) / valid


def default_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Per-record loss of a HF model on a batch; HF's own (token-mean over the batch) loss is
    not per record, so labels are kept out of the forward call."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = input_logits(model(**inputs).logits, batch["input_ids"])
    return per_record_loss(logits, batch["labels"])


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def check_wiring(model: nn.Module, optimizer: Optimizer) -> None:
    """Refuse setups where the optimizer would not update the model's LoRA weights (#820)."""
    params = trainable(model)
    if not params:
        raise ModelError("the model has no trainable parameters: nothing to train with DP-SGD")
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if {id(p) for p in params} != in_opt:
        raise ModelError(
            "the optimizer does not hold exactly the model's trainable parameters (was the model "
            "moved or re-wrapped after the optimizer was built? see opacus issue #820)"
        )
    devices = {p.device for p in params}
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        raise ModelError(f"trainable parameters must live on one real device (got {devices})")


def secure_gaussian(std: float, reference: Tensor, rng: SecureRandom) -> Tensor:
    """N(0, std^2) noise shaped like ``reference``: Opacus' ``secure_mode`` recipe (four draws
    summed and halved, so the std is unchanged while no single float draw can be read back from
    the output), every draw from the CSPRNG."""
    if std == 0:
        return torch.zeros_like(reference)
    n = reference.numel()
    draws = rng.normal(4 * n).reshape(4, n)  # (4, n) float64
    noise = draws.sum(axis=0) * (std / 2)
    return torch.from_numpy(noise).to(reference.device, reference.dtype).view_as(reference)


def secure_optimizer_class(optim_cls: type[DPOptimizer]) -> type[DPOptimizer]:
    """Opacus' DP optimizer class whose ``add_noise`` draws from ``self.secure_rng``.

    The same steps as Opacus' own ``add_noise`` (plain and ghost-clipping optimizers alike):
    the effective noise multiplier, one noise tensor per parameter on its summed clipped
    gradient, the processed flags; only the generator differs.
    """

    class SecureDPOptimizer(optim_cls):
        secure_rng: SecureRandom

        def clip_and_accumulate(self) -> None:
            self.dropped = getattr(self, "dropped", 0) + drop_non_finite(self)
            super().clip_and_accumulate()

        def add_noise(self) -> None:
            multiplier = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
            std = multiplier * self.max_grad_norm
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                noise = secure_gaussian(std, p.summed_grad, self.secure_rng)
                p.grad = (p.summed_grad + noise).view_as(p)
                _mark_as_processed(p.summed_grad)

    SecureDPOptimizer.__name__ = f"Secure{optim_cls.__name__}"
    return SecureDPOptimizer


def drop_non_finite(opt: DPOptimizer) -> int:
    """Zero the per-record gradients (every parameter's row) of the records whose gradient is
    not finite anywhere, before clipping; returns how many. A zero row clips to zero: the
    record adds nothing to the sum. A no-op without per-record gradients (ghost clipping)."""
    params = [p for p in opt.params if getattr(p, "grad_sample", None) is not None]
    if not params:
        return 0
    flats = [opt._get_flat_grad_sample(p) for p in params]
    if not len(flats[0]):
        return 0
    bad = torch.zeros(len(flats[0]), dtype=torch.bool, device=flats[0].device)
    for g in flats:
        bad |= ~torch.isfinite(g.reshape(len(g), -1)).all(dim=1).to(bad.device)
    if not bad.any():
        return 0
    for p, g in zip(params, flats, strict=True):
        rows = bad.to(g.device).view(-1, *[1] * (g.dim() - 1))
        p.grad_sample = torch.where(rows, torch.zeros((), dtype=g.dtype, device=g.device), g)
    return int(bad.sum())


def _wrap(
    model: nn.Module,
    optimizer: Optimizer,
    cfg: RecordDPConfig,
    noise_multiplier: float,
    expected_batch_size: int,
    noise_rng: SecureRandom,
) -> tuple[AbstractGradSampleModule, DPOptimizer]:
    check_wiring(model, optimizer)
    mode = cfg.grad_sample_mode
    extra = {"max_grad_norm": cfg.max_grad_norm} if mode == "ghost" else {}
    gsm = get_gsm_class(mode)(model, batch_first=True, loss_reduction="mean", **extra)
    optim_cls = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode=mode)
    dp_opt = secure_optimizer_class(optim_cls)(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        secure_mode=True,  # what it is; our add_noise does the drawing
    )
    dp_opt.secure_rng = noise_rng
    return gsm, dp_opt


def _secure_rng(seed: int | None) -> SecureRandom:
    """DP noise and Poisson sampling must not be reproducible from a public seed: whoever knows it
    can subtract the noise. ``seed`` is for tests only (a fixed AES key)."""
    if seed is None:
        return SecureRandom()
    return SecureRandom(hashlib.sha256(f"fedtune-test-seed {seed}".encode()).digest())


def _attach_accountant(dp_opt: DPOptimizer, acc: GaussianAccountant, sample_rate: float) -> None:
    # Our accountant, not the PrivacyEngine's: it persists across rounds (a new engine per
    # round would restart epsilon at 0). Called once per logical (noised) step only.
    def hook(opt: DPOptimizer) -> None:
        acc.step(noise_multiplier=opt.noise_multiplier, sample_rate=sample_rate)

    dp_opt.attach_step_hook(hook)


def dp_backward(
    private_model: AbstractGradSampleModule, dp_opt: DPOptimizer, losses: Tensor
) -> None:
    """Backward of per-record losses (B,). Ghost clipping (Li et al. 2022, arXiv:2110.05679)
    needs two passes: per-record norms first, then the clipped-weighted loss."""
    if isinstance(private_model, get_gsm_class("ghost")):
        DPTensorFastGradientClipping(private_model, dp_opt, losses, "mean").backward()
    else:
        losses.mean().backward()


class DPTrainer:
    """Logical DP-SGD steps on a peft model; a context manager that removes Opacus' hooks."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        cfg: RecordDPConfig,
        plan: RecordPlan,
        accountant: GaussianAccountant,
        *,
        physical_batch_size: int,
        loss_fn: LossFn = default_loss,
        seed: int | None = None,
    ) -> None:
        if physical_batch_size <= 0:
            raise PrivacyError(f"`physical_batch_size` must be positive ({physical_batch_size})")
        self.model, self.plan, self.accountant = model, plan, accountant
        self.physical_batch_size, self.loss_fn = physical_batch_size, loss_fn
        self.device = trainable(model)[0].device
        self.noise_rng = _secure_rng(seed)
        self.sample_rng = _secure_rng(None if seed is None else seed + 1)
        self.private_model, self.optimizer = _wrap(
            model, optimizer, cfg, plan.noise_multiplier, plan.step_divisor, self.noise_rng
        )
        _attach_accountant(self.optimizer, accountant, plan.sample_rate)
        self._verified = False

    def __enter__(self) -> DPTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove hooks and per-sample attributes: the model is a plain peft model again."""
        self.private_model.cleanup()

    def sample(self, num_records: int) -> list[int]:
        """Poisson sampling: each record independently with probability ``plan.sample_rate``."""
        mask = self.sample_rng.uniform(num_records) < self.plan.sample_rate
        return [int(i) for i in np.flatnonzero(mask)]

    def step(self, records: Sequence[Any], collate_fn: Callable[[list[Any]], Batch]) -> float:
        """One logical DP-SGD step on a Poisson sample of ``records``; returns the mean loss."""
        return self.step_on(self.draw(records), collate_fn)

    def draw(self, records: Sequence[Any]) -> list[Any]:
        """A logical batch: a Poisson sample of ``records``, the plan's records (may be empty)."""
        if len(records) != self.plan.num_records:
            raise PrivacyError(
                f"the plan is for {self.plan.num_records} records, got {len(records)}"
            )
        return [records[i] for i in self.sample(len(records))]

    def step_on(self, chosen: list[Any], collate_fn: Callable[[list[Any]], Batch]) -> float:
        """One logical step on records already drawn by :meth:`draw`."""
        before = None if self._verified else [p.detach().clone() for p in trainable(self.model)]
        # An empty Poisson batch still releases a noisy step (the analysis counts every step).
        loss = self._accumulate(chosen, collate_fn) if chosen else self._noise_only_step()
        if before is not None:
            self._verify_moved(before)
        return loss

    def _physical_batches(self, chosen: list[Any], collate_fn: Callable) -> Iterator[Batch]:
        for i in range(0, len(chosen), self.physical_batch_size):
            batch = collate_fn(chosen[i : i + self.physical_batch_size])
            yield {k: v.to(self.device) for k, v in batch.items()}

    def _accumulate(self, chosen: list[Any], collate_fn: Callable) -> float:
        n_chunks = -(-len(chosen) // self.physical_batch_size)
        total = 0.0
        for i, batch in enumerate(self._physical_batches(chosen, collate_fn)):
            # Only the last physical batch of a logical batch adds noise and steps (Opacus'
            # BatchMemoryManager protocol); earlier ones only clip and accumulate.
            self.optimizer.signal_skip_step(do_skip=i < n_chunks - 1)
            losses = self.loss_fn(self.private_model, batch)  # (b,)
            dp_backward(self.private_model, self.optimizer, losses)
            if isinstance(self.private_model, get_gsm_class("ghost")):
                self._ghost_drop_non_finite(batch, losses)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            finite = losses.detach()[torch.isfinite(losses.detach())]
            total += float(finite.sum())
        dropped = getattr(self.optimizer, "dropped", 0)
        if dropped:  # the site's own log; nothing of it leaves the site
            logger.warning(
                "DP-SGD: %d record(s) of this step had a non-finite gradient and contributed "
                "nothing (the noise is unchanged); the model may be diverging, or was crafted",
                dropped,
            )
            self.optimizer.dropped = 0
        return total / len(chosen)

    def _ghost_drop_non_finite(self, batch: Batch, losses: Tensor) -> None:
        """Ghost clipping sums the clipped gradients in one backward pass, so one record with a
        non-finite norm makes the whole sum NaN: run the physical batch again without such
        records (their contribution: zero, as with ``hooks``), until every record left is
        finite (each pass drops one or more, so at most the batch's size passes)."""
        keep = torch.arange(len(losses))
        dropped = 0
        while True:
            norms = self.private_model.per_sample_gradient_norms  # set by the first pass
            bad = ~torch.isfinite(losses.detach()) | ~torch.isfinite(norms.detach()).to(
                losses.device
            )
            if not bad.any():
                break
            dropped += int(bad.sum())
            keep = keep[~bad.to(keep.device)]
            self.optimizer.original_optimizer.zero_grad(set_to_none=True)  # keep summed_grad
            if not len(keep):
                break
            sub = {k: v[keep.to(v.device)] for k, v in batch.items()}
            losses = self.loss_fn(self.private_model, sub)
            dp_backward(self.private_model, self.optimizer, losses)
        for p in trainable(self.model):  # none kept: a zero sum
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.optimizer.dropped = getattr(self.optimizer, "dropped", 0) + dropped

    def _noise_only_step(self) -> float:
        opt = self.optimizer
        std = opt.noise_multiplier * opt.max_grad_norm
        for p in opt.params:
            p.grad = secure_gaussian(std, p.detach(), self.noise_rng) / opt.expected_batch_size
        self.accountant.step(
            noise_multiplier=opt.noise_multiplier, sample_rate=self.plan.sample_rate
        )
        opt.original_optimizer.step()
        opt.original_optimizer.zero_grad(set_to_none=True)
        return float("nan")

    def _verify_moved(self, before: list[Tensor]) -> None:
        """Guard for opacus issue #820: a noisy step that leaves every LoRA weight unchanged means
        the optimizer is updating parameters the model no longer uses."""
        lrs = [g.get("lr", 1.0) for g in self.optimizer.param_groups]
        if self.optimizer.noise_multiplier == 0 or not any(lrs):  # e.g. warmup from lr 0
            return
        self._verified = True
        after = trainable(self.model)
        if all(torch.equal(a, b) for a, b in zip(after, before, strict=True)):
            raise ModelError(
                "a DP-SGD step left every trainable weight unchanged: the optimizer is not "
                "updating the model's LoRA parameters (opacus issue #820)"
            )


class DPStepper:
    """The training loop's step under record-level DP (``client.train.Stepper``): one logical
    DP-SGD step of a :class:`DPTrainer` built around the loop's model and optimizer."""

    def __init__(
        self,
        cfg: RecordDPConfig,
        plan: RecordPlan,
        accountant: GaussianAccountant,
        *,
        width: int,
    ) -> None:
        """``width``: every physical batch padded to this many tokens (`model.max_length`, which
        encoding truncates to), never to its longest record, so no record's computation depends
        on another's length."""
        if width <= 0:
            raise PrivacyError(f"DP-SGD pads every batch to a fixed width; got {width}")
        self.cfg, self.plan, self.accountant = cfg, plan, accountant
        self.width = width
        self.examples = 0
        self.private = True  # the loop's frozen-layer cache decides on public stand-ins

    def open(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        examples: list[Encoded],
        cfg: TrainConfig,
        *,
        pad_id: int,
        seed: int,
    ) -> None:
        # `seed` is public: DPTrainer draws batches and noise from its own secret generators.
        self.records, self.examples = examples, len(examples)
        self.collate = functools.partial(collate, pad_id=pad_id, width=self.width)
        self.trainer = DPTrainer(
            model, optimizer, self.cfg, self.plan, self.accountant,
            physical_batch_size=micro_batch_size(cfg),
        )  # fmt: skip

    def step(self) -> list[float]:
        chosen = self.trainer.draw(self.records)
        loss = self.trainer.step_on(chosen, self.collate)
        return [loss] if chosen else []  # an empty Poisson batch: noise only, no loss to report

    def close(self) -> None:
        self.trainer.close()
