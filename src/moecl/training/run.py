"""A continual-learning run end to end: train over the stream, fill ``R``, write the run folder
(its layout: :mod:`moecl.training.folder`).

Crash safety: every file is written atomically, and ``state.json`` only after a task's
checkpoint, predictions and replay memory are on disk. Re-running the same command resumes
after the last completed task; every RNG is re-seeded from ``(seed, task)`` at the start of a
task, so the resumed run produces the same numbers as an uninterrupted one. A damaged newest
checkpoint falls back to the one before it (said aloud), a log line cut by a crash is dropped.
One process writes a folder at a time (a second one is refused, naming the first), and a NaN or
infinite loss stops the run naming the task and step, with the last completed task's checkpoint
intact; the options in :data:`~moecl.training.folder.RESUMABLE` (a lower ``lr``) may change on
resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from moecl.backends import Applied, apply_backend, backend_for
from moecl.config import RunConfig
from moecl.data.batches import Collator
from moecl.data.trace import DataError, Example, Task, load_benchmark, read_split
from moecl.evaluation.continual import backward_transfer, forward_transfer, overall_performance
from moecl.evaluation.floors import ZeroShotCache, majority_score, zero_shot_key
from moecl.evaluation.general import BenchmarkScore, base_scores, paired, score_suite, suite_note
from moecl.evaluation.generation import generate, max_new_tokens_for, score_predictions, single_line
from moecl.evaluation.routing import Allocation, gate_summary, routing_results
from moecl.io import atomic_write_json, atomic_write_text
from moecl.methods import METHODS
from moecl.methods.base import Method, ReportContext
from moecl.models.loading import cache_dir, check_model_name, load_model, resolve_dtype
from moecl.reports.console import allocation_table, general_table, r_table
from moecl.reports.plots import plot_allocation_phases
from moecl.reports.progress import make_progress
from moecl.training.folder import RESUMABLE, RunFolder, RunFolderError
from moecl.training.lock import RunLock
from moecl.training.processes import engine_mismatch, gather, make_accelerator
from moecl.training.replay import ReplayMemory
from moecl.training.trainer import seed_everything, train_task


def benchmark_root(config: RunConfig) -> Path:
    """Where the stream's TRACE-format files are: ``mini-trace`` ships with moecl, ``smoke`` is
    generated into the cache once, ``trace`` is the user's ``--data-dir``."""
    if config.benchmark == "trace":
        return Path(config.data_dir)
    if config.data_dir:
        raise ValueError(f"--data-dir is for --benchmark trace; {config.benchmark!r} is built by moecl")
    if config.benchmark == "smoke":
        from moecl.data.smoke import VERSION as SMOKE_VERSION
        from moecl.data.smoke import build_smoke

        root = cache_dir() / "data" / f"smoke-v{SMOKE_VERSION}"
        return root if (root / "moecl_tasks.json").is_file() else build_smoke(root)
    from moecl.data.mini_trace import shipped_root

    return shipped_root()


def load_tasks(config: RunConfig) -> list[Task]:
    root = benchmark_root(config)
    tasks = load_benchmark(root, config.tasks, config.train_size, config.test_size, config.seed, config.eval_size)
    if config.eval_split == "eval":
        missing = [t.name for t in tasks if not t.eval]
        if missing:
            files = ", ".join(str(root / n / "eval.json") for n in missing)
            raise DataError(
                f"--eval-split eval scores the validation split, but {files} is missing; add eval.json "
                "to those task folders or use --eval-split test"
            )
    return tasks


def load_replay_extra(config: RunConfig) -> list[Example]:
    """``--replay-extra``'s examples, validated like a task's split (file, record and field named)."""
    if not config.replay_extra:
        return []
    path = Path(config.replay_extra)
    if not path.is_file():
        raise DataError(f"--replay-extra {path}: no such file; give a TRACE-format JSON list of prompt/answer records")
    return read_split(path)


class Run:
    """One continual-learning run over ``tasks`` into ``out`` (see the module docstring)."""

    def __init__(
        self,
        config: RunConfig,
        out: Path,
        tasks: list[Task],
        console: Console | None = None,
        progress: Progress | None = None,
        replay_extra: list[Example] | None = None,
        changes: dict[str, list[Any]] | None = None,
    ):
        self.config, self.out, self.tasks = config, out, tasks
        self.replay_extra = replay_extra or []  # --replay-extra's examples (read and checked by run())
        self.shared_progress = progress  # a caller's live progress display (a study's) to add bars to
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = resolve_dtype(config.dtype, device)
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "no")
        self.accelerator = make_accelerator(device, precision)
        self.main = self.accelerator.is_main_process
        self.console = console or Console()
        if self.main and (note := engine_mismatch(self.accelerator)):
            self.console.print(f"[yellow]note: {note}[/]")
        self.method: Method = METHODS[config.method](config)
        self.applied = Applied("stock")  # what the compute backend changed in this run's model
        self.process_settings: dict[str, Any] = {}
        self.folder = RunFolder(out)
        self.state: dict[str, Any] = self.folder.read_state() or {
            "completed": 0,
            "R": [],
            "zero_shot": None,
            "train": [],
            "wall_seconds": 0.0,
        }
        if changes:
            self.resume_with(changes)

    def say(self, text: str) -> None:
        if self.main:
            self.console.print(text, soft_wrap=True, markup=False, highlight=False)

    def resume_with(self, changes: dict[str, list[Any]]) -> None:
        """Record options changed on resume (:data:`~moecl.training.folder.RESUMABLE`); an
        interrupted task starts again from its beginning, under the new options."""
        done = self.state["completed"]
        shown = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items())
        self.state.setdefault("option_changes", []).append({"from_phase": done + 1, "options": changes})
        partial = self.state.get("partial")
        if partial is not None:
            self.state["partial"] = None
            self.say(f"{self.out}: resuming with {shown}; phase {done + 1} starts again from its beginning")
        else:
            self.say(f"{self.out}: resuming with {shown} from phase {done + 1}")
        if self.main:
            atomic_write_json(self.folder.state, self.state)
            if partial is not None:
                shutil.rmtree(self.folder.checkpoint(partial["dir"]), ignore_errors=True)

    # -- files (main process only) ------------------------------------------------------------

    def log(self, record: dict[str, Any]) -> None:
        if self.main:
            self.folder.append_log(record)

    def save_mid_task(self, model: torch.nn.Module, t: int, snapshot: dict[str, Any]) -> None:
        """Checkpoint phase ``t`` after optimizer step ``snapshot["step"]``: the method's weights and
        the trainer's state go to a new folder under a temporary name, renamed once complete;
        then ``state.json`` points to it and the previous mid-task folder is removed. A crash at
        any moment leaves ``state.json`` pointing to a complete checkpoint."""
        if not self.main:
            return
        folder = self.folder.checkpoint(f"task-{t}-step-{snapshot['step']}")
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with writing(folder):
            self.method.save(model, tmp)
            torch.save({k: snapshot[k] for k in ("optimizer", "schedule", "torch_rng")}, tmp / "trainer_state.pt")
        position = {k: snapshot[k] for k in ("step", "micro", "tokens", "padded", "last_loss", "python_rng")}
        atomic_write_json(tmp / "position.json", {"task": t, **position})
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        previous = self.state.get("partial")
        self.state["partial"] = {"task": t, "step": snapshot["step"], "dir": folder.name}
        atomic_write_json(self.folder.state, self.state)
        if previous is not None and previous["dir"] != folder.name:
            shutil.rmtree(self.folder.checkpoint(previous["dir"]), ignore_errors=True)

    def _trim_log(self) -> None:
        """Drop log lines of a task that was interrupted (it is trained again from its start)."""
        if self.main:
            for note in self.folder.trim_log(self.state["completed"], self.state.get("partial")):
                self.say(f"note: {note}")

    def progress(self) -> contextlib.AbstractContextManager[Progress]:
        """The caller's live progress display if one was handed in (rich allows one at a time), else
        a transient one of our own."""
        if self.shared_progress is not None:
            return contextlib.nullcontext(self.shared_progress)
        columns = (TextColumn("{task.description:<36}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        return make_progress(self.console, *columns, disable=not self.main, transient=True)

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(
        self,
        model: torch.nn.Module,
        tokenizer,
        task: Task,
        progress: Progress | None,
        label: str,
        plain: bool = False,
        take_gates: Callable[[], torch.Tensor | None] | None = None,
        gates: list[list[float]] | None = None,
    ) -> tuple[float, list[dict]]:
        """Score on ``task``'s scored split (``eval_split``); the examples are split across processes.
        ``plain``: the prompts as they are (the base model's zero-shot floor), not the method's.
        With ``take_gates`` (a method's :meth:`~moecl.methods.base.Method.recording_gates`), every
        example's mean gate over its prompt tokens and mean gate entropy, ``[g_1..g_T, H]``, are
        appended to ``gates``, read from the generation's own forward pass."""
        acc, method = self.accelerator, self.method
        prompts_for = (lambda task, prompts, tok: prompts) if plain else method.eval_prompts
        prompt_tokens = self.config.max_prompt_tokens if plain else method.prompt_tokens()
        progress = progress or Progress(disable=True)
        split = task.split(self.config.eval_split)
        bar = progress.add_task(f"eval {task.name} {label}", total=len(split))
        local_gates: list[list[float]] = []

        def record(batch: dict[str, torch.Tensor]) -> None:
            means, entropy = gate_summary(take_gates(), batch["attention_mask"])
            local_gates.extend(torch.cat([means, entropy[:, None]], 1).tolist())

        with acc.split_between_processes(list(range(len(split)))) as part:
            examples = [split[i] for i in part]
            raw = generate(
                model,
                tokenizer,
                prompts_for(task, [e.prompt for e in examples], tokenizer),
                self.max_new_tokens(task, tokenizer),
                prompt_tokens,
                self.config.eval_batch_size,
                lambda n: progress.advance(bar, n * acc.num_processes),
                record if take_gates is not None else None,
                single_line(task),
            )
            local = [asdict(p) for p in score_predictions(task, examples, raw)]
        preds = gather(acc, local)
        if take_gates is not None:
            gates.extend(gather(acc, local_gates))
        progress.remove_task(bar)
        return sum(p["score"] for p in preds) / len(preds), preds

    def report_context(self, tokenizer) -> ReportContext:
        """The narrow view of this run a method's report gets."""

        def score(model: torch.nn.Module, task: Task, label: str) -> float:
            return self.evaluate(model, tokenizer, task, None, label)[0]

        return ReportContext(self.tasks, score, self.main, self.out)

    def max_new_tokens(self, task: Task, tokenizer) -> int:
        return self.config.max_new_tokens or max_new_tokens_for(task, tokenizer, self.config.max_answer_tokens)

    def floors(self, base: torch.nn.Module, tokenizer) -> dict[str, dict[str, float]]:
        """Each task's majority-class and zero-shot (untouched base model, plain prompts) scores on
        the scored split; zero-shot scores come from the cache when this model saw these items."""
        cfg = self.config
        cache = ZeroShotCache(cache_dir() / "floors")
        keys, floors = {}, {}
        for task in self.tasks:
            split = task.split(cfg.eval_split)
            settings = {
                "max_new_tokens": self.max_new_tokens(task, tokenizer),
                "max_prompt_tokens": cfg.max_prompt_tokens,
                **({} if self.dtype == torch.float32 else {"dtype": str(self.dtype)}),  # fp32 keys as before
            }
            keys[task.name] = zero_shot_key(cfg.model, task, split, settings)
            floors[task.name] = {"majority": majority_score(task, split), "zero_shot": cache.get(keys[task.name])}
        missing = [t for t in self.tasks if floors[t.name]["zero_shot"] is None]
        if missing:
            base.to(self.accelerator.device)
            with self.progress() as progress:
                for task in missing:
                    value, _ = self.evaluate(base, tokenizer, task, progress, "zero-shot floor", plain=True)
                    floors[task.name]["zero_shot"] = value
                    if self.main:
                        n = len(task.split(cfg.eval_split))
                        cache.put(keys[task.name], cfg.model, task.name, value, n)
        return floors

    def evaluate_row(
        self, model, tokenizer, upto: int, progress: Progress, label: str, allocation: Allocation | None = None
    ) -> list[float | None]:
        """R's row: tasks ``0..upto`` scored (all with ``eval_all_tasks``). With ``allocation``, a
        routed method's gates on tasks ``0..upto``, read during their generation, join it as rows
        (where the router sends each task: :mod:`moecl.evaluation.routing`)."""
        last = len(self.tasks) - 1 if self.config.eval_all_tasks else upto
        row: list[float | None] = [None] * len(self.tasks)
        recording = self.method.recording_gates(model) if allocation is not None else contextlib.nullcontext()
        with recording as take:
            for i in range(last + 1):
                self.method.before_eval(model, i)
                gates: list[list[float]] = []
                take_i = take if i <= upto else None
                row[i], preds = self.evaluate(
                    model, tokenizer, self.tasks[i], progress, label, take_gates=take_i, gates=gates
                )
                if take_i is not None:
                    table = torch.tensor(gates)  # (examples, experts + 1)
                    allocation.add_task([(table[:, :-1], table[:, -1])])
                if self.main:
                    body = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds)
                    atomic_write_text(self.folder.predictions / label / f"{self.tasks[i].name}.jsonl", body)
        return row

    # -- the run --------------------------------------------------------------------------------

    def execute(self) -> dict[str, Any]:
        cfg, out, acc = self.config, self.out, self.accelerator
        start = time.perf_counter()
        if backend_for(cfg.kernels, acc.device, self.dtype) == "cpu":
            from moecl.backends import cpu

            self.process_settings = cpu.prepare_process()  # before the first product (MKL, if opted in)
        base, tokenizer = load_model(cfg.model, seed=cfg.seed, dtype=self.dtype)
        self.applied = apply_backend(base, cfg.kernels, acc.device, self.dtype)
        if self.state.get("floors") is None:  # before any adapter touches the base model
            self.state["floors"] = self.floors(base, tokenizer)
        if cfg.general and suite_note(cfg.general) and self.main:
            self.console.print(f"note: {suite_note(cfg.general)}", soft_wrap=True)
        if cfg.general and self.state.get("general_before") is None:
            base.to(acc.device)
            before = base_scores(cfg.model, base, tokenizer, cfg.general, cfg.general_limit, self.dtype)
            self.state["general_before"] = {name: score.to_json() for name, score in before.items()}
        model, resume = self.restore(base)
        self.applied.merge(apply_backend(model, cfg.kernels, acc.device, self.dtype))  # adapters, a new base
        done = self.state["completed"]
        memory = ReplayMemory(cfg.replay, cfg.seed)  # rebuilt: each task's sample depends on (seed, task) only
        for phase in self.phases()[:done]:
            for i in phase:
                memory.add_task(i, self.tasks[i].train)
        self._trim_log()
        model.to(acc.device)
        if cfg.gradient_checkpointing and self.method.trains:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        collator = Collator(tokenizer, cfg.max_prompt_tokens, cfg.max_answer_tokens)
        with self.progress() as progress:
            if cfg.eval_all_tasks and self.state["zero_shot"] is None:
                self.state["zero_shot"] = self.evaluate_row(
                    model, tokenizer, len(self.tasks) - 1, progress, "zero-shot"
                )
            phases = self.phases()
            for t in range(done, len(phases)):
                seed_everything(cfg.seed, t)
                own = [e for i in phases[t] for e in self.tasks[i].train]
                self.method.before_task(model, t, own, collator)
                self.applied.merge(apply_backend(model, cfg.kernels, acc.device, self.dtype))  # new adapters
                items = [(i, e) for i in phases[t] for e in self.tasks[i].train] + memory.items
                if t > 0:  # alignment data joins the replay memory: trained as the current task's data
                    items += [(phases[t][-1], e) for e in self.replay_extra]
                name = "+".join(self.tasks[i].name for i in phases[t])
                stats = {"steps": 0, "tokens": 0, "last_loss": None, "planned_steps": 0}
                if self.method.trains:
                    bar = progress.add_task(f"train {name} ({t + 1}/{len(phases)}), steps", total=None)
                    stats = train_task(
                        acc,
                        self.method,
                        model,
                        collator,
                        items,
                        cfg,
                        t,
                        self.log,
                        lambda info, b=bar: progress.update(
                            b,
                            total=info["total"],
                            completed=info["step"],
                            loss=f"{info['loss']:.4f}",
                            tokens_per_s=f"{info['tokens_per_s']:.0f}",
                        ),
                        f"{name} (phase {t + 1} of {len(phases)})",
                        resume if t == done else None,
                        lambda snapshot, t=t: self.save_mid_task(model, t, snapshot),
                    )
                    progress.remove_task(bar)
                self.method.after_task(model, t, own, collator, memory.items)
                for i in phases[t]:
                    memory.add_task(i, self.tasks[i].train)
                gates = Allocation()
                row = self.evaluate_row(model, tokenizer, phases[t][-1], progress, f"after-task-{t}", gates)
                self.state["R"].append(row)
                allocation = gates.to_json() if gates.matrix else None
                if allocation is not None:
                    self.state.setdefault("allocation", []).append(allocation)
                examples = len(items) if self.method.trains else 0
                options = {k: getattr(cfg, k) for k in RESUMABLE}  # those that may change on resume
                self.state["train"].append({"task": name, "examples": examples, **stats, "options": options})
                self.state["completed"] = t + 1
                finished_partial, self.state["partial"] = self.state.get("partial"), None
                self.state["wall_seconds"] += time.perf_counter() - start
                start = time.perf_counter()
                if self.main:
                    with writing(self.folder.checkpoint(f"task-{t}")):
                        self.method.save(model, self.folder.checkpoint(f"task-{t}"))
                    atomic_write_json(self.folder.replay, memory.to_json())
                    atomic_write_json(self.folder.state, self.state)  # last: marks task t complete
                    if finished_partial is not None:
                        shutil.rmtree(self.folder.checkpoint(finished_partial["dir"]), ignore_errors=True)
                    title = f"R after phase {t + 1} ({cfg.eval_split} split)"
                    self.console.print(r_table(self.tasks, self.state["R"], title, phases, self.state["floors"]))
                    if allocation is not None:
                        caption = f"router allocation after phase {t + 1}"
                        self.console.print(allocation_table(self.tasks, allocation, caption))
                        plot_allocation_phases(
                            [a["matrix"] for a in self.state["allocation"]],
                            [task.name for task in self.tasks],
                            out / "router_allocation.png",
                        )
                acc.wait_for_everyone()
        general = self.general_after(model, base, tokenizer) if cfg.general else {}
        results = {**self.results(model, tokenizer, time.perf_counter() - start), **general}
        if self.main:
            atomic_write_json(self.folder.results, results)
        acc.wait_for_everyone()
        return results

    def restore(self, base: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, Any] | None]:
        """The model to train on from, and the trainer's mid-task snapshot if there is one.

        Resumes from the newest checkpoint that loads: the mid-task one (``--save-every``), else the
        last completed task's. A damaged one is named and the one before it taken (the tasks after
        it are trained again); with none left the run starts from the base model."""
        cfg, done = self.config, self.state["completed"]
        partial = self.state.get("partial")
        if partial is not None and partial["task"] == done:  # a mid-task checkpoint (--save-every)
            path = self.folder.checkpoint(partial["dir"])
            try:
                seed_everything(cfg.seed, -1)
                model, resume = self.method.load(base, path), load_mid_task(path)
            except Exception as err:  # noqa: BLE001 (any fault of a damaged folder: safetensors, torch, JSON)
                self.say(
                    f"note: {path} is damaged ({first_line(err)}); phase {done + 1} starts again from its beginning"
                )
                self.state["partial"] = None
                base = self.fresh_base()
            else:
                self.say(f"resuming {self.out} inside phase {done + 1}, after its optimizer step {partial['step']}")
                return model, resume
        for k in range(done, 0, -1):
            path = self.folder.checkpoint(f"task-{k - 1}")
            try:
                seed_everything(cfg.seed, -1)
                model = self.method.load(base, path)
            except Exception as err:  # noqa: BLE001
                self.say(f"note: {path} is damaged ({first_line(err)}); trying the checkpoint before it")
                base = self.fresh_base()
                continue
            if k < done:
                self.rewind(k)
            self.say(f"resuming {self.out} after {k} of {len(self.phases())} training phases")
            return model, None
        if done:
            self.rewind(0)
        seed_everything(cfg.seed, -1)  # adapters' initial values
        return self.method.wrap(base), None

    def fresh_base(self) -> torch.nn.Module:
        """The base model again (a failed load may have put adapters on the one it was given)."""
        return load_model(self.config.model, seed=self.config.seed, dtype=self.dtype)[0]

    def rewind(self, completed: int) -> None:
        """Forget the phases after ``completed`` (their checkpoint is damaged): they are trained again."""
        self.say(f"{self.out}: phases {completed + 1}..{self.state['completed']} are trained again")
        for key in ("R", "train", "allocation"):
            if key in self.state:
                self.state[key] = self.state[key][:completed]
        self.state["completed"], self.state["partial"] = completed, None
        if self.main:
            atomic_write_json(self.folder.state, self.state)

    def general_after(self, model, base, tokenizer) -> dict[str, Any]:
        """General ability after the stream, paired with the base model's on the same items
        (results.json's ``general``, ``delta_RG``; per-item results in ``general.json``)."""
        cfg = self.config
        scored, note = self.method.general_model(model, len(self.tasks) - 1)
        start = time.perf_counter()
        after = score_suite(scored, base, tokenizer, cfg.general, cfg.general_limit, cfg.eval_batch_size)
        before = {n: BenchmarkScore(n, s["metric"], s["items"]) for n, s in self.state["general_before"].items()}
        seconds = round(time.perf_counter() - start, 1)
        out = {
            **paired(before, after),
            "general_suite": cfg.general,
            "general_suite_note": suite_note(cfg.general),
            "general_scored_with": note,
            "general_seconds": seconds,  # this process's time for the after-stream pass
        }
        if self.main:
            atomic_write_json(
                self.folder.general,
                {"before": self.state["general_before"], "after": {n: s.to_json() for n, s in after.items()}},
            )
            self.console.print(general_table(out, f"general ability ({cfg.general} suite)"))
            self.console.print(f"general ability after the stream scored in {seconds:.0f} s")
        return out

    def phases(self) -> list[list[int]]:
        """The task indices trained in each phase: one task each, or all at once for a joint method."""
        indices = list(range(len(self.tasks)))
        return [indices] if self.method.joint else [[i] for i in indices]

    def results(self, model, tokenizer, extra_seconds: float) -> dict[str, Any]:
        cfg, R = self.config, self.state["R"]
        trainable, total = self.method.parameter_counts(model)
        train = self.state["train"]
        joint = self.method.joint  # one row over all tasks: no score before/after to compare
        return {
            "method": cfg.method,
            "model": cfg.model,
            "benchmark": cfg.benchmark,
            "tasks": [t.name for t in self.tasks],
            "metrics": {t.name: t.metric for t in self.tasks},
            "R": R,
            "phases": self.phases(),
            "OP": sum(R[0]) / len(R[0]) if joint else overall_performance(R),
            "BWT": None if joint else backward_transfer(R, cfg.bwt_convention),
            "FWT": None if joint else forward_transfer(R, self.state["zero_shot"]),
            "bwt_convention": cfg.bwt_convention,
            "zero_shot": self.state["zero_shot"],
            "eval_split": cfg.eval_split,
            "floors": self.state["floors"],
            **routing_results(self.state.get("allocation")),
            **self.method.report(self.report_context(tokenizer), model, tokenizer),
            "kernels": {"requested": cfg.kernels, **self.applied.to_json(), "process": self.process_settings},
            "seed": cfg.seed,
            "trainable_params": trainable,
            "total_params": total,
            "train": train,
            "train_tokens": sum(s["tokens"] for s in train),
            "wall_seconds": round(self.state["wall_seconds"] + extra_seconds, 2),
        }


def load_mid_task(folder: Path) -> dict[str, Any]:
    """The trainer's snapshot saved by :meth:`Run.save_mid_task`, as ``train_task`` takes it back."""
    state = torch.load(folder / "trainer_state.pt", weights_only=True)
    return {**state, **json.loads((folder / "position.json").read_text())}


def run(
    config: RunConfig,
    out: Path,
    force: bool = False,
    console: Console | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Check the options, the data and the run folder, then train and evaluate over the whole
    stream. Nothing is written before every check has passed. ``progress``: a live display to
    add this run's bars to (a study's)."""
    folder = RunFolder(out)
    # Only the main process checks, locks and writes the folder; the other ranks of `accelerate
    # launch` are its helpers and learn what it decided.
    state = PartialState(cpu=not torch.cuda.is_available())  # as the run's Accelerator sees it
    if state.is_main_process:
        folder.check_usable()  # never a lock file in a folder that is not a run
    check_model_name(config.model)
    tasks = load_tasks(config)  # every file is validated before anything is created or trained
    replay_extra = load_replay_extra(config)
    lock = RunLock(out) if state.is_main_process else contextlib.nullcontext()
    with lock:
        if isinstance(lock, RunLock) and lock.previous and lock.previous.get("pid") != os.getpid():
            (console or Console()).print(
                f"{out}: its last writer (pid {lock.previous.get('pid')} on {lock.previous.get('host')}) is gone; "
                "taking the folder over"
            )
        decided = [folder.prepare(config.to_dict(), force, RunConfig.defaults()) if state.is_main_process else None]
        if state.num_processes > 1:
            broadcast_object_list(decided)  # the option changes on resume, once the folder is ready
        return Run(config, out, tasks, console, progress, replay_extra, decided[0]).execute()


@contextlib.contextmanager
def writing(path: Path):
    """Name ``path`` and what to do when writing it fails: safetensors reports a full disk as its
    own error, not as an ``OSError``."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as err:
        raise RunFolderError(
            f"{path}: could not write the checkpoint ({first_line(err)}); free space on that disk or make the "
            "folder writable, then run the same command again: it resumes from the last complete checkpoint"
        ) from err


def first_line(err: BaseException) -> str:
    """An exception's message, first line only and capped, for a one-line note."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:200]
