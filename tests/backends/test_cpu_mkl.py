"""unlock_mkl (moecl.backends.cpu.mkl): MKL's Intel kernels on AMD CPUs, only before the first product.

Each case runs in a fresh interpreter: MKL fixes its kernels at the first product of a process,
and this test process has long multiplied.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from moecl.backends.cpu.mkl import cpu_vendor, report

SCRIPT = """
import json, os, sys, torch
if sys.argv[1] == "late":
    torch.ones(4, 4) @ torch.ones(4, 4)
from moecl.backends.cpu.mkl import unlock_mkl
state = unlock_mkl()
torch.manual_seed(0)
a, b = torch.randn(300, 200), torch.randn(200, 100)
q, k, v = (torch.randn(2, 3, 40, 16) for _ in range(3))
mm_err = ((a @ b).double() - a.double() @ b.double()).abs().max().item()
att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
mask = torch.ones(40, 40, dtype=torch.bool).tril()
w = (q.double() @ k.double().transpose(-1, -2) / 4).masked_fill(~mask, float("-inf")).softmax(-1)
att_err = (att.double() - w @ v.double()).abs().max().item()
cbwr = os.environ.get("MKL_CBWR")
print(json.dumps({"state": state, "again": unlock_mkl(), "mm_err": mm_err, "att_err": att_err, "cbwr": cbwr}))
"""


def fresh(mode: str, **env: str) -> dict:
    inherited = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "MOECL_MKL_UNLOCK")}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, env={**inherited, **env}
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


amd_mkl = pytest.mark.skipif(
    cpu_vendor() != "AuthenticAMD" or not torch.backends.mkl.is_available(), reason="needs MKL on an AMD CPU"
)


@amd_mkl
def test_unlocked_before_the_first_product_and_the_products_stay_right():
    result = fresh("early", MOECL_MKL_UNLOCK="1")
    assert result["state"] == "unlocked" and result["again"] == "unlocked"  # idempotent
    assert result["mm_err"] < 1e-4 and result["att_err"] < 1e-5  # against float64 references
    # MKL's reproducible mode: without it a model's first vocabulary projection differed in the last
    # bits from the next ones, and whole runs drifted apart (issue 14's note)
    assert result["cbwr"] == "AUTO,STRICT"
    # a user's own choice stands
    assert fresh("early", MKL_CBWR="COMPATIBLE", MOECL_MKL_UNLOCK="1")["cbwr"] == "COMPATIBLE"


@amd_mkl
def test_after_a_product_it_says_it_is_too_late():
    result = fresh("late", MOECL_MKL_UNLOCK="1")
    assert result["state"].startswith("skipped: MKL had already chosen")
    assert result["mm_err"] < 1e-4


def test_the_switch_leaves_mkl_alone():
    result = fresh("early", MOECL_MKL_UNLOCK="0")
    assert result["state"] == "skipped: off by default (MOECL_MKL_UNLOCK=1 turns it on)" and result["mm_err"] < 1e-4


def test_mkl_is_left_alone_by_default():
    result = fresh("early")  # no MOECL_MKL_UNLOCK in the environment
    assert result["state"] == "skipped: off by default (MOECL_MKL_UNLOCK=1 turns it on)" and result["mm_err"] < 1e-4


def test_a_patch_that_came_too_late_is_undone_and_never_reported_as_skipped_while_it_stays():
    assert report(7, True) == "unlocked"
    assert report(0, False).startswith("skipped:") and "undone" in report(0, False)
    assert report(0, True).startswith("failed:")  # bytes left rewritten are never called "skipped"
