"""Every option of ``moecl run``, with its default and help (the CLI is generated from this)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from moecl.data.names import check_task_name
from moecl.evaluation.continual import BWT_CONVENTIONS
from moecl.models.pmoe_config import PMoEConfig, check_tau

METHOD_NAMES = (
    "pmoe",
    "moses",
    "seq-ft",
    "seq-lora",
    "o-lora",
    "per-task-lora",
    "mtl",
    "icl",
    "ewc",
    "lwf",
    "agem",
    "loramoe",
)
DEFAULT_LR = {"seq-ft": 1e-5}
DEFAULT_REPLAY = {"pmoe": 0.01, "loramoe": 0.01}  # LoRAMoE: its balancing constraint needs replayed data
DEFAULT_TARGETS: dict[str, list[str] | None] = {"moses": None}
"""Adapted projections when none are named: every linear layer of the blocks ("all-linear"),
chosen on the validation split (README); MoSEs keeps the family's q and v (its design)."""


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class RunConfig:
    """A continual-learning run: which method, model and task stream, and how to train."""

    method: str = _opt(
        "pmoe",
        "continual-learning method: pmoe, moses (mixture of sub-experts); baselines seq-ft (full fine-tuning), "
        "seq-lora, o-lora, per-task-lora (task id given), mtl (all tasks jointly), icl (k-shot prompting, no "
        "training), ewc, lwf, agem (seq-lora plus EWC, LwF or A-GEM), loramoe (a fixed bank of LoRA experts, a "
        "router per layer)",
        choices=list(METHOD_NAMES),
    )
    model: str = _opt("smollm2-135m", "Hugging Face name or local folder, or an alias: smollm2-135m, tiny-random")
    benchmark: str = _opt("mini-trace", "task stream", choices=["mini-trace", "smoke", "trace"])
    data_dir: str | None = _opt(
        None, "folder of <Task>/{train,test}.json (TRACE format); required by --benchmark trace"
    )
    tasks: list[str] | None = _opt(
        None,
        "comma-separated task names selecting and ordering the stream, or all; by default the stream's own "
        "default selection (mini-trace: sst2, med-subject, arithmetic of its 8, see the README)",
    )
    train_size: int | None = _opt(320, "cap on training examples per task (seeded sample); null: all")
    test_size: int | None = _opt(200, "cap on test examples per task (seeded sample); null: all")
    eval_size: int | None = _opt(200, "cap on validation (eval.json) examples per task (seeded sample); null: all")
    eval_split: str = _opt(
        "test",
        "which split fills R: test (TRACE's) or eval (the validation split; choose settings on it, never on test)",
        choices=["test", "eval"],
    )
    seed: int = _opt(0, "seed of data order, sampling, initialisation and replay")
    epochs: int = _opt(3, "epochs over each task's training data (replay included)")
    lr: float | None = _opt(
        None, "peak AdamW learning rate (default: 3e-3 for adapter methods, 1e-5 for seq-ft as in the PMoE paper)"
    )
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    warmup_ratio: float = _opt(0.1, "share of each task's steps spent warming the learning rate up")
    batch_size: int = _opt(8, "effective batch size (micro-batch x accumulation x processes)")
    micro_batch_size: int = _opt(8, "examples per forward pass on one process")
    max_prompt_tokens: int = _opt(320, "prompts are truncated from the left to this many tokens")
    max_answer_tokens: int = _opt(64, "answers are truncated to this many tokens in training")
    max_new_tokens: int | None = _opt(None, "generation length at evaluation (default: longest training answer + 4)")
    eval_batch_size: int = _opt(16, "prompts per generation batch")
    length_window: int = _opt(
        8,
        "training batches: sort each seeded window of this many micro-batches by length, so a micro-batch holds "
        "examples of similar length and little padding (every epoch still sees every example once, in a seeded "
        "order); 1: plain shuffled micro-batches, as runs made before this option",
    )
    gradient_checkpointing: bool = _opt(
        False, "recompute the base model's block activations in the backward pass: less memory, ~30% more time"
    )
    save_every: int = _opt(
        0,
        "also checkpoint every N optimizer steps inside a task (model, optimizer, schedule, RNG, data position), "
        "so a killed run resumes mid-task with the same numbers; 0: only at the end of each task",
    )
    replay: float | None = _opt(
        None,
        "fraction of each past task's training data kept and mixed into later tasks (default: 0.01 for pmoe as in "
        "the PMoE paper and for loramoe, 0 for the other baselines; seq-ft/seq-lora with replay are the paper's "
        "Full-ft-RE/LoRA-RE)",
    )
    replay_extra: str | None = _opt(
        None,
        "TRACE-format JSON file of extra examples (e.g. LIMA, the paper's alignment data) joining the replay "
        "memory: mixed into every task after the first, as that task's data",
    )
    lambda_route: float = _opt(
        1.0,
        "weight of PMoE's router loss (Eq. 7) against each training example's task id (none at inference); "
        "0 = off, the paper's main setting (chosen on the validation split: README, PMoE's router)",
    )
    lambda_orth: float = _opt(0.5, "o-lora: weight of the orthogonality loss sum_i |A_i A_t^T| (official code: 0.5)")
    lambda_l2: float = _opt(0.0, "o-lora: weight of ||new LoRA||^2 (official code: 0)")
    lambda_ewc: float = _opt(
        1000000.0,
        "ewc: weight of the penalty lambda/2 * sum F (theta - theta*)^2, F the diagonal Fisher of the adapter "
        "(chosen on the validation split: studies/baselines-grid.yaml, docs/results.md)",
    )
    ewc_samples: int = _opt(64, "ewc: training examples per task the diagonal Fisher is estimated on")
    lambda_lwf: float = _opt(
        1.0, "lwf: weight of the distillation from the model before the current task (chosen as lambda_ewc)"
    )
    lwf_temperature: float = _opt(2.0, "lwf: softmax temperature T of the distillation (scaled by T^2)")
    agem_memory: int = _opt(
        64, "agem: examples of each finished task kept in the episodic memory (chosen as lambda_ewc)"
    )
    loramoe_experts: int = _opt(6, "loramoe: LoRA experts per adapted projection (each of rank --rank)")
    lambda_balance: float = _opt(0.01, "loramoe: weight of the localized balancing constraint (chosen as lambda_ewc)")
    balance_delta: float = _opt(
        0.1,
        "loramoe: the constraint's delta: each half of the experts is pushed towards one kind of data (replayed "
        "earlier tasks; the current task) by weights 1 +- delta",
    )
    task_id: str = _opt(
        "given",
        "moses at evaluation: given (TIL, route by the true task) or inferred (TaIL, nearest task key)",
        choices=["given", "inferred"],
    )
    sub_rank: int = _opt(2, "moses: rank of each sub-expert")
    top_k: int = _opt(2, "moses: sub-experts per token")
    initial_experts: int = _opt(4, "moses: sub-experts the first task opens per projection")
    new_per_task: int = _opt(2, "moses: sub-experts each later task may open (earlier ones stay selectable)")
    icl_shots: int = _opt(6, "icl: demonstrations per prompt, drawn from the task's training split")
    icl_max_prompt_tokens: int = _opt(2048, "icl: demonstrations are dropped until the prompt fits this many tokens")
    tau: float | int | str = _opt(
        0.75,
        "PMoE: the last shallow block: an int counts blocks (24), a fraction strictly between 0 and 1 takes that "
        "share of them (0.75), all: every block; 0.0 and 1.0 are refused as ambiguous (write 0, 1 or all)",
    )
    rank: int = _opt(8, "LoRA rank")
    alpha: float = _opt(16.0, "LoRA alpha (deltas scaled by alpha / rank)")
    router_norm: bool = _opt(True, "PMoE: RMS-normalise the router's input h_tau (off: the paper's literal Eq. 4)")
    expert_init: str = _opt(
        "zero",
        "PMoE: how a new expert starts: zero (the paper: B = 0, a no-op) or copy (of the expert the router sends "
        "the new task to most; with --router-init copy the model's output is unchanged at growth)",
        choices=["zero", "copy"],
    )
    router_init: str = _opt(
        "zero",
        "PMoE: how a new router column starts: zero (the paper), copy (the most-used expert's column) or share "
        "(a logit offset giving the new expert --router-share of the gate on the new task's prompts)",
        choices=["zero", "copy", "share"],
    )
    router_share: float = _opt(0.5, "PMoE with --router-init share: the new expert's gate at growth")
    freeze_router: bool = _opt(
        True, "PMoE: only the new expert's router column trains; earlier columns stay frozen (off: the paper)"
    )
    router_align: bool = _opt(
        True, "PMoE: after each task rescale the newest router column to the older columns' mean norm (off: the paper)"
    )
    router_detach: bool = _opt(
        True,
        "PMoE: the router's input h_tau is detached, so routing losses train the router only, not the shallow "
        "LoRA (off: the paper's single graph)",
    )
    lambda_route_distill: float = _opt(
        1.0,
        "PMoE: weight of routing distillation, KL(task's stored mean gate || gate) on replayed examples; 0 = off",
    )
    router_lr: float | None = _opt(None, "PMoE: the router's own peak learning rate (default: --lr)")
    router_refit_steps: int = _opt(
        200,
        "PMoE: after each task (once two experts exist) fit every router column for N full-batch steps on h_tau of "
        "the replay memory and 32 of the task's examples, each task weighing the same; 0 = off (chosen on the "
        "validation split: docs/guide.md, PMoE's router)",
    )
    route_balance: bool = _opt(
        False,
        "PMoE: the router loss (Eq. 7) averages each task's examples in a batch first, then the tasks, so "
        "replayed examples weigh as much as the current task's",
    )
    lora_dropout: float = _opt(0.0, "dropout on the adapters' input")
    target_modules: list[str] | None = _opt(
        None,
        "comma-separated projections to adapt, or all-linear (default: all-linear; moses: the family's q,v)",
    )
    dtype: str = _opt(
        "auto",
        "the base model's precision: auto (bf16 on a CUDA device that supports it, else fp32), bf16, fp16 (CUDA "
        "only) or fp32; adapters and router stay fp32, the forward runs under Accelerate's autocast",
        choices=["auto", "bf16", "fp16", "fp32"],
    )
    kernels: str = _opt(
        "auto",
        "compute kernels: auto (moecl's CPU backend, moecl.backends.cpu, for a float32 model on an AMD CPU, where "
        "it was measured to help; PyTorch's and transformers' own modules anywhere else: Intel CPUs, GPUs, "
        "bf16/fp16), stock (the own modules everywhere) or cpu (the CPU backend for any float32 model on a CPU); "
        "results.json records what was applied",
        choices=["auto", "stock", "cpu"],
    )
    general: str | None = _opt(
        None,
        "general-ability suite scored through lm-eval before the stream (base model, cached) and after it: "
        "small (HellaSwag, ARC-Easy/Challenge, PIQA, BoolQ, MMLU cloze) or paper (MMLU 5-shot, GSM8K 8-shot, "
        "BBH-source 3-shot, BoolQ, PIQA); adds general and delta_RG to results.json; none: off",
        choices=[None, "none", "small", "paper"],
    )
    general_limit: int | None = _opt(100, "items per general-ability benchmark (seeded subset; null: all)")
    eval_all_tasks: bool = _opt(False, "after every task evaluate all tasks, and the base model first (enables FWT)")
    bwt_convention: str = _opt("seed", "BWT definition", choices=list(BWT_CONVENTIONS))

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = DEFAULT_LR.get(self.method, 3e-3)
        if self.general == "none":
            self.general = None
        if self.replay is None:
            self.replay = DEFAULT_REPLAY.get(self.method, 0.0)
        if self.target_modules is None:
            self.target_modules = DEFAULT_TARGETS.get(self.method, ["all-linear"])
        for name in ("tasks", "target_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [v.strip() for v in value.split(",") if v.strip()])
        for f in fields(self):
            check_type(f.name, f.type, getattr(self, f.name))
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name}={getattr(self, f.name)!r} is not one of {', '.join(map(str, choices))}")
        if self.benchmark == "trace" and not self.data_dir:
            raise ValueError("--benchmark trace reads TRACE's files: pass --data-dir DIR")
        for name, low in AT_LEAST.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"{name} must be at least {low}, got {value}")
        for name, (low, high, closed) in FRACTIONS.items():
            value = getattr(self, name)
            if value is not None and not (low <= value <= high if closed else low <= value < high):
                raise ValueError(f"{name} must lie in [{low}, {high}{']' if closed else ')'}, got {value}")
        for name in ("lr", "alpha", "router_lr", "lwf_temperature"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value}")
        check_tau(self.tau)
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}: the "
                "effective batch is micro-batch x accumulation steps x processes"
            )
        if self.method == "moses" and self.top_k > self.initial_experts:
            raise ValueError(f"top_k {self.top_k} exceeds initial_experts {self.initial_experts}: too few sub-experts")
        if self.tasks is not None:
            if not self.tasks:
                raise ValueError("tasks is empty; name tasks, or leave it out for the stream's default selection")
            for name in self.tasks:
                check_task_name(name, "--tasks")
            twice = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
            if twice:
                raise ValueError(f"--tasks names {', '.join(twice)} more than once; each task joins the stream once")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("target_modules is empty; name projections such as q_proj,v_proj, or all-linear")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def defaults() -> dict[str, Any]:
        """Every option's declared default (before the method-dependent ones are resolved)."""
        return {f.name: f.default for f in fields(RunConfig)}


AT_LEAST = {
    "train_size": 1,
    "test_size": 1,
    "eval_size": 1,
    "epochs": 1,
    "batch_size": 1,
    "micro_batch_size": 1,
    "max_prompt_tokens": 1,
    "max_answer_tokens": 1,
    "max_new_tokens": 1,
    "eval_batch_size": 1,
    "length_window": 1,
    "save_every": 0,
    "seed": 0,
    "rank": 1,
    "sub_rank": 1,
    "top_k": 1,
    "initial_experts": 1,
    "new_per_task": 0,
    "icl_shots": 0,
    "icl_max_prompt_tokens": 1,
    "weight_decay": 0,
    "lambda_route": 0,
    "lambda_orth": 0,
    "lambda_l2": 0,
    "lambda_route_distill": 0,
    "router_refit_steps": 0,
    "lambda_ewc": 0,
    "ewc_samples": 1,
    "lambda_lwf": 0,
    "agem_memory": 1,
    "loramoe_experts": 2,
    "lambda_balance": 0,
    "general_limit": 1,
}
"""Lower bounds of numeric options (``None`` stays allowed where the type allows it)."""
FRACTIONS = {
    "replay": (0, 1, True),
    "warmup_ratio": (0, 1, False),
    "lora_dropout": (0, 1, False),
    "balance_delta": (0, 1, False),
}
"""Options that are shares: (low, high, whether high itself is allowed)."""


def check_type(name: str, annotation: str, value: Any) -> None:
    """Refuse a value of the wrong type for its field's annotation (YAML and ``key=value`` hand
    over whatever they parsed: ``epochs=2.5`` is a float, ``lr=.inf`` an infinite one)."""
    allowed = [a.strip() for a in annotation.split("|")]
    if value is None:
        if "None" in allowed:
            return
        raise ValueError(f"{name} needs a value ({annotation}), got null")
    ok = {
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }
    if not any(ok.get(a, False) for a in allowed):
        raise ValueError(f"{name}={value!r} is not of type {annotation}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: give a finite number")


def _number(text: str) -> int | float | str:
    """``"24"`` -> 24 blocks, ``"0.75"`` -> a fraction, ``"all"`` -> every block (tau)."""
    if text.strip() == "all":
        return "all"
    return float(text) if any(c in text for c in ".eE") else int(text)


def converter(annotation: str):
    if "list" in annotation or annotation.startswith("str"):
        return str
    if annotation.startswith("float | int | str"):
        return _number
    if annotation.startswith("int"):
        return int
    if annotation.startswith("float"):
        return float
    raise TypeError(annotation)


def _coerce(name: str, value: Any) -> Any:
    """Strings from YAML or ``key=value`` that stand for numbers become numbers (YAML reads 1e-3 as text)."""
    kind = {f.name: f.type for f in fields(RunConfig)}[name]
    if isinstance(value, str) and kind != "bool" and converter(kind) is not str:
        try:
            return converter(kind)(value)
        except ValueError as err:
            raise ValueError(f"option {name}: {value!r} is not a number") from err
    return value


def config_from_options(values: dict[str, Any]) -> RunConfig:
    """A :class:`RunConfig` from options as YAML or ``key=value`` give them: ``preset`` expands
    first (the other keys win over it), text that stands for a number becomes one, and unknown
    keys are refused by name."""
    values = dict(values)
    preset = values.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset {preset!r} is not one of {', '.join(sorted(PRESETS))}")
        values = {**PRESETS[preset], **values}
    unknown = sorted(set(values) - {f.name for f in fields(RunConfig)})
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; see `moecl run --help`")
    return RunConfig(**{k: _coerce(k, v) for k, v in values.items()})


PRESETS: dict[str, dict[str, Any]] = {
    # PMoE's router exactly as its paper (arXiv 2407.21571) describes it (Eq. 4, no router loss): raw h_tau, every new
    # expert and column at zero, every column training, 1% replay. Training budget, rank and
    # target modules stay the stream's validated defaults, so a comparison isolates the router.
    "pmoe-paper": dict(
        method="pmoe",
        **{
            name: getattr(PMoEConfig.paper(), name)
            for name in ("router_norm", "expert_init", "router_init", "freeze_router", "router_align", "router_detach")
        },
        lambda_route=0.0,
        lambda_route_distill=0.0,
        router_lr=None,
        router_refit_steps=0,
        route_balance=False,
        replay=0.01,
    ),
    # The main job's set-up with a tiny budget (CI runs it from an empty cache): the default model
    # and the shipped stream, 2 optimizer steps per task, 8 test items. Checks that everything is
    # there and runs end to end; its scores mean nothing.
    "setup-check": dict(train_size=16, test_size=8, eval_size=8, epochs=1),
    # The MoSEs paper's (arXiv 2511.06237) "TRACE 0.5K": 500 training examples per task (mini-trace
    # holds up to 500 per task).
    "0.5k": dict(method="moses", train_size=500),
    # A tiny random model learns the smoke stream with every projection adapted and 30 epochs; a
    # quarter of each past task replayed keeps it (measured with PMoE's routed defaults: OP 70.3, BWT
    # -7.3; with the paper's router 82.9 / -1.0; 10 epochs at lr 1e-2 and replay 0.1 learned nothing).
    "smoke": dict(
        model="tiny-random",
        benchmark="smoke",
        epochs=30,
        lr=3e-3,
        batch_size=8,
        micro_batch_size=8,
        replay=0.25,
        tau=1,
        rank=8,
        alpha=16.0,
        max_prompt_tokens=96,
        max_answer_tokens=24,
        eval_batch_size=24,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
}
