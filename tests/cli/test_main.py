"""The `moecl` entry point itself: what it does around every command."""

import torch.distributed as dist

from moecl.cli.main import main


def test_the_process_group_is_torn_down_on_the_way_out_even_after_an_error(tmp_path):
    """Under `accelerate launch` every rank holds a gloo process group; left to interpreter exit,
    its threads can be destroyed unjoined (SIGABRT). main() destroys it, whatever the outcome."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert main(["show", str(tmp_path / "not-a-run")]) == 2  # a command that fails cleanly
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
