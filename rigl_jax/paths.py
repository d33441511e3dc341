"""One path layer for every file a run or a sweep writes: local paths and URLs alike.

Pods keep their runs in Cloud Storage (``gs://bucket/runs/x``). Local paths go
through ``os`` as before (rename-based atomic writes, permissions, free space);
URLs go through ``etils.epath``, the layer orbax writes its checkpoints with
(``gcsfs`` for ``gs://``, or TensorFlow's gfile where TensorFlow is installed and
``EPATH_USE_TF`` is not ``false``).

Atomicity on object stores: one object upload is atomic (a reader sees the old
object or the new one, never a mix), so :func:`write_atomic` writes the object
directly; there is no append, so :func:`append` rewrites the object (logs stay
small: one line per logged step).
"""

from __future__ import annotations

import os


def is_url(path) -> bool:
  """``gs://...``, ``s3://...`` and the like (anything with a scheme)."""
  return "://" in str(path)


def _epath(path):
  from etils import epath  # pylint: disable=import-outside-toplevel
  return epath.Path(str(path))


def resolve(path) -> str:
  """An absolute local path, or the URL as given (without a trailing slash)."""
  path = str(path)
  return path.rstrip("/") if is_url(path) else os.path.abspath(path)


def join(path, *names) -> str:
  if is_url(path):
    return "/".join([str(path).rstrip("/"), *names])
  return os.path.join(str(path), *names)


def basename(path) -> str:
  return os.path.basename(str(path).rstrip("/"))


def exists(path) -> bool:
  return _epath(path).exists() if is_url(path) else os.path.exists(path)


def is_dir(path) -> bool:
  return _epath(path).is_dir() if is_url(path) else os.path.isdir(path)


def makedirs(path) -> None:
  """Creates a folder and its parents (object stores have no folders: nothing to do
  but check that the bucket is there)."""
  if is_url(path):
    scheme, _, rest = str(path).partition("://")
    bucket = _epath(f"{scheme}://{rest.split('/', 1)[0]}")
    if not bucket.exists():
      raise FileNotFoundError(f"bucket {bucket} does not exist or cannot be read")
    return
  os.makedirs(path, exist_ok=True)


def listdir(path) -> list[str]:
  if is_url(path):
    return sorted(p.name for p in _epath(path).iterdir()) if is_dir(path) else []
  return sorted(os.listdir(path))


def read_text(path, errors: str = "strict") -> str:
  if is_url(path):
    return _epath(path).read_bytes().decode("utf-8", errors=errors)
  with open(path, encoding="utf-8", errors=errors) as f:
    return f.read()



def write_atomic(path, data: str | bytes) -> None:
  """Writes the whole file so that a kill leaves the old content or the new one:
  a temporary file renamed over the old (local), one object upload (URLs)."""
  data = data.encode("utf-8") if isinstance(data, str) else data
  if is_url(path):
    _epath(path).write_bytes(data)
    return
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def append(path, data: str | bytes) -> None:
  """Adds ``data`` at the end of the file (creating it)."""
  data = data.encode("utf-8") if isinstance(data, str) else data
  if is_url(path):
    p = _epath(path)
    p.write_bytes((p.read_bytes() if p.exists() else b"") + data)
    return
  with open(path, "ab") as f:
    f.write(data)
