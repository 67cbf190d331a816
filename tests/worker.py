"""Entry point of one rank launched by :func:`tests.launch.run_ranks`."""

import importlib
import os
import sys
from pathlib import Path

import torch


def main() -> None:
    target, args_path, out_dir, devices, nodes = sys.argv[1:6]
    torch.set_num_threads(1)
    module_name, fn_name = target.split(":")
    fn = getattr(importlib.import_module(module_name), fn_name)
    kwargs = torch.load(args_path, weights_only=False)
    result = fn(out_dir=out_dir, devices=int(devices), num_nodes=int(nodes), **kwargs)
    rank = int(os.environ["NODE_RANK"]) * int(devices) + int(os.environ["LOCAL_RANK"])
    torch.save(result, Path(out_dir) / f"result{rank}.pt")
    if torch.distributed.is_initialized():
        # gloo can abort at interpreter exit when a group is still alive (pytorch/pytorch#190489)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
