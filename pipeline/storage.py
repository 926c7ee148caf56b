"""Object storage through pyarrow filesystems: which endpoint and region an s3:// URI goes to, bounded
timeouts, and one clear error (naming the URI and the fix) for a missing bucket, denied access or an
unreachable endpoint.

Settings travel as environment variables, the AWS SDKs' own (`AWS_ENDPOINT_URL`, `AWS_REGION`), so the
decode workers, and the decode child processes they start, resolve a URI exactly as the driver does.
Credentials are never read here: pyarrow's AWS SDK takes them from its standard chain (environment,
~/.aws files, instance or pod role), and so does botocore, which makes the output's writes to s3:// because
pyarrow cannot send a conditional write (`If-None-Match: *`, `If-Match: <ETag>`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # the service-specific one wins, as in the SDKs
REGION_ENVS = ("AWS_REGION", "AWS_DEFAULT_REGION")
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 120.0
DENIED_CODES = (
    "ACCESS_DENIED",
    "AccessDenied",
    "INVALID_ACCESS_KEY_ID",
    "InvalidAccessKeyId",
    "SIGNATURE_DOES_NOT_MATCH",
    "SignatureDoesNotMatch",
    "HTTP response code 403",
)
NOT_SUPPORTED_CODES = ("NotImplemented", "501")  # a store that takes no conditional writes answers so
TMP_PREFIX = "_tmp-"  # pyarrow.dataset and pandas ignore names starting with "_" or "."
MAX_ATTEMPTS = 3  # per request, so an unreachable endpoint fails in seconds rather than retrying for minutes


def storage_env(endpoint_url: str | None = None, region: str | None = None) -> dict[str, str]:
    """The environment variables that carry a job spec's storage settings to every process of the job."""
    env = {}
    if endpoint_url:
        env["AWS_ENDPOINT_URL"] = env["AWS_ENDPOINT_URL_S3"] = endpoint_url
    if region:
        env["AWS_REGION"] = env["AWS_DEFAULT_REGION"] = region
    return env


@contextmanager
def storage_settings(endpoint_url: str | None = None, region: str | None = None) -> Iterator[dict[str, str]]:
    """Apply a spec's storage settings to this process for the duration of a job (restored after)."""
    env = storage_env(endpoint_url, region)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _first_env(names: tuple[str, ...]) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


@functools.lru_cache(maxsize=16)
def _s3(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "request_timeout": REQUEST_TIMEOUT_S,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
    }
    if endpoint:
        url = urlparse(endpoint)
        kwargs["endpoint_override"] = url.netloc + url.path.rstrip("/")
        kwargs["scheme"] = url.scheme or "https"
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


class PreconditionFailed(Exception):
    """A conditional write that lost: an object was there (`if_absent`) or it had changed (`if_etag`)."""


class ConditionalWritesUnsupported(Exception):
    """The store cannot make conditional writes (gs:// here, or an S3-compatible store that answers 501)."""


_NO_CONDITIONS: set[tuple[str | None, str]] = set()  # (endpoint, bucket) found to refuse conditional writes


@functools.lru_cache(maxsize=16)
def _s3_client(endpoint: str | None, region: str | None, identity: tuple):
    """botocore's S3 client with the same endpoint, region, timeouts and attempts as `_s3` (`identity`
    keys the cache on which credentials the environment names, so a changed chain gets a new client)."""
    import botocore.session
    from botocore.config import Config

    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=REQUEST_TIMEOUT_S,
        retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        # Checksums only where S3 requires them: S3-compatible stores (MinIO, Ceph, R2) do not all take
        # the newer default trailing checksums.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = botocore.session.get_session()
    return session.create_client("s3", endpoint_url=endpoint, region_name=region, config=config)


def s3_client():
    """The botocore S3 client this process's environment resolves to (endpoint, region, credentials)."""
    names = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE")
    identity = tuple(os.environ.get(n) for n in names)
    return _s3_client(_first_env(ENDPOINT_ENVS), _first_env(REGION_ENVS), identity)


def filesystem_from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for a URI with a scheme (s3://, gs://, hdfs://, ...) and the path inside it."""
    url = urlparse(uri)
    if url.username or url.password:
        raise ValueError(
            f"{redact(uri)}: credentials in a URI would land in the output's rows and manifest; "
            "put them in the environment (AWS_ACCESS_KEY_ID, ...) and drop them from the URI"
        )
    if url.scheme.lower() == "s3" and not url.query:
        path = (url.netloc + unquote(url.path)).rstrip("/")
        return _s3(_first_env(ENDPOINT_ENVS), _first_env(REGION_ENVS)), path
    return pafs.FileSystem.from_uri(uri)


def redact(uri: str) -> str:
    """`uri` without any user:password part, for messages."""
    url = urlparse(uri)
    if not (url.username or url.password):
        return uri
    return url._replace(netloc=url.hostname + (f":{url.port}" if url.port else "")).geturl()


def resolve(uri: str, what: str = "input", from_uri=None) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path inside it, prefix that turns such a path back into a URI) of a path or URI."""
    if "://" in uri:
        scheme = uri.split("://", 1)[0].lower()
        if scheme == "file":
            return pafs.LocalFileSystem(), os.path.abspath(unquote(urlparse(uri).path)), ""
        try:
            fs, path = (from_uri or filesystem_from_uri)(uri)
        except ValueError:
            raise
        except Exception as e:  # unknown scheme, missing credentials, bad syntax
            raise ValueError(f"{what} {uri}: cannot open this URI ({e})") from e
        return fs, path, f"{scheme}://"
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri)), ""


def explain(error: OSError, uri: str, where: str) -> ValueError:
    """A ValueError naming `uri` and the fix, for the object-store failures a user can cause."""
    text, s3 = str(error), urlparse(uri).scheme.lower() == "s3"
    endpoint = (_first_env(ENDPOINT_ENVS) or "the AWS default endpoint") if s3 else "the store"
    credentials = (
        "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role"
        if s3
        else "GOOGLE_APPLICATION_CREDENTIALS or the instance's service account"
    )
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        bucket = urlparse(uri).netloc
        fix = f"bucket {bucket!r} does not exist at {endpoint}; create it, or fix the bucket name"
    elif any(s in text for s in DENIED_CODES):
        rights = "read and write" if where.startswith("output") else "read"
        fix = f"access denied; give the job's credentials ({credentials}) {rights} rights on it"
    elif "NETWORK_CONNECTION" in text or "curlCode" in text or "Could not connect" in text:
        fix = (
            f"cannot reach the endpoint {endpoint}; check AWS_ENDPOINT_URL or the spec's "
            "storage.endpoint_url, and that the server is up"
        )
    elif "://" in uri:
        fix = f"object storage refused it ({text})"
    else:
        fix = f"cannot read it ({text})"
    uri = redact(uri)
    return ValueError(f"{where if uri in where else f'{where} {uri}'}: {fix}")


def check_reachable(fs: pafs.FileSystem, path: str, uri: str, where: str) -> None:
    """Look at `uri`'s bucket and list `uri` once, so that a missing bucket, denied access or a dead endpoint
    fails at job start (a listing alone reports a missing bucket as an empty one)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return
    bucket = path.split("/", 1)[0]
    try:
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise OSError(f"NO_SUCH_BUCKET: {bucket}")
        fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    except OSError as e:
        raise explain(e, uri, where) from e


def with_job_storage(fn):
    """Run `fn(job, ...)` with the job spec's storage settings applied to this process (the driver)."""

    @functools.wraps(fn)
    def wrapper(job, *args, **kwargs):
        with storage_settings(job.storage.endpoint_url, job.storage.region):
            return fn(job, *args, **kwargs)

    return wrapper


def worker_env() -> dict:
    """Ray remote args that give workers this process's endpoint and region (never credentials: each node
    reads those from its own chain), so that workers resolve URIs as the driver does."""
    names = (*ENDPOINT_ENVS, *REGION_ENVS)
    env = {n: os.environ[n] for n in names if os.environ.get(n)}
    return {"runtime_env": {"env_vars": env}} if env else {}


@dataclass(frozen=True)
class OutputDir:
    """Where a job's output lives: a local directory or an object-store prefix, as a pyarrow FileSystem and
    a path inside it. Object stores have no directories: a prefix exists once a file is under it."""

    fs: pafs.FileSystem
    path: str  # inside `fs`, no trailing "/"
    prefix: str  # "" for a local directory, "s3://" etc. for an object store

    @classmethod
    def of(cls, where: str | Path | OutputDir) -> OutputDir:
        if isinstance(where, OutputDir):
            return where
        fs, path, prefix = resolve(str(where), "output")
        return cls(fs, path.rstrip("/") or "/", prefix)

    @property
    def local(self) -> bool:
        return not self.prefix

    @property
    def conditional(self) -> bool:
        """Whether writes here can be conditional (`if_absent`, `if_etag`): s3:// unless the store said no."""
        return (
            self.prefix == "s3://"
            and (_first_env(ENDPOINT_ENVS), self._bucket_key("")[0]) not in _NO_CONDITIONS
        )

    def _bucket_key(self, name: str) -> tuple[str, str]:
        bucket, _, key = f"{self.path}/{name}".partition("/")
        return bucket, key

    def uri(self, name: str = "") -> str:
        """The output (or one file of it) as the user writes it: a local path or an s3:// URI."""
        return self.prefix + (f"{self.path}/{name}" if name else self.path)

    def __str__(self) -> str:
        return self.uri()

    def check(self) -> None:
        """Fail now, naming the URI and the fix, if the bucket is missing, access denied or unreachable."""
        check_reachable(self.fs, self.path, self.uri(), "output")

    def names(self, start: str = "") -> list[str]:
        """Names of the files directly in the output that start with `start`, sorted."""
        if self.local:
            out = Path(self.path)
            return sorted(p.name for p in out.glob(f"{start}*") if p.is_file()) if out.is_dir() else []
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        except OSError as e:
            raise explain(e, self.uri(), "output") from e
        names = (info.base_name for info in infos if info.type == pafs.FileType.File)
        return sorted(n for n in names if n.startswith(start))

    def read_bytes(self, name: str) -> bytes | None:
        """The whole of one file, None if it is not there."""
        try:
            with self.fs.open_input_stream(f"{self.path}/{name}") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            if self.fs.get_file_info(f"{self.path}/{name}").type == pafs.FileType.NotFound:
                return None
            raise explain(e, self.uri(name), "output") from e

    def write_bytes(self, name: str, data: bytes, *, if_absent: bool = False, if_etag: str | None = None):
        """Commit one file whole: a renamed, fsynced temporary file locally, one upload on an object store.

        On s3:// returns the new object's ETag. `if_absent` / `if_etag` make the upload conditional (no
        object there / still that version): PreconditionFailed if the condition does not hold,
        ConditionalWritesUnsupported where the store cannot check it (`conditional` says so first)."""
        if (if_absent or if_etag) and not self.conditional:
            raise ConditionalWritesUnsupported(f"{self.uri(name)}: this store takes no conditional writes")
        if self.local:
            Path(self.path).mkdir(parents=True, exist_ok=True)
            tmp = Path(self.path) / f"{TMP_PREFIX}{name}-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, Path(self.path) / name)
            return None
        if self.prefix == "s3://":
            bucket, key = self._bucket_key(name)
            conditions = {"IfNoneMatch": "*"} if if_absent else {"IfMatch": if_etag} if if_etag else {}
            reply = self._s3_call("put_object", name, Bucket=bucket, Key=key, Body=data, **conditions)
            return reply.get("ETag")
        try:
            # One write of the whole buffer, then close: the object appears at close, all of it.
            stream = self.fs.open_output_stream(f"{self.path}/{name}")
            stream.write(data)
            stream.close()
        except OSError as e:
            raise explain(e, self.uri(name), "output") from e
        return None

    def read_versioned(self, name: str) -> tuple[bytes, str] | None:
        """One s3:// object and its ETag (what `if_etag` takes), None if it is not there."""
        bucket, key = self._bucket_key(name)
        reply = self._s3_call("get_object", name, missing_ok=True, Bucket=bucket, Key=key)
        return None if reply is None else (reply["Body"].read(), reply["ETag"])

    def delete(self, name: str, *, if_etag: str | None = None) -> None:
        """Remove one file (gone already is fine); `if_etag`: only that version of it (s3://)."""
        if if_etag and not self.conditional:
            raise ConditionalWritesUnsupported(f"{self.uri(name)}: this store takes no conditional deletes")
        if self.local:
            (Path(self.path) / name).unlink(missing_ok=True)
            return
        if self.prefix == "s3://":
            bucket, key = self._bucket_key(name)
            condition = {"IfMatch": if_etag} if if_etag else {}
            self._s3_call("delete_object", name, missing_ok=True, Bucket=bucket, Key=key, **condition)
            return
        try:
            self.fs.delete_file(f"{self.path}/{name}")
        except FileNotFoundError:
            pass
        except OSError as e:
            if self.fs.get_file_info(f"{self.path}/{name}").type != pafs.FileType.NotFound:
                raise explain(e, self.uri(name), "output") from e

    def _s3_call(self, operation: str, name: str, missing_ok: bool = False, **params):
        """One botocore request, its failures turned into ours: PreconditionFailed (412),
        ConditionalWritesUnsupported (501 to a conditional request), None for a missing object where
        `missing_ok`, else `explain`'s ValueError naming the URI and the fix."""
        import botocore.exceptions as bex

        try:
            return getattr(s3_client(), operation)(**params)
        except bex.ClientError as e:
            error = e.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise PreconditionFailed(f"{self.uri(name)}: {code or status}") from e
            conditional = any(k in params for k in ("IfMatch", "IfNoneMatch"))
            if conditional and (status == 501 or code in NOT_SUPPORTED_CODES):
                _NO_CONDITIONS.add((_first_env(ENDPOINT_ENVS), params["Bucket"]))
                raise ConditionalWritesUnsupported(f"{self.uri(name)}: {code or status}") from e
            if missing_ok and (status == 404 or code in ("NoSuchKey", "404")):
                return None
            raise explain(OSError(f"{code}: {error.get('Message', e)}"), self.uri(name), "output") from e
        except bex.NoCredentialsError as e:
            raise explain(OSError(f"AccessDenied: {e}"), self.uri(name), "output") from e
        except (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ReadTimeoutError) as e:
            raise explain(OSError(f"Could not connect: {e}"), self.uri(name), "output") from e
