"""Data-parallel training: which process this is, and the two sums the loop needs (gradients, figures).

`accelerate launch --multi_gpu --num_processes N -m ortlora.cli finetune ...` (also on CPUs; accelerate's `--cpu`
launches one process) or `torchrun --nproc_per_node N -m ortlora.cli finetune ...` starts N copies of the command;
accelerate's PartialState joins them into one torch.distributed group (gloo on CPU, nccl on CUDA). Without such a
launch there is one process and nothing here communicates.
"""

from __future__ import annotations

import os


class Processes:
    """This process's place among the data-parallel processes (rank 0 of 1 when not launched with several)."""

    def __init__(self, cpu: bool = False):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.local_rank = 0, 0
        if self.world > 1:
            from accelerate import PartialState  # initializes torch.distributed (gloo on CPU, nccl on CUDA)

            state = PartialState(cpu=cpu)  # without cpu=True it leaves CPU processes ungrouped
            self.rank, self.local_rank = state.process_index, state.local_process_index

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the processes."""
        if self.world == 1:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def sum_gradients(self, params) -> None:
        """Sum the gradients of `params` over the processes, flattened into one all_reduce."""
        if self.world == 1:
            return
        import torch
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
