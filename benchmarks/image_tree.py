"""Generated ImageFolder trees of real encoded files (JPEG / PNG, mixed sizes) for tests and benchmarks.

Class ``c`` has a dominant hue and stripes at angle ``pi * c / C``, so the images are not all alike; sizes are
drawn around the requested mean (ImageNet-like 500x375 by default) so a pipeline meets mixed aspect ratios.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def encode_image(array: np.ndarray, fmt: str = "JPEG", quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def class_image(label: int, num_classes: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = np.pi * label / num_classes
    stripes = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / max(4.0, width / 24) + rng.uniform(0, 6.28))
    hue = np.array([np.cos(angle), np.sin(angle), -np.cos(angle)]) * 0.3 + 0.5
    img = stripes[..., None] * hue[None, None] + rng.normal(0, 0.05, (height, width, 3))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_image_tree(
    root: str | Path, num_classes: int = 4, per_class: int = 10, mean_size: tuple[int, int] = (375, 500),
    seed: int = 0, fmt: str = "JPEG", jitter: float = 0.3,
) -> list[Path]:
    """``root/class_<c>/img_<i>.jpg`` files; sizes uniform within +-``jitter`` of ``mean_size`` (h, w)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    suffix = ".jpg" if fmt == "JPEG" else ".png"
    files = []
    for c in range(num_classes):
        d = root / f"class_{c:03d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h = max(8, int(mean_size[0] * rng.uniform(1 - jitter, 1 + jitter)))
            w = max(8, int(mean_size[1] * rng.uniform(1 - jitter, 1 + jitter)))
            path = d / f"img_{i:05d}{suffix}"
            path.write_bytes(encode_image(class_image(c, num_classes, h, w, rng), fmt))
            files.append(path)
    return files
