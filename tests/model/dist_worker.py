"""Run by tests/model/test_checkpoint_torchrun.py under ``torchrun --nproc-per-node 2``:
every rank holds the same (replicated) model and optimizer, saves a torch_dist checkpoint
through a gloo process group, then loads it into a fresh mHC-on model (in-process toggle)."""

import sys

import torch
import torch.distributed as dist

from mhc_model import HybridModel
from mhc_model import checkpoint as C
from tests.model.helpers import tiny_config, tokens


def main(out: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = HybridModel(tiny_config("M*-E"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(tokens()).square().mean().backward()
    opt.step()
    C.save_dist(out, model, opt, iteration=7)
    on = HybridModel(tiny_config("M*-E", mhc=True))
    common = C.load_dist(out, on)
    assert common["iteration"] == 7
    with torch.no_grad():
        diff = (on(tokens()) - model(tokens())).abs().max().item()
    assert diff <= 1e-5, diff
    dist.barrier()
    if dist.get_rank() == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, f"{out}/reference.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
