"""One rank of tests/test_eval.py::test_distributed_matches_single_process.

Launched as `python -m torch.distributed.run --standalone --nproc_per_node=2 dist_eval_worker.py OUT_DIR`:
builds the test's deterministic model and stream, runs sliding and TTT evaluation across the
gloo process group and writes this rank's results and traces to OUT_DIR/rank{RANK}.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

import test_eval  # noqa: E402
import train_gpt  # noqa: E402


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    h = test_eval.make_h(**test_eval.DIST_H)
    rt = train_gpt.Runtime(h)
    result = test_eval.sliding_and_ttt(h, rt, **test_eval.DIST_CASE)
    result.update(rank=rt.rank, world_size=rt.world_size, distributed=rt.distributed)
    (Path(out_dir) / f"rank{rt.rank}.json").write_text(json.dumps(result))
    rt.close(0)  # train_gpt's own end of a distributed run: barrier, destroy, no finalization


if __name__ == "__main__":
    main(sys.argv[1])
