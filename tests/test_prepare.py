"""tada-data on small archives the tests make, in each source's format: no network is used."""

import bz2
import gzip
import hashlib
import io
import socket
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from tada_dist.data import load_domain
from tada_dist.data import prepare


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def tar_gz(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as bundle:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.fixture
def digit_archives(tmp_path, monkeypatch):
    """MNIST (IDX), MNIST-M (pytorch-adapt's tar) and USPS (libsvm bz2) test splits of 4 images each,
    with the module's published checksums swapped for theirs."""
    folder = tmp_path / "archives"
    folder.mkdir()
    rng = np.random.default_rng(0)
    mnist_images = rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    files = {"t10k-images-idx3-ubyte.gz": idx(mnist_images), "t10k-labels-idx1-ubyte.gz": idx(np.array([3, 1, 4, 1]))}
    mnist_m = {f"mnist_m/mnist_m_test/{i:08d}.png": png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
               for i in range(4)}
    mnist_m["mnist_m/mnist_m_test_labels.txt"] = b"".join(f"{i:08d}.png {d}\n".encode() for i, d in enumerate((7, 2, 7, 0)))
    files["mnist_m.tar.gz"] = tar_gz(mnist_m)
    usps_rows = [f"{label + 1} " + " ".join(f"{k + 1}:{v:.4f}" for k, v in enumerate(np.linspace(-1, 1, 256)))
                 for label in (9, 0, 5)]
    files["usps.t.bz2"] = bz2.compress("\n".join(usps_rows).encode())
    for name, data in files.items():
        (folder / name).write_bytes(data)
    monkeypatch.setattr(prepare, "MNIST_FILES", {"test": tuple((n, md5(files[n])) for n in list(files)[:2])})
    monkeypatch.setattr(prepare, "MNIST_M", prepare.Archive("mnist_m.tar.gz", ("http://unused",), md5(files["mnist_m.tar.gz"])))
    monkeypatch.setattr(prepare, "USPS_FILES", {"test": prepare.Archive("usps.t.bz2", ("http://unused",), md5(files["usps.t.bz2"]))})
    return folder, mnist_images


def digits_of(domain) -> list[str]:
    return sorted(domain.classes[label] for label in domain.labels)


def test_digits_are_laid_out_as_imagefolders_with_their_labels_and_pixels(tmp_path, digit_archives, capsys):
    archives, mnist_images = digit_archives
    assert prepare.main(["digits", "--root", str(tmp_path / "data"), "--split", "test", "--archives", str(archives)]) == 0
    root = tmp_path / "data" / "digits"
    mnist = load_domain(root / "mnist")
    assert digits_of(mnist) == ["1", "1", "3", "4"]
    first = next(f for f in mnist.files if f.endswith("00000.png"))
    assert "/3/" in first and np.array_equal(np.asarray(Image.open(first)), mnist_images[0])
    assert digits_of(load_domain(root / "mnist_m")) == ["0", "2", "7", "7"]
    usps = load_domain(root / "usps")
    assert digits_of(usps) == ["0", "5", "9"]
    with Image.open(usps.files[0]) as image:
        assert image.size == (16, 16) and np.asarray(image)[0, 0] == 0 and np.asarray(image)[-1, -1] == 255
    assert "MD5" in (root / "SOURCE.md").read_text() and "Split: test." in (root / "SOURCE.md").read_text()
    assert "mnist 4, mnist_m 4, usps 3 images" in capsys.readouterr().out
    # Running it again lays the folders out afresh instead of adding the images twice.
    assert prepare.main(["digits", "--root", str(tmp_path / "data"), "--split", "test", "--archives", str(archives)]) == 0
    assert len(load_domain(root / "mnist").files) == 4


def test_a_checksum_mismatch_stops_with_one_line_and_removes_the_copy(tmp_path, digit_archives, capsys):
    archives, _ = digit_archives
    (archives / "usps.t.bz2").write_bytes(b"tampered")
    assert prepare.main(["digits", "--root", str(tmp_path / "data"), "--split", "test", "--archives", str(archives)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("tada-data: error: usps.t.bz2 has MD5 ") and "expected" in error
    assert not (tmp_path / "data" / "digits" / "downloads" / "usps.t.bz2").exists()


def test_unreachable_sources_name_the_file_and_the_offline_way(tmp_path, monkeypatch, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    closed = {"image_list.zip": prepare.Archive("image_list.zip", (f"http://127.0.0.1:{port}/image_list.zip",))}
    monkeypatch.setattr(prepare, "DATASETS", {"pacs": prepare.Dataset(**{
        **prepare.DATASETS["pacs"].__dict__, "archives": lambda split: tuple(closed.values())})})
    assert prepare.main(["pacs", "--root", str(tmp_path / "data")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("tada-data: error: could not download image_list.zip") and "--archives DIR" in error


def test_image_benchmarks_are_unpacked_as_published_and_their_sha256_recorded(tmp_path, capsys):
    archives = tmp_path / "archives"
    archives.mkdir()
    lists = io.BytesIO()
    with zipfile.ZipFile(lists, "w") as bundle:
        bundle.writestr("image_list/photo_train.txt", "photo/dog/0.jpg 0\n")
    (archives / "image_list.zip").write_bytes(lists.getvalue())
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(jpeg, format="JPEG")
    for domain in ("art_painting", "cartoon", "photo", "sketch"):
        (archives / f"{domain}.tgz").write_bytes(tar_gz({f"{domain}/dog/0.jpg": jpeg.getvalue(),
                                                         f"{domain}/horse/1.jpg": jpeg.getvalue()}))
    assert prepare.main(["pacs", "--root", str(tmp_path / "data"), "--archives", str(archives)]) == 0
    root = tmp_path / "data" / "pacs"
    assert load_domain(root / "photo").classes == ["dog", "horse"]
    assert (root / "image_list" / "photo_train.txt").is_file()
    assert "SHA-256" in (root / "SOURCE.md").read_text() and "has no published checksum" in capsys.readouterr().err


def test_archives_that_reach_outside_the_folder_are_refused(tmp_path, capsys):
    archives = tmp_path / "archives"
    archives.mkdir()
    (archives / "image_list.zip").write_bytes(b"")
    for domain in ("art_painting", "cartoon", "photo", "sketch"):
        (archives / f"{domain}.tgz").write_bytes(tar_gz({"../escaped.txt": b"x"}))
    lists = io.BytesIO()
    with zipfile.ZipFile(lists, "w") as bundle:
        bundle.writestr("image_list/a.txt", "")
    (archives / "image_list.zip").write_bytes(lists.getvalue())
    assert prepare.main(["pacs", "--root", str(tmp_path / "data"), "--archives", str(archives)]) == 2
    assert "cannot be unpacked" in capsys.readouterr().err
    assert not (tmp_path / "data" / "escaped.txt").exists()


def test_unknown_dataset_and_listing(capsys):
    assert prepare.main(["svhn"]) == 2
    assert "unknown dataset svhn; known: digits, pacs, office31, officehome" in capsys.readouterr().err
    assert prepare.main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert "configs/pacs/photo_to_art_painting.yaml" in listing and "Saenko et al." in listing
