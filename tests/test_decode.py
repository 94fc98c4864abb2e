import contextlib
import io
import os
import signal
import subprocess
import sys
import time
import warnings
import zipfile

import numpy as np
import pytest
from PIL import Image

from conftest import assert_user_error, run_python, with_stray_bytes, write_image
from faceattr import decode
from faceattr.data import load_dataset, numbered_images, open_source
from faceattr.decode import Audit, decode_image, decode_images
from faceattr.errors import FaceAttrError


def jpeg_bytes(array: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def test_fast_jpeg_path_matches_pil():
    assert decode.jpeg_decoder() is not None  # the installed torchvision has it: the path is live
    rng = np.random.default_rng(0)
    for _ in range(5):
        raw = jpeg_bytes(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        fast, size, mode = decode_image(raw)
        with Image.open(io.BytesIO(raw)) as im:
            reference = np.asarray(im.convert("RGB"))
        assert (size, mode) == ((64, 64), "RGB")
        assert np.abs(fast.astype(int) - reference).max() <= 1


def sideways(size: tuple[int, int], fmt: str, exif: bytes | None = None) -> bytes:
    """A picture red along its top, saved with EXIF orientation 6: a viewer turns it 90°
    clockwise, so upright its red is along the right-hand side."""
    a = np.zeros((64, 64, 3), dtype=np.uint8)
    a[:16, :, 0] = 255
    if exif is None:
        tags = Image.Exif()
        tags[0x0112] = 6
        exif = tags.tobytes()
    buffer = io.BytesIO()
    Image.fromarray(a).resize(size).save(buffer, format=fmt, exif=exif, quality=95)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "size, fmt", [((64, 64), "JPEG"), ((64, 48), "JPEG"), ((64, 64), "PNG")]
)  # libjpeg-turbo's path, and PIL's for other sizes and formats
def test_an_image_is_turned_upright_as_its_exif_orientation_says(size, fmt):
    image, original, _ = decode_image(sideways(size, fmt))
    assert original == size  # the size as stored
    assert image[:, -8:, 0].mean() > 240  # red on the right
    assert image[:8, :16, 0].mean() < 20  # not along the top


def test_both_decoders_turn_an_image_alike():
    raw = sideways((64, 64), "JPEG")
    fast, _, _ = decode_image(raw)
    slow = np.empty_like(fast)
    decode._decode_with_pil(raw, "x", slow)
    assert np.abs(fast.astype(int) - slow).max() <= 1


def test_a_damaged_exif_tag_leaves_a_good_image_decoded_as_it_is():
    cut = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03"  # ends mid-entry
    bad_header = b"Exif\x00\x00MMj*\x00\x00\x00\x08\x00\x00"  # PIL: SyntaxError, not a TIFF
    for exif in [cut, bad_header]:
        for size, fmt in [((64, 64), "JPEG"), ((64, 48), "JPEG"), ((64, 64), "PNG")]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PIL's "Corrupt EXIF data"
                image, original, _ = decode_image(sideways(size, fmt, exif=exif))
            assert original == size and image[:8, :, 0].mean() > 240  # red along the top still


def test_a_damaged_png_is_named_not_decoded_half():
    """Turning an image upright loads its pixels: a broken stream there had been taken for a
    damaged EXIF tag, and the half-decoded image kept without a word."""
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (120, 100, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="PNG")
    raw = bytearray(buffer.getvalue())
    raw[len(raw) // 2 : len(raw) // 2 + 8] = bytes(8)
    with pytest.raises(FaceAttrError, match=r"broken\.png: cannot decode image"):
        decode_image(bytes(raw), "broken.png")


def test_truncated_jpeg_is_named_not_padded():
    raw = jpeg_bytes(np.full((64, 64, 3), 128, dtype=np.uint8))
    with pytest.raises(FaceAttrError, match=r"broken\.jpg: cannot decode image"):
        decode_image(raw[: len(raw) // 2], "broken.jpg")
    for junk in (b"", b"junk"):  # named for what it is, not as <_io.BytesIO object at 0x...>
        with pytest.raises(
            FaceAttrError, match=r"^junk\.jpg: cannot decode image \(PIL cannot read it as one\)$"
        ):
            decode_image(junk, "junk.jpg")


@pytest.mark.parametrize("use_zip", [False, True])
def test_worker_processes_give_the_same_array_as_one_process(
    dataset_dir, tmp_path, monkeypatch, use_zip
):
    path = dataset_dir
    if use_zip:
        path = tmp_path / "d.zip"
        with zipfile.ZipFile(path, "w") as z:
            for p in sorted(dataset_dir.rglob("*")):
                z.write(p, p.relative_to(dataset_dir).as_posix())
    images = load_dataset(path).train
    serial, serial_audit = decode_images(images, workers=1)
    monkeypatch.setattr(decode, "CHUNK", 16)
    monkeypatch.setattr(decode, "PARALLEL_FROM", 32)
    parallel, parallel_audit = decode_images(images, workers=2)
    into = np.zeros_like(serial)  # a plain array given as `out` gets the workers' results too
    assert decode_images(images, workers=2, out=into)[0] is into and np.array_equal(into, serial)
    assert np.array_equal(serial, parallel)
    assert serial_audit == parallel_audit and sum(parallel_audit.sizes.values()) == 160


def test_an_error_in_a_worker_reaches_the_user(dataset_dir, tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    good = (dataset_dir / "train_img" / "000001.jpg").read_bytes()
    for i in range(1, 65):
        (folder / f"{i}.jpg").write_bytes(good if i != 50 else b"not an image")
    monkeypatch.setattr(decode, "CHUNK", 8)
    monkeypatch.setattr(decode, "PARALLEL_FROM", 16)
    with pytest.raises(FaceAttrError, match=r"50\.jpg: cannot decode image"):
        decode_images(numbered_images(open_source(tmp_path), "imgs"), workers=2)


@pytest.mark.skipif(sys.platform != "linux", reason="worker processes decode on Linux only")
def test_a_worker_that_dies_is_one_line_not_a_wait_forever(dataset_dir, tmp_path):
    """multiprocessing's Pool replaced a worker killed midway (the OOM killer's, a decoder's
    crash) and waited forever for its chunk; SIGTERM did not end that either."""
    script = """
import os, signal, sys
from faceattr import cli, decode
decode.CHUNK, decode.PARALLEL_FROM = 8, 16  # worker processes, even for a small set
task = decode._worker_task
def dies(chunk):
    if chunk[0] == 48:
        os.kill(os.getpid(), signal.SIGKILL)
    return task(chunk)
decode._worker_task = dies
sys.exit(cli.main(["explore", sys.argv[1], "--out", sys.argv[2], "--no-cache", "-q"]))
"""
    result = subprocess.run(
        [sys.executable, "-c", script, str(dataset_dir), str(tmp_path / "ex")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert_user_error(result, "a process decoding the images died")


@pytest.mark.parametrize("workers", [1, 2])
def test_what_libjpeg_says_of_a_damaged_image_names_the_image(
    tmp_path, monkeypatch, capfd, caplog, workers
):
    """libjpeg prints "Corrupt JPEG data: ..." itself, naming no file: the audit names it."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    clean = [jpeg_bytes(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(64)]
    for i, raw in enumerate(clean, 1):
        (folder / f"{i}.jpg").write_bytes(with_stray_bytes(raw) if i in (7, 50) else raw)
    monkeypatch.setattr(decode, "CHUNK", 8)
    monkeypatch.setattr(decode, "PARALLEL_FROM", 16)
    images = numbered_images(open_source(tmp_path), "imgs")
    with caplog.at_level("WARNING", logger="faceattr"):
        array, audit = decode_images(images, workers=workers)
    assert "Corrupt JPEG" not in capfd.readouterr().err
    assert sorted(audit.damaged) == [6, 49] and not audit.bad
    said = "Corrupt JPEG data: 3 extraneous bytes before marker 0xda"
    assert audit.damaged[6] == f"{folder / '7.jpg'}: {said}"
    assert f"decoded 2 damaged image(s) all the same: {folder / '7.jpg'}: {said} (and 1 more)" in (
        caplog.text
    )
    assert np.array_equal(array[6], decode_image(clean[6])[0])  # the junk skipped, nothing lost
    assert decode.Audit.from_dict(audit.to_dict()) == audit
    older = {k: v for k, v in audit.to_dict().items() if k != "damaged"}  # an older cache's
    assert decode.Audit.from_dict(older).damaged == {}


WARNS_WHILE_DECODING = """
import sys, warnings
from faceattr import decode
from faceattr.data import numbered_images, open_source
plain = decode.decode_into
def warns(raw, where, dest):
    warnings.warn("a decoder's own warning", UserWarning, stacklevel=1)
    return plain(raw, where, dest)
decode.decode_into = warns
_, audit = decode.decode_images(numbered_images(open_source(sys.argv[1]), "v"))
print(sorted(audit.damaged))
"""


def test_a_python_warning_while_decoding_is_shown_not_taken_for_damage(tmp_path):
    """Python writes its warnings to fd 2 as well: while libjpeg's messages are caught there,
    they are held back, then shown (a process of its own: pytest captures warnings): once, as
    the first image that gave it, not as PIL's source line, which had been named instead."""
    for i in (1, 2, 3):
        write_image(tmp_path / "v" / f"{i}.jpg", (1, 2, 3))
    result = run_python("-c", WARNS_WHILE_DECODING, str(tmp_path))
    assert result.returncode == 0 and result.stdout == "[]\n", result.stderr
    said = f"{tmp_path / 'v' / '1.jpg'}: a decoder's own warning (and 2 more)"
    assert result.stderr.splitlines() == [said], result.stderr


def test_other_sizes_and_modes_are_converted():
    def encoded(mode, size, colour, fmt="PNG"):
        buffer = io.BytesIO()
        Image.new(mode, size, colour).save(buffer, format=fmt)
        return buffer.getvalue()

    gray, size, mode = decode_image(encoded("L", (64, 64), 100), "g")
    assert gray.shape == (64, 64, 3) and (gray == 100).all() and mode == "L"
    rgba, _, _ = decode_image(encoded("RGBA", (64, 64), (10, 20, 30, 255)), "a")
    assert rgba[0, 0].tolist() == [10, 20, 30]
    big, size, _ = decode_image(encoded("RGB", (128, 96), (5, 6, 7)), "b")
    assert big.shape == (64, 64, 3) and size == (128, 96)


def test_decode_audit_counts_conversions(tmp_path):
    write_image(tmp_path / "v" / "1.png", 50, mode="L")
    write_image(tmp_path / "v" / "2.jpg", (1, 2, 3), size=(80, 80))
    write_image(tmp_path / "v" / "3.jpg", (1, 2, 3))
    _, audit = decode_images(numbered_images(open_source(tmp_path), "v"))
    assert (audit.resized, audit.converted) == (1, 1)
    assert audit.modes == {"L": 1, "RGB": 2}


def test_corrupt_image_is_named(tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "1.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(FaceAttrError, match=r"1\.jpg: cannot decode image"):
        decode_images(numbered_images(open_source(tmp_path), "v"))


def test_a_file_pil_reads_as_another_format_it_cannot_decode_is_named():
    """PIL tells the format by content: a file that begins like a Blizzard texture with an
    unknown compression raised BLPFormatError, a NotImplementedError, past the catch."""
    import struct

    buffer = io.BytesIO()
    Image.new("P", (64, 64)).save(buffer, format="BLP")
    blp = bytearray(buffer.getvalue())
    struct.pack_into("<I", blp, 4, 64001)  # its compression
    with pytest.raises(FaceAttrError, match=r"x\.jpg: cannot decode image \(Unknown BLP"):
        decode_image(bytes(blp), "x.jpg")


def test_high_bit_depth_grey_is_scaled_not_clipped():
    def encoded(array, fmt):  # uint16: mode I;16, float32: F, int32: I
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=fmt)
        return buffer.getvalue()

    half = np.full((64, 64), 32768, dtype=np.uint16)
    grey, _, mode = decode_image(encoded(half, "PNG"), "16-bit png")
    assert mode.startswith("I") and (grey == 128).all()  # PIL's own convert gives 255
    floats = np.full((64, 64), 0.25, dtype=np.float32)
    grey, _, mode = decode_image(encoded(floats, "TIFF"), "float tiff")
    assert mode == "F" and (grey == 64).all()
    eight = np.full((64, 64), 200, dtype=np.int32)  # 32-bit, but holding 8-bit values
    grey, _, _ = decode_image(encoded(eight, "TIFF"), "int tiff")
    assert (grey == 200).all()


def test_an_image_too_large_to_open_is_named(monkeypatch):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 is then a "bomb"
    with pytest.raises(FaceAttrError, match=r"huge\.png: cannot decode image.*exceeds limit"):
        decode_image(buffer.getvalue(), "huge.png")


SLOW_DECODE = """
import os, signal, sys, time
# As a terminal starts it: a test run in a background job inherits Ctrl-C ignored (as POSIX
# shells start background jobs), and Python then leaves it ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
from faceattr import cli, decode
decode.CHUNK, decode.PARALLEL_FROM = 8, 16  # worker processes, even for a small set
task = decode._worker_task
def slow(chunk):
    os.write(1, b"decoding\\n")  # one write: two workers' lines do not interleave
    time.sleep(0.5)
    return task(chunk)
decode._worker_task = slow
sys.exit(cli.main(["explore", sys.argv[1], "--out", sys.argv[2], "--no-cache", "-q"]))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="worker processes decode on Linux only")
@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_while_workers_decode_is_one_line(dataset_dir, tmp_path, presses):
    """Ctrl-C reaches the whole process group: only the parent speaks, workers die quietly.
    Pressed again while the pool winds down, it had left the workers waiting for an end that
    never came, and the command hung after "interrupted"."""
    script = tmp_path / "slow.py"
    script.write_text(SLOW_DECODE)
    command = [sys.executable, str(script), str(dataset_dir), str(tmp_path / "explore")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)  # fmt: skip
    assert process.stdout.readline() == "decoding\n"  # a worker is at work
    try:
        for _ in range(presses):
            os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C does
            time.sleep(0.1)  # the second while the pool waits for the chunks begun
        stderr = process.communicate(timeout=60)[1]
    finally:  # what a hang left behind is not the next test's
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    # Pressed twice, the second may come after the first was answered: Python's own end then.
    ended = (130,) if presses == 1 else (130, -signal.SIGINT)
    assert process.returncode in ended and stderr == "faceattr: interrupted\n", stderr


def test_a_large_image_decodes_without_pils_warning(monkeypatch):
    """PIL warns of a "decompression bomb" above MAX_IMAGE_PIXELS (89 megapixels), naming its
    own source line rather than the image; a large image is resized like any other."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40x40 is "large", not yet refused
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (10, 20, 30)).save(buffer, format="PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        array, size, _ = decode_image(buffer.getvalue())
    assert size == (40, 40) and array[0, 0].tolist() == [10, 20, 30]


def test_an_exif_tag_cut_short_leaves_the_image_as_stored():
    """PIL raises struct.error for an EXIF block whose first IFD offset is cut short: the image
    is kept as stored, unrotated, whatever its shape."""
    cut = b"Exif\x00\x00MM\x00*\x00\x00\x01"  # the first IFD's offset cut short: struct.error
    for size in [(64, 64), (64, 48)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image, original, _ = decode_image(sideways(size, "PNG", exif=cut))
        assert original == size and image[:8, :, 0].mean() > 240  # red along the top still


def test_a_warning_is_told_as_the_image_that_gave_it_only(tmp_path, monkeypatch):
    """A warning is told as the image's that gave it, not as every image decoded after it."""
    for i in (1, 2, 3):
        write_image(tmp_path / "v" / f"{i}.jpg", (1, 2, 3))
    plain = decode.decode_into

    def warns_on_the_first(raw, where, dest):
        if where.endswith("1.jpg"):
            warnings.warn("the first image's own warning", UserWarning, stacklevel=1)
        return plain(raw, where, dest)

    monkeypatch.setattr(decode, "decode_into", warns_on_the_first)
    _, audit = decode_images(numbered_images(open_source(tmp_path), "v"), workers=1)
    assert sorted(audit.warned) == [0], audit.warned


def test_warn_names_the_first_image_of_each_warning_once(caplog):
    """Each warning is told once, naming its lowest-numbered image (whichever worker's chunk
    finished first), and "(and N more)" only when there are more."""
    audit = Audit(warned={7: ("7.jpg", "text A"), 2: ("2.jpg", "text A"), 4: ("4.jpg", "text B")})
    with caplog.at_level("WARNING", logger="faceattr"):
        audit.warn("the set")
    assert caplog.messages == ["2.jpg: text A (and 1 more)", "4.jpg: text B"], caplog.messages


def test_an_image_left_out_is_zeros(tmp_path):
    """An image --skip-bad leaves out is zeros, whatever the array held before."""
    for i in (1, 3):
        write_image(tmp_path / "v" / f"{i}.png", (9, 9, 9))
    (tmp_path / "v" / "2.png").write_bytes(b"not an image")
    out = np.full((3, 64, 64, 3), 255, dtype=np.uint8)
    array, audit = decode_images(
        numbered_images(open_source(tmp_path), "v"), out=out, skip_bad=True
    )
    assert sorted(audit.bad) == [1]
    assert (array[1] == 0).all() and (array[0] == 9).all() and (array[2] == 9).all()


def test_an_image_resized_in_height_only_is_counted(tmp_path):
    """An image resized in its height only (64 wide) is counted as resized."""
    write_image(tmp_path / "v" / "1.png", (1, 2, 3), size=(64, 48))
    write_image(tmp_path / "v" / "2.png", (1, 2, 3))
    _, audit = decode_images(numbered_images(open_source(tmp_path), "v"))
    assert audit.resized == 1 and audit.sizes == {"64x48": 1, "64x64": 1}


def test_32_bit_grey_holding_8_bit_values_up_to_255_is_kept():
    """A 32-bit grey image whose brightest pixel is 255 holds 8-bit values: kept, not scaled."""
    a = np.full((64, 64), 255, dtype=np.int32)
    a[:, :32] = 10
    buffer = io.BytesIO()
    Image.fromarray(a).save(buffer, format="TIFF")
    grey, _, mode = decode_image(buffer.getvalue(), "int tiff")
    assert mode.startswith("I") and (grey[:, 40:] == 255).all() and (grey[:, :24] == 10).all()


@pytest.mark.skipif(sys.platform != "linux", reason="worker processes decode on Linux only")
def test_ctrl_c_between_two_submits_winds_the_workers_down(tmp_path, monkeypatch):
    """Ctrl-C tripped in another thread is raised between two bytecodes, block or no block: one
    that came while the chunks were still being handed out had left the workers running, and
    the command hung at its exit, waiting for them."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    for i in range(1, 33):
        write_image(tmp_path / "v" / f"{i}.jpg", (i, 2, 3))
    monkeypatch.setattr(decode, "CHUNK", 8)
    monkeypatch.setattr(decode, "PARALLEL_FROM", 16)
    submit, calls = ProcessPoolExecutor.submit, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first has forked the workers
            raise KeyboardInterrupt
        return submit(self, *args, **kwargs)

    monkeypatch.setattr(ProcessPoolExecutor, "submit", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            decode_images(numbered_images(open_source(tmp_path), "v"), workers=2)
        assert multiprocessing.active_children() == []
    finally:  # what a failure left running is not the next test's
        for child in multiprocessing.active_children():
            child.kill()
