"""A data domain: the list of image files and labels, read from an ImageFolder or an image-list file.

Every image is decoded once with PIL before any pipeline is built, because one corrupt or empty
file kills a DALI pipeline mid-training and DALI has no option to skip it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")

# Decoding is mostly file I/O and zlib/libjpeg work, which release the GIL, so threads beyond the
# core count still help when the files sit on a network file system. Each thread checks a chunk of
# files: for tiny images (digits) one task per file costs more than the decoding.
_CHECK_THREADS = min(32, 4 * (os.cpu_count() or 1))
_CHECK_CHUNK = 64
_NAMES_SHOWN = 5
log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data domain, image file or loader setting is not usable."""


@dataclass(frozen=True)
class Domain:
    """The images of one domain; `labels[i]` is the index of the class of `files[i]` in `classes`."""

    name: str
    files: list[str]
    labels: list[int]
    classes: list[str]


def load_domain(path: str | Path, *, classes: list[str] | None = None, skip_corrupt: bool = False) -> Domain:
    """Reads an ImageFolder directory or an image-list file and checks that every image decodes.

    `classes` fixes the class order (normally the source domain's classes, so that label i means the
    same class in both domains): an ImageFolder must then have exactly these class folders, and
    label i of an image list means `classes[i]`.
    """
    path = Path(os.path.abspath(Path(path).expanduser()))
    name = path.stem if path.is_file() else path.name
    if path.is_dir():
        domain = _read_image_folder(path, name, classes)
    elif path.is_file():
        domain = _read_image_list(path, name, classes)
    else:
        raise DataError(
            f"data domain '{name}' not found: {path} (expected an ImageFolder directory or an image-list file)"
        )
    return _drop_or_reject_unreadable(domain, path, skip_corrupt)


def check_same_classes(source: Domain, target: Domain) -> None:
    """Adaptation needs one label space: the same class names in the same index order."""
    if source.classes == target.classes:
        return
    only_source = sorted(set(source.classes) - set(target.classes))
    only_target = sorted(set(target.classes) - set(source.classes))
    if not only_source and not only_target:
        raise DataError(
            f"class order differs between source '{source.name}' and target '{target.name}': "
            f"{source.classes} vs {target.classes}"
        )
    raise DataError(
        f"class sets differ between source '{source.name}' and target '{target.name}': "
        f"only in source: {only_source}; only in target: {only_target}"
    )


def _read_image_folder(root: Path, name: str, classes: list[str] | None) -> Domain:
    folders = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not folders:
        raise DataError(f"data domain '{name}' has no class subfolders: {root} (expected <dir>/<class>/<image>)")
    if classes is not None and sorted(classes) != folders:
        missing = sorted(set(classes) - set(folders))
        extra = sorted(set(folders) - set(classes))
        raise DataError(
            f"class folders of data domain '{name}' ({root}) differ from the expected classes: "
            f"missing folders: {missing}; unexpected folders: {extra}"
        )
    class_names = list(classes) if classes is not None else folders
    files: list[str] = []
    labels: list[int] = []
    for label, class_name in enumerate(class_names):
        images = _images_under(root / class_name)
        if not images:
            raise DataError(
                f"class folder '{class_name}' of data domain '{name}' has no images: {root / class_name} "
                f"(expected {', '.join(IMAGE_EXTENSIONS)} files)"
            )
        files += images
        labels += [label] * len(images)
    return Domain(name=name, files=files, labels=labels, classes=class_names)


def _images_under(folder: Path) -> list[str]:
    """Image files anywhere below `folder`, in a stable order (torchvision's ImageFolder also recurses)."""
    found = []
    for directory, subdirectories, names in os.walk(folder, followlinks=True):
        subdirectories.sort()
        found += [os.path.join(directory, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def _read_image_list(list_file: Path, name: str, classes: list[str] | None) -> Domain:
    """The thuml/tllib list format: one `<image path> <integer label>` per line (see _resolve_listed_path)."""
    try:
        lines = list_file.read_text().splitlines()
    except UnicodeDecodeError as error:
        raise DataError(
            f"data domain '{name}' is neither a directory nor a text image list: {list_file} ({error.reason} at byte "
            f"{error.start}; expected lines '<image path> <integer label>')"
        ) from error
    files: list[str] = []
    labels: list[int] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{list_file}:{number}"
        # Split at the last blank so that image paths may contain spaces.
        parts = line.strip().rsplit(maxsplit=1)
        if len(parts) != 2 or not (parts[1].isascii() and parts[1].isdigit()):
            raise DataError(f"{where}: expected '<image path> <integer label>', got {line.strip()!r}")
        image = _resolve_listed_path(list_file, parts[0])
        label = int(parts[1])
        if classes is not None and label >= len(classes):
            raise DataError(f"{where}: label {label} is out of range for the {len(classes)} expected classes")
        if not image.is_file():
            raise DataError(f"{where}: listed image not found: {image}")
        files.append(str(image))
        labels.append(label)
    if not files:
        raise DataError(f"data domain '{name}' has no images: {list_file} lists none")
    # Class names are the label numbers 0..max, so a label keeps its meaning even if a class is absent.
    class_names = list(classes) if classes is not None else [str(i) for i in range(max(labels) + 1)]
    return Domain(name=name, files=files, labels=labels, classes=class_names)


def _resolve_listed_path(list_file: Path, listed: str) -> Path:
    """Relative paths are relative to the list's folder, or, for the tllib layout
    (`<root>/image_list/<domain>.txt` listing `<domain>/images/...`), to the folder above it."""
    path = Path(listed).expanduser()
    candidate = Path(os.path.abspath(list_file.parent / path))
    if not path.is_absolute() and not candidate.is_file() and list_file.parent.name == "image_list":
        return Path(os.path.abspath(list_file.parent.parent / path))
    return candidate


def _drop_or_reject_unreadable(domain: Domain, path: Path, skip_corrupt: bool) -> Domain:
    chunks = [domain.files[start : start + _CHECK_CHUNK] for start in range(0, len(domain.files), _CHECK_CHUNK)]
    with ThreadPoolExecutor(max_workers=_CHECK_THREADS) as pool:
        problems = [problem for chunk in pool.map(_decode_problems, chunks) for problem in chunk]
    unreadable = [(file, problem) for file, problem in zip(domain.files, problems) if problem is not None]
    if not unreadable:
        return domain
    if not skip_corrupt:
        file, problem = unreadable[0]
        more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
        raise DataError(
            f"unreadable image in data domain '{domain.name}': {file}: {problem}{more}; "
            "fix or remove it, or set data.skip_corrupt=true to drop unreadable images"
        )
    dropped = {file for file, _ in unreadable}
    log.warning("data domain '%s': dropped %d unreadable image(s) (data.skip_corrupt=true): %s",
                domain.name, len(unreadable), _first_names([file for file, _ in unreadable]))
    kept = [(file, label) for file, label in zip(domain.files, domain.labels) if file not in dropped]
    if not kept:
        raise DataError(f"data domain '{domain.name}' has no readable images: {path}")
    return Domain(
        name=domain.name,
        files=[file for file, _ in kept],
        labels=[label for _, label in kept],
        classes=domain.classes,
    )


def _decode_problems(files: list[str]) -> list[str | None]:
    return [_decode_problem(file) for file in files]


def _decode_problem(file: str) -> str | None:
    """Why `file` cannot be decoded, or None. A full load(), since verify() misses truncated data."""
    try:
        with Image.open(file) as image:
            image.load()
    except Exception as error:  # noqa: BLE001 - any decoder failure here would also fail in the pipeline
        return f"{type(error).__name__}: {error}".splitlines()[0]
    return None


def _first_names(files: Sequence[str]) -> str:
    shown = ", ".join(files[:_NAMES_SHOWN])
    return shown + (f", ... ({len(files) - _NAMES_SHOWN} more)" if len(files) > _NAMES_SHOWN else "")
