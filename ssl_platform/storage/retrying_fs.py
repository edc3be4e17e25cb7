"""A ``pyarrow.fs.S3FileSystem`` whose Python-level calls are retried with backoff (:mod:`ssl_platform.storage.retry`).

Ray Train's controller writes its checkpoint bookkeeping (``checkpoint_manager_snapshot.json``) and deletes old
checkpoints through the storage filesystem; without retries one failed request there ends the run, even when the
checkpoint upload itself would have ridden the outage out. Build one with :func:`ssl_platform.storage.s3.filesystem`.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from pyarrow.fs import S3FileSystem

from ssl_platform.storage.retry import T, retry_with_backoff


class RetryingS3FileSystem(S3FileSystem):
    """``pyarrow.fs.S3FileSystem`` whose Python-level operations are retried with :func:`retry_with_backoff`.

    ``open_output_stream`` returns a buffered writer that sends the object on close, retried as a whole (for
    small files: checkpoint files go through :func:`ssl_platform.storage.checkpoint_upload.upload_checkpoint_dir`). Calls
    made from C++ (``pyarrow.fs.copy_files``, e.g. Ray's download of a checkpoint) keep pyarrow's own per-request
    retries. Survives pickling (Ray sends it to every process).
    """

    def __init__(self, *, retry_attempts: int = 5, retry_backoff_s: float = 1.0, **kwargs: Any):
        super().__init__(**kwargs)
        self._kwargs = kwargs
        self.retry_attempts = retry_attempts
        self.retry_backoff_s = retry_backoff_s

    def __reduce__(self):
        return _rebuild_retrying_fs, (self._kwargs, self.retry_attempts, self.retry_backoff_s)

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        return retry_with_backoff(fn, what, attempts=self.retry_attempts, backoff_s=self.retry_backoff_s)

    def _uri(self, path: Any) -> str:
        return f"s3://{str(getattr(path, 'base_dir', path)).lstrip('/')}"

    def get_file_info(self, paths_or_selector):
        if isinstance(paths_or_selector, (list, tuple)):
            what = f"{len(paths_or_selector)} paths under s3://" if len(paths_or_selector) != 1 else self._uri(paths_or_selector[0])
        else:
            what = self._uri(paths_or_selector)
        return self._retry(f"listing {what}", lambda: S3FileSystem.get_file_info(self, paths_or_selector))

    def create_dir(self, path, *, recursive=True):
        return self._retry(f"creating {self._uri(path)}", lambda: S3FileSystem.create_dir(self, path, recursive=recursive))

    def delete_dir(self, path):
        return self._retry(f"deleting {self._uri(path)}", lambda: S3FileSystem.delete_dir(self, path))

    def delete_dir_contents(self, path, *, accept_root_dir=False, missing_dir_ok=False):
        return self._retry(f"deleting {self._uri(path)}", lambda: S3FileSystem.delete_dir_contents(
            self, path, accept_root_dir=accept_root_dir, missing_dir_ok=missing_dir_ok))

    def delete_file(self, path):
        return self._retry(f"deleting {self._uri(path)}", lambda: S3FileSystem.delete_file(self, path))

    def move(self, src, dest):
        return self._retry(f"moving {self._uri(src)}", lambda: S3FileSystem.move(self, src, dest))

    def copy_file(self, src, dest):
        return self._retry(f"copying {self._uri(src)}", lambda: S3FileSystem.copy_file(self, src, dest))

    def open_input_stream(self, path, compression="detect", buffer_size=None):
        return self._retry(f"reading {self._uri(path)}", lambda: S3FileSystem.open_input_stream(self, path, compression, buffer_size))

    def open_input_file(self, path):
        return self._retry(f"reading {self._uri(path)}", lambda: S3FileSystem.open_input_file(self, path))

    def open_output_stream(self, path, compression="detect", buffer_size=None, metadata=None):
        import pyarrow as pa

        def send(data: bytes) -> None:
            def put() -> None:
                with S3FileSystem.open_output_stream(self, path, compression, buffer_size, metadata) as out:
                    out.write(data)

            self._retry(f"writing {self._uri(path)}", put)

        return pa.PythonFile(_SendOnClose(send), mode="w")


def _rebuild_retrying_fs(kwargs: dict[str, Any], attempts: int, backoff_s: float) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(retry_attempts=attempts, retry_backoff_s=backoff_s, **kwargs)


class _SendOnClose(io.RawIOBase):
    """Bytes kept in memory and handed to ``send`` once, on close."""

    def __init__(self, send: Callable[[bytes], None]):
        super().__init__()
        self._buf = io.BytesIO()
        self._send = send

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self._buf.write(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self._send(self._buf.getvalue())
            finally:
                super().close()
