"""Decode images into one uint8 array of shape (N, 64, 64, 3), fast and in parallel.

JPEGs of the right size take libjpeg-turbo through torchvision (about twice PIL's speed); anything
else (other sizes, grayscale, RGBA, PNG, a damaged file) goes through PIL, which converts it or names
the broken file. Large sets are split into chunks decoded by forked worker processes that write
straight into a shared array, so nothing is copied back: on 16 cores this is I/O-bound, not GIL-bound.
"""

from __future__ import annotations

import functools
import io
import logging
import mmap
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing, contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from faceattr import progress
from faceattr.data import ImageSet, Source, open_source
from faceattr.errors import FaceAttrError, plural, some
from faceattr.runtime import cpu_cores

log = logging.getLogger("faceattr")

SIZE = 64
CHUNK = 256  # images per task: large enough to amortise the hand-off, small enough to balance
PARALLEL_FROM = 4 * CHUNK  # fewer images decode faster than worker processes start


@dataclass
class Audit:
    """What decoding found: original sizes and modes, and how many images had to be converted."""

    sizes: Counter = field(default_factory=Counter)
    modes: Counter = field(default_factory=Counter)
    resized: int = 0
    converted: int = 0
    bad: dict[int, str] = field(default_factory=dict)  # index -> why it could not be decoded
    # index -> what libjpeg said of an image it decoded all the same ("Corrupt JPEG data: ...")
    damaged: dict[int, str] = field(default_factory=dict)
    # index -> (the image, a warning Python's libraries gave while decoding it: PIL's, say)
    warned: dict[int, tuple[str, str]] = field(default_factory=dict)

    def add(self, size: tuple[int, int], mode: str) -> None:
        self.sizes[f"{size[0]}x{size[1]}"] += 1
        self.modes[mode] += 1
        self.resized += size != (SIZE, SIZE)
        self.converted += mode != "RGB"

    def merge(self, other: Audit) -> None:
        self.sizes.update(other.sizes)
        self.modes.update(other.modes)
        self.resized += other.resized
        self.converted += other.converted
        self.bad.update(other.bad)
        self.damaged.update(other.damaged)
        self.warned.update(other.warned)

    def to_dict(self) -> dict:
        return {
            "sizes": dict(self.sizes.most_common()),
            "modes": dict(self.modes.most_common()),
            "resized": self.resized,
            "converted": self.converted,
            "bad": {str(i): why for i, why in sorted(self.bad.items())},
            "damaged": {str(i): why for i, why in sorted(self.damaged.items())},
            "warned": {str(i): list(said) for i, said in sorted(self.warned.items())},
        }

    @classmethod
    def from_dict(cls, d: dict) -> Audit:
        bad = {int(i): why for i, why in d.get("bad", {}).items()}
        damaged = {int(i): why for i, why in d.get("damaged", {}).items()}
        warned = {int(i): tuple(said) for i, said in d.get("warned", {}).items()}
        counts = (Counter(d["sizes"]), Counter(d["modes"]), d["resized"], d["converted"])
        return cls(*counts, bad, damaged, warned)

    def check(self, skip_bad: bool, hint: str = "") -> None:
        """Stop at images that could not be decoded, or, with `skip_bad`, warn about them.

        `hint` ends the error's line: how the command that met them may go on (run.SKIP_HINT, say).
        """
        if not self.bad:
            return
        if not skip_bad:
            raise FaceAttrError(f"{first_and_more(self.bad)}{hint}")
        log.warning(
            "leaving out %d image(s) that cannot be decoded: %s",
            len(self.bad),
            first_and_more(self.bad),
        )

    def warn(self, what: str) -> None:
        """Say which images of `what` were decoded all the same, damaged or changed: told again
        when they come from the cache, as the training on them is the same."""
        if self.damaged:
            log.warning(
                "decoded %d damaged image(s) all the same: %s",
                len(self.damaged),
                first_and_more(self.damaged),
            )
        said: dict[str, list[str]] = {}  # a warning's text -> the images that gave it
        for _, (where, text) in sorted(self.warned.items()):
            said.setdefault(text, []).append(where)
        for text, images in said.items():  # a line for each
            more = f" (and {len(images) - 1} more)" if len(images) > 1 else ""
            log.warning("%s: %s%s", images[0], text, more)
        if self.resized or self.converted:
            log.warning(
                "%s: %s resized to %dx%d, %d converted to RGB",
                *(what, plural(self.resized, "image"), SIZE, SIZE, self.converted),
            )


def first_and_more(found: dict[int, str]) -> str:
    """What was found of the first image, and how many more."""
    return some([found[i] for i in sorted(found)])


@functools.cache
def jpeg_decoder() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torchvision's libjpeg-turbo decoder, imported at the first image to decode: importing
    torchvision takes some 2 s, which a command whose images are all cached need not pay.

    None where torchvision no longer has it (deprecated in 0.29 in favour of TorchCodec): PIL
    then does the work. It turns each image as its EXIF orientation says, as PIL's path does.
    """
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:  # pragma: no cover - depends on the installed torchvision
        return None
    return functools.partial(decode_jpeg, mode=ImageReadMode.UNCHANGED, apply_exif_orientation=True)


def decode_into(raw: bytes, where: str, dest: np.ndarray) -> tuple[tuple[int, int], str]:
    """Decode one image into `dest` (64, 64, 3) uint8; return its original size and mode."""
    decode_jpeg = jpeg_decoder()
    # A complete JPEG ends with the EOI marker; a truncated one goes to PIL, which reports it.
    if decode_jpeg and raw[:2] == b"\xff\xd8" and raw.rstrip(b"\x00")[-2:] == b"\xff\xd9":
        try:
            chw = decode_jpeg(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        except RuntimeError:
            chw = None
        if chw is not None and chw.shape == (3, SIZE, SIZE):
            torch.from_numpy(dest).copy_(chw.permute(1, 2, 0))
            return (SIZE, SIZE), "RGB"
    return _decode_with_pil(raw, where, dest)


# What PIL raises for a file it cannot read; a decompression bomb is an image of over 179
# megapixels, which would take gigabytes to open and end as 64x64 anyway.
_UNDECODABLE = (
    UnidentifiedImageError,
    Image.DecompressionBombError,
    OSError,
    SyntaxError,
    ValueError,
    NotImplementedError,  # BLPFormatError: a file that begins like a Blizzard texture
    EOFError,
)


def _decode_with_pil(raw: bytes, where: str, dest: np.ndarray) -> tuple[tuple[int, int], str]:
    """Any format PIL reads; non-square images are centre-cropped first so faces keep their shape.

    An image whose EXIF orientation says it was taken sideways (a phone's, say) is turned upright
    first, as viewers show it: else its face would be cropped and learned lying on its side.
    """
    try:
        with _large_images_quiet(), Image.open(io.BytesIO(raw)) as im:
            size, mode = im.size, im.mode
            im = _upright(im)
            if mode.startswith("I") or mode == "F":  # I, I;16, I;16B, F...: not 8 bits
                im = _to_8_bits(im)
            if im.mode != "RGB":
                im = im.convert("RGB")
            if im.size != (SIZE, SIZE):
                w, h = im.size
                side = min(w, h)
                left, top = (w - side) // 2, (h - side) // 2
                box = (left, top, left + side, top + side)
                im = im.resize((SIZE, SIZE), Image.Resampling.BICUBIC, box=box)
            dest[...] = np.asarray(im, dtype=np.uint8)
    except UnidentifiedImageError:  # its text names the in-memory file: <_io.BytesIO ...>
        raise FaceAttrError(f"{where}: cannot decode image (PIL cannot read it as one)") from None
    except _UNDECODABLE as e:
        raise FaceAttrError(f"{where}: cannot decode image ({e})") from None
    return size, mode


def _upright(im: Image.Image) -> Image.Image:
    """`im` turned as its EXIF orientation says; as it is where that tag is damaged: a camera's
    metadata, not the pixels, which are still good (libjpeg-turbo's path ignores it alike)."""
    im.load()  # the pixels first: their errors are the image's, not the tag's (exif_transpose
    # would load them inside, where the guard below would take a broken stream for a bad tag)
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # whatever a damaged tag raises: SyntaxError, struct.error...
        return im


@contextmanager
def _large_images_quiet():
    """Over 89 megapixels PIL warns, naming its own source line, not the image: it ends as 64x64
    like any other, and the audit counts it among the resized (over 179, it refuses)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def _to_8_bits(im: Image.Image) -> Image.Image:
    """A 16-bit or float grayscale image as 8-bit: PIL's own conversion clips it, mostly to white.

    16-bit modes (and 32-bit ones holding values above 255) scale from 0..65535, floats in 0..1
    from 0..1; anything else is taken as 0..255 already.
    """
    a = np.asarray(im, dtype=np.float64)
    top = a.max(initial=0)
    scale = 255 / 65535 if im.mode.startswith("I;16") or top > 255 else 1.0
    if im.mode == "F" and top <= 1:
        scale = 255.0
    return Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), "L")


def decode_image(raw: bytes, where: str = "image") -> tuple[np.ndarray, tuple[int, int], str]:
    """One image as a new (64, 64, 3) uint8 array, with its original size and mode."""
    dest = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    with _quiet_torchvision():
        size, mode = decode_into(raw, where, dest)
    return dest, size, mode


@contextmanager
def _quiet_torchvision():
    """Silence torchvision's deprecation warning, which it repeats on every decoded image."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        yield


@contextmanager
def _libjpeg_messages() -> Iterator[Callable[[], str]]:
    """Catch what libjpeg prints to the process's stderr itself, naming no file, of an image it
    decodes all the same ("Corrupt JPEG data: 3 extraneous bytes before marker 0xd9"): yields a
    function that returns what was printed since its last call, for the caller to name the image.

    Best effort: where stderr cannot be redirected, nothing is caught and libjpeg prints as before.
    """
    try:
        sys.stderr.flush()  # Python's own text already written goes where it was meant to
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield lambda: ""
        return
    try:
        with tempfile.TemporaryFile() as caught:
            fd, read = caught.fileno(), 0

            def since() -> str:
                nonlocal read
                end = os.fstat(fd).st_size
                text = os.pread(fd, end - read, read) if end > read else b""
                read = end
                return text.decode(errors="replace")

            os.dup2(fd, 2)
            yield since
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _decode_range(source: Source, paths: list[str], out: np.ndarray, start: int, end: int) -> Audit:
    audit = Audit()
    # Python's warnings (PIL's, say) are held back while stderr is libjpeg's, then told as the
    # image's (`Audit.warn`): shown as such, they would name their library's source line instead.
    with warnings.catch_warnings(record=True) as held:
        warnings.simplefilter("always")  # each image's, not the first's only
        with _quiet_torchvision(), _libjpeg_messages() as printed:
            for i in range(start, end):
                where = source.describe(paths[i])
                seen = len(held)
                try:
                    audit.add(*decode_into(source.read(paths[i]), where, out[i]))
                except FaceAttrError as e:  # collected, so that every broken file can be named
                    out[i] = 0
                    audit.bad[i] = str(e)
                if said := " ".join(printed().split()):
                    audit.damaged[i] = f"{where}: {said}"
                for w in held[seen:]:
                    audit.warned[i] = (where, " ".join(str(w.message).split()))
    return audit


# Set in the parent just before forking; the workers inherit it instead of receiving it pickled.
_JOB: dict = {}


def _worker_init() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the pool ends its workers so: die quietly
    # Ctrl-C reaches the whole process group: the parent stops the pool, its workers keep quiet.
    # Born with it blocked (see decode_images), one sent before now is dropped here, not raised.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    torch.set_num_threads(1)  # one process per core already
    _JOB["source"] = open_source(_JOB["path"])  # own file handle: a zip's offset is not shareable


def _worker_task(bounds: tuple[int, int]) -> Audit:
    return _decode_range(_JOB["source"], _JOB["paths"], _JOB["out"], *bounds)


def _in_workers(workers: int, chunks: list[tuple[int, int]]) -> Iterator[Audit]:
    """Each chunk's audit, decoded by `workers` forked processes, as they finish. A worker that
    dies (killed for memory, say) is one line: multiprocessing's Pool would wait for its chunk
    forever, an executor says it is broken."""
    pool, done = None, False
    try:
        # Forked with Ctrl-C blocked, so no worker sees it before it ignores it; one meant for
        # this process arrives as the block ends (or, tripped in another thread, between two
        # submits), and the chunks not begun are then dropped: the pool is wound down below.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            pool = ProcessPoolExecutor(workers, mp.get_context("fork"), initializer=_worker_init)
            futures = [pool.submit(_worker_task, chunk) for chunk in chunks]  # they fork here
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        for future in as_completed(futures):
            yield future.result()
        done = True
    except BrokenProcessPool:
        raise FaceAttrError(
            "a process decoding the images died (out of memory?); --workers 1 decodes in this one"
        ) from None
    finally:
        if pool is not None:
            _wind_down(pool, kill=not done)


def _wind_down(pool: ProcessPoolExecutor, kill: bool) -> None:
    """Shut `pool` down; with `kill` (Ctrl-C, or an image's error: the chunks begun are of no
    use now) its workers are ended first. Left running, they keep the command from exiting."""
    try:
        if kill:
            _kill_workers(pool)
        pool.shutdown(wait=True, cancel_futures=True)
    except BaseException:  # Ctrl-C again while they finish: waited for, they never end
        _kill_workers(pool)
        raise


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    """End `pool`'s workers at once; the pool then finds them dead and winds itself down.
    Python 3.14 has `kill_workers()`; before it, the processes are only in `_processes`."""
    if hasattr(pool, "kill_workers"):
        pool.kill_workers()
        return
    for process in list((pool._processes or {}).values()):
        process.kill()


def shared_array(n: int) -> np.ndarray:
    """An (n, 64, 64, 3) uint8 array in shared anonymous memory, writable by forked workers."""
    shape = (n, SIZE, SIZE, 3)
    buffer = mmap.mmap(-1, max(1, int(np.prod(shape))))
    return np.frombuffer(buffer, dtype=np.uint8, count=int(np.prod(shape))).reshape(shape)


def decode_images(
    images: ImageSet,
    workers: int | None = None,
    out: np.ndarray | None = None,
    skip_bad: bool = False,
    hint: str = "",
    judge: bool = True,
) -> tuple[np.ndarray, Audit]:
    """Decode every image of `images` into `out` (a new array if None), in parallel when it pays.

    An image that cannot be decoded is an error naming it (ended by `hint`); with `skip_bad` it
    is left as zeros and recorded in `Audit.bad` for the caller to drop; with `judge` False,
    too, but without a word: the caller judges (the cache, which stores the audit first).
    Worker processes write into `out` directly when it is a memory-mapped file (the cache);
    otherwise they write into shared memory, which becomes (or is copied into) `out`.
    """
    paths = images.paths()
    n = len(paths)
    workers = min(workers or cpu_cores(), max(1, n // CHUNK))
    parallel = workers > 1 and n >= PARALLEL_FROM and sys.platform == "linux"
    given = out
    if out is None or (parallel and not isinstance(out, np.memmap)):
        out = shared_array(n) if parallel else np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    audit = Audit()
    chunks = [(s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)]
    with progress.bar(n, f"decoding {images.describe()}") as shown:
        if not parallel:
            for start, end in chunks:
                audit.merge(_decode_range(images.source, paths, out, start, end))
                shown.update(end - start)
        else:
            # fork, as DataLoader does: workers start at once and share `out` with the parent.
            _JOB.update(path=images.source.path, paths=paths, out=out)
            jpeg_decoder()  # imported once here, not once in every worker
            try:  # closed as it ends, however: a traceback would keep the workers otherwise
                with closing(_in_workers(workers, chunks)) as parts:
                    for part in parts:
                        audit.merge(part)
                        shown.update(sum(part.sizes.values()) + len(part.bad))
            finally:
                _JOB.clear()
    if judge:
        audit.check(skip_bad, hint)
    if given is not None and given is not out:
        given[...] = out
        out = given
    audit.warn(images.describe())
    return out, audit
