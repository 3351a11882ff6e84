"""The one place that talks to S3 (through aioboto3).

Used for the attachments bucket Engram writes and for an s3:// backup
repository. Driver errors become `StoreUnreachable`/`RecoveryError` here.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import os
import re
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote
from xml.etree import ElementTree

import aioboto3
import aiobotocore.session
import aiohttp
import anyio
import yarl
from aiohttp.helpers import get_env_proxy_for_url
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from ..errors import RecoveryError, StoreUnreachable


@dataclass(frozen=True)
class S3Location:
    endpoint: str | None
    access_key_id: str
    secret_access_key: str
    region: str
    bucket: str

    def __repr__(self) -> str:  # never show the secret
        return f"S3Location(endpoint={self.endpoint!r}, bucket={self.bucket!r})"


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str


_CONFIG = Config(
    connect_timeout=3,
    read_timeout=30,
    retries={"max_attempts": 2, "mode": "standard"},
    max_pool_connections=32,
    # SeaweedFS, MinIO and friends want path-style addressing.
    s3={"addressing_style": "path"},
    request_checksum_calculation="when_required",
    response_checksum_validation="when_required",
)


def translate(exc: Exception, what: str, location: S3Location) -> RecoveryError:
    """An S3 failure as an operator-facing error; the secret never appears."""
    where = f"bucket {location.bucket!r}" + (f" at {location.endpoint}" if location.endpoint else "")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", "Unknown"))
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            return StoreUnreachable(
                f"S3 refused the credentials while trying to {what} ({code}) on {where}",
                "check the access key id and secret access key configured for this bucket",
            )
        if code == "403":  # a HEAD answer carries no body: wrong keys and missing permission look alike
            return StoreUnreachable(
                f"S3 refused the credentials or denied access while trying to {what} (403) on {where}",
                "check the access key id and secret access key configured for this bucket, and that they may "
                "list, read and write it",
            )
        if code in ("AccessDenied", "AllAccessDisabled"):
            return StoreUnreachable(
                f"S3 denied access while trying to {what} ({code}) on {where}",
                "the credentials are valid but lack permission: grant them s3:ListBucket, s3:GetObject and "
                "s3:PutObject on this bucket (and s3:DeleteObject for pruning), or use keys that have it",
            )
        if code in ("NoSuchBucket", "404"):
            return StoreUnreachable(
                f"S3 {where} does not exist (while trying to {what})", "create the bucket or fix its name"
            )
        if code in ("AuthorizationHeaderMalformed", "PermanentRedirect", "301", "IllegalLocationConstraintException",
                    "InvalidRegion"):
            region = exc.response.get("Error", {}).get("Region") or exc.response.get("ResponseMetadata", {}).get(
                "HTTPHeaders", {}).get("x-amz-bucket-region")
            return StoreUnreachable(
                f"S3 {where} is in another region than {location.region!r} ({code}"
                + (f"; it is in {region!r}" if region else "") + f") while trying to {what}",
                "set the region of this bucket (STORAGE_REGION for attachments, ENGRAM_RECOVERY_REPOSITORY_REGION "
                "for the repository)" + (f" to {region}" if region else ""),
            )
        return RecoveryError(f"S3 error {code} while trying to {what} on {where}", "see the S3 server's logs")
    if isinstance(exc, EndpointConnectionError | BotoCoreError | OSError | TimeoutError):
        return StoreUnreachable(
            f"S3 is unreachable while trying to {what} on {where}: {exc.__class__.__name__}",
            "check that the S3 server is running and that its host and port are configured correctly",
        )
    return RecoveryError(f"S3 failure while trying to {what} on {where}: {exc}")


S3_ERRORS = (ClientError, BotoCoreError, OSError, TimeoutError)


@asynccontextmanager
async def client(location: S3Location) -> AsyncIterator[Any]:
    """An aioboto3 S3 client for `location` (the caller catches S3_ERRORS and calls `translate`).

    Sessions are kept per credentials (a new session reloads the S3 service model:
    0.25-0.4 s a client), and a plain-http endpoint loads no CA bundle.
    """
    session = _session(location.access_key_id, location.secret_access_key, location.region)
    async with session.client(
        "s3", endpoint_url=location.endpoint, config=_CONFIG, verify=None if _tls(location) else False
    ) as s3:
        yield s3


@functools.lru_cache(maxsize=16)
def _session(access_key_id: str, secret_access_key: str, region: str) -> aioboto3.Session:
    return aioboto3.Session(
        aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key, region_name=region
    )


async def list_objects(s3: Any, bucket: str, prefix: str = "") -> AsyncIterator[ObjectInfo]:
    """Every object under `prefix`, one page (1,000 keys) per request: no per-object HEAD."""
    paginator = s3.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", ()):
            yield ObjectInfo(key=item["Key"], size=int(item["Size"]), etag=str(item.get("ETag", "")).strip('"'))


async def versioning_status(s3: Any, bucket: str) -> str:
    """'Enabled', 'Suspended' or 'Disabled' (never enabled)."""
    answer = await s3.get_bucket_versioning(Bucket=bucket)
    return str(answer.get("Status") or "Disabled")


# --- helpers for the attachments mirror (core/repository/mirror.py) --------------------------


@dataclass(frozen=True)
class VersionInfo:
    key: str
    size: int
    etag: str
    version_id: str


async def list_latest_versions(
    s3: Any, bucket: str, prefix: str = "", page_size: int = 1000
) -> AsyncIterator[VersionInfo]:
    """The current version of every live object, read from ListObjectVersions pages.

    One request per 1,000 versions rather than one HEAD per object. A key whose
    newest version is a delete marker has no `IsLatest` entry among the versions,
    so deleted objects are left out as ListObjectsV2 would leave them out.
    """
    paginator = s3.get_paginator("list_object_versions")
    async for page in paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}):
        for item in page.get("Versions", ()):
            if item.get("IsLatest"):
                yield VersionInfo(
                    key=item["Key"],
                    size=int(item["Size"]),
                    etag=str(item.get("ETag", "")).strip('"'),
                    version_id=str(item.get("VersionId") or "null"),
                )


async def versions_as_of(s3: Any, bucket: str, moment: datetime, prefix: str = "") -> dict[str, str]:
    """Key -> the version id each object had at `moment`: per key, the newest version written at or
    before it, unless that entry is a delete marker (the object was deleted then). A versioned bucket
    keeps every version, so this is the bucket as it was (point-in-time recovery reads attachments so)."""
    newest: dict[str, tuple[datetime, str | None]] = {}
    paginator = s3.get_paginator("list_object_versions")
    async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        entries = [(item, True) for item in page.get("Versions", ())]
        entries += [(item, False) for item in page.get("DeleteMarkers", ())]
        for item, is_version in entries:
            written: datetime = item["LastModified"]
            if written > moment:
                continue
            key = str(item["Key"])
            if key not in newest or written >= newest[key][0]:
                newest[key] = (written, str(item.get("VersionId") or "null") if is_version else None)
    return {key: version for key, (_when, version) in newest.items() if version is not None}


@dataclass(frozen=True)
class AsOf:
    """One key of a versioned bucket: its version at a moment (None: absent or deleted then) and its current
    version (None: deleted now)."""

    then: VersionInfo | None
    now: VersionInfo | None

    @property
    def current_is_then(self) -> bool:
        """Does the object hold its content of then now? The same version, or a copy of it (same ETag and size:
        a rollback's copy is a new version of the same bytes)."""
        if self.then is None or self.now is None:
            return False
        same = self.now.etag == self.then.etag and self.now.size == self.then.size
        return self.now.version_id == self.then.version_id or same


async def bucket_as_of(s3: Any, bucket: str, moment: datetime, prefix: str = "") -> dict[str, AsOf]:
    """Every key's version at `moment` (as `versions_as_of` chooses it, with its size and ETag) beside its
    current one: what a rollback of the bucket to that moment must copy back, and what it may leave."""
    then: dict[str, tuple[datetime, VersionInfo | None]] = {}
    now: dict[str, VersionInfo | None] = {}
    paginator = s3.get_paginator("list_object_versions")
    async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        entries = [(item, True) for item in page.get("Versions", ())]
        entries += [(item, False) for item in page.get("DeleteMarkers", ())]
        for item, is_version in entries:
            key, version = str(item["Key"]), str(item.get("VersionId") or "null")
            info = VersionInfo(key=key, size=int(item.get("Size", 0)), etag=str(item.get("ETag", "")).strip('"'),
                               version_id=version) if is_version else None  # fmt: skip
            if item.get("IsLatest"):
                now[key] = info
            now.setdefault(key, None)
            written: datetime = item["LastModified"]
            if written > moment or (key in then and written < then[key][0]):
                continue
            then[key] = (written, info)
    return {key: AsOf(then[key][1] if key in then else None, current) for key, current in now.items()}


async def copy_version(s3: Any, bucket: str, version: VersionInfo) -> str:
    """Server-side copy of one older version onto its own key (the new current version), only if that version
    still has its ETag; the new object's ETag."""
    answer = await s3.copy_object(
        Bucket=bucket,
        Key=version.key,
        CopySourceIfMatch=f'"{version.etag}"',
        CopySource={"Bucket": bucket, "Key": version.key, "VersionId": version.version_id},
    )
    return str(answer.get("CopyObjectResult", {}).get("ETag", "")).strip('"')


async def get_version(s3: Any, bucket: str, key: str, version_id: str) -> bytes:
    """One version of an object, whole (an attachment: small)."""
    answer = await s3.get_object(Bucket=bucket, Key=key, VersionId=version_id)
    async with answer["Body"] as body:
        return bytes(await body.read())


async def head(s3: Any, bucket: str, key: str) -> ObjectInfo | None:
    """Size and ETag of one object, None if it does not exist."""
    try:
        answer = await s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if error_code(exc) in MISSING:
            return None
        raise
    return ObjectInfo(key=key, size=int(answer["ContentLength"]), etag=str(answer.get("ETag", "")).strip('"'))


def same_account(a: S3Location, b: S3Location) -> bool:
    """Can a CopyObject into `b` read from `a`? It is authorised by the destination's credentials alone;
    with the same endpoint and key we know they can read the source bucket, with another we cannot tell."""
    same = (a.endpoint or "").rstrip("/").lower() == (b.endpoint or "").rstrip("/").lower()
    return same and a.access_key_id == b.access_key_id


# The codes S3 servers answer for an object that does not exist (HEAD has no body: its code is the status).
MISSING = frozenset({"404", "NoSuchKey", "NotFound"})


def error_code(exc: BaseException) -> str:
    """The S3 error code of a ClientError ('' for anything else)."""
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


async def multipart_copy(s3: Any, request: dict[str, Any], size: int, part_size: int) -> None:
    """Server-side copy of an object too large for one CopyObject (5 GiB), with UploadPartCopy.

    `request` holds what CopyObject would be given (Bucket, Key, CopySource and any CopySourceIf*
    precondition), so a caller builds one request for either way of copying. The upload is aborted
    on any failure, so no partial object ever appears under its key: S3 publishes it only on
    CompleteMultipartUpload.
    """
    bucket, key = request["Bucket"], request["Key"]
    upload = await s3.create_multipart_upload(Bucket=bucket, Key=key)
    upload_id = upload["UploadId"]
    try:
        parts: list[dict[str, Any]] = []
        for number, start in enumerate(range(0, size, part_size), start=1):
            end = min(start + part_size, size) - 1
            answer = await s3.upload_part_copy(
                **request, UploadId=upload_id, PartNumber=number, CopySourceRange=f"bytes={start}-{end}"
            )
            parts.append({"ETag": answer["CopyPartResult"]["ETag"], "PartNumber": number})
        await s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
    except BaseException:
        with anyio.CancelScope(shield=True):
            try:
                await s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            except S3_ERRORS:
                pass  # the original failure is the one worth reporting; a lifecycle rule reaps leftovers
        raise


@asynccontextmanager
async def bulk_client(location: S3Location, connections: int = 32) -> AsyncIterator[Any]:
    """An S3 client for listing and copying many objects: like `client`, tuned for volume.

    Its connection pool holds at least `connections` sockets so that as many
    concurrent requests never queue for one, and it leaves timestamps as the
    strings S3 sent: botocore parses each LastModified with dateutil, which
    costs about 0.5 ms a key, most of a 1,000-key listing's CPU time. Clients
    come from one shared botocore session, which loads the S3 service model
    once per process instead of once per client.
    """
    config = _CONFIG.merge(Config(max_pool_connections=max(connections, 10)))
    # Credentials go to the client, never into the shared session.
    async with _bulk_session().create_client(
        "s3",
        endpoint_url=location.endpoint,
        region_name=location.region,
        aws_access_key_id=location.access_key_id,
        aws_secret_access_key=location.secret_access_key,
        config=config,
        verify=None if _tls(location) else False,  # no TLS, so no CA bundle to load (~70 ms a client)
    ) as s3:
        yield s3


def _tls(location: S3Location) -> bool:
    return not (location.endpoint or "https://").lower().startswith("http://")


@functools.cache
def _bulk_session() -> Any:
    session = aiobotocore.session.get_session()
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
    return session


@dataclass(frozen=True)
class CopySource:
    """What a server-side copy reads: `key` of `bucket`, at `version_id` (None: the current version), and only
    while its ETag is still `if_match` (None: whatever it is now)."""

    bucket: str
    key: str
    version_id: str | None = None
    if_match: str | None = None


class Copier:
    """Server-side CopyObject for many small objects, without botocore's per-request overhead.

    botocore spends about 2 ms of CPU on every request (endpoint rules evaluated
    afresh for each new key, user-agent assembly, event hooks), more than
    SeaweedFS spends on the copy itself; on a small machine that halves the copy
    rate. This signs each request with botocore's own SigV4 signer and sends it
    on one pooled aiohttp session. Only for an explicit (path-style) endpoint;
    failures surface as botocore `ClientError`s or `OSError`s, so `translate`
    and `error_code` treat them like any other S3 failure.
    """

    _RETRY_STATUS = frozenset({500, 502, 503, 504})

    def __init__(self, location: S3Location, connections: int) -> None:
        assert location.endpoint, "the copier needs an explicit endpoint"
        self.location = location
        self._signer = S3SigV4Auth(
            Credentials(location.access_key_id, location.secret_access_key), "s3", location.region
        )
        self._connections = connections
        self._http: aiohttp.ClientSession | None = None
        self._proxy: tuple[Any, aiohttp.BasicAuth | None] = (None, None)

    async def __aenter__(self) -> Copier:
        # The CA bundle botocore would use; loaded only when there is TLS to verify.
        tls = (
            ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE") or None) if _tls(self.location) else False
        )
        # The proxy the environment names for the endpoint (as botocore honours it), looked up once: aiohttp's
        # trust_env looks up the proxy and ~/.netrc in a worker thread for every request, two thread hops a PUT.
        with contextlib.suppress(LookupError):
            self._proxy = await anyio.to_thread.run_sync(get_env_proxy_for_url, yarl.URL(self.location.endpoint or ""))
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max(self._connections, 10), ssl=tls),
            # A large copy can take a while before the server answers; connecting must not.
            timeout=aiohttp.ClientTimeout(sock_connect=3, sock_read=300),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()

    async def copy(self, source: CopySource, bucket: str, key: str) -> str | None:
        """Copy `source` to `key` of `bucket`; return the new object's ETag where the answer names one."""
        assert self._http is not None and self.location.endpoint
        url = f"{self.location.endpoint.rstrip('/')}/{bucket}/{quote(key, safe='/~')}"
        copy_source = quote(f"{source.bucket}/{source.key}", safe="/~")
        if source.version_id is not None:
            copy_source += f"?versionId={quote(source.version_id, safe='')}"
        headers = {"x-amz-copy-source": copy_source, "x-amz-content-sha256": "UNSIGNED-PAYLOAD"}
        if source.if_match is not None:
            headers["x-amz-copy-source-if-match"] = f'"{source.if_match}"'
        for attempt in range(3):
            request = AWSRequest("PUT", url, headers=headers)
            self._signer.add_auth(request)
            try:
                async with self._http.put(url, headers=dict(request.headers.items()), proxy=self._proxy[0],
                                          proxy_auth=self._proxy[1]) as answer:  # fmt: skip
                    status, body = answer.status, await answer.read()
            except aiohttp.ClientError as exc:
                if attempt < 2:
                    continue
                raise ConnectionError(f"{exc.__class__.__name__} talking to {self.location.endpoint}") from exc
            # S3 may report a failed copy in the body of a 200 answer.
            if status == 200 and b"<Error>" not in body:
                return _etag(body)
            error = _client_error(status, body)
            if (status in self._RETRY_STATUS or status == 200) and attempt < 2:
                await anyio.sleep(0.1 * 2**attempt)
                continue
            raise error
        raise AssertionError("the last attempt returns or raises")

    async def put(
        self, bucket: str, key: str, body: bytes, *, sha256: str | None = None, md5: str | None = None
    ) -> str | None:
        """PutObject of a small body (held in memory). With `sha256` or `md5` (hex digests the caller has
        already checked) the server refuses other bytes: as x-amz-checksum-sha256, as Content-MD5.
        Returns the new object's ETag.

        Same reason as `copy`: botocore's per-request CPU, not the server, limits a copy-back
        of many small attachments.
        """
        assert self._http is not None and self.location.endpoint
        url = f"{self.location.endpoint.rstrip('/')}/{bucket}/{quote(key, safe='/~')}"
        headers = {"Content-Length": str(len(body))}
        if sha256 is not None:
            headers["x-amz-checksum-sha256"] = base64_digest(sha256)
        if md5 is not None:
            headers["Content-MD5"] = base64_digest(md5)
        for attempt in range(3):
            request = AWSRequest("PUT", url, headers=headers)
            request.context["client_config"] = _UNSIGNED_BODY
            self._signer.add_auth(request)
            try:
                async with self._http.put(url, headers=dict(request.headers.items()), data=body, proxy=self._proxy[0],
                                          proxy_auth=self._proxy[1]) as answer:  # fmt: skip
                    status, etag, text = answer.status, answer.headers.get("ETag"), await answer.read()
            except aiohttp.ClientError as exc:
                if attempt < 2:
                    continue
                raise ConnectionError(f"{exc.__class__.__name__} talking to {self.location.endpoint}") from exc
            if status == 200:
                return etag.strip('"') if etag else None
            if status in self._RETRY_STATUS and attempt < 2:
                await anyio.sleep(0.1 * 2**attempt)
                continue
            raise _client_error(status, text, "PutObject")
        raise AssertionError("the last attempt returns or raises")


def base64_digest(hex_digest: str) -> str:
    """A digest as S3's checksum headers carry it (x-amz-checksum-sha256, Content-MD5): base64, not hex."""
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


# The signer sees no body (aiohttp sends it), so it must not hash one: it would sign the hash of an empty
# body, which servers that check the payload hash (AWS, MinIO) refuse. The body's integrity goes in a
# signed checksum header instead, as the AWS SDKs' own unsigned-payload uploads do.
_UNSIGNED_BODY = Config(s3={"payload_signing_enabled": False})


def _etag(body: bytes) -> str | None:
    """The ETag of a CopyObjectResult answer."""
    try:
        root = ElementTree.fromstring(body) if body else None
    except ElementTree.ParseError:
        return None
    found = None if root is None else next((e.text for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "ETag"), None)
    return found.strip('"') if found else None


def _client_error(status: int, body: bytes, operation: str = "CopyObject") -> ClientError:
    code, message = str(status), ""
    try:
        root = ElementTree.fromstring(body) if body else None
    except ElementTree.ParseError:
        root = None
    if root is not None:
        code = root.findtext("Code") or code
        message = root.findtext("Message") or ""
    return ClientError({"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       operation)  # fmt: skip


# A single-part upload's ETag is the MD5 of its bytes (unless SSE-KMS/SSE-C encrypted them).
_MD5 = re.compile(r"^[0-9a-f]{32}$")


def md5_of_etag(etag: str) -> str | None:
    return etag if _MD5.match(etag) else None
