"""Images served to the training loop by index, from the fastest memory they fit in.

On a GPU the whole uint8 array normally lives in device memory (20,000 faces are 245 MB), so a
batch is one indexing kernel. A set too large for that stays in host memory as it came (in RAM,
or memory-mapped from the cache file: the OS keeps what fits in its page cache); each batch is
gathered from it straight into pinned memory, which the GPU copies from at full speed without a
staging copy. Pinning the whole array instead would not help: indexing it gives a new, unpinned
tensor.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger("faceattr")

DEVICE_SHARE = 0.5  # leave the other half of free GPU memory to the model and its activations


def placement(nbytes: int, device: torch.device, device_free: int) -> str:
    """Where an image array of `nbytes` goes: 'device' or 'host'."""
    if device.type != "cuda" or nbytes <= DEVICE_SHARE * device_free:
        return "device"
    return "host"


class DeviceImages:
    """A uint8 (N, 64, 64, 3) image array; `images[idx]` is a batch on `device`."""

    def __init__(self, array: np.ndarray, device: torch.device, where: str | None = None):
        self.device = device
        host = torch.from_numpy(array)
        if where is None:
            # By index: torch 2.4 refuses a device without one (None: the current device).
            free = torch.cuda.mem_get_info(device.index)[0] if device.type == "cuda" else 0
            where = placement(array.nbytes, device, free)
        self.where = where
        log.debug("%d images (%.0f MB) kept in %s memory", len(array), array.nbytes / 1e6, where)
        if where == "device":
            self.data = host.to(device)
        else:
            self.data = host
            log.info(
                "images kept in host memory: %.1f GB do not fit on %s", array.nbytes / 1e9, device
            )

    @property
    def index_device(self) -> torch.device:
        """Where `idx` should be for `images[idx]` not to wait for the GPU: the host gathers
        host-kept images, and would first have to copy an index back from the device."""
        return self.device if self.where == "device" else torch.device("cpu")

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        if self.where == "device":
            return self.data[idx.to(self.device)]
        # Gathered straight into pinned memory on a GPU's host (torch's caching host allocator
        # keeps it until the copy is done). An index on the GPU would make this wait for it:
        # give one on the host (see `index_device`).
        shape, pinned = (len(idx), *self.data.shape[1:]), self.device.type == "cuda"
        batch = torch.empty(shape, dtype=self.data.dtype, pin_memory=pinned)
        torch.index_select(self.data, 0, idx.cpu(), out=batch)
        return batch.to(self.device, non_blocking=True)
