import dataclasses
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import cli, here, run_python, write_image
from faceattr import cache, decode
from faceattr.cache import fingerprint, load_images
from faceattr.data import load_dataset, load_test_images, numbered_images, open_source
from faceattr.errors import FaceAttrError


def test_miss_then_hit_with_the_same_array(dataset_dir, tmp_path):
    images = load_dataset(dataset_dir).train
    first = load_images(images, tmp_path)
    assert first.cache == "miss" and first.images_per_s > 0
    second = load_images(images, tmp_path)
    assert second.cache == "hit"
    assert isinstance(second.array, np.memmap)  # read from disk on demand, not loaded whole
    assert np.array_equal(first.array, second.array)
    assert second.audit == first.audit
    assert len(list(tmp_path.glob("*.npy"))) == 1 and not list(tmp_path.glob(".*tmp"))


def test_a_folder_reached_two_ways_is_one_entry(dataset_dir, tmp_path):
    """predict DATA and predict DATA/val_img (the seed's --img_test_dir) read one folder: each
    had decoded it again, into an entry of its own."""
    first = load_images(load_dataset(dataset_dir, need="test").test, tmp_path)
    again = load_images(load_test_images(dataset_dir / "val_img"), tmp_path)
    assert (first.cache, again.cache) == ("miss", "hit")
    assert np.array_equal(first.array, again.array)
    assert len(list(tmp_path.glob("*.npy"))) == 1


def test_a_hit_tells_again_what_was_decoded_all_the_same(tmp_path, caplog):
    """The warnings about resized, converted or damaged images had been the first decode's only."""
    from conftest import with_stray_bytes

    folder = tmp_path / "data" / "imgs"
    for i in range(1, 5):
        write_image(folder / f"{i}.jpg", (40 * i, 0, 0), size=(80, 64) if i == 2 else (64, 64))
    (folder / "3.jpg").write_bytes(with_stray_bytes((folder / "3.jpg").read_bytes()))
    images = numbered_images(open_source(tmp_path / "data"), "imgs")
    said = []
    for expected in ("miss", "hit"):
        caplog.clear()
        with caplog.at_level("WARNING", logger="faceattr"):
            assert load_images(images, tmp_path / "cache").cache == expected
        said.append(caplog.messages)
    assert said[0] == said[1] and len(said[1]) == 2, said
    assert "decoded 1 damaged image(s) all the same" in said[1][0] and "3.jpg" in said[1][0]
    assert "1 image resized to 64x64, 0 converted to RGB" in said[1][1]


def test_the_decode_rate_leaves_out_the_decoders_import(dataset_dir, tmp_path, monkeypatch):
    # torchvision's import takes a second or two, once per process: no part of decoding, and
    # more than decoding all 20,000 faces of celeba64 takes 16 cores.
    real, imported = decode.jpeg_decoder, []

    def slow_first_call():
        if not imported:
            time.sleep(2.0)
            imported.append(True)
        return real()

    monkeypatch.setattr(decode, "jpeg_decoder", slow_first_call)
    images = load_dataset(dataset_dir).train
    for where in (tmp_path, None):  # a cache build, and decoding in memory
        imported.clear()
        loaded = load_images(images, where)
        assert loaded.cache in ("miss", "off") and loaded.seconds < 1.5
        assert imported  # the decoder was imported, only not on the clock


def test_a_changed_file_or_label_file_misses(dataset_dir, tmp_path):
    images = load_dataset(dataset_dir).train
    key = fingerprint(images)
    assert fingerprint(images) == key
    assert fingerprint(images, extra=b"labels") != key
    target = dataset_dir / "train_img" / "000007.jpg"
    stat = target.stat()
    load_images(images, tmp_path)
    fewer = dataclasses.replace(images, names=images.names[:50])  # other sets: kept beside it
    load_images(fewer, tmp_path)
    load_images(images, tmp_path, extra=b"other labels")
    kept = {fingerprint(fewer), fingerprint(images, b"other labels")}
    try:
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        assert fingerprint(images) != key
        assert load_images(images, tmp_path).cache == "miss"
        kept.add(fingerprint(images))
    finally:
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # The earlier version's entry is gone, the other set's kept: the cache does not pile up.
    assert {p.stem for p in tmp_path.glob("*.npy")} == kept
    assert len(list(tmp_path.glob("*.json"))) == 3


def test_an_earlier_cache_versions_entry_of_the_same_images_is_dropped(dataset_dir, tmp_path):
    """Its "set" was reckoned another way, so it was never matched, and stayed (245 MB for
    celeba64) though no faceattr of this version reads it."""
    images = load_dataset(dataset_dir).train
    for stem, source in (("old", images.describe()), ("others", "/elsewhere/train_img")):
        (tmp_path / f"{stem}.npy").write_bytes(b"an array")
        (tmp_path / f"{stem}.json").write_text(json.dumps({"source": source, "set": "x"}))
    assert load_images(images, tmp_path).cache == "miss"
    assert sorted(p.stem for p in tmp_path.glob("*.npy")) == sorted([fingerprint(images), "others"])


def test_two_images_swapped_by_name_miss(tmp_path):
    # Same size and time stamp (as unpacked from one zip): only the inodes and change times tell.
    for name, colour in (("1.bmp", (255, 0, 0)), ("2.bmp", (0, 0, 255))):
        write_image(tmp_path / "d" / "train_img" / name, colour)
    (tmp_path / "d" / "label_train.txt").write_text("0\n1\n")
    first, second = tmp_path / "d" / "train_img" / "1.bmp", tmp_path / "d" / "train_img" / "2.bmp"
    for f in (first, second):
        os.utime(f, ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))
    images = load_dataset(tmp_path / "d").train
    assert load_images(images, tmp_path / "cache").array[0, 0, 0].tolist() == [255, 0, 0]
    first.rename(tmp_path / "swap")
    second.rename(first)
    (tmp_path / "swap").rename(second)
    again = load_images(images, tmp_path / "cache")
    assert again.cache == "miss" and again.array[0, 0, 0].tolist() == [0, 0, 255]


def test_another_decoder_release_misses(dataset_dir, tmp_path, monkeypatch):
    images = load_dataset(dataset_dir).train
    key = fingerprint(images)
    assert "pillow " in cache.decoder_versions() and "torchvision " in cache.decoder_versions()
    monkeypatch.setattr(cache, "decoder_versions", lambda: "pillow 0.0, torchvision none")
    assert fingerprint(images) != key


def test_damaged_entry_is_rebuilt(dataset_dir, tmp_path):
    images = load_dataset(dataset_dir).train
    good = np.array(load_images(images, tmp_path).array)
    (npy,) = tmp_path.glob("*.npy")
    npy.unlink()  # a new file: truncating a mapped one in place would kill this process
    npy.write_bytes(b"garbage")
    again = load_images(images, tmp_path)
    assert again.cache == "miss" and np.array_equal(again.array, good)
    for wrong in (good[:-1], good.astype(np.int16)):  # a valid .npy, of another shape or type
        npy.unlink()
        np.save(npy, wrong)
        again = load_images(images, tmp_path)
        assert again.cache == "miss" and np.array_equal(again.array, good)


def test_unwritable_cache_folder_falls_back_to_memory(dataset_dir, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    caplog.set_level("INFO", logger="faceattr")
    loaded = load_images(load_dataset(dataset_dir).train, blocker / "cache")
    assert loaded.cache == "off" and loaded.array.shape == (160, 64, 64, 3)
    assert load_images(load_dataset(dataset_dir).train, None).cache == "off"
    # Cached or not, the command says how many images it decoded, and how fast.
    assert caplog.text.count("decoded 160 images of") == 2 and "images/s)" in caplog.text
    # Inside the image folder, its files would join the images: refused.
    images = load_dataset(dataset_dir).train
    with pytest.raises(FaceAttrError, match=r"--cache .* is inside the image folder"):
        load_images(images, dataset_dir / "train_img" / "cache")
    assert not (dataset_dir / "train_img" / "cache").exists()
    # Nor among the layout's other images: predict reads val_img/ alone, train_img/ beside it.
    test_images = load_test_images(dataset_dir)
    for given in (dataset_dir / "train_img" / "cache", dataset_dir / "val_img" / "cache"):
        with pytest.raises(FaceAttrError, match=r"--cache .* is inside the image folder"):
            load_images(test_images, given)
        assert not given.exists()


def test_a_read_only_cache_folder_is_read(dataset_dir, tmp_path, monkeypatch, caplog):
    """A cache shared read-only (decoded by another user, say) serves what it holds; what it
    lacks is decoded in memory, with a warning."""
    dataset = load_dataset(dataset_dir)
    filled = np.array(load_images(dataset.train, tmp_path / "shared").array)
    os.chmod(tmp_path / "shared", 0o555)  # root may write all the same: the check is stood in for

    def refused(path):
        raise FaceAttrError(f"cannot write to {path}: permission denied")

    monkeypatch.setattr(cache, "ensure_writable_dir", refused)
    caplog.set_level("INFO", logger="faceattr")
    loaded = load_images(dataset.train, tmp_path / "shared")
    assert loaded.cache == "hit" and np.array_equal(loaded.array, filled)
    assert "not caching" not in caplog.text
    missing = load_images(dataset.train, tmp_path / "shared", extra=b"other labels")
    assert missing.cache == "off" and np.array_equal(missing.array, filled)
    assert f"not caching decoded images: cannot write to {tmp_path / 'shared'}" in caplog.text
    assert len(list((tmp_path / "shared").glob("*.npy"))) == 1  # nothing added
    os.chmod(tmp_path / "shared", 0o755)
    # One this user may not even look into (mode 000): a miss, not "Permission denied".
    real_exists = Path.exists

    def hidden(path, *args, **kwargs):
        if path.parent == tmp_path / "shared":
            raise PermissionError(13, "Permission denied", str(path))
        return real_exists(path, *args, **kwargs)

    monkeypatch.setattr(Path, "exists", hidden)
    assert load_images(dataset.train, tmp_path / "shared").cache == "off"


def test_a_cache_folder_without_room_falls_back_to_memory(dataset_dir, tmp_path, monkeypatch):
    """The cache's .npy is written through a memory mapping, which on a full disk had killed the
    process (SIGBUS) without a word: its space is now taken first, and no room is a warning."""
    import errno

    images, taken = load_dataset(dataset_dir).train, []

    def full(fd, offset, length):
        taken.append(length)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    loaded = load_images(images, tmp_path / "cache")
    assert taken and taken[0] >= 160 * 64 * 64 * 3  # all of it, before any page was written
    assert loaded.cache == "off" and loaded.array.shape == (160, 64, 64, 3)
    assert list((tmp_path / "cache").iterdir()) == []  # nor a temporary left
    monkeypatch.undo()
    assert np.array_equal(loaded.array, load_images(images, None).array)


def test_a_file_size_limit_on_the_cache_is_a_warning_and_no_leftover(dataset_dir, tmp_path):
    """A real refusal of the cache's size (RLIMIT_FSIZE, as a quota would): one warning, the
    command goes on decoding in memory."""
    script = f"""
import resource, signal
from faceattr.cache import load_images
from faceattr.data import load_dataset
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # the cache needs 1.9 MB
print(load_images(load_dataset({str(dataset_dir)!r}).train, {str(tmp_path / "cache")!r}).cache)
"""
    result = run_python("-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["off"], result.stdout
    assert "not caching decoded images: no room in" in result.stderr
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_rewritten_zip_misses(tmp_path):
    """A zip's member CRCs come from its directory: rewritten with a damaged member, they stay;
    its own size and times do not. Rewritten in place with its mtime put back (`touch -r`, an
    unpacker's), its size, inode and mtime are the same: its change time alone tells."""
    for i in (1, 2):
        write_image(tmp_path / "d" / "val_img" / f"{i}.png", (i, i, i))
    archive = tmp_path / "d.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in (1, 2):
            z.write(tmp_path / "d" / "val_img" / f"{i}.png", f"val_img/{i}.png")
    key = fingerprint(load_test_images(archive))
    archive.write_bytes(archive.read_bytes())  # the same bytes, written again a second later
    st = archive.stat()
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # whatever the clock's step
    assert fingerprint(load_test_images(archive)) != key
    key, st = fingerprint(load_test_images(archive)), archive.stat()
    archive.write_bytes(archive.read_bytes())  # rewritten in place: its inode is kept
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns))  # and its time stamp put back
    assert archive.stat().st_ino == st.st_ino and archive.stat().st_mtime_ns == st.st_mtime_ns
    assert fingerprint(load_test_images(archive)) != key


def test_second_train_does_not_decode_again(dataset_dir, tmp_path):
    runs = []
    for name, command in (("a", here), ("b", cli)):  # the second in a process of its own
        result = command(
            "train",
            str(dataset_dir),
            "--out",
            str(tmp_path / name),
            "--folds",
            "2",
            "--epochs",
            "1",
            "--cache",
            str(tmp_path / "cache"),
            "--arch",
            "simple",
        )
        assert result.returncode == 0, result.stderr
        runs.append(json.loads((tmp_path / name / "run.json").read_text()))
    assert runs[0]["decode"]["cache"] == "miss" and runs[1]["decode"]["cache"] == "hit"
    assert runs[0]["oof"] == runs[1]["oof"]


def test_a_linked_test_folder_reached_two_ways_is_one_entry(tmp_path):
    """DATA/val_img, a link to the images, and the link's target given alone are one folder:
    one cache entry, not the same images decoded twice."""
    for i in (1, 2):
        write_image(tmp_path / "images" / f"{i}.png", (i, i, i))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "val_img").symlink_to(tmp_path / "images")
    first = load_images(load_dataset(tmp_path / "data", need="test").test, tmp_path / "cache")
    again = load_images(load_test_images(tmp_path / "images"), tmp_path / "cache")
    assert (first.cache, again.cache) == ("miss", "hit")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1


def test_other_files_in_the_cache_folder_are_left_alone(dataset_dir, tmp_path):
    """A .json in the cache folder that is no entry's (a list, another tool's) or an entry
    edited by hand is left alone when older entries are dropped, not a traceback."""
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "odd.json").write_text(json.dumps({"version": "x", "set": "y"}))
    images = load_dataset(dataset_dir).train
    assert load_images(images, tmp_path).cache == "miss"
    assert (tmp_path / "list.json").exists() and (tmp_path / "odd.json").exists()
    assert load_images(images, tmp_path).cache == "hit"
