"""Where streamed images live: an ImageFolder tree (``root/class_name/.../image``) on local disk or S3.

:func:`data_filesystem` turns ``data.root`` / ``data.val_root`` into a pyarrow filesystem and path (S3 endpoint
and credentials from the standard AWS settings, as for checkpoints). :func:`list_image_folder` lists a tree once
(metadata only, one recursive listing: paginated ``LIST`` requests on S3), with torchvision's ``ImageFolder``
class convention: class = first folder under the root, classes sorted by name. Every problem a run would only
meet in its workers (a missing path, bucket or prefix, no read permission, no class folder, no image) is a
:class:`~ssl_platform.data.DataError` naming the key and the URI, raised before Ray Train starts.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

from ssl_platform.data import IMAGE_SUFFIXES, DataError


@dataclass(frozen=True)
class ImageFolderListing:
    """Files of an ImageFolder tree: filesystem paths (no ``s3://`` scheme), integer labels, class names."""

    uri: str
    path: str  # the root as a filesystem path
    files: list[str]
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.files)


def data_filesystem(uri: str, endpoint: str | None = None):
    """``(pyarrow filesystem, path)`` of a local directory or an ``s3://bucket/prefix``."""
    from ssl_platform.uri_files import resolve_uri

    return resolve_uri(uri, spec_endpoint=endpoint)


def is_image(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES


def list_image_folder(uri: str, key: str = "data.root", endpoint: str | None = None, fs=None) -> ImageFolderListing:
    """List ``uri`` as an ImageFolder tree; raises :class:`DataError` naming ``key`` and ``uri``."""
    from pyarrow.fs import FileSelector, FileType

    if fs is None:
        fs, path = data_filesystem(uri, endpoint)
    else:
        from ssl_platform import s3

        path = s3.fs_path(uri)
    path = path.rstrip("/")
    try:
        info = fs.get_file_info(path)
        if info.type != FileType.Directory:
            raise DataError(f"{key}: expected an ImageFolder directory (root/class_name/image), got {uri!r}, which "
                            f"{'is a file' if info.type == FileType.File else 'does not exist'}")
        entries = fs.get_file_info(FileSelector(path, recursive=True))
    except DataError:
        raise
    except OSError as err:
        raise DataError(f"{key}: cannot list {uri!r}: {_reason(err)}") from None
    prefix = path + "/"
    by_class: dict[str, list[str]] = {}
    loose = 0
    for entry in entries:
        if entry.type != FileType.File or not is_image(entry.path):
            continue
        rel = entry.path[len(prefix):] if entry.path.startswith(prefix) else entry.path
        cls, sep, _ = rel.partition("/")
        if not sep:
            loose += 1
            continue
        by_class.setdefault(cls, []).append(entry.path)
    if not by_class:
        hint = " (images lie directly under it: put them in root/class_name/)" if loose else ": the dataset is empty"
        raise DataError(f"{key}: expected an ImageFolder tree root/class_name/image "
                        f"({', '.join(sorted(IMAGE_SUFFIXES))}), got {uri!r} with no class folder holding images{hint}")
    classes = sorted(by_class)
    files: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        members = sorted(by_class[cls])
        files.extend(members)
        labels.extend([label] * len(members))
    return ImageFolderListing(uri=uri, path=path, files=files, labels=labels, classes=classes)


def relabel(listing: ImageFolderListing, classes: list[str], key: str = "data.val_root") -> ImageFolderListing:
    """``listing`` with the labels of ``classes`` (the training split's): a validation folder may lack classes, but
    a class the training split does not have is an error."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(listing.classes) - set(index))
    if unknown:
        raise DataError(f"{key}: expected only classes of data.root ({len(classes)} classes), got {listing.uri!r} "
                        f"with classes the training split lacks: {unknown[:5]}")
    labels = [index[listing.classes[y]] for y in listing.labels]
    return ImageFolderListing(uri=listing.uri, path=listing.path, files=listing.files, labels=labels, classes=list(classes))


def in_test_split(path: str, test_fraction: float) -> bool:
    """A deterministic, listing-free hold-out: a file is in the test split when a CRC32 of its path relative to the
    root falls in the first ``test_fraction`` of the hash range (the same file, the same split, on every node)."""
    return (zlib.crc32(path.encode()) & 0xFFFFFFFF) < test_fraction * 2**32


def split_by_hash(listing: ImageFolderListing, test_fraction: float) -> tuple[ImageFolderListing, ImageFolderListing]:
    """(train, test) of one folder when there is no ``data.val_root``; see :func:`in_test_split`."""
    train: tuple[list[str], list[int]] = ([], [])
    test: tuple[list[str], list[int]] = ([], [])
    for f, y in zip(listing.files, listing.labels):
        part = test if in_test_split(f[len(listing.path) + 1:], test_fraction) else train
        part[0].append(f)
        part[1].append(y)
    if not train[0] or not test[0]:
        raise DataError(f"data.test_fraction: expected a value that leaves images in both splits of {listing.uri!r} "
                        f"({len(listing)} images), got {test_fraction}")
    return (ImageFolderListing(listing.uri, listing.path, train[0], train[1], listing.classes),
            ImageFolderListing(listing.uri, listing.path, test[0], test[1], listing.classes))


def _reason(err: OSError) -> str:
    text = str(err)
    for marker, reason in (("NoSuchBucket", "the bucket does not exist"), ("AccessDenied", "no read permission (AccessDenied)"),
                           ("ACCESS_DENIED", "no read permission (ACCESS_DENIED)"), ("Permission denied", "no read permission")):
        if marker in text:
            return f"{reason} ({type(err).__name__})"
    return f"{type(err).__name__}: {text.splitlines()[0] if text else err!r}"
