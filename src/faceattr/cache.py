"""Decode once: every image set is cached as a memory-mapped .npy, keyed by a fingerprint.

The fingerprint covers the source, every file's name, size, modification time, inode and change
time (inside a zip: size, CRC and time stamp, and the zip's own size and times), the decoders'
releases and any extra bytes the caller adds (a training set's labels, as parsed: a label file
rewritten with other line endings keeps its key). A changed, added or removed file gives a new
key, so a stale cache is never read; a new entry for the same files replaces their earlier one,
so the folder does not pile up. The array is memory-mapped, so a dataset larger than RAM still
works.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from faceattr import decode
from faceattr.data import ImageSet
from faceattr.decode import SIZE, Audit, decode_images
from faceattr.errors import FaceAttrError, plural
from faceattr.outputs import NO_ROOM, atomic_path, ensure_writable_dir, refuse_inside, write_json

log = logging.getLogger("faceattr")

CACHE_VERSION = 2  # bump when decoding changes what lands in the array
PATHS = "surrogateescape"  # a path not in UTF-8 (a Latin-1 name) is hashed as its bytes


def default_cache_dir() -> Path:
    """$FACEATTR_CACHE, else $XDG_CACHE_HOME/faceattr, else ~/.cache/faceattr."""
    if os.environ.get("FACEATTR_CACHE"):
        return Path(os.environ["FACEATTR_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "faceattr"


@functools.cache
def decoder_versions() -> str:
    """The decoders' releases, from their packages' metadata (importing torchvision takes seconds):
    another release (and the libjpeg-turbo its wheel bundles) may round some pixels differently,
    so its cache is its own. A decoder library replaced under them is not seen."""
    found = []
    for package in ("pillow", "torchvision"):
        try:
            found.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{package} none")
    return ", ".join(found)


def fingerprint(images: ImageSet, extra: bytes = b"") -> str:
    """A key that changes whenever any input of the decoded array does."""
    h = hashlib.sha256()
    source = Path(images.source.path).resolve()
    h.update(f"faceattr-cache v{CACHE_VERSION} {SIZE} {decoder_versions()}\n".encode())
    h.update(f"{_place(images)}\n".encode(errors=PATHS))
    if source.is_file():  # a zip: its members' CRCs are its directory's word, not their bytes'
        st = source.stat()  # a zip rewritten with a damaged member keeps them, not its times
        h.update(f"{st.st_size} {st.st_mtime_ns} {st.st_ino} {st.st_ctime_ns}\n".encode())
    for name, rel in zip(images.names, images.paths(), strict=True):
        h.update(f"{name} {images.source.stat(rel)}\n".encode(errors=PATHS))
    h.update(extra)
    return h.hexdigest()[:32]


def _place(images: ImageSet) -> str:
    """Where an image set lies, however its folder was reached: a folder's own path (DATA with
    its val_img/, and DATA/val_img given alone, are one set, cached once), or the zip's with
    the folder inside it."""
    source = Path(images.source.path).resolve()
    if source.is_file():
        return f"{source} {images.folder}"
    return str((source / images.folder).resolve())


@dataclass
class Loaded:
    """A decoded image set and how it was obtained."""

    array: np.ndarray
    audit: Audit
    cache: str  # "hit", "miss" (decoded and stored) or "off"
    seconds: float
    path: str | None = None

    @property
    def images_per_s(self) -> float:
        return len(self.array) / max(self.seconds, 1e-9)

    def summary(self) -> dict:
        return {
            "cache": self.cache,
            "path": self.path,
            "seconds": self.seconds,
            "images_per_s": self.images_per_s,
        }


def _image_set(images: ImageSet, extra: bytes) -> str:
    """Which image set an entry holds, whatever version of its files: their place and names, and
    the caller's extra bytes (two label files for one folder, two attributes, keep an entry each
    rather than replace each other's at every switch)."""
    h = hashlib.sha256(f"{_place(images)}\n".encode(errors=PATHS))
    h.update("\n".join(images.names).encode(errors=PATHS))
    h.update(extra)
    return h.hexdigest()[:32]


def _drop_superseded(cache_dir: Path, key: str, image_set: str, source: str) -> None:
    """Delete the entries of the same image set's earlier versions: a file edited or touched
    makes a new entry (245 MB for celeba64), and the old one would never be read again. So
    would one of an earlier CACHE_VERSION from the same `source`: its key and "set" differ from
    this version's, so only `source` tells it is the same set. A process still reading one
    keeps its mapping; the file goes once it is done."""
    for meta in cache_dir.glob("*.json"):
        if meta.stem == key:
            continue
        try:
            saved = json.loads(meta.read_text())
            older = saved.get("version", 1) < CACHE_VERSION and saved.get("source") == source
            if saved.get("set") != image_set and not older:
                continue
            meta.with_suffix(".npy").unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
        except (OSError, ValueError, AttributeError, TypeError):  # another's, damaged, gone
            continue
        log.debug("dropped %s, an earlier version of these images", meta.with_suffix(".npy"))


def import_decoder() -> float:
    """Import the JPEG decoder now, and say how many seconds that took: torchvision's import (a
    second or two, once per process) is no part of decoding, so the decode rate leaves it out."""
    start = time.perf_counter()
    decode.jpeg_decoder()
    return time.perf_counter() - start


class _NoRoom(Exception):
    """No disk space for the cache's array."""


def _new_array(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A new memory-mapped .npy at `path`, its disk space taken before a page is written: a page
    written through the mapping to a full disk kills the process (SIGBUS), where a reservation
    that finds no room is an error (_NoRoom)."""
    try:
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
        if hasattr(os, "posix_fallocate"):  # not on macOS or Windows
            with open(path, "r+b") as f:
                try:
                    os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
                except OSError as e:
                    if e.errno in NO_ROOM:
                        raise
                    # Otherwise the file system cannot reserve: the pages are written as before.
    except OSError as e:
        if e.errno in NO_ROOM:
            raise _NoRoom(e.strerror) from None
        raise
    return out


def load_images(
    images: ImageSet,
    cache_dir: str | Path | None,
    workers: int | None = None,
    extra: bytes = b"",
    skip_bad: bool = False,
    hint: str = "",
) -> Loaded:
    """The decoded (N, 64, 64, 3) array of `images`, from the cache when it is there.

    Images that cannot be decoded are an error (ended by `hint`, see `run.SKIP_HINT`), or
    with `skip_bad` listed in `audit.bad` (the cache remembers them either way). With `cache_dir`
    None nothing is cached. A cache folder that cannot be written is a warning, not an error:
    its entries are read (one shared read-only, say), and images it lacks decoded in memory.
    """
    start = time.perf_counter()
    unwritable = None  # why the cache folder cannot be written, if it cannot
    if cache_dir is not None:
        # Its .npy and .json files would join the images, and stop every later command.
        refuse_inside(cache_dir, images.layout_folders(), "--cache")
        try:
            cache_dir = ensure_writable_dir(cache_dir)
        except FaceAttrError as e:
            cache_dir, unwritable = Path(cache_dir), e
    if cache_dir is None:
        start += import_decoder()
        array, audit = decode_images(images, workers, skip_bad=skip_bad, hint=hint)
        seconds = time.perf_counter() - start
        _log_decoded(images, seconds)
        return Loaded(array, audit, "off", seconds)

    key = fingerprint(images, extra)
    npy, meta = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    log.debug("decoded-image cache for %s: %s", images.describe(), npy)
    try:
        present = npy.exists() and meta.exists()
    except OSError:  # a folder this user may not even look into: a miss
        present = False
    if present:
        if (entry := _read_entry(npy, meta, len(images))) is not None:
            array, audit = entry
            audit.check(skip_bad, hint)
            log.info("decoded images of %s found in the cache", images.describe())
            audit.warn(images.describe())
            return Loaded(array, audit, "hit", time.perf_counter() - start, str(npy))
        log.warning("cache entry %s is damaged; decoding again", npy)
    if unwritable is not None:
        log.warning("not caching decoded images: %s", unwritable)
        return load_images(images, None, workers, extra, skip_bad, hint)

    start += import_decoder()
    shape = (len(images), SIZE, SIZE, 3)
    try:
        with atomic_path(npy) as tmp:
            out = _new_array(tmp, shape)
            _, audit = decode_images(images, workers, out=out, judge=False)
            out.flush()
            del out
    except _NoRoom as e:
        log.warning("not caching decoded images: no room in %s (%s)", cache_dir, e)
        return load_images(images, None, workers, extra, skip_bad, hint)
    seconds = time.perf_counter() - start
    image_set = _image_set(images, extra)
    write_json(
        meta,
        {
            "source": images.describe(),
            "images": len(images),
            "set": image_set,
            "version": CACHE_VERSION,
            "audit": audit.to_dict(),
            "decode_s": seconds,
        },
    )
    _drop_superseded(cache_dir, key, image_set, images.describe())
    audit.check(skip_bad, hint)
    _log_decoded(images, seconds)
    return Loaded(np.load(npy, mmap_mode="c"), audit, "miss", seconds, str(npy))


def _read_entry(npy: Path, meta: Path, n: int) -> tuple[np.ndarray, Audit] | None:
    """A cache entry's images (memory-mapped copy-on-write: writable for torch, never written
    back to the file) and audit; None if it is damaged."""
    try:
        array = np.load(npy, mmap_mode="c")
        audit = Audit.from_dict(json.loads(meta.read_text())["audit"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # JSON errors too
        return None
    return (array, audit) if array.shape == (n, SIZE, SIZE, 3) and array.dtype == np.uint8 else None


def _log_decoded(images: ImageSet, seconds: float) -> None:
    rate = len(images) / max(seconds, 1e-9)
    log.info("decoded %s of %s in %.1fs (%.0f images/s)", plural(len(images), "image"),
             images.describe(), seconds, rate)  # fmt: skip
