"""Greedy generation (moecl.evaluation.generation): batching by tokens, stopping at a line end."""

import torch


def test_generation_batches_prompts_by_length_in_tokens():
    """Prompts are grouped by their length in tokens, not characters: with a byte tokenizer "éééé"
    (8 tokens) is longer than "abcdefg" (7); the texts come back in the prompts' order."""
    from moecl.evaluation.generation import generate
    from moecl.models.loading import tiny_random

    base, tokenizer = tiny_random()
    prompts = ["éééé", "abcde", "ab", "abcdefg"]
    widths = []
    texts = generate(base, tokenizer, prompts, 2, 64, 2, on_batch=lambda b: widths.append(b["input_ids"].shape[1]))
    assert widths == [5, 8]  # (ab, abcde), (abcdefg, éééé); by characters: (ab, éééé), (abcde, abcdefg)
    for prompt, text in zip(prompts, texts, strict=True):
        assert text == generate(base, tokenizer, [prompt], 2, 64, 1)[0]


def test_one_line_generation_stops_at_the_line_end_with_the_same_predictions():
    """A model that writes "a", a line end, then "b" forever: with ``one_line`` generation stops
    after the line end (two passes instead of six), and the prediction is the same."""
    from moecl.data.trace import Example, Task
    from moecl.evaluation.generation import LineEnded, generate, postprocess
    from moecl.models.loading import tiny_random

    base, tokenizer = tiny_random()
    script = [tokenizer.convert_tokens_to_ids(t) for t in ("a", "Ċ")]  # "Ċ": the byte-level newline
    passes = []

    def force(module, args, logits):
        token = script[len(passes)] if len(passes) < len(script) else tokenizer.convert_tokens_to_ids("b")
        passes.append(token)
        logits = logits.clone()
        logits[:, -1, token] += 1e4
        return logits

    base.lm_head.register_forward_hook(force)
    task = Task("t", "accuracy", [Example("q", "one line")], [], [])
    texts = {}
    for one_line in (True, False):
        passes.clear()
        texts[one_line] = generate(base, tokenizer, ["hello", "hi"], 6, 64, 2, one_line=one_line)
        texts[one_line, "passes"] = len(passes)
    assert texts[True] == ["a\n", "a\n"] and texts[True, "passes"] == 2
    assert texts[False] == ["a\nbbbb", "a\nbbbb"] and texts[False, "passes"] == 6
    assert [postprocess(task, t) for t in texts[True]] == [postprocess(task, t) for t in texts[False]] == ["a", "a"]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("q   ", "q\n\n\n", "q x\n", "q xy")]
    done = LineEnded(tokenizer, 1)(torch.tensor(rows), None)  # after "q": blank, line ends only, text + end, text
    assert done.tolist() == [False, False, True, False]
