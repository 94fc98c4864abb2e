import numpy as np
import pytest
import torch

from faceattr.batches import DeviceImages, placement

GB = 1 << 30


@pytest.mark.parametrize(
    ("device", "nbytes", "device_free", "expected"),
    [
        ("cpu", 100 * GB, 0, "device"),  # on a CPU the host is the device
        ("cuda", 1 * GB, 80 * GB, "device"),
        ("cuda", 50 * GB, 80 * GB, "host"),  # over half the free memory: left to the model
    ],
)
def test_placement(device, nbytes, device_free, expected):
    assert placement(nbytes, torch.device(device), device_free) == expected


@pytest.mark.parametrize("where", ["device", "host"])
def test_batches_are_the_indexed_images(where):
    array = np.random.default_rng(0).integers(0, 255, (50, 64, 64, 3), dtype=np.uint8)
    images = DeviceImages(array, torch.device("cpu"), where=where)
    idx = torch.tensor([3, 1, 49, 3])
    batch = images[idx]
    assert len(images) == 50 and batch.dtype == torch.uint8
    assert np.array_equal(batch.numpy(), array[[3, 1, 49, 3]])


def test_host_kept_images_take_their_index_on_the_host():
    array = np.zeros((4, 64, 64, 3), dtype=np.uint8)
    cuda = torch.device("cuda")  # placement is given: nothing is moved to a GPU here
    assert DeviceImages(array, cuda, where="host").index_device == torch.device("cpu")
    assert DeviceImages(array, torch.device("cpu"), where="device").index_device.type == "cpu"


def test_a_set_too_large_for_the_gpus_free_memory_stays_on_the_host(monkeypatch):
    def mem_get_info(device=None):  # as torch 2.4's: an index or None, not torch.device("cuda")
        assert device is None or isinstance(device, int), device
        return 1000, 80 * GB

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    array = np.zeros((4, 64, 64, 3), dtype=np.uint8)  # 49 kB, over half of 1000 free bytes
    images = DeviceImages(array, torch.device("cuda"))
    assert images.where == "host" and images.data.device.type == "cpu"


def test_exactly_half_the_free_memory_still_fits_on_the_device():
    assert placement(40 * GB, torch.device("cuda"), 80 * GB) == "device"
