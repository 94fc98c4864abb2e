"""torchrun on a CPU (gloo, 2 processes): fold-parallel equals one process; DDP trains."""

import json
import os

import pytest

from conftest import cli, here, run_python, torchrun, train_args
from faceattr.distributed import Ranks


def test_ranks_share_the_folds():
    ranks = [Ranks(rank=r, world=3) for r in range(3)]
    assert [[k for k in range(7) if r.mine(k)] for r in ranks] == [[0, 3, 6], [1, 4], [2, 5]]
    assert ranks[0].main and not ranks[1].main
    assert all(Ranks().mine(k) for k in range(5))


def test_fold_parallel_torchrun_equals_one_process(dataset_dir, tmp_path):
    # torchrun gives each process one thread; the reference gets the same, so sums add up alike.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    reference = cli(*train_args(dataset_dir, one), env=env)
    assert reference.returncode == 0, reference.stderr
    parallel = torchrun(*train_args(dataset_dir, two), env=env)
    assert parallel.returncode == 0, parallel.stderr
    assert parallel.stdout.count("out-of-fold HTER") == 1  # rank 0 alone reports
    for name in (
        "folds.csv",
        "oof.csv",
        "models/fold_1.safetensors",
        "models/fold_2.safetensors",
        "models/ensemble.json",
    ):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    labels = []
    for run in (one, two):
        out = run / "label_val.txt"
        result = here("predict", str(dataset_dir), "--run", str(run), "--output", str(out))
        assert result.returncode == 0, result.stderr
        labels.append(out.read_text())
    assert labels[0] == labels[1]


def test_data_parallel_torchrun_trains_and_predicts(dataset_dir, tmp_path):
    run = tmp_path / "ddp"
    result = torchrun(*train_args(dataset_dir, run, "--ddp", "--cache", str(tmp_path / "cache")))
    assert result.returncode == 0, result.stderr
    # On an empty cache one process decodes, the other reads what it stored.
    assert result.stderr.count("decoded 160 images") == 1, result.stderr
    assert result.stderr.count("found in the cache") == 1, result.stderr
    summary = json.loads((run / "run.json").read_text())
    assert summary["status"] == "complete" and summary["config"]["ddp"] is True
    assert [f["fold"] for f in summary["folds"]] == [1, 2]
    # Both processes trained fold 1 together, each on its half of every epoch.
    assert result.stderr.count("fold 1 epoch  1/2") == 2
    out = tmp_path / "label_val.txt"
    assert (
        here("predict", str(dataset_dir), "--run", str(run), "--output", str(out)).returncode == 0
    )
    assert len(out.read_text().splitlines()) == 40


def test_a_process_whose_peer_stopped_says_so_in_one_line(dataset_dir, tmp_path, monkeypatch):
    """Under torchrun, the others' next collective fails when one process stops on an error."""
    import torch

    from faceattr import distributed, run
    from faceattr.distributed import Ranks

    def peer_gone(*args, **kwargs):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer\nmore")

    monkeypatch.setattr(distributed, "from_environment", lambda device: (Ranks(0, 2), device))
    monkeypatch.setattr(distributed, "finish", lambda: None)
    monkeypatch.setattr(run, "train_run", peer_gone)
    result = here("train", str(dataset_dir), "--out", str(tmp_path / "run"), "-q")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "faceattr: error: another process of this torchrun job stopped, see its error "
        "([gloo/transport/tcp/pair.cc:534] Connection closed by peer)"
    ]

    def out_of_memory(*args, **kwargs):  # its own error, not a peer's
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(run, "train_run", out_of_memory)
    result = here("train", str(dataset_dir), "--out", str(tmp_path / "run"), "-q")
    assert "out of GPU memory" in result.stderr

    def a_bug(*args, **kwargs):  # this process's own: not blamed on another
        return torch.zeros(3) @ torch.zeros(4)

    monkeypatch.setattr(run, "train_run", a_bug)
    with pytest.raises(RuntimeError, match="inconsistent tensor size"):
        here("train", str(dataset_dir), "--out", str(tmp_path / "run"), "-q")


WAITER = """
import sys, time
from pathlib import Path
from datetime import timedelta
import torch, torch.distributed as dist
from faceattr import distributed
dist.init_process_group("gloo", timeout=timedelta(seconds=2))  # the default group's limit
ranks, _ = distributed.from_environment(torch.device("cpu"))
time.sleep(5 * ranks.rank)  # rank 1 is still training a fold
ranks.barrier()
Path(sys.argv[1], f"rank {ranks.rank} waited").touch()  # a file each: their prints interleave
"""


def test_a_process_waits_for_the_others_beyond_the_default_time_limit(tmp_path):
    """A process done with its folds may wait a fold's time for the others' (10 minutes is NCCL's
    default limit, here 2 s): the barrier does not time out."""
    script = tmp_path / "waiter.py"
    script.write_text(WAITER)
    marks = tmp_path / "marks"
    marks.mkdir()
    result = run_python(
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(marks)
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in marks.iterdir()) == ["rank 0 waited", "rank 1 waited"]
