"""Files named by a URI, on local disk or S3: the filesystem and path of a URI, and small text files (chain state).

A local write goes to a temporary file renamed over the target; an S3 PUT is atomic: readers see the old or the
new content, never a mix.
"""

from __future__ import annotations

import os
from pathlib import Path

from ssl_platform.storage.s3 import filesystem, fs_path, is_s3


def join_uri(uri: str, *parts: str) -> str:
    """``uri`` with ``parts`` appended, one ``/`` between each."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def resolve_uri(uri: str, fs=None, spec_endpoint: str | None = None):
    """(filesystem, path) for a URI: ``fs`` (default :func:`ssl_platform.storage.s3.filesystem`) for ``s3://``, pyarrow's
    LocalFileSystem and the absolute path otherwise."""
    from pyarrow.fs import LocalFileSystem

    if is_s3(uri):
        return (fs or filesystem(spec_endpoint)), fs_path(uri)
    return LocalFileSystem(), os.path.abspath(uri)


def storage_uri(fs, path: str) -> str:
    """The URI of ``path`` on pyarrow filesystem ``fs``: ``s3://bucket/key`` on S3, else the path."""
    return f"s3://{path.lstrip('/')}" if getattr(fs, "type_name", "") == "s3" else path


def read_text(uri: str, fs=None) -> str | None:
    """The text of a local or S3 file, or None if it does not exist."""
    from pyarrow.fs import FileType

    f, path = resolve_uri(uri, fs)
    if f.get_file_info(path).type != FileType.File:
        return None
    with f.open_input_stream(path) as stream:
        return stream.read().decode()


def write_text(uri: str, text: str, fs=None) -> None:
    f, path = resolve_uri(uri, fs)
    if not is_s3(uri):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
        return
    with f.open_output_stream(path) as stream:  # an S3 PUT is atomic: readers see the old or the new object
        stream.write(text.encode())
