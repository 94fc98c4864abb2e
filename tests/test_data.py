import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import write_image
from faceattr.data import (
    dataset_from_paths,
    load_dataset,
    load_test_images,
    numbered_images,
    open_source,
    parse_labels,
    read_labels,
)
from faceattr.decode import decode_images
from faceattr.errors import FaceAttrError


def make_layout(root: Path, labels: list[int], n_test: int = 3, pad: bool = True) -> None:
    """Image N is filled with grey level N, so order can be checked from the pixels."""
    for i in range(1, len(labels) + 1):
        write_image(
            root / "train_img" / (f"{i:06d}.jpg" if pad else f"{i}.png"), (i, i, i), fmt=None
        )
    for i in range(1, n_test + 1):
        write_image(root / "val_img" / (f"{i:06d}.jpg" if pad else f"{i}.png"), (i, i, i))
    (root / "label_train.txt").write_text("".join(f"{v}\n" for v in labels))


def zip_folder(folder: Path, target: Path, top: str | None) -> Path:
    with zipfile.ZipFile(target, "w") as z:
        for p in sorted(folder.rglob("*")):
            rel = p.relative_to(folder).as_posix()
            z.write(p, f"{top}/{rel}" if top else rel)
    return target


def test_unpadded_names_are_ordered_by_number(tmp_path):
    labels = [0, 1] * 6  # 12 images: string sort would put 10.png before 2.png
    make_layout(tmp_path, labels, n_test=11, pad=False)
    data = load_dataset(tmp_path, need="any")
    assert data.train.names[:3] == ["1.png", "2.png", "3.png"]
    assert data.train.names[9] == "10.png"
    array, _ = decode_images(data.train)
    assert array[:, 0, 0, 0].tolist() == list(range(1, 13))  # png keeps the exact grey level
    assert data.labels.tolist() == labels
    assert load_test_images(tmp_path).names[-1] == "11.png"
    # The test images alone, as a folder or zipped bare: numbered images either way.
    bare = zip_folder(tmp_path / "val_img", tmp_path / "val.zip", None)
    assert load_test_images(bare).names == load_test_images(tmp_path / "val_img").names
    # Or one folder down, as `zip -r test.zip test/` makes them; two such folders: say which.
    nested = zip_folder(tmp_path / "val_img", tmp_path / "nested.zip", "test")
    assert load_test_images(nested).names == load_test_images(bare).names
    with zipfile.ZipFile(nested, "a") as z:
        z.write(tmp_path / "val_img" / "1.png", "more/1.png")
    with pytest.raises(FaceAttrError, match="more/, test/ each hold images; extract the one"):
        load_test_images(nested)


def zip_as_named(folder: Path, target: Path, name) -> Path:
    """A zip of `folder`'s files, each member named `name(relative posix path)` verbatim (zipfile's
    own write would tidy the name)."""
    with zipfile.ZipFile(target, "w") as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.writestr(zipfile.ZipInfo(name(p.relative_to(folder).as_posix())), p.read_bytes())
    return target


@pytest.mark.parametrize("top", [None, "exercise"])
def test_zip_is_read_directly_with_or_without_top_folder(tmp_path, top):
    make_layout(tmp_path / "src", [0, 1, 1, 0])
    archive = zip_folder(tmp_path / "src", tmp_path / "data.zip", top)
    data = load_dataset(archive, need="any")
    assert len(data.train) == 4 and len(data.test) == 3
    assert data.labels.tolist() == [0, 1, 1, 0]
    array, audit = decode_images(data.train)
    assert array.shape == (4, 64, 64, 3) and array.dtype == np.uint8
    assert audit.sizes == {"64x64": 4}
    assert len(load_test_images(archive)) == 3
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["src"]  # nothing extracted


@pytest.mark.parametrize(
    "name",
    [
        lambda rel: f"./{rel}",  # as some archivers write them
        lambda rel: f"exercise//{rel}",
        lambda rel: rel.replace("/", "\\"),  # Windows PowerShell 5's Compress-Archive
        lambda rel: f"/{rel}",  # absolute, as a few tools write them
    ],
)
def test_zip_member_names_are_normalised(tmp_path, name):
    make_layout(tmp_path / "src", [0, 1, 1, 0])
    archive = zip_as_named(tmp_path / "src", tmp_path / "data.zip", name)
    data = load_dataset(archive, need="any")
    assert data.labels.tolist() == [0, 1, 1, 0] and len(data.test) == 3
    array, _ = decode_images(data.train)
    assert array.shape == (4, 64, 64, 3) and data.train.source.stat(data.train.paths()[0])[0] > 0


def test_folder_with_one_top_folder(tmp_path):
    make_layout(tmp_path / "celeba", [0, 1])
    assert len(load_dataset(tmp_path).train) == 2
    make_layout(tmp_path / "copy", [0, 1])  # two: which one is meant is not guessed
    with pytest.raises(FaceAttrError, match="celeba/, copy/ each hold the layout; give the path"):
        load_dataset(tmp_path)
    archive = zip_folder(tmp_path, tmp_path.parent / f"{tmp_path.name}.zip", None)  # no path in it
    with pytest.raises(FaceAttrError, match="each hold the layout; extract the one meant, or zip"):
        load_dataset(archive)


def test_labels_accept_crlf_and_trailing_blank_lines():
    assert parse_labels("0\r\n1\r\n1\r\n\r\n\n", "x").tolist() == [0, 1, 1]
    # "\r\n" written in text mode on Windows is "\r\r\n": one line end, not a blank line.
    assert parse_labels("0\r\r\n1\r\r\n1\r\r\n", "x").tolist() == [0, 1, 1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("\n\n", "is empty"),
        ("0\n1\n2\n", r"line 3: expected 0 or 1 \(one label a line\), found '2'"),
        ("0\n\n1\n", "line 2"),
        ("0 1 " * 5000, r"line 1: .*, found '0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 \.\.\.'$"),
    ],
)
def test_bad_label_files(text, message):
    with pytest.raises(FaceAttrError, match=message):
        parse_labels(text, "labels.txt")


def test_a_utf16_label_file_is_read(tmp_path):
    """Windows Notepad's "Unicode": UTF-16 with a byte-order mark; its UTF-8 has one too."""
    (tmp_path / "utf-8-bom.txt").write_bytes(b"\xef\xbb\xbf0\n1\n")
    assert read_labels(tmp_path / "utf-8-bom.txt").tolist() == [0, 1]
    for encoding in ("utf-16", "utf-16-be"):
        path = tmp_path / f"{encoding}.txt"
        bom = "\ufeff" if encoding == "utf-16-be" else ""  # utf-16 writes its own
        path.write_bytes((bom + "0\r\n1\r\n1\r\n").encode(encoding))
        assert read_labels(path).tolist() == [0, 1, 1]
    (tmp_path / "latin.txt").write_bytes(b"0\n\xe91\n")
    with pytest.raises(FaceAttrError, match="is not a text file"):
        read_labels(tmp_path / "latin.txt")


def test_label_count_must_match_image_count(tmp_path):
    make_layout(tmp_path, [0, 1, 1])
    (tmp_path / "label_train.txt").write_text("0\n1\n")
    with pytest.raises(FaceAttrError, match=r"has 2 labels but .* has 3 images"):
        load_dataset(tmp_path)


def test_numbering_gaps_duplicates_and_names(tmp_path):
    folder = tmp_path / "imgs"
    for n in (1, 2, 4):
        write_image(folder / f"{n}.jpg", (0, 0, 0))
    source = open_source(tmp_path)
    with pytest.raises(FaceAttrError, match="3 is missing"):
        numbered_images(source, "imgs")
    write_image(folder / "3.jpg", (0, 0, 0))
    write_image(folder / "0003.png", (0, 0, 0))
    with pytest.raises(FaceAttrError, match="both have number 3"):
        numbered_images(source, "imgs")
    (folder / "0003.png").unlink()
    (folder / "notes.txt").write_text("ignored")
    (folder / "._1.jpg").write_bytes(b"\x00\x05\x16\x07")  # macOS's metadata twin: hidden
    assert len(numbered_images(source, "imgs")) == 4
    # A date-like number is one gap, found at once (counting up to it took all the memory).
    write_image(folder / "20230101120000.jpg", (0, 0, 0))
    with pytest.raises(FaceAttrError, match="without gaps; 5 is missing"):
        numbered_images(source, "imgs")
    write_image(folder / "0.jpg", (0, 0, 0))
    (folder / "20230101120000.jpg").unlink()
    with pytest.raises(FaceAttrError, match="numbering starts at 0"):
        numbered_images(source, "imgs")
    (folder / "0.jpg").unlink()
    write_image(folder / "face.jpg", (0, 0, 0))
    with pytest.raises(FaceAttrError, match=r"face\.jpg: image name is not a number"):
        numbered_images(source, "imgs")


def test_every_format_pil_reads_is_an_image_and_a_number_in_another_is_refused(tmp_path):
    folder = tmp_path / "imgs"
    for n, (suffix, fmt) in enumerate([(".jpg", None), (".jfif", "JPEG"), (".ppm", None)], 1):
        write_image(folder / f"{n}{suffix}", (n * 50, n, n), fmt=fmt)
    source = open_source(tmp_path)
    images = numbered_images(source, "imgs")
    assert images.names == ["1.jpg", "2.jfif", "3.ppm"]
    red = decode_images(images, workers=1)[0][:, 0, 0, 0].astype(int)
    assert np.abs(red - [50, 100, 150]).max() <= 2  # JPEG's rounding
    # Left out with a warning, the last one would have made the label file a line short.
    (folder / "4.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    with pytest.raises(FaceAttrError, match=r"4\.heic is numbered like an image, but \.heic is"):
        numbered_images(source, "imgs")


@pytest.mark.parametrize("use_zip", [False, True])
def test_an_entry_named_like_an_image_that_is_not_a_file_is_named(tmp_path, use_zip):
    """A folder "5.jpg" had been left out without a word; a named pipe, taken for a gap."""
    folder = tmp_path / "d" / "imgs"
    for n in (1, 2, 3):
        write_image(folder / f"{n}.jpg", (0, 0, 0))
    (folder / "4.jpg").mkdir()
    (folder / "old").mkdir()  # a folder not named like an image is no one's business
    (folder / ".thumbs.jpg").mkdir()  # nor is a hidden one
    path = tmp_path / "d"
    if use_zip:
        path = tmp_path / "d.zip"
        with zipfile.ZipFile(path, "w") as z:
            for q in sorted((tmp_path / "d").rglob("*")):
                z.write(q, q.relative_to(tmp_path / "d").as_posix())
    source = open_source(path)
    with pytest.raises(
        FaceAttrError, match=r"imgs/4\.jpg is named like an image but is not a file$"
    ):
        numbered_images(source, "imgs")
    (folder / "4.jpg").rmdir()
    if hasattr(os, "mkfifo") and not use_zip:
        os.mkfifo(folder / "4.jpg")
        with pytest.raises(FaceAttrError, match=r"4\.jpg is named like an image but is not a file"):
            numbered_images(source, "imgs")
        (folder / "4.jpg").unlink()
    if not use_zip:
        assert len(numbered_images(source, "imgs")) == 3


def test_missing_or_empty_folders(tmp_path):
    with pytest.raises(FaceAttrError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "train_img").mkdir()
    (tmp_path / "label_train.txt").write_text("0\n")
    with pytest.raises(FaceAttrError, match="has no images"):
        load_dataset(tmp_path)
    with pytest.raises(FaceAttrError, match="expected train_img/"):
        load_dataset(tmp_path / "train_img")


def test_an_empty_test_folder_is_left_out_where_it_is_optional(tmp_path, caplog):
    make_layout(tmp_path, [0, 1, 1], n_test=0)
    (tmp_path / "val_img").mkdir()
    data = load_dataset(tmp_path, need="any")  # explore's: the training images are still there
    assert data.test is None and len(data.train) == 3
    assert "val_img has no images; leaving the test part out" in caplog.text
    assert tmp_path / "val_img" in data.image_folders()  # no output goes there all the same
    with pytest.raises(FaceAttrError, match="has no images"):
        load_dataset(tmp_path, need="test")  # predict's: the test images are the point


@pytest.mark.parametrize("use_zip", [False, True])
def test_a_file_named_like_the_test_folder_is_named(tmp_path, caplog, use_zip):
    """A file called val_img had been passed over without a word where the test part is
    optional, and called missing where it is needed."""
    make_layout(tmp_path / "d", [0, 1, 1], n_test=0)
    (tmp_path / "d" / "val_img").write_text("not a folder")
    data = zip_folder(tmp_path / "d", tmp_path / "d.zip", None) if use_zip else tmp_path / "d"
    found = load_dataset(data, need="any")
    assert found.test is None and len(found.train) == 3
    assert "val_img is not a folder; leaving the test part out" in caplog.text
    with pytest.raises(FaceAttrError, match="val_img is not a folder"):
        load_dataset(data, need="test")
    assert load_dataset(data).test is None  # train's: no word, the test part is not its concern


def test_the_layouts_folders_are_found_from_inside_one(tmp_path, monkeypatch):
    make_layout(tmp_path, [0, 1, 1])
    monkeypatch.chdir(tmp_path / "val_img")
    found = load_test_images(".").layout_folders()  # "." had been its own parent
    assert sorted(found) == [tmp_path / "train_img", tmp_path / "val_img"]


def test_seed_style_paths(tmp_path):
    make_layout(tmp_path, [1, 0, 1])
    data = dataset_from_paths(
        tmp_path / "train_img", tmp_path / "label_train.txt", tmp_path / "val_img"
    )
    assert data.labels.tolist() == [1, 0, 1] and len(data.test) == 3
    with pytest.raises(FaceAttrError, match="must be given together"):
        dataset_from_paths(tmp_path / "train_img", None, None)
    # The dataset's folder for the test images' (--img_test_dir): named, not one warning a file.
    with pytest.raises(
        FaceAttrError, match=r"holds no images but a val_img/ folder: give .*val_img"
    ):
        dataset_from_paths(None, None, tmp_path)
    # The label file reached through a link: its folder's ".." is not where the images are.
    (tmp_path / "proj").mkdir()
    (tmp_path / "real" / "labels").mkdir(parents=True)
    (tmp_path / "label_train.txt").rename(tmp_path / "real" / "labels" / "label_train.txt")
    (tmp_path / "proj" / "labels").symlink_to(tmp_path / "real" / "labels")
    (tmp_path / "train_img").rename(tmp_path / "proj" / "train_img")
    linked = tmp_path / "proj" / "labels" / "label_train.txt"
    assert dataset_from_paths(tmp_path / "proj" / "train_img", linked, None).labels.tolist() == [
        1,
        0,
        1,
    ]
    for folder, message in ((tmp_path / "nowhere", f"{tmp_path / 'nowhere'} does not exist"),
                            (linked, "label_train.txt is not a folder")):  # fmt: skip
        with pytest.raises(FaceAttrError, match=message):
            dataset_from_paths(folder, linked, None)
        with pytest.raises(FaceAttrError, match=message):
            dataset_from_paths(None, None, folder)


def test_not_a_dataset(tmp_path):
    (tmp_path / "file.txt").write_text("hi")
    with pytest.raises(FaceAttrError, match=r"neither a folder nor a \.zip"):
        load_dataset(tmp_path / "file.txt")
    broken = tmp_path / "empty.zip"
    zipfile.ZipFile(broken, "w").close()
    with pytest.raises(FaceAttrError, match="expected train_img/"):
        load_dataset(broken)
    # A download cut short: a zip's first bytes, not its list of members.
    make_layout(tmp_path / "d", [0, 1])
    whole = zip_folder(tmp_path / "d", tmp_path / "d.zip", None).read_bytes()
    (tmp_path / "cut.zip").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(FaceAttrError, match=r"cut.zip is a .zip file cut short or damaged"):
        load_dataset(tmp_path / "cut.zip")


def test_what_is_no_dataset_is_named_as_what_it_is(tmp_path):
    for where in (Path(os.devnull), tmp_path / "fifo.zip"):  # not read: a pipe waits forever
        if where.name == "fifo.zip":
            os.mkfifo(where)
        with pytest.raises(FaceAttrError, match=r"neither a folder nor a \.zip"):
            load_dataset(where)
    make_layout(tmp_path / "d", [0, 1])
    shutil.rmtree(tmp_path / "d" / "val_img")
    (tmp_path / "d" / "val_img").write_text("a file")
    with pytest.raises(FaceAttrError, match=r"image folder .*val_img is not a folder"):
        numbered_images(open_source(tmp_path / "d"), "val_img")


def test_a_zip_whose_directory_is_damaged_is_one_line(tmp_path):
    """zipfile raises more than BadZipFile for a damaged central directory: a name flagged UTF-8
    that is not (UnicodeDecodeError), a "version needed" it does not know (NotImplementedError)."""
    import struct

    make_layout(tmp_path / "d", [0, 1])
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as z:
        for path in sorted((tmp_path / "d").rglob("*")):
            z.write(path, path.relative_to(tmp_path / "d"))
        z.writestr("readme_\u00e9.txt", b"x")  # flagged UTF-8
    data = good.read_bytes()
    bad_name = data.replace("readme_\u00e9".encode(), b"readme_\xe9\xe9")
    version = bytearray(data)
    struct.pack_into("<H", version, version.find(b"PK\x01\x02") + 6, 64)  # needs 6.4
    for name, damaged in (("name.zip", bad_name), ("version.zip", bytes(version))):
        (tmp_path / name).write_bytes(damaged)
        with pytest.raises(FaceAttrError, match=rf"{name} is not a readable zip file"):
            load_dataset(tmp_path / name)


def test_a_path_not_in_utf8_is_read_cached_and_reported(tmp_path):
    """A folder named in Latin-1 (an old USB stick's) reaches Python with surrogate escapes,
    which the cache's fingerprint and the report's writing had refused with a traceback."""
    from faceattr.cache import load_images
    from faceattr.outputs import write_text

    where = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))
    make_layout(where, [0, 1, 1])
    images = load_dataset(where).train
    assert load_images(images, tmp_path / "cache").cache == "miss"
    assert load_images(images, tmp_path / "cache").cache == "hit"
    write_text(tmp_path / "report.html", f"<p>{where}</p>")
    assert "caf\\udce9" in (tmp_path / "report.html").read_text()


def test_a_member_the_zip_cannot_give_is_named(tmp_path):
    make_layout(tmp_path / "d", [1, 0, 1])
    archive = tmp_path / "d.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        z.writestr("label_train.txt", "1\n0\n1\n")
        for i in (1, 2, 3):
            z.write(tmp_path / "d" / "train_img" / f"{i:06d}.jpg", f"train_img/{i}.jpg")
    raw = bytearray(archive.read_bytes())
    jpeg = (tmp_path / "d" / "train_img" / "000002.jpg").read_bytes()
    at = raw.index(jpeg)
    raw[at + 100] ^= 0xFF  # a stored image's byte: its CRC no longer matches
    archive.write_bytes(bytes(raw))
    images, _ = load_dataset(archive).require_train()
    with pytest.raises(FaceAttrError, match=r"d\.zip:train_img/2\.jpg: cannot be read.*CRC"):
        decode_images(images)
    # An encrypted member (flag bit 0, in the local and the central header of the label file):
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        raw[raw.index(signature) + offset] |= 1
    archive.write_bytes(bytes(raw))
    with pytest.raises(FaceAttrError, match=r"label_train\.txt: cannot be read.*encrypted"):
        load_dataset(archive)


def test_names_must_be_plain_decimal_numbers(tmp_path):
    write_image(tmp_path / "v" / "1.jpg", (0, 0, 0))
    write_image(tmp_path / "v" / "\u00b92.jpg", (0, 0, 0))  # a superscript 1: isdigit() says yes
    with pytest.raises(FaceAttrError, match="image name is not a number"):
        numbered_images(open_source(tmp_path), "v")


def test_the_layouts_folders_are_those_beside_that_are_there(tmp_path):
    """The layout's folders are those that exist beside each other: train_img/'s include
    val_img/, test images alone are their own folder, and a zip is its own layout whatever
    folders lie beside it on disk."""
    make_layout(tmp_path / "d", [0, 1, 1])
    train = load_dataset(tmp_path / "d").train
    assert sorted(train.layout_folders()) == [
        tmp_path / "d" / "train_img",
        tmp_path / "d" / "val_img",
    ]
    # Test images with no train_img/ beside them: their own folder only.
    make_layout(tmp_path / "t", [], n_test=2)
    (tmp_path / "t" / "label_train.txt").unlink()
    assert load_test_images(tmp_path / "t").layout_folders() == [tmp_path / "t" / "val_img"]
    # A zip is its own layout, whatever folders lie beside it on disk.
    archive = zip_folder(tmp_path / "d", tmp_path / "d.zip", None)
    archive = archive.rename(tmp_path / "d" / "d.zip")
    assert load_test_images(archive).layout_folders() == [archive]
