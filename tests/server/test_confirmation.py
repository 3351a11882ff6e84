"""Destructive tools ask the user to confirm by MCP elicitation: the SDK's real client at both protocol
generations (2025-11-25: a mid-call elicitation/create; 2026-07-28: InputRequiredResult and a retry),
against a real seeded database. reindex_qdrant is the destructive tool here: its confirm=false is a dry run."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx2
import mcp_types as types
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.session import ClientRequestContext
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from support import EngramDB, User, engram_env, fingerprints, make_engram_db, wait_listening

from engram_recovery.core.settings import Settings
from engram_recovery.server import confirm
from engram_recovery.server.app import build_server
from engram_recovery.server.invoke import DECLINED, check_confirmable

pytestmark = pytest.mark.anyio
EXE = str(Path(sys.executable).with_name("engram-recovery"))

LEGACY, MODERN = "legacy", "2026-07-28"
PENDING = (
    "SELECT count(*) FROM oban_jobs WHERE worker = 'Engram.Workers.EmbedNote' "
    "AND state IN ('available', 'scheduled', 'executing', 'retryable', 'suspended')"
)
CALL = {"mode": "all"}


@pytest.fixture
async def db(admin_dsn: str, master_key: bytes) -> AsyncIterator[EngramDB]:
    async for engram in make_engram_db(admin_dsn, master_key, users=2, vaults_per_user=2, notes=40, attachments=0):
        yield engram


@pytest.fixture
def settings(db: EngramDB, settings_for: Any) -> Settings:
    result: Settings = settings_for(db)
    return result


async def pending_jobs(db: EngramDB) -> int:
    conn = await asyncpg.connect(db.dsn)
    try:
        return int(await conn.fetchval(PENDING))
    finally:
        await conn.close()


YES = types.ElicitResult(action="accept", content={"confirm": True})


@pytest.mark.parametrize("mode", [LEGACY, MODERN])
async def test_an_accepted_confirmation_runs_the_confirmed_reindex(db: EngramDB, settings: Settings, mode: str) -> None:
    user = User(YES)
    assert await pending_jobs(db) == 0
    async with Client(build_server(settings), mode=mode, elicitation_callback=user) as client:
        result = await client.call_tool("reindex_qdrant", CALL)
    assert not result.is_error and result.structured_content is not None
    done = result.structured_content
    assert done["dry_run"] is False and done["enqueued"] > 0
    assert await pending_jobs(db) == done["enqueued"]
    # Asked once, and shown what the dry run found.
    assert len(user.asked) == 1
    assert f"enqueue {done['enqueued']} EmbedNote job(s)" in user.asked[0]
    assert DECLINED not in done["summary"]


@pytest.mark.parametrize("mode", [LEGACY, MODERN])
@pytest.mark.parametrize(
    "answer",
    [
        types.ElicitResult(action="decline"),
        types.ElicitResult(action="cancel"),
        types.ElicitResult(action="accept", content={"confirm": False}),
        types.ElicitResult(action="accept", content={"confirm": "true"}),
    ],
    ids=["decline", "cancel", "false", "string"],
)
async def test_a_declined_confirmation_changes_nothing_and_says_so(
    db: EngramDB, settings: Settings, mode: str, answer: types.ElicitResult
) -> None:
    user = User(answer)
    before = await fingerprints(db.dsn)
    async with Client(build_server(settings), mode=mode, elicitation_callback=user) as client:
        result = await client.call_tool("reindex_qdrant", CALL)
    assert await fingerprints(db.dsn) == before
    assert not result.is_error and result.structured_content is not None
    assert result.structured_content["dry_run"] is True and result.structured_content["enqueued"] == 0
    assert result.structured_content["summary"].startswith(DECLINED)
    assert len(user.asked) == 1


@pytest.mark.parametrize("mode", [LEGACY, MODERN])
async def test_a_client_without_elicitation_gets_the_dry_run_as_before(
    db: EngramDB, settings: Settings, mode: str
) -> None:
    before = await fingerprints(db.dsn)
    async with Client(build_server(settings), mode=mode) as client:
        dry = await client.call_tool("reindex_qdrant", CALL)
        assert await fingerprints(db.dsn) == before
        assert dry.structured_content is not None and dry.structured_content["dry_run"] is True
        assert DECLINED not in dry.structured_content["summary"]
        assert dry.structured_content["notes_to_enqueue"] > 0
        # confirm=true still works without any question.
        done = await client.call_tool("reindex_qdrant", {**CALL, "confirm": True})
    assert done.structured_content is not None
    assert done.structured_content["enqueued"] == dry.structured_content["notes_to_enqueue"]
    assert await pending_jobs(db) == done.structured_content["enqueued"]


@pytest.mark.parametrize("mode", [LEGACY, MODERN])
async def test_confirm_true_and_nothing_to_do_ask_nothing(db: EngramDB, settings: Settings, mode: str) -> None:
    conn = await asyncpg.connect(db.dsn)
    try:
        # A user without a vault: a reindex scoped to them would change nothing, so there is nothing to confirm.
        idle = await conn.fetchval(
            "INSERT INTO users (email, created_at, updated_at) VALUES ('idle@example.org', now(), now()) RETURNING id"
        )
    finally:
        await conn.close()
    user = User(YES)
    async with Client(build_server(settings), mode=mode, elicitation_callback=user) as client:
        done = await client.call_tool("reindex_qdrant", {**CALL, "confirm": True})
        nothing = await client.call_tool("reindex_qdrant", {**CALL, "user_id": str(idle)})
    assert user.asked == []
    assert done.structured_content is not None and done.structured_content["dry_run"] is False
    assert done.structured_content["enqueued"] > 0
    assert nothing.structured_content is not None and nothing.structured_content["dry_run"] is True
    assert nothing.structured_content["notes_to_enqueue"] == 0
    assert DECLINED not in nothing.structured_content["summary"]


async def test_an_unanswered_mid_call_confirmation_runs_the_dry_run(
    db: EngramDB, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(confirm, "ANSWER_SECONDS", 0.5)

    async def away(context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
        await anyio.sleep(3)
        return YES

    before = await fingerprints(db.dsn)
    async with Client(build_server(settings), mode=LEGACY, elicitation_callback=away) as client:
        result = await client.call_tool("reindex_qdrant", CALL)
    assert result.structured_content is not None
    assert result.structured_content["summary"].startswith(DECLINED)
    assert await fingerprints(db.dsn) == before


async def test_multi_round_yes_counts_only_as_the_answer_to_a_question_asked_once(
    db: EngramDB, settings: Settings
) -> None:
    """2026-07-28 by hand: a replayed state, a state without an answer, an answer without a state or a
    forged state never run the confirmed reindex; only the one retry that answers the question does."""
    before = await fingerprints(db.dsn)
    async with Client(build_server(settings), mode=MODERN, elicitation_callback=User(YES)) as client:
        session = client.session
        first = await session.call_tool("reindex_qdrant", CALL, allow_input_required=True)
        assert isinstance(first, types.InputRequiredResult) and first.request_state
        assert set(first.input_requests or {}) == {"confirm"}
        yes: types.InputResponses = {"confirm": YES}
        # An answer without the state, and the state without an answer: asked again, nothing changed.
        unasked = await session.call_tool("reindex_qdrant", CALL, input_responses=yes, allow_input_required=True)
        assert isinstance(unasked, types.InputRequiredResult)
        silent = await session.call_tool(
            "reindex_qdrant", CALL, request_state=first.request_state, allow_input_required=True
        )
        assert isinstance(silent, types.InputRequiredResult) and silent.request_state
        # That retry spent the first ticket: answering it now asks again.
        late = await session.call_tool(
            "reindex_qdrant", CALL, input_responses=yes, request_state=first.request_state, allow_input_required=True
        )
        assert isinstance(late, types.InputRequiredResult) and late.request_state
        with pytest.raises(MCPError, match="Invalid or expired requestState"):
            await session.call_tool(
                "reindex_qdrant",
                CALL,
                input_responses=yes,
                request_state='{"ticket": "x"}',
                allow_input_required=True,
            )
        # State minted for other arguments does not fit this call.
        with pytest.raises(MCPError, match="Invalid or expired requestState"):
            await session.call_tool(
                "reindex_qdrant",
                {"mode": "stale"},
                input_responses=yes,
                request_state=late.request_state,
                allow_input_required=True,
            )
        assert await fingerprints(db.dsn) == before
        done = await session.call_tool(
            "reindex_qdrant", CALL, input_responses=yes, request_state=late.request_state, allow_input_required=True
        )
        assert isinstance(done, types.CallToolResult) and done.structured_content is not None
        assert done.structured_content["dry_run"] is False
        enqueued = done.structured_content["enqueued"]
        assert enqueued > 0 and await pending_jobs(db) == enqueued
        # The same retry replayed runs nothing a second time: the question comes back.
        replay = await session.call_tool(
            "reindex_qdrant", CALL, input_responses=yes, request_state=late.request_state, allow_input_required=True
        )
        assert isinstance(replay, types.InputRequiredResult)
    assert await pending_jobs(db) == enqueued


@pytest.mark.parametrize("mode", [LEGACY, MODERN])
async def test_confirmation_over_the_real_stdio_server(db: EngramDB, tmp_path: Path, mode: str) -> None:
    """The served process (its own stdio loop, server/stdio.py) carries the question and the answer both ways."""
    user = User(YES)
    server = StdioServerParameters(command=EXE, args=["serve"], env=engram_env(db, tmp_path))
    async with Client(server, mode=mode, elicitation_callback=user) as client:
        result = await client.call_tool("reindex_qdrant", CALL)
    assert result.structured_content is not None and result.structured_content["dry_run"] is False
    assert len(user.asked) == 1
    assert await pending_jobs(db) == result.structured_content["enqueued"] > 0


@pytest.mark.parametrize("mode", [LEGACY, MODERN])
async def test_confirmation_over_streamable_http(db: EngramDB, tmp_path: Path, mode: str) -> None:
    """The demo's transport: the question reaches the client over HTTP too (SSE mid-call, or the retry)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    token = "confirm-test-token-0123456789abcdef"
    env = engram_env(db, tmp_path, ENGRAM_RECOVERY_HTTP_TOKEN=token)
    proc = await anyio.open_process(
        [EXE, "serve", "--http", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        await wait_listening(port, proc)
        user = User(types.ElicitResult(action="decline"))
        before = await fingerprints(db.dsn)
        url = f"http://127.0.0.1:{port}/mcp"
        async with httpx2.AsyncClient(headers={"authorization": f"Bearer {token}"}) as http:
            transport = streamable_http_client(url, http_client=http)
            async with Client(transport, mode=mode, elicitation_callback=user) as client:
                declined = await client.call_tool("reindex_qdrant", CALL)
                assert await fingerprints(db.dsn) == before
                user.answer = YES
                done = await client.call_tool("reindex_qdrant", CALL)
    finally:
        proc.terminate()
        with anyio.fail_after(10):
            await proc.wait()
    assert declined.structured_content is not None and declined.structured_content["summary"].startswith(DECLINED)
    assert len(user.asked) == 2
    assert done.structured_content is not None and done.structured_content["dry_run"] is False
    assert await pending_jobs(db) == done.structured_content["enqueued"] > 0


def test_a_tool_with_a_confirmation_needs_a_confirm_flag_and_a_summary() -> None:
    from engram_recovery.tools import registry
    from engram_recovery.tools.base import ToolSpec
    from engram_recovery.tools.reindex_qdrant import SPEC

    confirmed = [spec.name for spec in registry.all_specs() if spec.confirmation is not None]
    assert "reindex_qdrant" in confirmed
    for spec in registry.all_specs():
        check_confirmable(spec)  # every registered tool is fit for it
    unfit: ToolSpec[Any, Any] = dataclasses.replace(registry.load("backup_status"), confirmation=SPEC.confirmation)
    with pytest.raises(TypeError, match="backup_status has a confirmation but no confirm"):
        check_confirmable(unfit)


@pytest.mark.parametrize("answer", [False, True], ids=["declined", "accepted"])
async def test_the_unconfirmed_run_happens_once_and_writes_the_question(
    db: EngramDB, settings: Settings, answer: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engram_recovery.core.progress import silent
    from engram_recovery.core.reindex.run import reindex as engine
    from engram_recovery.core.runtime import Runtime
    from engram_recovery.server.invoke import invoke
    from engram_recovery.tools import reindex_qdrant

    runs: list[bool] = []
    asked: list[str] = []

    async def counted(runtime: Runtime, request: Any, progress: Any) -> Any:
        runs.append(request.confirm)
        return await engine(runtime, request, progress)

    async def person(message: str) -> bool:
        asked.append(message)
        return answer

    monkeypatch.setattr(reindex_qdrant, "reindex", counted)
    async with Runtime(settings) as runtime:
        result = await invoke(reindex_qdrant.SPEC, runtime, dict(CALL), silent, ask=person)
    # The dry run that wrote the question is the declined call's answer; a yes adds only the confirmed run.
    assert runs == ([False, True] if answer else [False]) and len(asked) == 1
    assert result.summary.startswith(DECLINED) is (not answer)  # type: ignore[attr-defined]
    assert (await pending_jobs(db) > 0) is answer
