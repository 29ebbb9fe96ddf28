"""Training-step and inference time of PMoE's fused expert banks against PEFT's LoRA.

    python benchmarks/step_time.py              # full measurement (a few minutes on 2 cores)
    python benchmarks/step_time.py --rounds 3   # quicker, noisier

One process, one random-weight Llama (hidden 512, 8 blocks, 8 heads, vocab 8000, MLP 1376),
batch 8 x 128 tokens, LoRA rank 4 on q_proj and v_proj, tau = 0.75 (6 shallow, 2 deep blocks).
Variants are timed interleaved (round r times every variant once) so that a busy neighbour
slows all of them alike; the table reports medians and ratios to PEFT's LoRA, and the last
line is the headline ratio ``ratio pmoe_T32/peft_lora = X.XX``.

Variants: PMoE with T = 1, 8, 32 experts (fused form); PEFT LoRA with the same rank and
targets on all blocks; PMoE T = 32 computed with the per-expert reference loop. A step is
forward + backward + AdamW over the trainable parameters. Inference is a forward pass without
gradients, reported per token.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from moecl import PMoEConfig, PMoEModel
from moecl.adapters import LoRAExpertBank

BATCH, SEQ, VOCAB = 8, 128, 8000
TARGETS = ["q_proj", "v_proj"]


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        intermediate_size=1376,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
    )
    model = LlamaForCausalLM(config)
    return model


def pmoe(num_experts: int) -> PMoEModel:
    model = PMoEModel(base_model(), PMoEConfig(tau=0.75, rank=4, alpha=8, target_modules=TARGETS))
    for _ in range(num_experts):
        model.add_task()
    # Trained-looking experts and router: zero B would let a clever kernel skip nothing, but
    # random values make sure every expert's product is real work on real numbers.
    with torch.no_grad():
        for bank in model.deep_banks():
            bank.frozen_B.normal_(std=0.01)
            bank.expert_B.normal_(std=0.01)
        model.router.weight.normal_(std=0.01)
    return model


def peft_lora() -> torch.nn.Module:
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)
    return get_peft_model(base_model(), config)


@contextlib.contextmanager
def reference_loop() -> Iterator[None]:
    """Compute every expert bank with the per-expert loop (the slow oracle) while active."""
    fused = LoRAExpertBank.delta
    LoRAExpertBank.delta = LoRAExpertBank.reference_delta
    try:
        yield
    finally:
        LoRAExpertBank.delta = fused


def step_fn(model: torch.nn.Module, ids: torch.Tensor, loop: bool = False) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    model.train()

    def step() -> None:
        with reference_loop() if loop else contextlib.nullcontext():
            model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def forward_fn(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    def forward() -> None:
        model.eval()
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)

    return forward


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per call, each round calling every function once in turn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(timed(fn))
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))

    models = {"pmoe_T1": pmoe(1), "pmoe_T8": pmoe(8), "pmoe_T32": pmoe(32), "peft_lora": peft_lora()}
    steps = {name: step_fn(m, ids) for name, m in models.items()}
    steps["loop_T32"] = step_fn(pmoe(32), ids, loop=True)
    trainable = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in models.items()}

    print(f"torch {torch.__version__}, {args.threads} threads, batch {BATCH}x{SEQ}, {args.rounds} rounds")
    step_times = interleaved(steps, args.rounds, args.warmup)
    fwd_times = interleaved(
        {name: forward_fn(models[name], ids) for name in ("pmoe_T1", "pmoe_T32", "peft_lora")},
        args.rounds,
        args.warmup,
    )

    ref = step_times["peft_lora"]
    print("\n| variant | trainable params | step ms (median) | step / peft_lora |")
    print("|---|---:|---:|---:|")
    for name, t in step_times.items():
        params = trainable.get(name, trainable["pmoe_T32"])
        print(f"| {name} | {params:,} | {t * 1e3:.0f} | {t / ref:.2f} |")
    tokens = BATCH * SEQ
    print("\n| variant | forward us/token (median) | forward / pmoe_T1 |")
    print("|---|---:|---:|")
    for name, t in fwd_times.items():
        print(f"| {name} | {t / tokens * 1e6:.1f} | {t / fwd_times['pmoe_T1']:.2f} |")
    print(f"\nratio pmoe_T32_forward/pmoe_T1_forward = {fwd_times['pmoe_T32'] / fwd_times['pmoe_T1']:.2f}")
    print(f"ratio loop_T32/peft_lora = {step_times['loop_T32'] / ref:.2f}")
    print(f"ratio pmoe_T32/peft_lora = {step_times['pmoe_T32'] / ref:.2f}")


if __name__ == "__main__":
    main()
