"""Datasets in the exercise's layout, read from a folder or straight from a `.zip`.

The layout is `train_img/` (images named by number), `label_train.txt` (line N is the label of
image N) and optionally `val_img/` (unlabelled test images), at the top of the folder or zip or one
folder down (the exercise's zip has a top folder). Images are ordered by their number, never by
string sort, so `2.jpg` comes before `10.jpg`.

Decoding the images into one array is `decode`'s job; this module only finds and checks them.
"""

from __future__ import annotations

import codecs
import functools
import logging
import os
import re
import threading
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from faceattr.errors import FaceAttrError, plural

log = logging.getLogger("faceattr")

TRAIN_DIR, LABEL_FILE, TEST_DIR = "train_img", "label_train.txt", "val_img"


# --- where the files are: a folder or a zip, behind one small interface -----------------------


class FolderSource:
    """Files under a folder on disk; paths are relative, with '/' separators."""

    def __init__(self, root: Path):
        self.path = root

    def __str__(self) -> str:
        return str(self.path)

    def is_dir(self, rel: str) -> bool:
        return (self.path / rel).is_dir()

    def is_file(self, rel: str) -> bool:
        return (self.path / rel).is_file()

    def exists(self, rel: str) -> bool:
        return (self.path / rel).exists()

    def scan(self, rel: str) -> tuple[list[str], list[str]]:
        """The names in `rel`, hidden ones left out: its files, and the rest (folders, pipes,
        devices, broken links), in one pass over a folder that may hold 100,000 images."""
        files: list[str] = []
        others: list[str] = []
        with os.scandir(self.path / rel) as it:
            for e in it:
                if not e.name.startswith("."):
                    (files if e.is_file() else others).append(e.name)
        return files, others

    def list_files(self, rel: str) -> list[str]:
        return self.scan(rel)[0]

    def subfolders(self) -> list[str]:
        with os.scandir(self.path) as it:
            return sorted(e.name for e in it if e.is_dir() and not e.name.startswith((".", "__")))

    def read(self, rel: str) -> bytes:
        try:
            return (self.path / rel).read_bytes()
        except OSError as e:
            raise FaceAttrError(f"{self.path / rel}: cannot be read ({e.strerror or e})") from None

    def local(self, rel: str) -> Path:
        """The path on disk that holds `rel`."""
        return self.path / rel

    def stat(self, rel: str) -> tuple:
        """What identifies a file's version: size and modification time, and the inode and its
        change time, which a rename or `cp -p` also changes: two images of one size and time
        stamp (unpacked from one zip, say) swapped by name would otherwise keep their key."""
        st = (self.path / rel).stat()
        return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns

    def describe(self, rel: str) -> str:
        return str(self.path / rel)


# An encrypted member (RuntimeError), a bad CRC or a damaged stream, a method zipfile lacks: the
# member's fault, named like an image that cannot be decoded.
_MEMBER_ERRORS = (
    RuntimeError,
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    NotImplementedError,
    OSError,
)


class ZipSource:
    """Files inside a zip archive, read without extracting anything to disk."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
        # A damaged central directory: a name flagged UTF-8 that is not (UnicodeDecodeError, a
        # ValueError), a "version needed" above 6.3 (NotImplementedError), a record cut short.
        except (zipfile.BadZipFile, OSError, NotImplementedError, ValueError, EOFError) as e:
            raise FaceAttrError(f"{path} is not a readable zip file ({e})") from None
        self._lock = threading.Lock()  # one file handle: reads from two threads must not interleave
        self._files: dict[str, list[str]] = {}
        self._dirs: set[str] = {""}
        # Each file's member name, by its normalised path: archivers write "./train_img/1.jpg",
        # "data//train_img/1.jpg", "/train_img/1.jpg" or (Windows PowerShell 5) "train_img\\1.jpg"
        # for the same.
        self._members: dict[str, str] = {}
        for name in self.zip.namelist():
            p = PurePosixPath(name.replace("\\", "/").lstrip("/"))
            parents = [str(q) for q in p.parents if str(q) != "."]
            self._dirs.update(parents)
            if name.endswith(("/", "\\")):
                self._dirs.add(str(p))
            elif not p.name.startswith(".") and "__MACOSX" not in p.parts:
                parent = "" if str(p.parent) == "." else str(p.parent)
                self._files.setdefault(parent, []).append(p.name)
                self._members[str(p)] = name

    def __str__(self) -> str:
        return str(self.path)

    def is_dir(self, rel: str) -> bool:
        return rel.strip("/") in self._dirs

    def is_file(self, rel: str) -> bool:
        parent, _, name = rel.rpartition("/")
        return name in self._files.get(parent, [])

    def exists(self, rel: str) -> bool:
        return self.is_file(rel) or self.is_dir(rel)

    def scan(self, rel: str) -> tuple[list[str], list[str]]:
        """The names in `rel`, hidden ones left out: its files, and its folders (a zip holds
        nothing else)."""
        inside = rel.strip("/")
        prefix = f"{inside}/" if inside else ""
        names = (d[len(prefix) :] for d in self._dirs if d and d.startswith(prefix))
        return self.list_files(rel), [n for n in names if "/" not in n and not n.startswith(".")]

    def list_files(self, rel: str) -> list[str]:
        return list(self._files.get(rel.strip("/"), []))

    def subfolders(self) -> list[str]:
        tops = {d.split("/")[0] for d in self._dirs if d}
        return sorted(d for d in tops if not d.startswith((".", "__")))

    def read(self, rel: str) -> bytes:
        try:
            with self._lock:
                return self.zip.read(self._members.get(rel, rel))
        except _MEMBER_ERRORS as e:
            raise FaceAttrError(
                f"{self.describe(rel)}: cannot be read from the zip ({e})"
            ) from None

    def local(self, rel: str) -> Path:
        """The path on disk that holds `rel`: the archive."""
        return self.path

    def stat(self, rel: str) -> tuple:
        """What identifies a member's version: size, CRC and time stamp."""
        info = self.zip.getinfo(self._members.get(rel, rel))
        return info.file_size, info.CRC, info.date_time

    def describe(self, rel: str) -> str:
        return f"{self.path}:{rel}"


Source = FolderSource | ZipSource


def open_source(path: str | Path) -> Source:
    """A folder or a .zip as a Source; anything else is a user error."""
    path = Path(path)
    if path.is_dir():
        return FolderSource(path)
    if path.is_file():
        try:  # is_zipfile says False for a file it cannot open: name why
            with open(path, "rb"):
                pass
        except OSError as e:
            raise FaceAttrError(f"{path}: cannot be read ({e.strerror or e})") from None
        if zipfile.is_zipfile(path):
            return ZipSource(path)
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":  # a zip's first member, without the directory at its end
                raise FaceAttrError(
                    f"{path} is a .zip file cut short or damaged (its list of members, at its "
                    "end, is missing): copy or download it again"
                )
    if path.exists():  # another file, or a named pipe, a device: not read, they could wait forever
        raise FaceAttrError(f"{path} is neither a folder nor a .zip file")
    raise FaceAttrError(f"{path} does not exist")


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


# --- labels and numbered images ----------------------------------------------------------------


def parse_labels(text: str, where: str) -> np.ndarray:
    """0/1 labels, one per line, blanks around each ignored; CRLF or CR line endings and trailing
    blank lines are accepted with a warning, anything else is refused."""
    if "\r" in text:
        log.warning("%s has Windows (CRLF) or old Mac (CR) line endings; reading it anyway", where)
    # "\r\r\n" too: "\r\n" written in text mode on Windows, one line end, not two.
    lines = re.sub("\r+\n", "\n", text).replace("\r", "\n").split("\n")
    blank = 0
    while lines and not lines[-1].strip():
        lines.pop()
        blank += 1
    if blank > 1:  # one empty string is just the final newline
        log.warning("%s ends with %d blank lines; ignoring them", where, blank - 1)
    if not lines:
        raise FaceAttrError(f"{where} is empty")
    labels = np.empty(len(lines), dtype=np.int64)
    for i, line in enumerate(lines):
        value = line.strip()
        if value not in ("0", "1"):
            shown = value if len(value) <= 40 else f"{value[:40]}..."  # a whole file on one line
            raise FaceAttrError(
                f"{where} line {i + 1}: expected 0 or 1 (one label a line), found {shown!r}"
            )
        labels[i] = int(value)
    return labels


def no_label_file(where: str, there: bool) -> FaceAttrError:
    """The error for a label file that is missing, or is something else (a folder, a pipe, a
    device: reading a named pipe would wait for a writer forever)."""
    return FaceAttrError(f"label file {where} {'is not a file' if there else 'does not exist'}")


def read_labels(path: str | Path) -> np.ndarray:
    """Labels from a label file on disk (see `parse_labels`)."""
    path = Path(path)
    if not path.is_file():
        raise no_label_file(str(path), path.exists())
    return parse_labels(_decode_text(path.read_bytes(), str(path)), str(path))


def _decode_text(raw: bytes, where: str) -> str:
    """UTF-8 (with or without a byte-order mark), or UTF-16 with one: Windows Notepad's
    "Unicode"."""
    try:
        if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return raw.decode("utf-16")
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise FaceAttrError(f"{where} is not a text file") from None


@dataclass(frozen=True)
class ImageSet:
    """Numbered images in one folder of a source, sorted by number (1, 2, ..., N)."""

    source: Source
    folder: str
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def paths(self) -> list[str]:
        return [_join(self.folder, n) for n in self.names]

    def describe(self) -> str:
        return self.source.describe(self.folder)

    def layout_folders(self) -> list[Path]:
        """Its folder on disk (a zip's: the archive) and the layout's image folders beside it:
        predict reads only val_img/, but a cache written into train_img/ would join its images."""
        here = Path(os.path.abspath(self.source.local(self.folder)))  # "." has a parent too
        beside = [here.parent / TRAIN_DIR, here.parent / TEST_DIR] if here.is_dir() else []
        return [here, *(p for p in beside if p != here and p.is_dir())]


def numbered_images(source: Source, folder: str) -> ImageSet:
    """The images of `folder`, checked to be numbered 1..N without gaps or duplicates."""
    where = source.describe(folder)
    if not source.is_dir(folder):
        state = "is not a folder" if source.exists(folder) else "does not exist"
        raise FaceAttrError(f"image folder {where} {state}")
    files, others = source.scan(folder)
    odd = sorted(n for n in others if _is_image(n))
    if odd:  # a folder left out silently, or a pipe's image taken for a gap in the numbering
        raise FaceAttrError(
            f"{source.describe(_join(folder, odd[0]))} is named like an image but is not a file"
        )
    numbered: dict[int, str] = {}
    for name in files:
        stem, suffix = os.path.splitext(name)
        if not _is_image(name):
            if stem.isdecimal():  # left out, the last one would leave the label file short
                raise FaceAttrError(
                    f"{source.describe(_join(folder, name))} is numbered like an image, but "
                    f"{suffix or 'no extension'} is no image format PIL reads: convert it, or "
                    "move it out"
                )
            log.warning("ignoring %s: not an image", source.describe(_join(folder, name)))
            continue
        if not stem.isdecimal():  # not isdigit(): it takes "²", which int() refuses
            raise FaceAttrError(
                f"{source.describe(_join(folder, name))}: image name is not a number"
            )
        number = int(stem)
        if number in numbered:
            raise FaceAttrError(f"{where}: {numbered[number]} and {name} both have number {number}")
        numbered[number] = name
    if not numbered:
        raise FaceAttrError(f"image folder {where} has no images")
    numbers = sorted(numbered)
    if numbers != list(range(1, len(numbers) + 1)):
        # The first gap, found without counting up to the largest number (a date-like name,
        # 20230101120000.jpg, would have taken all the memory there is).
        positive = [n for n in numbers if n > 0]
        missing = next((i for i, n in enumerate(positive, start=1) if n != i), None)
        problem = f"{missing} is missing" if missing else "numbering starts at 0"
        raise FaceAttrError(f"{where}: images must be numbered 1..N without gaps; {problem}")
    return ImageSet(source, folder, [numbered[n] for n in numbers])


# --- the exercise's layout -----------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """Training images with their labels, and test images, any of which may be absent."""

    train: ImageSet | None
    labels: np.ndarray | None
    test: ImageSet | None
    where: str = ""
    label_folder: Path | None = None  # the label file's, when given on its own (the seed's)
    # A test folder not read (empty, or not the command's concern): no output goes there either.
    unread_test: Path | None = None

    def require_train(self) -> tuple[ImageSet, np.ndarray]:
        if self.train is None or self.labels is None:
            raise FaceAttrError(f"{self.where}: no {TRAIN_DIR}/ with {LABEL_FILE} found")
        return self.train, self.labels

    def require_test(self) -> ImageSet:
        if self.test is None:
            raise FaceAttrError(f"{self.where}: no {TEST_DIR}/ found")
        return self.test

    def image_folders(self) -> list[Path]:
        """Its image folders on disk (a zip's: the archive, which no folder lies in), an unread
        test folder too: what is written there would be among its images next time."""
        found = [p.source.local(p.folder) for p in (self.train, self.test) if p is not None]
        return found + ([self.unread_test] if self.unread_test else [])

    def locations(self) -> list[Path]:
        """Where on disk the data lives: its image folders (or zip), the folder they were found
        in (for the seed's paths, the one the image folders and label file share), and for the
        seed's paths the one holding the label file."""
        parts = [p for p in (self.train, self.test) if p is not None]
        found = [where for p in parts for where in (p.source.local(p.folder), p.source.local(""))]
        return found + [f for f in (self.unread_test, self.label_folder) if f is not None]


def _find_root(source: Source) -> str | None:
    """The folder holding the layout: the top, or one folder down."""

    def has_layout(root: str) -> bool:
        return (
            source.is_dir(_join(root, TRAIN_DIR))
            or source.is_dir(_join(root, TEST_DIR))
            or source.is_file(_join(root, LABEL_FILE))
        )

    if has_layout(""):
        return ""
    found = [d for d in source.subfolders() if has_layout(d)]
    if len(found) > 1:  # which one is meant is the user's to say
        raise FaceAttrError(
            f"{source}: {', '.join(f'{d}/' for d in found)} each hold the layout; {_one_of(source)}"
        )
    return found[0] if found else None


def _one_of(source: Source) -> str:
    """How to name one of a source's folders: a path for a folder, another zip for a zip."""
    if isinstance(source, ZipSource):
        return "extract the one meant, or zip it alone"
    return "give the path of the one meant"


def load_dataset(path: str | Path, need: str = "train") -> Dataset:
    """The exercise's layout in a folder or zip; `need` is 'train', 'test' or 'any'."""
    source = open_source(path)
    root = _find_root(source)
    if root is None:
        raise FaceAttrError(
            f"{path}: expected {TRAIN_DIR}/, {LABEL_FILE} or {TEST_DIR}/ at the top or one folder down"
        )
    train = labels = None
    has_train = source.is_dir(_join(root, TRAIN_DIR)) or source.is_file(_join(root, LABEL_FILE))
    if has_train and need != "test":
        train, labels = _train_part(source, _join(root, TRAIN_DIR), _join(root, LABEL_FILE))
    optional = need == "any" and train is not None  # explore's: the test part may be left out
    test, unread_test = _test_part(source, _join(root, TEST_DIR), need != "train", optional)
    dataset = Dataset(train, labels, test, where=str(path), unread_test=unread_test)
    if need == "train":
        dataset.require_train()
    elif need == "test":
        dataset.require_test()
    return dataset


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in _image_suffixes()


@functools.cache
def _image_suffixes() -> frozenset[str]:
    """Every extension of a format PIL opens: .jpg, .png, .webp, .jfif, .ppm, ... Asked once a
    folder is scanned, not at import: PIL loads all its plugins to answer (50 ms)."""
    return frozenset(e for e, f in Image.registered_extensions().items() if f in Image.OPEN)


def _holds_images(source: Source, folder: str) -> bool:
    return any(_is_image(n) for n in source.list_files(folder))


def holds_images(path: str | Path) -> bool:
    """Whether the folder `path` holds a file named as an image: an output there would join them."""
    return Path(path).is_dir() and _holds_images(FolderSource(Path(path)), "")


def _train_part(source: Source, folder: str, label_rel: str) -> tuple[ImageSet, np.ndarray]:
    if not source.is_file(label_rel):
        raise no_label_file(source.describe(label_rel), source.exists(label_rel))
    where = source.describe(label_rel)
    labels = parse_labels(_decode_text(source.read(label_rel), where), where)
    images = numbered_images(source, folder)
    if len(images) != len(labels):
        raise FaceAttrError(
            f"{where} has {plural(len(labels), 'label')} but {images.describe()} has "
            f"{plural(len(images), 'image')}"
        )
    return images, labels


def _test_part(
    source: Source, folder: str, read: bool, optional: bool
) -> tuple[ImageSet | None, Path | None]:
    """The test images if they are to be `read`, and the folder of those that are not: not read,
    but not to be written into either. An `optional` part is left out, with a warning, where
    it is no folder or holds no images: no reason to stop exploring the training images."""
    if not read or not source.exists(folder):
        return None, source.local(folder) if source.is_dir(folder) else None
    if optional and not source.is_dir(folder):
        log.warning("%s is not a folder; leaving the test part out", source.describe(folder))
        return None, None
    if optional and not _holds_images(source, folder):
        log.warning("%s has no images; leaving the test part out", source.describe(folder))
        return None, source.local(folder)
    return numbered_images(source, folder), None  # a file in its place: it says so


def dataset_from_paths(
    train_dir: str | Path | None, labels_txt: str | Path | None, test_dir: str | Path | None
) -> Dataset:
    """The seed's way of naming the parts: each folder and the label file given on its own."""
    train = labels = test = None
    if train_dir is not None or labels_txt is not None:
        if train_dir is None or labels_txt is None:
            raise FaceAttrError("--img_train_dir and --labels_txt must be given together")
        label_path, train_path = Path(labels_txt), _folder(train_dir)
        if not label_path.is_file():
            raise no_label_file(str(label_path), label_path.exists())
        # One source holding both, from their common folder: paths without "..", which a link
        # between them would have sent elsewhere.
        label_abs, train_abs = label_path.resolve(), train_path.resolve()
        root = Path(os.path.commonpath([label_abs.parent, train_abs]))
        source = FolderSource(root)
        train, labels = _train_part(source, _rel_to(train_abs, root), _rel_to(label_abs, root))
    if test_dir is not None:
        test = image_folder(test_dir)
    label_folder = Path(labels_txt).resolve().parent if labels_txt is not None else None
    return Dataset(train, labels, test, str(train_dir or test_dir), label_folder)


def _rel_to(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _folder(path: str | Path) -> Path:
    """`path`, if it is a folder; a zip or a missing path is named as such."""
    path = Path(path)
    if not path.is_dir():
        state = "is not a folder" if path.exists() else "does not exist"
        raise FaceAttrError(f"image folder {path} {state}")
    return path


def image_folder(path: str | Path) -> ImageSet:
    """A folder of numbered images given directly (the seed's `--img_test_dir`)."""
    source = FolderSource(_folder(path))
    if not _holds_images(source, "") and source.is_dir(TEST_DIR):  # the dataset, not its part
        raise FaceAttrError(
            f"image folder {path} holds no images but a {TEST_DIR}/ folder: give "
            f"{Path(path) / TEST_DIR}"
        )
    return numbered_images(source, "")


def load_test_images(path: str | Path) -> ImageSet:
    """Test images: a dataset (folder or zip) with `val_img/`, or a folder (or zip) of numbered
    images, at its top or one folder down."""
    source = open_source(path)
    root = _find_root(source)
    if root is not None and source.is_dir(_join(root, TEST_DIR)):
        return numbered_images(source, _join(root, TEST_DIR))
    if root is None:  # bare images: at the top, or one folder down (`zip -r test.zip test/`)
        if not _holds_images(source, ""):
            below = [d for d in source.subfolders() if _holds_images(source, d)]
            if len(below) == 1:
                return numbered_images(source, below[0])
            if below:
                raise FaceAttrError(
                    f"{path}: {', '.join(f'{d}/' for d in below)} each hold images; "
                    f"{_one_of(source)}"
                )
        return numbered_images(source, "")
    raise FaceAttrError(f"{path}: no {TEST_DIR}/ folder and no numbered images found")
