"""The token routing view (issue 16, point 1) marks the router's top expert."""

import re

import torch
from conftest import perturb_adapters

from moecl.models.loading import tiny_random
from moecl.models.pmoe import PMoEModel
from moecl.models.pmoe_config import PMoEConfig
from moecl.reports.route import route_html, route_text, token_routes


def test_route_view_marks_the_top_expert_of_router_probs():
    base, tokenizer = tiny_random(0)
    model = PMoEModel(base, PMoEConfig(tau=1, rank=2, alpha=4))
    for _ in range(3):
        model.add_task()
    perturb_adapters(model, scale=2.0)  # a router that prefers different experts for different tokens
    text = "The <sky> is blue & the sea\\nis deep."
    pieces, probs = token_routes(model, tokenizer, text)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    expected = model.router_probs(torch.tensor([ids]))[0]
    assert torch.equal(probs, expected) and "".join(pieces) == text
    page = route_html(pieces, probs, ["a", "b", "c"], "demo")
    marked = [int(e) for e in re.findall(r'data-expert="(\d+)"', page)]
    assert marked == [int(k) + 1 for k in expected.argmax(-1)] and len(set(marked)) > 1
    assert "&lt;" in page and "<sky" not in page and "E3: c" in page and "<script" not in page
    assert route_text(pieces, probs, ["a", "b", "c"]).plain.endswith(text)
