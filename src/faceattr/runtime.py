"""Where the work runs: device choice, seeding, and the versions a run records."""

from __future__ import annotations

import os
import platform
import random
import re
import shutil

import numpy as np
import torch

import faceattr
from faceattr.errors import FaceAttrError


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' takes the GPU when there is one; asking for CUDA without one is a user error.

    On a GPU, cuDNN is told to time its convolution algorithms: every batch here has one of a few
    shapes, so each is timed once and the fastest kept for the thousands of steps that follow.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):  # torch's own: a traceback
        raise FaceAttrError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FaceAttrError(f"--device {name} was asked for but no CUDA GPU is available")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise FaceAttrError(
            f"--device {name}: there is no GPU {device.index}, only {torch.cuda.device_count()}"
        )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def check_compiler(device: torch.device) -> None:
    """`--compile` builds its kernels with the system's compiler: C++ on a CPU (inductor's),
    C on a GPU (Triton's launchers). Without one, torch.compile fails at the first step in a
    hundred lines; this says so in one, before anything is written."""
    variable, names, what = (
        ("CC", ("gcc", "clang", "cc"), "a C compiler")
        if device.type == "cuda"
        else ("CXX", ("g++", "clang++", "c++"), "a C++ compiler")
    )
    wanted = (os.environ[variable],) if os.environ.get(variable) else names
    if not any(shutil.which(name) for name in wanted):
        raise FaceAttrError(
            f"--compile needs {what} ({' or '.join(wanted)}) on PATH; install one, or train "
            "without --compile"
        )


def uses_bf16(device: torch.device) -> bool:
    """bf16 autocast on CUDA (tensor cores, half the memory traffic); float32 on a CPU, where
    bf16 is slower on most cores and its rounding would change what the tests pin down."""
    return device.type == "cuda"


def autocast(device: torch.device) -> torch.autocast:
    """The precision every forward pass runs at, training, validation and prediction alike."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device))


def cpu_cores() -> int:
    """The cores this process may run on: a machine lent in slices (a container, a batch job)
    pins its processes to some of the host's cores, and `os.cpu_count()` counts them all."""
    if hasattr(os, "sched_getaffinity"):  # Linux; elsewhere every core is the process's
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_name() -> str:
    """The processor and the widest vector instructions torch uses on it, e.g. "AMD EPYC
    (AVX512)": CPU timings depend on these more than on the code, and machines lent for a day
    differ in them."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:  # Linux; platform.processor() there says "x86_64"
            model = next(
                (line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                model,
            )
    except OSError:
        pass
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    return f"{model} ({capability})" if capability else model


def seed_everything(seed: int) -> None:
    """Seed every generator a run touches, so that a CPU run repeats exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def describe(device: torch.device) -> dict[str, str]:
    """Versions and hardware, recorded in every run.json."""
    info = {
        "faceattr": faceattr.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "device": str(device),
        "cpu": cpu_name(),
        "cpu_threads": str(torch.get_num_threads()),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
