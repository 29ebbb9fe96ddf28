"""Which expert each token goes to (PMoE's Fig. 5): an HTML page and a terminal view.

Every token is coloured by its top expert under PMoE's router, with the whole gate on hover; a
legend names each expert's task. The page is self-contained (inline CSS, no scripts).
"""

from __future__ import annotations

import html

import torch
from rich.text import Text

from moecl.models.pmoe import PMoEModel

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f")
RICH = ("blue", "dark_orange", "green", "red", "magenta", "cyan", "yellow", "pink1", "tan")


def token_routes(model: PMoEModel, tokenizer, text: str, max_tokens: int = 2048) -> tuple[list[str], torch.Tensor]:
    """The text's tokens (as text pieces) and their gates ``(tokens, experts)`` under the router."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][-max_tokens:]
    if not ids:
        raise ValueError("the text has no tokens to route")
    device = next(model.parameters()).device
    probs = model.router_probs(torch.tensor([ids], device=device))[0].cpu()  # (tokens, experts)
    pieces = [tokenizer.decode([i]) for i in ids]
    return pieces, probs


def route_html(pieces: list[str], probs: torch.Tensor, tasks: list[str], title: str) -> str:
    """A self-contained page: tokens coloured by top expert, the gate in each token's tooltip."""
    spans = []
    for piece, gate in zip(pieces, probs, strict=True):
        top = int(gate.argmax())
        tip = " ".join(f"E{k + 1}={float(g):.2f}" for k, g in enumerate(gate))
        colour = PALETTE[top % len(PALETTE)]
        alpha = f"{int(40 + 215 * float(gate[top])):02x}"  # stronger colour for a surer gate
        body = html.escape(piece).replace("\n", "⏎<br>")
        spans.append(
            f'<span class="t" data-expert="{top + 1}" style="background:{colour}{alpha}" title="{tip}">{body}</span>'
        )
    legend = "".join(
        f'<span class="l" style="background:{PALETTE[k % len(PALETTE)]}">E{k + 1}: {html.escape(task)}</span>'
        for k, task in enumerate(tasks)
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.9}"
        ".t{border-radius:3px;padding:1px 0;white-space:pre-wrap}"
        ".l{color:white;border-radius:3px;padding:2px 8px;margin-right:6px}"
        "</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{legend}</p><p>{''.join(spans)}</p>"
        "<p><small>Colour: the token's top expert (deeper = larger gate); hover for the whole gate.</small></p>"
        "</body></html>"
    )


def route_text(pieces: list[str], probs: torch.Tensor, tasks: list[str]) -> Text:
    """The same view for the terminal (rich): each token on its top expert's colour."""
    text = Text()
    for k, task in enumerate(tasks):
        text.append(f" E{k + 1}: {task} ", style=f"white on {RICH[k % len(RICH)]}")
        text.append(" ")
    text.append("\n\n")
    for piece, gate in zip(pieces, probs, strict=True):
        text.append(piece, style=f"on {RICH[int(gate.argmax()) % len(RICH)]}")
    return text
