"""One rank of tests/test_frontier_ttt.py::test_distributed_matches_single_process.

Launched as `python -m torch.distributed.run --standalone --nproc_per_node=2 dist_frontier_ttt_worker.py OUT_DIR`:
runs the test's phased TTT case across the gloo process group and writes this rank's result and
the positions it scored to OUT_DIR/rank{RANK}.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

import test_frontier_ttt  # noqa: E402
import train_gpt  # noqa: E402


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    h = test_frontier_ttt.make_h(**test_frontier_ttt.DIST_H)
    rt = train_gpt.Runtime(h)
    result = test_frontier_ttt.phased_case(h, rt)
    result.update(rank=rt.rank, world_size=rt.world_size, distributed=rt.distributed)
    (Path(out_dir) / f"rank{rt.rank}.json").write_text(json.dumps(result))
    rt.close(0)  # train_gpt's own end of a distributed run: barrier, destroy, no finalization


if __name__ == "__main__":
    main(sys.argv[1])
