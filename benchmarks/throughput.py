"""How close training and evaluation come to this machine's limit, on the default stream.

    python benchmarks/throughput.py               # 2-6 minutes on 2 cores (SmolLM2 cached)
    python benchmarks/throughput.py --rounds 1    # quicker, noisier
    python benchmarks/throughput.py --pieces      # also every piece, and every piece but one

One process, three measurements:

(a) the float32 matmul rate at the model's projection shapes (every linear layer of a block, as
    many rows as a training micro-batch has tokens), through PyTorch's default kernel (MKL on
    this CPU) and through oneDNN; the machine's limit is the faster of the two. It is measured
    again in every round, just before that round's training, because it drifts between minutes
    (500-537 GFLOP/s over three runs of one afternoon) and MFU is a ratio of the two;
(b) PMoE training steps (``moecl.training.trainer.train_task``: forward, router losses, backward,
    AdamW) on SmolLM2-135M (the real one when cached, else a random model of its shape) over the
    first micro-batches of an epoch of each default task, counting real (unpadded) tokens;
(c) greedy generation on the default stream's test prompts: prompts/s and new tokens/s.

Like a ``moecl run`` that applies the CPU backend, it first makes the backend's one process-wide
setting (``moecl.backends.cpu.prepare_process``: MKL's vendor check, only with
``MOECL_MKL_UNLOCK=1``). (b) and (c) run two variants interleaved round by round, on the same
length-grouped micro-batches: ``stock`` (``--kernels stock``: PyTorch's and transformers' own
modules) and ``auto`` (``--kernels auto``: ``moecl.backends.cpu`` applied to the model: products
on oneDNN, grouped attention, the last block's kept positions, the merged shallow LoRA and the
expert mixture accumulated into the base product).
Model FLOPs count
``2 N`` per token forward and ``2 N`` backward (the frozen base needs input gradients only),
``N`` the base model's non-embedding weights. The last line is ``train_mfu = X.XX``: the median
over rounds of ``auto``'s real-token model FLOP rate over the limit measured in the same round.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import replace

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from moecl.backends import cpu
from moecl.backends.cpu import linear as onednn
from moecl.config import RunConfig
from moecl.data.batches import Collator, LengthGroupedBatches
from moecl.data.trace import Example, Task
from moecl.evaluation.generation import generate
from moecl.methods import METHODS
from moecl.models.loading import byte_tokenizer, load_model
from moecl.training.run import load_tasks, make_accelerator
from moecl.training.trainer import train_task

VARIANTS: dict[str, tuple[str, ...] | None] = {"stock": None, "auto": cpu.default_pieces()}
"""Each variant's backend pieces (``None``: stock modules; auto: this CPU's default pieces);
``--pieces`` adds every piece, and every piece but one."""


@contextlib.contextmanager
def kernels(model: nn.Module, pieces: tuple[str, ...] | None) -> Iterator[None]:
    """The CPU backend's ``pieces`` applied to ``model`` (all: ``--kernels auto``), undone
    afterwards; ``None``: the stock modules (``--kernels stock``)."""
    applied = cpu.apply(model, pieces) if pieces is not None else None
    try:
        yield
    finally:
        if applied is not None:
            applied.undo()


def smollm2():
    """SmolLM2-135M and its tokenizer; a random model of its shape where the weights are missing."""
    try:
        return (*load_model("smollm2-135m"), "SmolLM2-135M")
    except ValueError:
        config = LlamaConfig(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            tie_word_embeddings=True,
            max_position_embeddings=2048,
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
        tokenizer = byte_tokenizer()
        tokenizer.padding_side = "left"
        return model, tokenizer, "random SmolLM2-135M-shaped Llama (weights not cached)"


def non_embedding_params(model: nn.Module) -> int:
    """Weights of the blocks' linear layers: the ``N`` of ``2 N`` FLOPs per token and pass."""
    head = model.get_output_embeddings()
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head)


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rates(model: nn.Module, rows: int, repeats: int) -> dict[str, float]:
    """GFLOP/s of one block's linear products for ``rows`` tokens, FLOP-weighted over the block."""
    block = model.get_decoder().layers[0]
    shapes = [m.weight.shape for m in block.modules() if isinstance(m, nn.Linear)]
    out = {}
    kernels = (("PyTorch default (MKL here)", F.linear), ("oneDNN", lambda x, w: onednn._onednn(x, w, None)))
    for name, product in kernels:
        total_flops = total_time = 0.0
        with torch.no_grad():
            for out_features, in_features in shapes:
                x, w = torch.randn(rows, in_features), torch.randn(out_features, in_features)
                total_time += best_of(lambda x=x, w=w, product=product: product(x, w), repeats)
                total_flops += 2 * rows * in_features * out_features
        out[name] = total_flops / total_time / 1e9
    return out


def stream_sample(
    tasks: list[Task], collator: Collator, config: RunConfig, steps: int, seed: int
) -> list[list[tuple[int, Example]]]:
    """The examples of ``steps`` optimizer steps of each task, as the trainer's ``(expert,
    example)`` pairs (all on the one expert the benchmark's model has): the first micro-batches
    of a whole epoch's length-grouped order, so that they pad as the run's batches do (grouping a
    small random sample instead would pad more: its examples lie further apart in length)."""
    sample = []
    for task in tasks:
        lengths = [collator.length(e) for e in task.train]
        order = LengthGroupedBatches(
            lengths, config.micro_batch_size, torch.Generator().manual_seed(seed), config.length_window
        )
        batches = list(order)[: steps * config.batch_size // config.micro_batch_size]
        sample.append([(0, task.train[i]) for batch in batches for i in batch])
    return sample


def epoch_padding(tasks: list[Task], config: RunConfig, collator: Collator, window: int) -> float:
    """Share of padding over one epoch of every task's micro-batches."""
    real = padded = 0
    for task in tasks:
        lengths = [collator.length(e) for e in task.train]
        sampler = LengthGroupedBatches(lengths, config.micro_batch_size, torch.Generator().manual_seed(0), window)
        for batch in sampler:
            real += sum(lengths[i] for i in batch)
            padded += max(lengths[i] for i in batch) * len(batch)
    return 1 - real / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are reported)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per task per round")
    parser.add_argument("--eval-prompts", type=int, default=32, help="test prompts per task per round")
    parser.add_argument(
        "--profile", action="store_true", help="then profile `auto`'s steps on the first task; print the top operators"
    )
    parser.add_argument(
        "--pieces", action="store_true", help="also time every backend piece, and every piece but one (what each buys)"
    )
    args = parser.parse_args()
    if args.pieces:
        VARIANTS["all"] = tuple(cpu.PIECES)
        VARIANTS.update({f"all - {p}": tuple(q for q in cpu.PIECES if q != p) for p in cpu.PIECES})
    process = cpu.prepare_process()  # before any product, as `moecl run --kernels auto` does
    console = Console(width=max(Console().width, 110))  # the tables are wider than a default 80 columns
    torch.manual_seed(0)
    base, tokenizer, model_name = smollm2()
    n_params = non_embedding_params(base)
    config = RunConfig()
    collator = Collator(tokenizer, config.max_prompt_tokens, config.max_answer_tokens)
    method = METHODS[config.method](config)
    model = method.wrap(base)
    method.before_task(model, 0, [], collator)
    accelerator = make_accelerator(torch.device("cpu"), "no")
    tasks = load_tasks(config)
    prompts = [e.prompt for task in tasks for e in task.split("test")[: args.eval_prompts]]
    samples = stream_sample(tasks, collator, config, args.steps, seed=0)

    lengths = sorted(collator.length(e) for items in samples for _, e in items)
    rows = config.micro_batch_size * lengths[len(lengths) // 2]
    rates: list[dict[str, float]] = []  # (a), one measurement per round
    train: dict[str, list[tuple[int, int, float]]] = {v: [] for v in VARIANTS}
    evals: dict[str, list[tuple[int, float]]] = {v: [] for v in VARIANTS}
    for round_ in range(args.rounds):
        rates.append(matmul_rates(base, rows, repeats=5))
        for variant, pieces in VARIANTS.items():
            cfg = replace(config, epochs=1, save_every=0)
            with kernels(base, pieces):
                tokens = padded = 0
                seconds = 0.0
                for t, items in enumerate(samples):
                    stats = train_task(accelerator, method, model, collator, items, cfg, t, lambda record: None)
                    tokens += stats["tokens"]
                    padded += round(stats["tokens"] / (1 - stats["padding"]))
                    seconds += stats["seconds"]
                train[variant].append((tokens, padded, seconds))
        for variant, pieces in VARIANTS.items():  # all on the same weights: the same texts
            with kernels(base, pieces):
                start = time.perf_counter()
                texts = generate(model, tokenizer, prompts, 12, config.max_prompt_tokens, config.eval_batch_size)
                new_tokens = sum(len(tokenizer(x, add_special_tokens=False)["input_ids"]) for x in texts)
                evals[variant].append((new_tokens, time.perf_counter() - start))
        console.print(f"round {round_ + 1} of {args.rounds} done")

    console.print(f"process settings: {process}")
    console.print(f"model: {model_name}, N = {n_params / 1e6:.1f}M non-embedding weights; {rows} rows per product")
    table = Table(title="(a) float32 matmul rate at the model's projection shapes (median; each round)")
    table.add_column("kernel")
    table.add_column("GFLOP/s", justify="right")
    table.add_column("by round", justify="right")
    for name in rates[0]:
        by_round = [r[name] for r in rates]
        table.add_row(name, f"{statistics.median(by_round):.0f}", " ".join(f"{r:.0f}" for r in by_round))
    console.print(table)
    limits = [max(r.values()) for r in rates]
    mfu = {  # each round's model FLOP rate over the limit measured just before it
        v: [4 * n_params * t / s / 1e9 / limit for (t, _, s), limit in zip(train[v], limits, strict=True)]
        for v in VARIANTS
    }
    table = Table(title=f"(b) PMoE training, {args.steps} steps x {len(samples)} tasks per round (medians)")
    for column in ("variant", "real tokens/s", "padding", "model GFLOP/s", "MFU", "MFU by round", "speed-up"):
        table.add_column(column, justify="right")
    tok_s = {v: statistics.median(t / s for t, _, s in train[v]) for v in VARIANTS}
    for variant in VARIANTS:
        tokens, padded, _ = train[variant][0]
        gflops = 4 * n_params * tok_s[variant] / 1e9
        table.add_row(
            variant,
            f"{tok_s[variant]:.0f}",
            f"{1 - tokens / padded:.1%}",
            f"{gflops:.0f}",
            f"{statistics.median(mfu[variant]):.3f}",
            " ".join(f"{m:.2f}" for m in mfu[variant]),
            f"{tok_s[variant] / tok_s['stock']:.2f}x",
        )
    console.print(table)
    for window in (1, config.length_window):
        console.print(f"padding over a full epoch of the default stream, length_window={window}: ", end="")
        console.print(f"{epoch_padding(tasks, config, collator, window):.1%}")
    table = Table(title=f"(c) greedy generation, {len(prompts)} test prompts per round (medians)")
    for column in ("variant", "prompts/s", "new tokens/s", "speed-up"):
        table.add_column(column, justify="right")
    p_s = {v: statistics.median(len(prompts) / s for _, s in evals[v]) for v in VARIANTS}
    for variant in VARIANTS:
        n_s = statistics.median(n / s for n, s in evals[variant])
        table.add_row(variant, f"{p_s[variant]:.2f}", f"{n_s:.1f}", f"{p_s[variant] / p_s['stock']:.2f}x")
    console.print(table)
    if args.profile:
        cfg = replace(config, epochs=1, save_every=0)
        with kernels(base, VARIANTS["auto"]), torch.profiler.profile() as prof:
            train_task(accelerator, method, model, collator, samples[0], cfg, 0, lambda record: None)
        console.print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=48))
    console.print(f"train_mfu (stock) = {statistics.median(mfu['stock']):.2f}")
    console.print(f"train_mfu = {statistics.median(mfu['auto']):.2f}")


if __name__ == "__main__":
    main()
