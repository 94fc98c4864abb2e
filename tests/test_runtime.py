import os
import random

import numpy as np
import pytest
import torch

from faceattr.errors import FaceAttrError
from faceattr.runtime import cpu_cores, describe, resolve_device, seed_everything


def test_auto_takes_the_cpu_without_a_gpu_and_leaves_cudnn_alone(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    assert torch.backends.cudnn.benchmark is False


def test_a_gpu_times_its_convolutions(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert resolve_device("auto") == torch.device("cuda")
    assert torch.backends.cudnn.benchmark is True
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    # What torch would refuse with a traceback (or a GPU not there): one line each.
    for name, said in (("cudax", "unknown device 'cudax'"), ("cuda:2", "no GPU 2, only 2")):
        with pytest.raises(FaceAttrError, match=said):
            resolve_device(name)


@pytest.mark.parametrize("name", ["cuda", "tpu", "gpu"])
def test_devices_that_cannot_be_had_are_user_errors(name, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FaceAttrError, match="cuda"):
        resolve_device(name)


def test_seeding_repeats_every_generator():
    def draw():
        return random.random(), np.random.rand(), torch.rand(()).item()

    seed_everything(3)
    first = draw()
    seed_everything(3)
    assert draw() == first
    seed_everything(2**40)  # a seed over numpy's range is folded into it, not refused
    assert draw() != first


def test_a_run_records_its_versions_and_device():
    info = describe(torch.device("cpu"))
    assert info["torch"] == torch.__version__ and info["device"] == "cpu" and "gpu" not in info
    # Which processor: a CPU run's times are read against it.
    assert info["cpu"] and "(" in info["cpu"] and info["cpu"].endswith(")")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_cpu_cores_counts_the_cores_this_process_may_use():
    cores = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(cores)})  # as a container pinned to one core of the host
        assert cpu_cores() == 1
    finally:
        os.sched_setaffinity(0, cores)
    assert cpu_cores() == len(cores)
