"""`tada-data`: lay out a supported dataset in the folders the configs expect, from its public sources.

    tada-data --list                                  what can be prepared, from where
    tada-data digits --root data                      MNIST, MNIST-M and USPS as data/digits/{mnist,mnist_m,usps}
    tada-data pacs office31 --root data               PACS and Office-31 as data/pacs, data/office31
    tada-data pacs --root data --archives ~/Downloads use archives already on this machine (no network)

Each dataset is a list of archives with the address they are published at. An archive is taken from
--archives when it is there, else from <root>/<dataset>/downloads/ when an earlier call left it,
else downloaded. Archives with a published checksum (MNIST, USPS: torchvision's; MNIST-M: pytorch-
adapt's) are verified and a mismatch stops with one line; the others have none published, so their
SHA-256 is printed and recorded in <root>/<dataset>/SOURCE.md for the user to compare. The layout is
then checked (every domain present, images counted) before the command reports success.

Digits are converted to ImageFolder PNGs (`<domain>/<digit>/<n>.png`); --split picks the official
train split (the published MNIST -> MNIST-M protocol) or the test split.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tada_dist.cli import fail
from tada_dist.data.domain import IMAGE_EXTENSIONS

PROG = "tada-data"
DOWNLOAD_TIMEOUT_SECONDS = 30


@dataclass(frozen=True)
class Archive:
    name: str  # file name, in --archives and in <root>/<dataset>/downloads
    urls: tuple[str, ...]  # mirrors, tried in order
    md5: str | None = None  # published checksum, when there is one


@dataclass(frozen=True)
class Dataset:
    name: str
    description: str
    domains: tuple[str, ...]  # folders that must hold images afterwards
    archives: Callable[[str], tuple[Archive, ...]]  # split -> archives
    lay_out: Callable[[Path, Path, str], None]  # (downloads, dataset folder, split)
    source: str  # where it is published and whose checksums are used
    cite: str
    config: str  # the shipped config that trains on it
    terms: str = "no licence is stated with the archives; research use, citing the paper"


class PrepareError(ValueError):
    """An archive cannot be had or verified, or its contents are not the expected layout."""


# -- digits: converted from their original formats into ImageFolder PNGs -------------------------

MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
# Published by torchvision (torchvision.datasets.MNIST.resources).
MNIST_FILES = {
    "train": (("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
              ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432")),
    "test": (("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
             ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c")),
}
# The MNIST-M archive of pytorch-adapt (Musgrave et al.) and its checksum.
MNIST_M = Archive("mnist_m.tar.gz", ("https://cornell.box.com/shared/static/jado7quprg6hzzdubvwzh9umr75damwi",),
                  "859df31c91afe82e80e5012ba928f279")
# The libsvm copies of USPS, with torchvision's checksums (torchvision.datasets.USPS.split_list).
USPS_FILES = {
    "train": Archive("usps.bz2", ("https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass/usps.bz2",),
                     "ec16c51db3855ca6c91edd34d0e9b197"),
    "test": Archive("usps.t.bz2", ("https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass/usps.t.bz2",),
                    "8ea070ee2aca1ac39742fdd1ef5ed118"),
}


def mnist_archives(split: str) -> tuple[Archive, ...]:
    return tuple(Archive(name, tuple(m + name for m in MNIST_MIRRORS), md5) for name, md5 in MNIST_FILES[split])


def digits_archives(split: str) -> tuple[Archive, ...]:
    return (*mnist_archives(split), MNIST_M, USPS_FILES[split])


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format): big-endian dims after a 4-byte magic whose last byte is the rank."""
    data = gzip.decompress(path.read_bytes())
    if data[:2] != b"\0\0" or data[2] != 0x08:
        raise PrepareError(f"{path} is not an IDX file of unsigned bytes (expected MNIST's format)")
    rank = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank))
    values = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank)
    if values.size != int(np.prod(shape)):
        raise PrepareError(f"{path} holds {values.size} values, its header says {shape}")
    return values.reshape(shape)


def write_digits(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """images [n, h, w] uint8 grey, labels [n] -> folder/<label>/<n>.png."""
    for label in np.unique(labels):
        (folder / str(int(label))).mkdir(parents=True, exist_ok=True)
    for index, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(folder / str(int(label)) / f"{index:05d}.png")


def lay_out_mnist(downloads: Path, target: Path, split: str) -> None:
    (images_file, _), (labels_file, _) = MNIST_FILES[split]
    images, labels = read_idx(downloads / images_file), read_idx(downloads / labels_file)
    if len(images) != len(labels):
        raise PrepareError(f"{images_file} has {len(images)} images but {labels_file} {len(labels)} labels")
    write_digits(target / "mnist", images, labels)


def lay_out_mnist_m(downloads: Path, target: Path, split: str) -> None:
    staging = target / ".mnist_m-extract"
    extract(downloads / MNIST_M.name, staging)
    labels_file = staging / "mnist_m" / f"mnist_m_{split}_labels.txt"
    if not labels_file.is_file():
        raise PrepareError(f"{MNIST_M.name} has no mnist_m/{labels_file.name} (expected pytorch-adapt's MNIST-M archive)")
    for line in labels_file.read_text().splitlines():
        if not line.strip():
            continue
        name, label = line.split()
        destination = target / "mnist_m" / label / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging / "mnist_m" / f"mnist_m_{split}" / name), destination)
    shutil.rmtree(staging)


def lay_out_usps(downloads: Path, target: Path, split: str) -> None:
    """libsvm lines `label index:value ...`, labels 1-10 for digits 0-9, 256 values in [-1, 1] (16x16)."""
    lines = bz2.decompress((downloads / USPS_FILES[split].name).read_bytes()).decode().splitlines()
    rows = [line.split() for line in lines if line.strip()]
    pixels = np.array([[float(item.split(":")[1]) for item in row[1:]] for row in rows], dtype=np.float32)
    if pixels.shape[1:] != (256,):
        raise PrepareError(f"{USPS_FILES[split].name} rows have {pixels.shape[1:]} values, expected 256 (16x16)")
    images = ((pixels.reshape(-1, 16, 16) + 1) / 2 * 255).round().clip(0, 255).astype(np.uint8)
    write_digits(target / "usps", images, np.array([int(float(row[0])) - 1 for row in rows]))


def lay_out_digits(downloads: Path, target: Path, split: str) -> None:
    lay_out_mnist(downloads, target, split)
    lay_out_mnist_m(downloads, target, split)
    lay_out_usps(downloads, target, split)


# -- image benchmarks: archives unpacked as they are (tllib's layout, which the configs read) ------

TLLIB = "https://cloud.tsinghua.edu.cn/f/{}/?dl=1"  # thuml/Transfer-Learning-Library's download addresses


def tllib_archives(files: dict[str, str]) -> Callable[[str], tuple[Archive, ...]]:
    archives = tuple(Archive(name, (TLLIB.format(key),)) for name, key in files.items())
    return lambda split: archives


def unpack_all(downloads: Path, target: Path, split: str, names: tuple[str, ...] = ()) -> None:
    for name in names:
        extract(downloads / name, target)


def extract(archive: Path, destination: Path) -> None:
    """Unpack a .zip, .tar, .tgz or .tar.gz; members that would land outside `destination` are refused."""
    destination.mkdir(parents=True, exist_ok=True)
    try:
        if archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as bundle:
                for member in bundle.namelist():
                    if not (destination / member).resolve().is_relative_to(destination.resolve()):
                        raise PrepareError(f"{archive} holds {member}, which would land outside {destination}")
                bundle.extractall(destination)
        else:
            with tarfile.open(archive) as bundle:
                bundle.extractall(destination, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as error:
        raise PrepareError(f"{archive} cannot be unpacked ({error}); remove it and run tada-data again") from None


PACS_FILES = {"image_list.zip": "603a1fea81f2415ab7e0", "art_painting.tgz": "46684292e979402b8d87",
              "cartoon.tgz": "7bfa413b34ec4f4fa384", "photo.tgz": "45f71386a668475d8b42",
              "sketch.tgz": "4ba559535e4b4b6981e5"}
OFFICE31_FILES = {"image_list.zip": "2c1dd9fbcaa9455aa4ad", "amazon.tgz": "ec12dfcddade43ab8101",
                  "dslr.tgz": "a41d818ae2f34da7bb32", "webcam.tgz": "8a41009a166e4131adcd"}
OFFICEHOME_FILES = {"image_list.zip": "1b0171a188944313b1f5", "Art.tgz": "6a006656b9a14567ade2",
                    "Clipart.tgz": "ae88aa31d2d7411dad79", "Product.tgz": "f219b0ff35e142b3ab48",
                    "Real_World.tgz": "6c19f3f15bb24ed3951a"}


def _unpacker(files: dict[str, str]) -> Callable[[Path, Path, str], None]:
    return lambda downloads, target, split: unpack_all(downloads, target, split, tuple(files))


DATASETS = {
    "digits": Dataset(
        "digits", "MNIST (source), MNIST-M and USPS as ImageFolders of PNGs", ("mnist", "mnist_m", "usps"),
        digits_archives, lay_out_digits,
        "MNIST from torchvision's mirrors, USPS from the libsvm site (checksums from torchvision), MNIST-M from "
        "pytorch-adapt's archive (its checksum)",
        "LeCun et al. 1998 (MNIST); Ganin & Lempitsky 2015 (MNIST-M); Hull 1994 (USPS)",
        "configs/digits/mnist_to_mnistm.yaml"),
    "pacs": Dataset(
        "pacs", "PACS: photo, art_painting, cartoon, sketch (7 classes)",
        ("photo", "art_painting", "cartoon", "sketch"), tllib_archives(PACS_FILES), _unpacker(PACS_FILES),
        "thuml/Transfer-Learning-Library's copies (no checksum published)", "Li et al., ICCV 2017",
        "configs/pacs/photo_to_art_painting.yaml"),
    "office31": Dataset(
        "office31", "Office-31: amazon, dslr, webcam (31 classes) and tllib's image lists",
        ("amazon", "dslr", "webcam"), tllib_archives(OFFICE31_FILES), _unpacker(OFFICE31_FILES),
        "thuml/Transfer-Learning-Library's copies (no checksum published)", "Saenko et al., ECCV 2010",
        "configs/office31/amazon_to_webcam.yaml"),
    "officehome": Dataset(
        "officehome", "Office-Home: Art, Clipart, Product, Real_World (65 classes) and tllib's image lists",
        ("Art", "Clipart", "Product", "Real_World"), tllib_archives(OFFICEHOME_FILES), _unpacker(OFFICEHOME_FILES),
        "thuml/Transfer-Learning-Library's copies (no checksum published)", "Venkateswara et al., CVPR 2017",
        "configs/officehome/art_to_clipart.yaml",
        terms="non-commercial research use (see hemanthdv.org/officeHomeDataset.html)"),
}


# -- getting and checking archives ------------------------------------------------------------------


def digest(path: Path, algorithm: str) -> str:
    hasher = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            hasher.update(block)
    return hasher.hexdigest()


def fetch(archive: Archive, downloads: Path, offline_folder: Path | None) -> Path:
    """The archive in `downloads`: copied from --archives, kept from an earlier call, or downloaded."""
    destination = downloads / archive.name
    if offline_folder is not None and (offline_folder / archive.name).is_file():
        shutil.copyfile(offline_folder / archive.name, destination)
    elif not destination.is_file():
        errors = []
        for url in archive.urls:
            print(f"{PROG}: downloading {archive.name} from {url}", file=sys.stderr, flush=True)
            partial = destination.with_name(destination.name + ".partial")
            try:
                with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response, open(partial, "wb") as out:
                    shutil.copyfileobj(response, out, 1 << 20)
                partial.replace(destination)
                break
            except (urllib.error.URLError, OSError) as error:
                partial.unlink(missing_ok=True)
                errors.append(f"{url}: {getattr(error, 'reason', error)}")
        else:
            where = f"--archives {offline_folder}" if offline_folder else "--archives DIR"
            raise PrepareError(f"could not download {archive.name} ({'; '.join(errors)}); fetch it on a machine with "
                               f"network access and pass the folder that holds it: {where}")
    if archive.md5 is not None:
        got = digest(destination, "md5")
        if got != archive.md5:
            destination.unlink()
            raise PrepareError(f"{archive.name} has MD5 {got}, expected {archive.md5} (the published checksum); "
                               "it was removed: fetch it again")
    return destination


def count_images(folder: Path) -> int:
    return sum(1 for path in folder.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS)


def prepare(dataset: Dataset, root: Path, split: str, offline_folder: Path | None) -> dict[str, int]:
    """Fetch, verify and lay out one dataset under root/<name>; the images found per domain."""
    target = root / dataset.name
    downloads = target / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    provenance = []
    for archive in dataset.archives(split):
        path = fetch(archive, downloads, offline_folder)
        if archive.md5:
            provenance.append(f"- {archive.name}: MD5 {archive.md5} verified; from {archive.urls[0]}")
        else:
            sha256 = digest(path, "sha256")
            print(f"{PROG}: {archive.name} has no published checksum; its SHA-256 is {sha256}", file=sys.stderr)
            provenance.append(f"- {archive.name}: SHA-256 {sha256} (no published checksum); from {archive.urls[0]}")
    for domain in dataset.domains:  # a re-run lays out afresh instead of adding files twice
        shutil.rmtree(target / domain, ignore_errors=True)
    dataset.lay_out(downloads, target, split)
    counts = {domain: count_images(target / domain) for domain in dataset.domains}
    empty = [domain for domain, count in counts.items() if count == 0]
    if empty:
        raise PrepareError(f"{target}: no images for domain(s) {', '.join(empty)} after unpacking; the archives do "
                           f"not have the expected layout ({dataset.source})")
    (target / "SOURCE.md").write_text("\n".join([
        f"# {dataset.description}", "", f"Source: {dataset.source}.", f"Cite: {dataset.cite}.",
        f"Terms: {dataset.terms}.", f"Split: {split}." if dataset.name == "digits" else "", "", "Archives:", "",
        *provenance, "", "Images per domain: " + ", ".join(f"{d} {n}" for d, n in counts.items()) + ".", "",
    ]))
    return counts


def describe() -> str:
    lines = []
    for dataset in DATASETS.values():
        lines += [f"{dataset.name:<11} {dataset.description}", f"{'':<11} from {dataset.source}",
                  f"{'':<11} cite {dataset.cite}; terms: {dataset.terms}", f"{'':<11} trained by {dataset.config}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="datasets:\n" + describe())
    parser.add_argument("datasets", nargs="*", metavar="DATASET", help=f"one or more of {', '.join(DATASETS)}")
    parser.add_argument("--root", default="data", help="the folder that receives <root>/<dataset> (default: data)")
    parser.add_argument("--split", choices=("train", "test"), default="train",
                        help="digits only: the official train split (default) or the test split")
    parser.add_argument("--archives", type=Path, help="a folder holding archives already downloaded (no network needed)")
    parser.add_argument("--list", action="store_true", help="list the datasets and their sources")
    args = parser.parse_args(argv)
    if args.list or not args.datasets:
        print(describe())
        return 0
    unknown = [name for name in args.datasets if name not in DATASETS]
    if unknown:
        return fail(PROG, f"unknown dataset {', '.join(unknown)}; known: {', '.join(DATASETS)}")
    if args.archives is not None and not args.archives.is_dir():
        return fail(PROG, f"--archives {args.archives} is not a folder")
    root = Path(args.root)
    for name in args.datasets:
        dataset = DATASETS[name]
        try:
            counts = prepare(dataset, root, args.split, args.archives)
        except PrepareError as error:
            return fail(PROG, error)
        shown = ", ".join(f"{domain} {count}" for domain, count in counts.items())
        print(f"{root / name}: {shown} images; train with: tada-train --config {dataset.config} "
              f"data.root={root / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
