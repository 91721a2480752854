"""One rank of tests/test_cuda_dist.py.

Launched as `python -m torch.distributed.run --standalone --nproc_per_node=2 cuda_dist_worker.py OUT_DIR`
with a tiny run's settings (COMPILE=1) in the environment:
1. trains two steps with looping off and two with looping on through the real Trainer (compiled
   model inside DDP, Dynamo's eager backend on CPU) and counts the graphs the backend is handed;
2. quantizes with the default (rank 0's own Hessians) into OUT_DIR/artifact.ptz and with
   GPTQ_HESSIAN_ALL_RANKS=1 into OUT_DIR/artifact_all.ptz, counting each rank's calibration
   forwards.
Rank 0 saves the weights it quantized (OUT_DIR/model.pt) and the averaged Hessians it quantized
artifact_all.ptz from (OUT_DIR/hessians_all_ranks.pt); each rank writes OUT_DIR/rank{RANK}.json.
"""

from __future__ import annotations

import copy
import functools
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_gpt as tg  # noqa: E402


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    out = Path(out_dir)
    h = tg.Hyperparameters.from_env(compile=True, quantized_model_path=str(out / "artifact.ptz"))
    rt = tg.Runtime(h)

    graphs: list[int] = []

    def counting_backend(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return torch._dynamo.lookup_backend("eager")(gm, example_inputs)

    # The product code asks for the default (inductor) backend; the graphs Dynamo hands a backend
    # (and DDPOptimizer splits) do not depend on which, and "eager" compiles none of them. DDP's first bucket is made small so that this tiny model spans
    # several buckets, as the full model's 146 MB of fp32 parameters do: with Dynamo's DDPOptimizer
    # on, each bucket boundary would cut the training graph in two.
    torch.compile = functools.partial(torch.compile, backend=counting_backend)
    dist._DEFAULT_FIRST_BUCKET_BYTES = 16 * 1024

    model = tg.build_model(h, rt.device, rt.is_cuda)
    trainer = tg.Trainer(h, rt, model)
    loader = tg.ShuffledSequenceLoader(h.train_files, h.train_seq_len, rt.rank, rt.world_size)
    per_mode = {}
    for looping in (False, True):
        model.looping_active = looping
        before = len(graphs)
        for step in range(2):
            trainer.step(loader, step, 1.0)
        per_mode[str(looping)] = len(graphs) - before

    # The Hessians each quantization is given, saved so that the test can quantize from exactly
    # these: GPTQ's error propagation can move a code by more than one step for a last-bit
    # difference in H, so an H rebuilt in the test in another summation order is no exact reference.
    collected, collect = [], tg.collect_hessians
    tg.collect_hessians = lambda *a, **kw: collected.append(collect(*a, **kw)) or collected[-1]
    forwards = []
    real_forward_hidden = model.forward_hidden
    model.forward_hidden = lambda ids: forwards.append(ids.shape[0]) or real_forward_hidden(ids)
    calibration = {}
    for name, hh in (("rank0", h), ("all_ranks", copy.copy(h))):
        if name == "all_ranks":
            hh.gptq_hessian_all_ranks, hh.quantized_model_path = True, str(out / "artifact_all.ptz")
        forwards.clear()
        collected.clear()
        tg.quantize_and_save(hh, rt, model, tg.Logger(None), 0)
        calibration[name] = len(forwards)
        if rt.is_main and name == "all_ranks":
            torch.save(collected[0], out / "hessians_all_ranks.pt")
    if rt.is_main:
        torch.save(model.state_dict(), out / "model.pt")
    result = dict(rank=rt.rank, world_size=rt.world_size, optimize_ddp=torch._dynamo.config.optimize_ddp,
                  graphs_per_mode=per_mode, graph_sizes=graphs, calibration_forwards=calibration)
    (out / f"rank{rt.rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
