"""Sparsity-aware distillation: fine-tune the FFN weights so the routed model tracks the dense one.

Without training, zeroing half of an FFN's neurons costs a small model a lot (SmolLM2-135M:
WikiText-2 ppl x4 at 50% FFN sparsity, even with the oracle's true expert shares; EVAL.md).
This stage trains the model with routing in the loop:

* teacher: a frozen copy of the model at budget 1.0 (the dense model, exactly), or a given
  ``teacher`` (for a second stage: the original dense model, so the dense model does not drift
  from stage to stage);
* student: the same model under a budget drawn at random for every step, uniformly in
  ``[budget_min, budget_max]`` (and budget 1.0 for ``dense_fraction`` of the steps, so the dense
  model stays the dense model); routing is the model's own (routers frozen, current router
  temperature and policy "budget");
* loss: KL(teacher || student) over every position's next-token distribution (distillation,
  not language modelling: the student learns to imitate the dense model on the text, not the
  text itself, so a gain on a held-out set of the same domain is not domain adaptation);
* trained: the FFN weights (``params="ffn"``, default) or every weight (``"all"``).

One checkpoint still serves every budget: the budgets are drawn per step. Budgets calibrated
before fine-tuning map to slightly different sparsities afterwards (the FFN inputs changed), so
:func:`finetune` drops the model's presets; calibrate again (the CLI does).
"""

from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import require
from .data import check_token_ids

PARAM_SETS = ("ffn", "all")


@dataclass
class FinetuneConfig:
    """How to fine-tune a converted model with routing in the loop.

    steps: optimizer steps; batch_size sequences of seq_len tokens each per step.
    lr: peak AdamW learning rate (linear warmup over warmup_steps, cosine decay to 10%).
    weight_decay, grad_clip: AdamW weight decay and the global gradient-norm clip.
    budget_min, budget_max: each step's budget is drawn uniformly from this range.
    dense_fraction: share of the steps run at budget 1.0 (keeps the dense model intact).
    params: "ffn" (FFN projections only) or "all" (every parameter except the routers).
    seed: seeds the budget draws and the order of the training windows.
    """

    steps: int = 200
    batch_size: int = 2
    seq_len: int = 512
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 10
    budget_min: float = 0.3
    budget_max: float = 1.0
    dense_fraction: float = 0.1
    params: str = "ffn"
    seed: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        need = functools.partial(require, self)

        for name in ("steps", "batch_size", "seq_len"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, "an int >= 1")
        need(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "warmup_steps", "an int >= 0")
        need(isinstance(self.lr, (int, float)) and 0 < self.lr < 1, "lr", "in (0, 1)")
        need(isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0, "weight_decay", ">= 0")
        need(isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0, "grad_clip", "> 0")
        need(isinstance(self.budget_min, (int, float)) and 0 <= self.budget_min <= 1, "budget_min", "in [0, 1]")
        need(isinstance(self.budget_max, (int, float)) and self.budget_min <= self.budget_max <= 1,
             "budget_max", f"in [budget_min={self.budget_min}, 1]")
        need(isinstance(self.dense_fraction, (int, float)) and 0 <= self.dense_fraction <= 1,
             "dense_fraction", "in [0, 1]")
        need(self.params in PARAM_SETS, "params", f"one of {PARAM_SETS}")
        need(isinstance(self.seed, int), "seed", "an int")

    def to_dict(self) -> dict:
        return asdict(self)


def trainable_parameters(model: nn.Module, params: str) -> list[nn.Parameter]:
    """The parameters :func:`finetune` trains: the FFN projections, or everything but routers."""
    from .budget import routed_layers

    layers = routed_layers(model)  # raises for a model that is not converted
    routers = {id(p) for layer in layers for p in layer.router.parameters()}
    if params == "ffn":
        found = [p for layer in layers for mod in layer.projections() if mod is not None
                 for p in mod.parameters(recurse=False)]
    elif params == "all":
        found = [p for p in model.parameters() if id(p) not in routers]
    else:
        raise ValueError(f"params must be one of {PARAM_SETS}, got {params!r}")
    unique, seen = [], set()
    for p in found:  # tied weights appear once
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return unique


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) of the next-token distributions (fp32)."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def _check_teacher(teacher: nn.Module, model: nn.Module, device: torch.device) -> None:
    if teacher is model:
        raise ValueError("teacher must be another model than the one trained (default: a frozen dense copy)")
    t_dev = next(teacher.parameters()).device
    if t_dev != device:
        raise ValueError(f"teacher is on {t_dev} but the model is on {device}; move it first")
    vocab = [getattr(getattr(m, "config", None), "vocab_size", None) for m in (teacher, model)]
    if None not in vocab and vocab[0] != vocab[1]:
        raise ValueError(f"teacher has a vocabulary of {vocab[0]} tokens but the model has {vocab[1]}")


def _lr_at(step: int, cfg: FinetuneConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    frac = (step - cfg.warmup_steps) / span
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _draw_budget(gen: torch.Generator, cfg: FinetuneConfig) -> float:
    if torch.rand((), generator=gen).item() < cfg.dense_fraction:
        return 1.0
    u = torch.rand((), generator=gen).item()
    return cfg.budget_min + u * (cfg.budget_max - cfg.budget_min)


def finetune(model: nn.Module, input_ids: torch.Tensor, config: FinetuneConfig | None = None, *,
             teacher: nn.Module | None = None, progress: bool = True, log_every: int = 10) -> dict:
    """Fine-tune a converted model in place on ``input_ids`` [N, S]; return a report.

    Windows of ``config.seq_len`` tokens are cut from the rows of ``input_ids`` and visited in
    a seeded random order (cycling when ``steps * batch_size`` exceeds them). The report holds
    the config, the loss (KL to the dense teacher) every ``log_every`` steps with the budget
    used, and the wall time. The model ends in eval mode with its routing state restored and
    its presets dropped (calibrate again).

    ``teacher``: the model whose next-token distributions the student learns (same vocabulary,
    same device; run dense if it is a converted model, its routing state restored after, its
    weights untouched). Default: a frozen copy of ``model`` at budget 1.0.
    """
    from tqdm.auto import tqdm

    from .budget import get_routing_state, restore_routing_state, routed_layers, set_budget, set_routing
    from .budget import set_stats_recording

    cfg = config or FinetuneConfig()
    cfg.validate()
    check_token_ids(input_ids, "input_ids")
    if input_ids.shape[1] < cfg.seq_len:
        raise ValueError(f"input_ids rows have {input_ids.shape[1]} tokens, fewer than seq_len={cfg.seq_len}")
    layers = routed_layers(model)  # raises for a model that is not converted
    windows = input_ids[:, : input_ids.shape[1] // cfg.seq_len * cfg.seq_len].reshape(-1, cfg.seq_len).long()
    device = next(model.parameters()).device

    state = get_routing_state(model)  # policy, budgets, prefill, statistics: restored at the end
    own_teacher = teacher is None
    if own_teacher:
        teacher = copy.deepcopy(model)
    else:
        _check_teacher(teacher, model, device)
    from .layers import RoutedFFN

    routed_teacher = any(isinstance(m, RoutedFFN) for m in teacher.modules())
    teacher_state = get_routing_state(teacher) if routed_teacher else None
    teacher_grad = {id(p): p.requires_grad for p in teacher.parameters()}
    teacher_training = teacher.training
    teacher.eval()
    if teacher_state is not None:
        set_routing(teacher, "dense")
        set_stats_recording(teacher, False)
    for p in teacher.parameters():
        p.requires_grad_(False)

    train = trainable_parameters(model, cfg.params)
    train_ids = {id(p) for p in train}
    grad_before = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in train_ids)
    opt = torch.optim.AdamW(train, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(windows.shape[0], generator=gen)
    set_routing(model, "budget")
    set_stats_recording(model, False)
    for layer in layers:
        layer.prefill = "routed"  # every training position is routed, like a decode token
    # (ops.routed_ffn runs its differentiable reference whenever autograd needs a gradient,
    # so the layers keep their backends: routing has nothing to differentiate)
    history, window_loss, t0 = [], [], time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="fine-tuning with routing", disable=not progress)
    try:
        model.eval()  # no dropout: the student must see what decoding sees
        for step in bar:
            pick = torch.arange(step * cfg.batch_size, (step + 1) * cfg.batch_size) % windows.shape[0]
            ids = windows[order[pick]].to(device)
            with torch.no_grad():
                t_logits = teacher(ids, use_cache=False).logits
            budget = _draw_budget(gen, cfg)
            set_budget(model, budget)
            s_logits = model(ids, use_cache=False).logits
            loss = distillation_loss(s_logits, t_logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(train, cfg.grad_clip)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg)
            opt.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"fine-tuning loss became {value} at step {step} (budget {budget:.3f}); "
                                         f"lower FinetuneConfig.lr (now {cfg.lr})")
            window_loss.append(value)
            bar.set_postfix(kl=f"{value:.3f}", p=f"{budget:.2f}")
            if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
                history.append({"step": step + 1, "kl": value, "budget": budget,
                                "kl_mean_since_last": sum(window_loss) / len(window_loss)})
                window_loss = []
    finally:
        for p in model.parameters():
            p.requires_grad_(grad_before[id(p)])
        restore_routing_state(model, state)
        model.eval()
        if not own_teacher:  # the caller's teacher as it was
            if teacher_state is not None:
                restore_routing_state(teacher, teacher_state)
            for p in teacher.parameters():
                p.requires_grad_(teacher_grad[id(p)])
            teacher.train(teacher_training)
        del teacher
    report = {"config": cfg.to_dict(), "history": history, "seconds": time.perf_counter() - t0,
              "trained_parameters": int(sum(p.numel() for p in train)),
              "windows": int(windows.shape[0]), "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len}
    pcfg = getattr(model, "prunepath_config", None)
    if pcfg is not None:
        pcfg.finetune = {k: v for k, v in report.items() if k != "history"}
        pcfg.finetune["final_kl"] = history[-1]["kl_mean_since_last"] if history else None
        pcfg.presets = {}
    return report
