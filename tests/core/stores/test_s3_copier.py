"""The Copier (signed requests on one aiohttp session) against a real SeaweedFS: checksums and proxies."""

from __future__ import annotations

import contextlib
import hashlib
import secrets

import anyio
import pytest
from anyio.abc import SocketStream
from botocore.exceptions import ClientError
from support import loopback_server, new_bucket

from engram_recovery.core.stores import s3
from engram_recovery.testbed.seaweedfs import SeaweedFS


@pytest.mark.anyio
@pytest.mark.parametrize("algorithm", ["sha256", "md5"])  # md5: an older inventory, with no SHA-256 recorded
async def test_a_put_lands_only_when_its_body_has_the_checksum_it_is_sent_with(weed: SeaweedFS, algorithm: str) -> None:
    where = await new_bucket(weed, name=f"copier-{secrets.token_hex(4)}")
    body = secrets.token_bytes(70_000)
    good, other = (hashlib.new(algorithm, data).hexdigest() for data in (body, body + b"x"))
    async with s3.Copier(where, 4) as copier:
        etag = await copier.put(where.bucket, "u1/good", body, **{algorithm: good})
        with pytest.raises(ClientError) as refused:
            await copier.put(where.bucket, "u1/bad", body, **{algorithm: other})
    assert s3.error_code(refused.value) == "BadDigest"
    assert etag == hashlib.md5(body, usedforsecurity=False).hexdigest()
    async with s3.bulk_client(where) as c:
        assert await s3.head(c, where.bucket, "u1/bad") is None  # the server kept nothing of the refused body
        answer = await c.get_object(Bucket=where.bucket, Key="u1/good")
        async with answer["Body"] as stream:
            assert await stream.read() == body


@pytest.mark.anyio
async def test_the_copier_goes_through_the_proxy_the_environment_names(
    weed: SeaweedFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    where = await new_bucket(weed, name=f"copier-{secrets.token_hex(4)}")
    host, port = weed.endpoint.removeprefix("http://").split(":")
    relayed: list[bytes] = []

    async def proxy(client: SocketStream) -> None:  # a forward proxy for plain http: the request goes on as it is
        async with client, await anyio.connect_tcp(host, int(port)) as server, anyio.create_task_group() as tg:

            async def pump(source: SocketStream, sink: SocketStream, seen: list[bytes] | None) -> None:
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    async for data in source:
                        if seen is not None:
                            seen.append(data)
                        await sink.send(data)
                tg.cancel_scope.cancel()

            tg.start_soon(pump, client, server, relayed)
            tg.start_soon(pump, server, client, None)

    async with loopback_server(proxy) as endpoint:
        for name in ("NO_PROXY", "no_proxy", "http_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", endpoint)
        async with s3.Copier(where, 4) as copier:
            await copier.put(where.bucket, "u1/through-the-proxy", b"attachment")
        async with s3.bulk_client(where) as c:  # botocore honours the same variable
            assert await s3.head(c, where.bucket, "u1/through-the-proxy") is not None
    # The absolute-form request line is what a client sends only to a proxy.
    assert any(f"PUT {weed.endpoint}/{where.bucket}/u1/through-the-proxy ".encode() in data for data in relayed)
