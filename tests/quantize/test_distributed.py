"""Rank placement and waiting under a multi-process launch (gloo on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from bitserve_quantize.distributed import rank_device
from bitserve_quantize.errors import OptionError

from .test_torchrun import child_pythonpath

SCRIPT = textwrap.dedent(
    """
    import datetime, sys, time
    from bitserve_quantize import distributed

    # A 3 s collective timeout stands in for NCCL's 10-minute watchdog.
    world = distributed.setup("cpu", timeout=datetime.timedelta(seconds=3))
    if world.is_main:
        time.sleep(6)  # rank 0 "evaluates" past the timeout
    if sys.argv[1] == "barrier":
        world.barrier()
    else:
        world.wait_for_main()
    print(f"rank {world.rank} done", flush=True)
    world.close()
    """
)


def _launch(tmp_path, how: str) -> subprocess.CompletedProcess:
    script = tmp_path / "wait.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": child_pythonpath()}
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    return subprocess.run(
        [*argv, str(script), how], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.timeout(240)
def test_other_ranks_outwait_a_long_rank0_eval(tmp_path):
    control = _launch(tmp_path, "barrier")
    # The plain collective barrier times out while rank 0 is busy: the failure this guards against.
    assert control.returncode != 0 and "rank 1 done" not in control.stdout
    waited = _launch(tmp_path, "wait")
    assert waited.returncode == 0, waited.stderr[-2000:]
    assert "rank 0 done" in waited.stdout and "rank 1 done" in waited.stdout


def test_one_named_gpu_under_several_processes_is_refused():
    with pytest.raises(
        OptionError, match=r"--device cuda:0 with 2 processes would put every rank on that GPU"
    ):
        rank_device("cuda:0", 2, 1)
    assert rank_device("cuda", 2, 1) == "cuda:1"
    assert rank_device("cuda:1", 1, 0) == "cuda:1"  # one process may pick its GPU
    assert rank_device("cpu", 2, 1) == "cpu"
