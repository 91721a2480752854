"""One rank of tests/test_frontier_model.py's two-rank check of GRAD_CLIP_PER_RANK.

Launched as `python -m torch.distributed.run --standalone --nproc_per_node=2 frontier_dist_worker.py OUT_DIR`
with the frontier switches of a tiny run in the environment. Trains two steps with looping off and
two with looping on through the real Trainer, compiled (Dynamo's eager backend, which compiles
nothing, counting the graphs it is handed), and records for every step this rank's own gradients
as the clip receives them and the gradients the first optimizer then steps with. Writes
OUT_DIR/rank{RANK}.pt: those, the final weights, whether training used DDP, Muon's class, and the
graphs per mode.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_gpt as tg  # noqa: E402


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    h = tg.Hyperparameters.from_env(compile=True)
    rt = tg.Runtime(h)
    graphs: list[int] = []

    def counting_backend(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return torch._dynamo.lookup_backend("eager")(gm, example_inputs)

    torch.compile = functools.partial(torch.compile, backend=counting_backend)
    torch.manual_seed(h.seed)
    model = tg.build_model(h, rt.device, rt.is_cuda)
    trainer = tg.Trainer(h, rt, model)
    names = {id(p): n for n, p in model.named_parameters()}
    steps: list[dict] = []

    real_clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *args, **kwargs):
        params = list(params)
        steps.append({"local": {names[id(p)]: p.grad.detach().clone() for p in params if p.grad is not None}})
        return real_clip(params, max_norm, *args, **kwargs)

    torch.nn.utils.clip_grad_norm_ = recording_clip
    first = trainer.optimizers[0]
    real_step = first.step

    def recording_step(*args, **kwargs):
        steps[-1]["averaged"] = {names[id(p)]: p.grad.detach().clone() for p in model.parameters() if p.grad is not None}
        return real_step(*args, **kwargs)

    first.step = recording_step
    loader = tg.ShuffledSequenceLoader(h.train_files, h.train_seq_len, rt.rank, rt.world_size)
    per_mode = {}
    for looping in (False, True):
        model.looping_active = looping
        before = len(graphs)
        for step in range(2):
            trainer.step(loader, step, 1.0)
        per_mode[str(looping)] = len(graphs) - before
    result = dict(steps=steps, state=model.state_dict(), graphs_per_mode=per_mode,
                  ddp=isinstance(trainer.fwd, torch.nn.parallel.DistributedDataParallel),
                  muon=type(trainer.muon).__name__)
    torch.save(result, Path(out_dir) / f"rank{rt.rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
