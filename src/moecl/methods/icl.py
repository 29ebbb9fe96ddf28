"""In-context learning: the frozen base model answers with k solved examples in its prompt."""

from __future__ import annotations

import random
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from moecl.data.trace import Example, Task
from moecl.io import atomic_write_json
from moecl.methods.base import Method

SEPARATOR = "\n\n"


class ICLMethod(Method):
    """k-shot prompting (``icl_shots``, default 6) of the base model; nothing is trained.

    Each task gets one fixed, seeded draw of ``k`` demonstrations from its training split,
    written ``prompt + answer`` and separated by a blank line, before the test prompt. When a
    prompt would exceed ``icl_max_prompt_tokens``, demonstrations are dropped, last drawn
    first, until it fits; the test prompt itself is never cut for a demonstration.
    """

    name = "icl"
    joint = True
    trains = False

    def wrap(self, base_model: PreTrainedModel) -> PreTrainedModel:
        return base_model.requires_grad_(False)

    def prompt_tokens(self) -> int:
        return self.config.icl_max_prompt_tokens

    def demonstrations(self, task: Task) -> list[Example]:
        k = min(self.config.icl_shots, len(task.train))
        return random.Random(f"icl:{self.config.seed}:{task.name}").sample(task.train, k)

    def eval_prompts(self, task: Task, prompts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[str]:
        demos = [d.prompt + d.answer + SEPARATOR for d in self.demonstrations(task)]
        demo_tokens = [len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in demos]
        budget = self.prompt_tokens()
        out = []
        for prompt in prompts:
            room = budget - len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            n = len(demos)
            while n and sum(demo_tokens[:n]) > room:
                n -= 1
            out.append("".join(demos[:n]) + prompt)
        return out

    def save(self, model: PreTrainedModel, directory: Path) -> None:
        atomic_write_json(directory / "icl.json", {"shots": self.config.icl_shots, "trained": False})

    def load(self, base_model: PreTrainedModel, directory: Path) -> PreTrainedModel:
        return self.wrap(base_model)
