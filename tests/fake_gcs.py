"""An in-memory stand-in for Google Cloud Storage, for tests of gs:// workdirs without a network.

One object store (bucket/name -> bytes, generation), reached two ways, as on a TPU VM:
- over HTTP, a subset of the GCS JSON API (object media/metadata reads with ranges and generation
  preconditions, media uploads, deletes, prefix listing, bucket metadata): what TensorStore's gcs
  driver (orbax's array files, via TENSORSTORE_GCS_HTTP_URL) and google-cloud-storage (orbax's
  bucket checks, via STORAGE_EMULATOR_HOST) send;
- as an fsspec filesystem registered for gs:// (etils.epath's fsspec backend; on a TPU VM epath
  uses TensorFlow's GCS client instead), with TensorFlow's conventions: mkdir writes a "dir/"
  placeholder object, a folder exists when any object lies under it, rename copies then deletes.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fsspec
from fsspec.spec import AbstractFileSystem


class Store:
  """Objects by "bucket/name": (bytes, generation)."""

  def __init__(self):
    self.objects: dict[str, tuple[bytes, int]] = {}
    self.lock = threading.Lock()
    self._generation = 1000

  def put(self, key: str, data: bytes, if_generation_match: int | None = None) -> int | None:
    """Writes an object; None when the precondition fails."""
    with self.lock:
      current = self.objects.get(key)
      if if_generation_match is not None and (current[1] if current else 0) != if_generation_match:
        return None
      self._generation += 1
      self.objects[key] = (bytes(data), self._generation)
      return self._generation

  def get(self, key: str) -> tuple[bytes, int] | None:
    with self.lock:
      return self.objects.get(key)

  def delete(self, key: str, if_generation_match: int | None = None) -> bool | None:
    """True when deleted, False when absent, None when the precondition fails."""
    with self.lock:
      current = self.objects.get(key)
      if if_generation_match is not None and (current[1] if current else 0) != if_generation_match:
        return None
      return self.objects.pop(key, None) is not None

  def keys(self, prefix: str = "") -> list[str]:
    with self.lock:
      return sorted(k for k in self.objects if k.startswith(prefix))


STORE = Store()


# ----------------------------------------------------------------------------------------------
# The JSON API over HTTP.
# ----------------------------------------------------------------------------------------------

def _metadata(bucket: str, name: str, data: bytes, generation: int) -> dict:
  now = datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
  return {"kind": "storage#object", "id": f"{bucket}/{name}/{generation}", "name": name,
          "bucket": bucket, "generation": str(generation), "metageneration": "1",
          "size": str(len(data)), "contentType": "application/octet-stream", "updated": now,
          "timeCreated": now, "storageClass": "STANDARD"}


class _Handler(BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"
  store: Store = STORE

  def log_message(self, *args):  # quiet
    pass

  def _reply(self, code: int, body: bytes = b"", headers: dict | None = None,
             content_type: str = "application/json") -> None:
    self.send_response(code)
    for k, v in (headers or {}).items():
      self.send_header(k, v)
    if code not in (204, 304):
      self.send_header("Content-Type", content_type)
      self.send_header("Content-Length", str(len(body)))
    else:
      self.send_header("Content-Length", "0")
    self.end_headers()
    if body and code not in (204, 304):
      self.wfile.write(body)

  def _json(self, code: int, obj: dict) -> None:
    self._reply(code, json.dumps(obj).encode())

  def _error(self, code: int, message: str) -> None:
    self._json(code, {"error": {"code": code, "message": message}})

  def _parse(self):
    url = urllib.parse.urlsplit(self.path)
    query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
    return url.path, query

  def _body(self) -> bytes:
    length = int(self.headers.get("Content-Length") or 0)
    return self.rfile.read(length) if length else b""

  @staticmethod
  def _int(query: dict, key: str) -> int | None:
    return int(query[key]) if key in query and query[key] != "" else None

  def do_GET(self):  # noqa: N802 (http.server's naming)
    path, query = self._parse()
    m = re.fullmatch(r"/storage/v1/b/([^/]+)", path)
    if m:
      return self._json(200, {"kind": "storage#bucket", "name": m.group(1), "id": m.group(1),
                              "hierarchicalNamespace": {"enabled": False},
                              "billing": {"requesterPays": False}})
    m = re.fullmatch(r"/storage/v1/b/([^/]+)/o", path)
    if m:
      return self._list(m.group(1), query)
    m = re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)", path)
    if not m:
      return self._error(404, f"no route {path}")
    bucket, name = m.group(1), urllib.parse.unquote(m.group(2))
    found = self.store.get(f"{bucket}/{name}")
    if found is None:
      return self._error(404, "No such object")
    data, generation = found
    match, not_match = self._int(query, "ifGenerationMatch"), self._int(query, "ifGenerationNotMatch")
    if match is not None and match != generation:
      return self._error(412, "Precondition Failed")
    if not_match is not None and not_match == generation:
      return self._reply(304, headers={"x-goog-generation": str(generation)})
    if query.get("alt") != "media":
      return self._json(200, _metadata(bucket, name, data, generation))
    headers = {"x-goog-generation": str(generation), "x-goog-metageneration": "1"}
    rng = self.headers.get("Range")
    if rng:
      lo, _, hi = rng.removeprefix("bytes=").partition("-")
      lo = int(lo) if lo else max(len(data) - int(hi), 0)
      hi = int(hi) if hi and rng.removeprefix("bytes=")[0] != "-" else len(data) - 1
      if lo >= len(data) and len(data) > 0:
        return self._error(416, "Requested range not satisfiable")
      part = data[lo:hi + 1]
      headers["Content-Range"] = f"bytes {lo}-{lo + max(len(part) - 1, 0)}/{len(data)}"
      return self._reply(206, part, headers, "application/octet-stream")
    return self._reply(200, data, headers, "application/octet-stream")

  def _list(self, bucket: str, query: dict) -> None:
    prefix = query.get("prefix", "")
    delimiter = query.get("delimiter", "")
    start, end = query.get("startOffset", ""), query.get("endOffset", "")
    names = [k[len(bucket) + 1:] for k in self.store.keys(f"{bucket}/{prefix}")]
    names = [n for n in names if (not start or n >= start) and (not end or n < end)]
    items, prefixes = [], set()
    for n in names:
      rest = n[len(prefix):]
      if delimiter and delimiter in rest:
        prefixes.add(prefix + rest.split(delimiter, 1)[0] + delimiter)
        continue
      data, generation = self.store.get(f"{bucket}/{n}") or (b"", 0)
      items.append(_metadata(bucket, n, data, generation))
    out = {"kind": "storage#objects", "items": items}
    if prefixes:
      out["prefixes"] = sorted(prefixes)
    self._json(200, out)

  def do_POST(self):  # noqa: N802
    path, query = self._parse()
    m = re.fullmatch(r"/upload/storage/v1/b/([^/]+)/o", path)
    if not m or query.get("uploadType") != "media":
      self._body()
      return self._error(501, f"unsupported upload {self.path}")
    bucket, name = m.group(1), query["name"]
    data = self._body()
    generation = self.store.put(f"{bucket}/{name}", data, self._int(query, "ifGenerationMatch"))
    if generation is None:
      return self._error(412, "Precondition Failed")
    self._json(200, _metadata(bucket, name, data, generation))

  def do_DELETE(self):  # noqa: N802
    path, query = self._parse()
    m = re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)", path)
    if not m:
      return self._error(404, f"no route {path}")
    key = f"{m.group(1)}/{urllib.parse.unquote(m.group(2))}"
    done = self.store.delete(key, self._int(query, "ifGenerationMatch"))
    if done is None:
      return self._error(412, "Precondition Failed")
    if not done:
      return self._error(404, "No such object")
    self._reply(204)


@contextlib.contextmanager
def serve(store: Store = STORE):
  """Runs the HTTP endpoint on 127.0.0.1 in a thread; yields its base URL."""
  handler = type("Handler", (_Handler,), {"store": store})
  server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
  server.daemon_threads = True
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}"
  finally:
    server.shutdown()
    server.server_close()


# ----------------------------------------------------------------------------------------------
# The fsspec filesystem (epath's gs:// backend).
# ----------------------------------------------------------------------------------------------

class _Writer(io.BytesIO):
  def __init__(self, fs: "FakeGcsFileSystem", key: str):
    super().__init__()
    self._fs, self._key = fs, key

  def close(self):
    if not self.closed:
      self._fs.store.put(self._key, self.getvalue())
    super().close()


class FakeGcsFileSystem(AbstractFileSystem):
  """gs://bucket/name paths on `STORE`; keys are "bucket/name"."""
  protocol = ("gs", "gcs")
  root_marker = ""
  cachable = False
  store = STORE

  def __init__(self, *args, **kwargs):  # accepts gcsfs's options (finalize_on_close, ...)
    super().__init__()

  @classmethod
  def _strip_protocol(cls, path):
    if isinstance(path, (list, tuple)):
      return [cls._strip_protocol(p) for p in path]
    path = str(path)
    for p in ("gs://", "gcs://"):
      path = path.removeprefix(p)
    return path.rstrip("/")

  def _is_dir(self, key: str) -> bool:
    return bool(self.store.keys(key + "/"))

  def info(self, path, **kwargs):
    key = self._strip_protocol(path)
    found = self.store.get(key)
    if found is not None:
      return {"name": key, "size": len(found[0]), "type": "file"}
    if self._is_dir(key) or "/" not in key:
      return {"name": key, "size": 0, "type": "directory"}
    raise FileNotFoundError(path)

  def ls(self, path, detail=True, **kwargs):
    key = self._strip_protocol(path)
    found = self.store.get(key)
    if found is not None:
      entries = [self.info(key)]
    else:
      children = {}
      for k in self.store.keys(key + "/"):
        rest = k[len(key) + 1:]
        if not rest:
          continue  # the folder's own placeholder
        head, sep, _ = rest.partition("/")
        child = f"{key}/{head}"
        children[child] = {"name": child, "size": 0, "type": "directory"} if sep else \
            self.info(child)
      if not children and not self._is_dir(key):
        raise FileNotFoundError(path)
      entries = [children[c] for c in sorted(children)]
    return entries if detail else [e["name"] for e in entries]

  def _open(self, path, mode="rb", **kwargs):
    key = self._strip_protocol(path)
    if "r" in mode:
      found = self.store.get(key)
      if found is None:
        raise FileNotFoundError(path)
      return io.BytesIO(found[0])
    if "a" in mode:
      writer = _Writer(self, key)
      found = self.store.get(key)
      writer.write(found[0] if found else b"")
      return writer
    return _Writer(self, key)

  def mkdir(self, path, create_parents=True, **kwargs):
    key = self._strip_protocol(path)
    if self.store.get(key + "/") is None and not self._is_dir(key):
      self.store.put(key + "/", b"")

  def makedirs(self, path, exist_ok=False):
    self.mkdir(path)

  def rmdir(self, path):
    self.store.delete(self._strip_protocol(path) + "/")

  def rm_file(self, path):
    if not self.store.delete(self._strip_protocol(path)):
      raise FileNotFoundError(path)

  def rm(self, path, recursive=False, maxdepth=None):
    for p in (path if isinstance(path, (list, tuple)) else [path]):
      key = self._strip_protocol(p)
      if self.store.get(key) is not None:
        self.store.delete(key)
      elif recursive and self._is_dir(key):
        for k in self.store.keys(key + "/"):
          self.store.delete(k)
      elif self._is_dir(key):
        raise IsADirectoryError(p)
      else:
        raise FileNotFoundError(p)

  def cp_file(self, path1, path2, **kwargs):
    found = self.store.get(self._strip_protocol(path1))
    if found is None:
      raise FileNotFoundError(path1)
    self.store.put(self._strip_protocol(path2), found[0])

  def mv(self, path1, path2, recursive=False, maxdepth=None, **kwargs):
    src, dst = self._strip_protocol(path1), self._strip_protocol(path2)
    if self.store.get(src) is not None:
      pairs = [(src, dst)]
    else:
      pairs = [(k, dst + k[len(src):]) for k in self.store.keys(src + "/")]
      if not pairs:
        raise FileNotFoundError(path1)
    for a, b in pairs:
      self.store.put(b, self.store.get(a)[0])
    for a, _ in pairs:
      self.store.delete(a)

  def rename(self, path1, path2, **kwargs):
    self.mv(path1, path2, recursive=True)


def register() -> None:
  """Makes fsspec (and so epath's fsspec backend) resolve gs:// to FakeGcsFileSystem."""
  for name in FakeGcsFileSystem.protocol:
    fsspec.register_implementation(name, FakeGcsFileSystem, clobber=True)
