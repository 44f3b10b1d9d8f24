"""One path layer for everything written under a workdir or read from a prepared store: local paths and
URLs (gs://, s3://, memory://, ...) through fsspec.

A leaf module (imports nothing from meddiff_jax), so every layer may use it. Orbax checkpoints do not go
through fsspec: Orbax writes arrays with TensorStore (its own file / gcs / s3 drivers) and metadata with
etils.epath (fsspec underneath for gs:// and s3://); `checkpoint_path` says which URLs it can take.
Cloud back ends are optional extras: `pip install -e '.[gcp]'` (gcsfs) or `'.[s3]'` (s3fs).
"""

from __future__ import annotations

import os
import posixpath
import socket
import time
import uuid
from typing import IO, Any

import fsspec

# URL scheme -> (the fsspec implementation it needs, the pyproject extra that installs it)
EXTRAS = {"gs": ("gcsfs", "gcp"), "gcs": ("gcsfs", "gcp"), "s3": ("s3fs", "s3")}
# what Orbax (TensorStore + epath) can write a checkpoint to besides a local directory
CHECKPOINT_SCHEMES = ("gs", "s3")


class MissingBackendError(ImportError):
  """A URL whose filesystem library is not installed (the message names the extra to install)."""


def scheme(path: str) -> str:
  """'gs' for gs://b/x, '' for a local path."""
  path = os.fspath(path)
  return path.split("://", 1)[0] if "://" in path else ""


def is_local(path: str) -> bool:
  return scheme(path) in ("", "file")


def join(base: str, *parts: str) -> str:
  """Path join that keeps a URL's scheme (os.path.join would too, but not on Windows; posix is the URL rule)."""
  base = os.fspath(base)
  return os.path.join(base, *parts) if is_local(base) else posixpath.join(base, *parts)


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
  """(fsspec filesystem, path inside it); a missing cloud library is one line naming the extra."""
  path = os.fspath(path)
  try:
    return fsspec.core.url_to_fs(path)
  except (ImportError, ValueError) as e:
    s = scheme(path)
    if s in EXTRAS:
      lib, extra = EXTRAS[s]
      raise MissingBackendError(
        f"{path}: {s}:// needs {lib}; install it with pip install -e '.[{extra}]' (or pip install {lib})"
      ) from None
    raise MissingBackendError(f"{path}: no filesystem for {s}:// ({e})") from None


def check_backend(path: str) -> None:
  """Raise MissingBackendError now (at the entry point) rather than at the first write."""
  filesystem(path)


def makedirs(path: str) -> None:
  fs, p = filesystem(path)
  fs.makedirs(p, exist_ok=True)


def exists(path: str) -> bool:
  fs, p = filesystem(path)
  return fs.exists(p)


def isdir(path: str) -> bool:
  fs, p = filesystem(path)
  return fs.isdir(p)


def listdir(path: str) -> list[str]:
  """Names in a directory (hidden ones included); [] when it does not exist."""
  fs, p = filesystem(path)
  if not fs.isdir(p):
    return []
  return sorted(posixpath.basename(str(e).rstrip("/")) for e in fs.ls(p, detail=False))


def remove_tree(path: str) -> None:
  """Delete a file or directory (prefix) if it exists."""
  fs, p = filesystem(path)
  if fs.exists(p):
    fs.rm(p, recursive=True)


def move(source: str, destination: str) -> None:
  """Rename a file or directory (a server-side copy + delete on object stores); the destination's parent is
  created."""
  fs, src = filesystem(source)
  _, dst = filesystem(destination)
  parent = posixpath.dirname(dst) if not is_local(destination) else os.path.dirname(os.path.abspath(dst))
  if parent:
    fs.makedirs(parent, exist_ok=True)
  fs.mv(src, dst, recursive=True)


def glob(pattern: str) -> list[str]:
  """Sorted matches, as URLs when the pattern is one."""
  fs, p = filesystem(pattern)
  return sorted(m if is_local(pattern) else fs.unstrip_protocol(m) for m in fs.glob(p))


def open_file(path: str, mode: str = "rb", **kwargs: Any) -> IO:
  fs, p = filesystem(path)
  if "w" in mode or "a" in mode:
    parent = posixpath.dirname(p) if not is_local(path) else os.path.dirname(os.path.abspath(p))
    if parent:
      fs.makedirs(parent, exist_ok=True)
  return fs.open(p, mode, **kwargs)


def read_bytes(path: str) -> bytes:
  with open_file(path, "rb") as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode()


def write_bytes(path: str, data: bytes) -> None:
  """Whole-object write. Local: tmp + rename, so a reader never sees half a file; object stores commit
  an object only when its upload completes, which gives the same guarantee."""
  if is_local(path):
    tmp = f"{path}.tmp.{unique_name()}"
    with open_file(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  else:
    with open_file(path, "wb") as f:
      f.write(data)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode())


def check_writable(path: str) -> None:
  """Create `path` and prove it takes a file; raises OSError / MissingBackendError with the reason."""
  makedirs(path)
  probe = join(path, f".write_test.{unique_name()}")
  write_bytes(probe, b"")
  fs, p = filesystem(probe)
  fs.rm(p)


def unique_name() -> str:
  """HOST.PID.RANDOM: unique across the hosts and processes of a job writing to one shared directory."""
  return f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


def checkpoint_path(path: str) -> str:
  """The directory string to hand Orbax: absolute when local; gs:// and s3:// as they are."""
  path = os.fspath(path)
  if is_local(path):
    return os.path.abspath(path.removeprefix("file://"))
  if scheme(path) in CHECKPOINT_SCHEMES:
    check_backend(path)  # Orbax's metadata goes through etils.epath -> fsspec
    return path
  raise ValueError(
    f"{path}: Orbax checkpoints go to a local directory, gs:// or s3:// (TensorStore has no {scheme(path)}:// driver)"
  )


class Appender:
  """An append-only file (metrics.jsonl, a TensorBoard event file) under a local path or a URL.

  Local: appended and flushed as written. Object stores have no append, so the whole content is kept
  in memory and the object rewritten on flush (what tensorboardX's and TensorFlow's GCS writers do),
  at most every `min_interval_s` (and always on close). Existing content is kept (a resumed run).
  """

  def __init__(self, path: str, *, min_interval_s: float = 30.0):
    self.path, self.min_interval_s = os.fspath(path), min_interval_s
    self.local = is_local(self.path)
    if self.local:
      self._file = open_file(self.path, "ab")
    else:
      self._buffer = bytearray(read_bytes(self.path) if exists(self.path) else b"")
      self._dirty, self._last_flush = False, 0.0

  def write(self, data: bytes) -> None:
    if self.local:
      self._file.write(data)
    else:
      self._buffer += data
      self._dirty = True

  def flush(self, force: bool = False) -> None:
    if self.local:
      self._file.flush()
    elif self._dirty and (force or time.monotonic() - self._last_flush >= self.min_interval_s):
      with open_file(self.path, "wb") as f:
        f.write(bytes(self._buffer))
      self._dirty, self._last_flush = False, time.monotonic()

  def close(self) -> None:
    if self.local:
      self._file.close()
    else:
      self.flush(force=True)
