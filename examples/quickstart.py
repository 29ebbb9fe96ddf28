"""PMoE in one page: two tasks in sequence on a small causal LM, no task id at inference.

    python examples/quickstart.py                      # tiny random Llama, seconds on a CPU
    python examples/quickstart.py --model DIR_OR_NAME  # any local Hugging Face causal LM, or smollm2-135m

Task 0 maps a token sequence to itself shifted by +1, task 1 by -1 on other tokens; task 1 replays
a few task-0 rows per batch, without which the router learns to send everything to the newest
expert. After each task the script prints the loss on both tasks and the router's mean gate per
task, then saves the adapters and reloads them to check the round trip.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from moecl import PMoEConfig, PMoEModel
from moecl.models.loading import load_model

SEQ, VOCAB_USED = 8, 40


def task_batch(task: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    """``prompt | answer`` rows. Task 0 draws tokens 4..21 and adds 1; task 1 draws 22..39 and
    subtracts 1: opposite rules that one adapter would trade off, on inputs a router can tell apart."""
    low = 4 + task * (VOCAB_USED - 4) // 2
    prompt = torch.randint(low, low + (VOCAB_USED - 4) // 2, (batch, SEQ), generator=gen)
    answer = prompt + 1 if task == 0 else prompt - 1
    return torch.cat([prompt, answer], dim=1)


def answer_loss(model: PMoEModel, ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[:, :SEQ] = -100  # loss on the answer only
    return model(input_ids=ids, labels=labels).loss


def load_base(name_or_path: str) -> torch.nn.Module:
    """The same base model every call (``tiny-random`` is seeded), so saved adapters reload onto it."""
    return load_model(name_or_path)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-random", help="Hugging Face name or folder, or an alias of moecl run")
    parser.add_argument("--steps", type=int, default=150, help="AdamW steps per task")
    args = parser.parse_args()
    model = PMoEModel(
        load_base(args.model),
        PMoEConfig(tau=0.5, rank=8, alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
    )
    gen = torch.Generator().manual_seed(0)
    held_out = {t: task_batch(t, 64, torch.Generator().manual_seed(100 + t)) for t in (0, 1)}

    for task in (0, 1):
        model.add_task()
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.01)
        model.train()
        for _ in range(args.steps):
            batch = task_batch(task, 16, gen)
            if task > 0:  # replay: a quarter of each batch comes from the earlier task's stream
                batch[:4] = task_batch(0, 4, gen)
            answer_loss(model, batch).backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        with torch.no_grad():
            losses = {t: answer_loss(model, ids).item() for t, ids in held_out.items()}
            gates = {t: model.router_probs(ids).mean(dim=(0, 1)).tolist() for t, ids in held_out.items()}
        trainable, total = model.parameter_counts()
        print(f"after task {task}: held-out loss " + ", ".join(f"task {t}: {v:.3f}" for t, v in losses.items()))
        for t, g in gates.items():
            print(f"  mean router gate on task {t}: " + " ".join(f"{x:.2f}" for x in g))
        print(f"  trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        reloaded = PMoEModel.from_pretrained(load_base(args.model), tmp)
    with torch.no_grad():
        same = torch.equal(reloaded(input_ids=held_out[1]).logits, model(input_ids=held_out[1]).logits)
    print(f"saved to safetensors + JSON and reloaded: logits identical = {same}")


if __name__ == "__main__":
    main()
