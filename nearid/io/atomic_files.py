"""One small file, changed only atomically: exclusive create, compare-and-swap replace and
compare-and-delete, on a local root (`os.link` / `O_EXCL`, an `flock` around compare + replace)
or on S3 (conditional PUT/DELETE with `If-None-Match: *` / `If-Match: <ETag>`). What a lease
(nearid/io/leases.py) is built on; `files_for(storage)` picks the implementation for a root.

`read` returns (bytes, version, mtime) or None; `create`/`replace` return the new version or
None when the condition failed; `delete` returns whether it deleted.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import uuid


class _LocalFiles:
    def __init__(self, base: str):
        self.base = base

    def _p(self, rel: str) -> str:
        return os.path.join(self.base, rel)

    def read(self, rel: str):
        """(bytes, version, mtime) or None; the version of a local file is its content hash."""
        try:
            with open(self._p(rel), "rb") as f:
                data = f.read()
            mtime = os.path.getmtime(self._p(rel))
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest(), mtime

    def _tmp(self, rel: str, data: bytes) -> str:
        path = self._p(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def create(self, rel: str, data: bytes):
        path, tmp = self._p(rel), self._tmp(rel, data)
        try:
            os.link(tmp, path)            # atomic and exclusive, and the content is complete
        except FileExistsError:
            return None
        except OSError as e:              # no hard links here: exclusive create, then write
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return hashlib.sha256(data).hexdigest()

    @contextlib.contextmanager
    def _locked(self, rel: str):
        import fcntl

        fd = os.open(self._p(rel) + ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)                  # closing drops the flock

    def replace(self, rel: str, data: bytes, version: str):
        with self._locked(rel):
            cur = self.read(rel)
            if cur is None or cur[1] != version:
                return None
            os.replace(self._tmp(rel, data), self._p(rel))
        return hashlib.sha256(data).hexdigest()

    def delete(self, rel: str, version: str) -> bool:
        with self._locked(rel):
            cur = self.read(rel)
            if cur is None or cur[1] != version:
                return False
            os.unlink(self._p(rel))
        return True


def _s3_code(e: BaseException) -> str | None:
    cause = e.__cause__ or e.__context__ or e
    resp = getattr(cause, "response", None) or getattr(e, "response", None)
    return (resp or {}).get("Error", {}).get("Code") if isinstance(resp, dict) else None


class _S3Files:
    """Conditional requests through the root's own s3fs client (same endpoint and credentials)."""

    def __init__(self, s3, base: str):
        self.s3, self.base = s3, base

    def _bk(self, rel: str) -> tuple[str, str]:
        bucket, _, key = f"{self.base}/{rel}".partition("/")
        return bucket, key

    def read(self, rel: str):
        from fsspec.asyn import sync

        bucket, key = self._bk(rel)

        async def get():
            resp = await self.s3._call_s3("get_object", Bucket=bucket, Key=key)
            try:
                body = await resp["Body"].read()
            finally:
                resp["Body"].close()
            return body, resp["ETag"], resp["LastModified"].timestamp()

        try:
            return sync(self.s3.loop, get)
        except FileNotFoundError:
            return None

    def create(self, rel: str, data: bytes):
        bucket, key = self._bk(rel)
        try:
            return self.s3.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")["ETag"]
        except FileExistsError:          # 412 PreconditionFailed: the lease exists
            return None
        except OSError as e:
            if _s3_code(e) in ("PreconditionFailed", "ConditionalRequestConflict"):
                return None               # 409: a concurrent conditional write won
            raise

    def replace(self, rel: str, data: bytes, version: str):
        bucket, key = self._bk(rel)
        try:
            return self.s3.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=version)["ETag"]
        except FileNotFoundError:
            return None
        except OSError as e:
            if _s3_code(e) in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                return None
            raise

    def delete(self, rel: str, version: str) -> bool:
        bucket, key = self._bk(rel)
        try:
            self.s3.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            code = _s3_code(e)
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                return False
            if code in ("NotImplemented", "InvalidArgument", "InvalidRequest"):
                cur = self.read(rel)      # a server without conditional deletes: compare, then delete
                if cur is None or cur[1] != version:
                    return False
                self.s3.call_s3("delete_object", Bucket=bucket, Key=key)
                return True
            raise


def files_for(storage):
    if storage.is_s3:
        return _S3Files(storage.fs.handler.fs, storage.base)
    return _LocalFiles(storage.base)
