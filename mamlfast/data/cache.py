"""Decoded data sets cached as memory-mapped files, one copy per machine whatever the number of processes.

A cache file holds a data set's images as uint8 [N, C, H, W], class after class, after a header
that says where they came from and how they were decoded:

    mamlfast-images 1
    <CRC-32 of the header, 8 hex digits> <header length> <data offset>
    <the header: one line of JSON>
    <zero bytes up to the data offset, a multiple of the page size>
    <the images: N * C * H * W bytes>

The header names the source (the data set and its root) and the options that decided the bytes
(image size, colour mode, ...), the key derived from them and from the source files' fingerprint,
the classes' names and image counts, each class's per-channel sums of pixel values and of their
squares (any split's normalisation statistics follow from them without reading an image), and the
CRC-32 of every CHUNK_BYTES of the images. A checksum is there to catch damage (a torn copy, a bad
disk), which CRC-32 does, not tampering, and it is checked whenever a process maps the file:
CRC-32 takes less than half of SHA-256's time there (measured: 1.1 s against 2.5 s for 1.27 GB).

The first process that needs a cache file decodes the images into a temporary file beside it and
renames it into place (a cache file is never changed in place, which would pull its pages from
under the processes that map it), holding a lock file meanwhile; the others wait for the lock, then map the
finished file. Every process maps it read-only, so a machine holds one copy in its page cache,
whatever the number of processes (ranks) that read it. A file whose header or checksums do not
match is decoded again, with a warning; where the cache folder cannot be written, the images are
decoded into memory, with a warning.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import mmap
import os
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import numpy as np
import torch

from ..files import atomic_open, cache_dir, first_line, remove_temporaries, waiting_lock
from .images import ClassImages, ImageSource

log = logging.getLogger(__name__)
FORMAT = 1
MAGIC = b"mamlfast-images 1\n"
CHUNK_BYTES = 64 * 2**20
BLOCK_IMAGES = 256  # images written at a time
SUFFIX = ".images"


def fingerprint(paths: Iterable[str | os.PathLike]) -> list:
    """What identifies the contents of source files cheaply: absolute path, size, modification time."""
    absolute = (p if os.path.isabs(p) else os.path.abspath(p) for p in map(os.fspath, paths))
    return [(path, (stat := os.stat(path)).st_size, stat.st_mtime_ns) for path in absolute]


@dataclass(frozen=True)
class Source:
    """What a cache file holds: ``kind`` (the data set, the file's name prefix), ``source`` (where
    its images are, recorded in the header), ``options`` (what decided the decoded bytes),
    ``files`` (the ``fingerprint`` of the files that hold the images) and the shape [C, H, W] of
    one image. They make its key: a file with the same key holds the same images."""

    kind: str
    source: dict
    options: dict
    files: list
    image_shape: tuple[int, int, int]

    @property
    def key(self) -> str:
        text = json.dumps([FORMAT, self.kind, self.source, self.options, self.files, self.image_shape],
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def path(self) -> Path:
        return cache_dir() / f"{self.kind}-{self.key[:16]}{SUFFIX}"


Classes = list[tuple[str, list[ImageSource]]]


def cached(source: Source, list_classes: Callable[[], Classes],
           decode: Callable[[Classes], Iterable[np.ndarray]]) -> ClassImages:
    """The images of ``source`` mapped read-only from its cache file. Where no valid one exists,
    it is written first: ``list_classes()`` gives the classes (name, images) in the order of its
    rows, and ``decode(classes)`` every image as uint8 [C, H, W], class after class. A valid cache
    file is read without listing the classes again (its header has them)."""
    path = source.path
    found, _ = _open(path, source)
    if found is not None:
        return found
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with waiting_lock(path.with_suffix(".lock"), lambda holder: log.warning(
                "waiting for %s, which is decoding the images into %s", holder, path)):
            found, problem = _open(path, source)  # another process may have written it meanwhile
            if found is not None:
                return found
            if problem is not None:
                log.warning("cache file %s is %s: decoding the images again", path, problem)
            remove_temporaries(path.parent, path.name)  # killed writes': none runs while this lock is held
            classes = list_classes()
            with atomic_open(path, "wb") as handle:
                _write(handle, source, classes, decode(classes))
        found, problem = _open(path, source)
        if found is None:
            raise OSError(f"the file just written reads back as {problem}")
        return found
    except OSError as error:  # a read-only or full cache folder only costs the decoding next time
        log.warning("could not write the cache file %s (%s): the images will be decoded again next time",
                    path, error.strerror or first_line(error))
    classes = list_classes()
    memory = io.BytesIO()
    _write(memory, source, classes, decode(classes))
    header, data_offset = _read_header(memory)
    images = np.frombuffer(memory.getbuffer(), np.uint8, offset=data_offset).reshape(header["shape"])
    return _class_images(images, header)


def _write(handle: BinaryIO, source: Source, classes: Classes, images: Iterable[np.ndarray]) -> None:
    """Write the cache file of ``source`` with the ``images`` of ``classes`` to ``handle``: the
    images first, at the data offset, then the header, whose room before them is that of its
    longest possible form."""
    counts, (channels, height, width) = [len(sources) for _, sources in classes], source.image_shape
    shape = (sum(counts), *source.image_shape)
    moments = np.zeros((len(counts), 2, channels), dtype=np.int64)
    chunks = -(-int(np.prod(shape)) // CHUNK_BYTES)
    pixels = height * width
    largest = np.array([[[n * pixels * 255] * channels, [n * pixels * 255 ** 2] * channels] for n in counts])
    placeholder = _header(source, classes, largest, [_crc(b"")] * chunks)
    data_offset = _round_up(len(_header_lines(placeholder, 10**18)), mmap.PAGESIZE)
    handle.seek(data_offset)
    checksums = _ChunkChecksums()
    images = iter(images)
    for index, count in enumerate(counts):
        for start in range(0, count, BLOCK_IMAGES):  # a class's images a block at a time: less work per image
            block = np.ascontiguousarray(np.stack(list(islice(images, min(BLOCK_IMAGES, count - start)))))
            if block.shape[1:] != source.image_shape or block.dtype != np.uint8:
                raise ValueError(f"decoded images are {block.dtype} {block.shape[1:]}, not uint8 {source.image_shape}")
            rows = block.reshape(-1, height * width)  # [n * C, H * W]; numpy sums 2-d rows fastest
            moments[index, 0] += rows.sum(1, dtype=np.int64).reshape(-1, channels).sum(0)
            moments[index, 1] += np.einsum("ij,ij->i", rows, rows, dtype=np.int64).reshape(-1, channels).sum(0)
            data = memoryview(block).cast("B")
            handle.write(data)
            checksums.update(data)
    if checksums.size != int(np.prod(shape)):
        raise ValueError(f"decoded {checksums.size} bytes of images, not the {int(np.prod(shape))} expected")
    handle.seek(0)
    handle.write(_header_lines(_header(source, classes, moments, checksums.values()), data_offset))


def _header(source: Source, classes: Classes, moments: np.ndarray, checksums: list[str]) -> dict:
    counts = [len(sources) for _, sources in classes]
    return dict(format=FORMAT, kind=source.kind, source=source.source, options=source.options, key=source.key,
                shape=[sum(counts), *source.image_shape], dtype="uint8", classes=[name for name, _ in classes],
                counts=counts, moments=moments.tolist(), chunk_bytes=CHUNK_BYTES, crc32=checksums)


def _header_lines(header: dict, data_offset: int) -> bytes:
    text = json.dumps(header, sort_keys=True).encode()
    return MAGIC + f"{_crc(text)} {len(text)} {data_offset}\n".encode() + text + b"\n"


def _read_header(handle: BinaryIO) -> tuple[dict, int]:
    """The header of the cache file open in ``handle``, and the offset of its images."""
    handle.seek(0)
    if handle.read(len(MAGIC)) != MAGIC:
        raise ValueError("not a mamlfast cache file")
    checksum, length, data_offset = handle.readline(200).decode().split()
    text = handle.read(int(length))
    if _crc(text) != checksum:
        raise ValueError("its header does not match its checksum")
    return json.loads(text), int(data_offset)


def _open(path: Path, source: Source) -> tuple[ClassImages | None, str | None]:
    """The cache file at ``path`` mapped read-only, or (None, how it fails ``source``; None if missing)."""
    try:
        with open(path, "rb") as handle:
            header, data_offset = _read_header(handle)
        problem = _mismatch(header, source)
        if problem is not None:
            return None, problem
        images = np.memmap(path, np.uint8, "r", offset=data_offset, shape=tuple(header["shape"]))
        if _chunk_checksums(images.reshape(-1)) != header["crc32"]:
            return None, "damaged (its images do not match their checksums)"
        return _class_images(images, header), None
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        return None, f"unreadable ({first_line(error)})"


def _mismatch(header: dict, source: Source) -> str | None:
    """How a cache file's header disagrees with the ``source`` it should hold, or None."""
    if header.get("format") != FORMAT or header.get("key") != source.key:
        return "for another source or another version of mamlfast"
    counts, shape = header.get("counts"), header.get("shape")
    if not (isinstance(counts, list) and len(counts) == len(header.get("classes", ())) and shape == [
            sum(counts), *source.image_shape] and header.get("dtype") == "uint8"):
        return (f"inconsistent (its image counts or its shape do not make uint8 "
                f"[N, {', '.join(map(str, source.image_shape))}])")
    return None


def _class_images(images: np.ndarray, header: dict) -> ClassImages:
    with warnings.catch_warnings():  # a read-only mapping: nothing writes to it (see ClassImages)
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        pool = torch.from_numpy(images)
    return ClassImages(pool, torch.tensor(header["counts"], dtype=torch.int64), header["classes"],
                       moments=torch.tensor(header["moments"], dtype=torch.int64))


class _ChunkChecksums:
    """The CRC-32 of every CHUNK_BYTES of a stream of bytes, and of the rest."""

    def __init__(self):
        self.done: list[str] = []
        self.current = 0
        self.size = 0

    def update(self, data: memoryview) -> None:
        while data:
            take = min(len(data), CHUNK_BYTES - self.size % CHUNK_BYTES)
            self.current = zlib.crc32(data[:take], self.current)
            self.size += take
            data = data[take:]
            if self.size % CHUNK_BYTES == 0:
                self.done.append(f"{self.current:08x}")
                self.current = 0

    def values(self) -> list[str]:
        return self.done + ([f"{self.current:08x}"] if self.size % CHUNK_BYTES else [])


def _chunk_checksums(data: np.ndarray) -> list[str]:
    """What ``_ChunkChecksums`` gives for the bytes of ``data``, computed on every core (zlib lets go
    of the interpreter lock while it sums)."""
    chunks = [data[start:start + CHUNK_BYTES] for start in range(0, len(data), CHUNK_BYTES)]
    with ThreadPoolExecutor(max(1, min(len(chunks), os.cpu_count() or 1))) as pool:
        return list(pool.map(_crc, chunks))


def _crc(data) -> str:
    return f"{zlib.crc32(data):08x}"


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
