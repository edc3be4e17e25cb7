"""What Ray Data's decode tasks run: file bytes -> uint8 canvases, and the per-epoch order of a listing block.

Only numpy, PIL and the standard library: a decode task imports this module and nothing heavier (importing torch
cost every Ray Data worker ~4 s and ~850 MB of PSS, measured in issue 25's research). The column names are those of
:class:`~ssl_platform.data.streaming.ImageBatch`'s source rows.
"""

from __future__ import annotations

import io
import zlib

import numpy as np

IMAGE_COLUMN, SIZE_COLUMN, LABEL_COLUMN, OK_COLUMN, PATH_COLUMN = "image", "size", "label", "ok", "path"


def decode_to_canvas(encoded: bytes, canvas: int, draft: bool = False) -> tuple[np.ndarray, int, int]:
    """Decode an image file's bytes to RGB and fit it into ``canvas x canvas`` (``uint8 [C, C, 3]``, h, w): scale
    ``s = min(1, canvas / max(h, w))`` (aspect kept, never enlarged; ``s = 1``, full resolution, whenever the long
    side fits), placed top-left, zero padded; ``(h, w)`` is the valid region the device-side crops are drawn in.

    ``draft`` (a speed option): a JPEG larger than its fit is decoded at a reduced DCT scale (1/2, 1/4 or 1/8, the
    smallest still >= the fit, ``PIL.Image.draft``) before the antialiased resize; off: the full decode is resized."""
    from PIL import Image

    with Image.open(io.BytesIO(encoded)) as img:
        w, h = img.size
        scale = min(1.0, canvas / max(w, h))
        tw, th = max(1, round(w * scale)), max(1, round(h * scale))
        if scale < 1.0 and draft:
            img.draft("RGB", (tw, th))  # JPEG: decode at a reduced DCT scale, still >= the target size
        rgb = img.convert("RGB")
        if rgb.size != (tw, th):
            rgb = rgb.resize((tw, th), Image.BILINEAR)  # PIL filters over the source footprint (antialiased)
        out = np.zeros((canvas, canvas, 3), dtype=np.uint8)
        out[:th, :tw] = np.asarray(rgb)
    return out, th, tw


def decode_batch(batch: dict[str, np.ndarray], *, canvas: int, filesystem=None, draft: bool = False) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: rows -> canvas rows.

    Input columns: ``path``, ``label`` and, for shards, the encoded ``image``; without it, the
    bytes are read from ``filesystem`` at ``path`` (an image folder's listing). Labels travel as given
    (:data:`~ssl_platform.data.sources.NO_LABEL` for unlabelled images). ``draft``: see :func:`decode_to_canvas`.
    """
    paths = [str(p) for p in batch[PATH_COLUMN]]
    encoded = batch.get(IMAGE_COLUMN)
    if encoded is None:
        encoded = [_read_bytes(filesystem, path) for path in paths]
    given = batch[LABEL_COLUMN]
    images, sizes, oks = [], [], []
    for data in encoded:
        try:
            image, h, w = decode_to_canvas(bytes(data), canvas, draft)
            ok = True
        except Exception:  # noqa: BLE001 -- any decoder failure makes the file a bad row, named by the worker
            image, h, w, ok = np.zeros((canvas, canvas, 3), dtype=np.uint8), 0, 0, False
        images.append(image)
        sizes.append((h, w))
        oks.append(ok)
    return {
        IMAGE_COLUMN: np.stack(images) if images else np.zeros((0, canvas, canvas, 3), dtype=np.uint8),
        SIZE_COLUMN: np.asarray(sizes, dtype=np.int32).reshape(-1, 2),
        LABEL_COLUMN: np.asarray(given, dtype=np.int64),
        OK_COLUMN: np.asarray(oks, dtype=bool),
        PATH_COLUMN: np.asarray(paths, dtype=object),
    }


def _read_bytes(filesystem, path: str) -> bytes:
    """A file's bytes; an unreadable file (gone since the listing, no permission) decodes as a bad row."""
    try:
        with filesystem.open_input_stream(path) as f:
            return f.read()
    except OSError:
        return b""


def shuffle_block(block: dict[str, np.ndarray], *, seed: int) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches(batch_size=None)`` function: the rows of one listing block in a new order every
    epoch (the generator is seeded by ``seed``, the dataset's execution index and the block's first path)."""
    n = len(block[PATH_COLUMN])
    if n < 2:
        return block
    import ray.data

    seed_tuple = ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True).get_seed_tuple(
        data_context=ray.data.DataContext.get_current())
    first = zlib.crc32(str(block[PATH_COLUMN][0]).encode())
    order = np.random.default_rng([first, seed_tuple.execution_idx or 0, seed]).permutation(n)
    return {k: v[order] for k, v in block.items()}
