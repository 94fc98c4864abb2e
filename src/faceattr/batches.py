"""Images served to the training loop by index, from the fastest memory they fit in.

On a GPU the whole uint8 array normally lives in device memory (20,000 faces are 245 MB), so a
batch is one indexing kernel. A set too large for that stays in host memory, pinned when it fits
in RAM so the copy to the GPU is asynchronous, otherwise as it came (memory-mapped from the cache
file, or in RAM without one).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

log = logging.getLogger("faceattr")

DEVICE_SHARE = 0.5  # leave the other half of free GPU memory to the model and its activations
HOST_SHARE = 0.5


def placement(nbytes: int, device: torch.device, device_free: int, host_free: int) -> str:
    """Where an image array of `nbytes` goes: 'device', 'pinned' (host) or 'mapped' (host file)."""
    if device.type != "cuda" or nbytes <= DEVICE_SHARE * device_free:
        return "device"
    return "pinned" if nbytes <= HOST_SHARE * host_free else "mapped"


def host_free_bytes() -> int:
    """Available physical memory, where the OS tells it."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


class DeviceImages:
    """A uint8 (N, 64, 64, 3) image array; `images[idx]` is a batch on `device`."""

    def __init__(self, array: np.ndarray, device: torch.device, where: str | None = None):
        self.device = device
        host = torch.from_numpy(array)
        if where is None:
            free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
            where = placement(array.nbytes, device, free, host_free_bytes())
        self.where = where
        log.debug("%d images (%.0f MB) kept in %s memory", len(array), array.nbytes / 1e6, where)
        if where == "device":
            self.data = host.to(device)
        else:
            self.data = host.pin_memory() if where == "pinned" else host
            log.info(
                "images kept in %s host memory: %.1f GB do not fit on %s",
                where,
                array.nbytes / 1e9,
                device,
            )

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        if self.where == "device":
            return self.data[idx.to(self.device)]
        batch = self.data[idx.cpu()]
        if self.where == "pinned":
            batch = batch.pin_memory()
        return batch.to(self.device, non_blocking=True)
