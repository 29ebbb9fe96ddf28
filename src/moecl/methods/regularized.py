"""Regularisation and gradient-projection baselines on the one LoRA of seq-lora.

Each trains the same adapter as ``seq-lora`` (one LoRA on the target projections of every block,
task after task) and adds one mechanism against forgetting:

=========  =====================================================================================
method     what it adds
=========  =====================================================================================
``ewc``    Elastic Weight Consolidation (Kirkpatrick et al., 2017, arXiv 1612.00796): after each
           task, the diagonal empirical Fisher ``F_t`` of the adapter weights on the task's
           training data, summed over tasks (``F = sum_t F_t``), and the loss
           ``lm + lambda_ewc / 2 * sum F (theta - theta*)^2`` around the weights after the last
           task (the accumulated, "online" form TRACE runs).
``lwf``    Learning without Forgetting (Li and Hoiem, 2016, arXiv 1606.09282): the model as it was
           before the current task is a teacher on the current batch; the loss adds
           ``lambda_lwf * T^2 * KL(softmax(teacher / T) || softmax(student / T))`` over the answer
           positions.
``agem``   Averaged GEM (Chaudhry et al., 2019, arXiv 1812.00420): an episodic memory of
           ``agem_memory`` examples per finished task; before each optimizer step the gradient
           ``g`` is compared with the gradient ``g_ref`` of a memory batch and, when
           ``g . g_ref < 0``, projected: ``g - (g . g_ref / g_ref . g_ref) g_ref``.
=========  =====================================================================================

Each method's own state (Fisher and anchor, teacher weights, memory) is saved beside the
adapter in every checkpoint, so a run resumes with the same numbers.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import PreTrainedModel

from moecl.data.batches import Collator, answer_loss, keeps_logits
from moecl.data.trace import Example
from moecl.io import atomic_write_json
from moecl.methods.lora import SeqLoRAMethod
from moecl.models.persistence import write_tensors
from moecl.models.pmoe import PMoEModel

EWC_STATE = "ewc.safetensors"
LWF_TEACHER = "lwf_teacher.safetensors"
AGEM_MEMORY = "agem_memory.json"


def _device_batch(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


class EWCMethod(SeqLoRAMethod):
    """seq-lora plus Elastic Weight Consolidation on the adapter weights (see the module table)."""

    name = "ewc"

    def __init__(self, config) -> None:
        super().__init__(config)
        self.fisher: dict[str, torch.Tensor] = {}  # name -> summed diagonal Fisher, like the parameter
        self.anchor: dict[str, torch.Tensor] = {}  # name -> the weights after the last finished task

    def loss(self, model: PMoEModel, batch: dict[str, torch.Tensor], lm_loss: torch.Tensor) -> torch.Tensor:
        if not self.fisher:
            return lm_loss
        return lm_loss + self.config.lambda_ewc / 2 * ewc_penalty(model, self.fisher, self.anchor)

    def after_task(
        self,
        model: PMoEModel,
        task_index: int,
        examples: list[Example],
        collator: Collator,
        replay: Sequence[tuple[int, Example]] = (),
    ) -> None:
        super().after_task(model, task_index, examples, collator, replay)
        rng = random.Random(f"ewc:{self.config.seed}:{task_index}")
        sample = rng.sample(examples, min(self.config.ewc_samples, len(examples)))
        for name, value in diagonal_fisher(model, collator, task_index, sample, self.config.micro_batch_size).items():
            self.fisher[name] = self.fisher[name] + value if name in self.fisher else value
        self.anchor = {n: p.detach().clone() for n, p in model.named_trainable_parameters()}

    def save(self, model: PMoEModel, directory: Path) -> None:
        super().save(model, directory)
        if self.fisher:
            state = {f"fisher.{n}": v for n, v in self.fisher.items()} | {
                f"anchor.{n}": v for n, v in self.anchor.items()
            }
            write_tensors(directory / EWC_STATE, state)

    def load(self, base_model: PreTrainedModel, directory: Path) -> PMoEModel:
        model = super().load(base_model, directory)
        path = directory / EWC_STATE
        self.fisher, self.anchor = {}, {}
        if path.is_file():
            device = next(model.parameters()).device
            for key, value in load_file(path, device=str(device)).items():
                kind, name = key.split(".", 1)
                (self.fisher if kind == "fisher" else self.anchor)[name] = value
        return model


def ewc_penalty(model: PMoEModel, fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """``sum over trained tensors of sum F * (theta - theta*)^2`` (a scalar with a gradient)."""
    terms = [(fisher[n] * (p - anchor[n]).pow(2)).sum() for n, p in model.named_trainable_parameters() if n in fisher]
    return torch.stack(terms).sum()


def diagonal_fisher(
    model: PMoEModel, collator: Collator, task_index: int, examples: list[Example], batch_size: int
) -> dict[str, torch.Tensor]:
    """The empirical diagonal Fisher of the trainable weights: the squared gradient of the answer
    loss of each batch of ``batch_size`` examples, averaged over batches weighted by their size
    (TRACE's EWC squares its training batches' gradients the same way)."""
    named = dict(model.named_trainable_parameters())
    total = {n: torch.zeros_like(p) for n, p in named.items()}
    keep = keeps_logits(model)
    with torch.enable_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            loss = answer_loss(model, _device_batch(model, collator([(task_index, e) for e in chunk])), keep)
            grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
            for (name, _), grad in zip(named.items(), grads, strict=True):
                if grad is not None:
                    total[name] += grad.detach().pow(2) * len(chunk)
    return {n: v / max(1, len(examples)) for n, v in total.items()}


class LwFMethod(SeqLoRAMethod):
    """seq-lora plus distillation from the model as it was before the current task."""

    name = "lwf"

    def __init__(self, config) -> None:
        super().__init__(config)
        self.teacher: dict[str, torch.Tensor] = {}  # the adapter weights before the current task
        self.teacher_task = -1  # the task the teacher was taken for
        self._student_logits: torch.Tensor | None = None
        self._capture = True

    def wrap(self, base_model: PreTrainedModel) -> PMoEModel:
        return self._watch(super().wrap(base_model))

    def _watch(self, model: PMoEModel) -> PMoEModel:
        """Keep the logits of the model's last training forward (the loss needs them)."""

        def keep(module, args, output) -> None:
            if self._capture and module.training and torch.is_grad_enabled():
                self._student_logits = output.logits

        model.register_forward_hook(keep)
        return model

    def before_task(self, model: PMoEModel, task_index: int, examples: list[Example], collator: Collator) -> None:
        super().before_task(model, task_index, examples, collator)
        if task_index > 0 and self.teacher_task != task_index:  # a mid-task resume keeps the loaded one
            self.teacher = {n: p.detach().clone() for n, p in model.named_trainable_parameters()}
            self.teacher_task = task_index

    def loss(self, model: PMoEModel, batch: dict[str, torch.Tensor], lm_loss: torch.Tensor) -> torch.Tensor:
        student, self._student_logits = self._student_logits, None
        if not self.teacher or student is None:
            return lm_loss
        keep = student.shape[1]
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if keep < batch["input_ids"].shape[1]:
            kwargs["logits_to_keep"] = keep
        self._capture = False
        try:
            with torch.no_grad():
                teacher = torch.func.functional_call(model, self.teacher, args=(), kwargs=kwargs, strict=False).logits
        finally:
            self._capture = True
        labels = batch["labels"][:, -keep + 1 :] if keep > 1 else batch["labels"][:, :0]
        mask = labels != -100  # the positions that predict an answer token
        return lm_loss + self.config.lambda_lwf * distillation(
            student[:, :-1], teacher[:, :-1], mask, self.config.lwf_temperature
        )

    def save(self, model: PMoEModel, directory: Path) -> None:
        super().save(model, directory)
        if self.teacher:
            write_tensors(directory / LWF_TEACHER, self.teacher, {"task": str(self.teacher_task)})

    def load(self, base_model: PreTrainedModel, directory: Path) -> PMoEModel:
        from safetensors import safe_open

        model = self._watch(super().load(base_model, directory))
        path = directory / LWF_TEACHER
        self.teacher, self.teacher_task = {}, -1
        if path.is_file():
            device = str(next(model.parameters()).device)
            self.teacher = load_file(path, device=device)
            with safe_open(path, "pt") as f:
                self.teacher_task = int((f.metadata() or {}).get("task", -1))
        return model


def distillation(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per masked position, averaged.

    Args:
        student, teacher: logits ``(batch, positions, vocab)``.
        mask: ``(batch, positions)``, True where the position counts.
        temperature: ``T``.
    """
    if not bool(mask.any()):
        return student.sum() * 0.0
    s = F.log_softmax(student[mask].float() / temperature, -1)
    t = F.log_softmax(teacher[mask].float() / temperature, -1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


class AGEMMethod(SeqLoRAMethod):
    """seq-lora whose every step is projected against an episodic memory's gradient (A-GEM)."""

    name = "agem"

    def __init__(self, config) -> None:
        super().__init__(config)
        self.memory: list[tuple[int, Example]] = []
        self.steps = 0  # optimizer steps taken so far (seeds each memory batch)
        self.projected = False  # whether the last step's gradient was projected
        self.collator: Collator | None = None

    def before_task(self, model: PMoEModel, task_index: int, examples: list[Example], collator: Collator) -> None:
        super().before_task(model, task_index, examples, collator)
        self.collator = collator

    def after_task(
        self,
        model: PMoEModel,
        task_index: int,
        examples: list[Example],
        collator: Collator,
        replay: Sequence[tuple[int, Example]] = (),
    ) -> None:
        super().after_task(model, task_index, examples, collator, replay)
        rng = random.Random(f"agem:{self.config.seed}:{task_index}")
        self.memory += [(task_index, e) for e in rng.sample(examples, min(self.config.agem_memory, len(examples)))]

    def before_step(self, model: PMoEModel) -> None:
        self.steps += 1
        if not self.memory or self.collator is None:
            return
        rng = random.Random(f"agem-batch:{self.config.seed}:{self.steps}")
        batch = self.collator(rng.sample(self.memory, min(self.config.micro_batch_size, len(self.memory))))
        params = [p for p in self.trainable_parameters(model) if p.grad is not None]
        with torch.enable_grad():
            loss = answer_loss(model, _device_batch(model, batch), keeps_logits(model))
            reference = torch.autograd.grad(loss, params, allow_unused=True)
        reference = [torch.zeros_like(p) if r is None else r for p, r in zip(params, reference, strict=True)]
        self.projected = project([p.grad for p in params], reference)

    def step_log(self, model: PMoEModel, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Whether this step's gradient was projected (1) or kept (0)."""
        return {"agem_projected": int(self.projected)} if self.memory else {}

    def save(self, model: PMoEModel, directory: Path) -> None:
        super().save(model, directory)
        memory = [{"task": t, "prompt": e.prompt, "answer": e.answer} for t, e in self.memory]
        atomic_write_json(directory / AGEM_MEMORY, {"steps": self.steps, "memory": memory})

    def load(self, base_model: PreTrainedModel, directory: Path) -> PMoEModel:
        model = super().load(base_model, directory)
        path = directory / AGEM_MEMORY
        saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"steps": 0, "memory": []}
        self.steps = saved["steps"]
        self.memory = [(m["task"], Example(m["prompt"], m["answer"])) for m in saved["memory"]]
        return model


@torch.no_grad()
def project(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> bool:
    """A-GEM's rule, in place on ``grads``: when ``g . g_ref < 0``, ``g -= (g . g_ref / g_ref .
    g_ref) g_ref`` (the dot products over all tensors together). Returns whether it projected."""
    dot = sum((g.double() * r.double()).sum() for g, r in zip(grads, reference, strict=True))
    norm = sum(r.double().pow(2).sum() for r in reference)
    if not dot < 0 or not norm > 0:
        return False
    scale = float(dot / norm)
    for g, r in zip(grads, reference, strict=True):
        g.sub_(r.to(g.dtype), alpha=scale)
    return True
