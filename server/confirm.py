"""Confirmation of destructive tool calls by MCP elicitation (form mode), on both protocol generations.

A tool with a `confirmation` called with confirm=false, by a client that declared the elicitation
capability, asks the user first (server/invoke.py decides when; this module asks):

* up to 2025-11-25 the question is a standalone `elicitation/create` request sent mid-call; no
  answer within ANSWER_SECONDS counts as no;
* from 2026-07-28 the call's result is an `InputRequiredResult` carrying the question, and the
  client retries the call with the answer (`input_responses`) and the `request_state` we gave it.

The SDK seals `request_state` (authenticated encryption, bound to the tool and its arguments), so
a client cannot forge one; it could still replay one. So the state names a one-time ticket this
process issued for exactly this question, and a yes counts only as the client's input response
to a ticket still outstanding: a replayed, expired or unknown ticket, an answer without a ticket,
or a ticket without an answer asks the question again. A question whose wording changed since it
was asked (the dry run now finds something else) is asked again too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from typing import Any

import anyio
from mcp.server.elicitation import render_elicitation_schema
from mcp.server.mcpserver import Context
from mcp.shared.exceptions import MCPError
from mcp_types import ElicitRequest, ElicitRequestFormParams, ElicitResult, InputRequiredResult
from mcp_types.version import is_version_at_least
from pydantic import BaseModel, Field

from .invoke import Ask, AskLater

log = logging.getLogger("engram_recovery")

# First protocol revision whose tools/call carries elicitation inside an InputRequiredResult.
MULTI_ROUND_VERSION = "2026-07-28"
# The key of our question in input_requests / input_responses.
QUESTION = "confirm"
# Mid-call elicitation: how long the user has to answer before the call goes on as declined.
ANSWER_SECONDS = 300.0
# Multi-round: how long an issued ticket stays good (the SDK's sealed state lives as long), and how many
# unanswered tickets are kept (a client that never retries must not grow the server without bound).
TICKET_SECONDS = 600.0
TICKETS_KEPT = 1000


class ConfirmForm(BaseModel):
    """The form the user answers."""

    confirm: bool = Field(description="true to go ahead; anything else changes nothing")


def _can_elicit(context: Context[Any, Any]) -> bool:
    """Form elicitation declared: a bare `elicitation: {}` (before modes existed) counts, url-only does not."""
    capabilities = context.client_capabilities
    elicitation = capabilities.elicitation if capabilities is not None else None
    return elicitation is not None and (elicitation.form is not None or elicitation.url is None)


def _said_yes(answer: object) -> bool:
    """Only an accepted form whose confirm is the JSON value true; decline, cancel, "true" or 1 are no."""
    return (
        isinstance(answer, ElicitResult)
        and answer.action == "accept"
        and answer.content is not None
        and answer.content.get("confirm") is True
    )


def _form(message: str) -> ElicitRequestFormParams:
    text = f"{message}\n\nConfirm to go ahead; decline (or leave unanswered) and nothing is changed."
    return ElicitRequestFormParams(message=text, requested_schema=render_elicitation_schema(ConfirmForm))


class Tickets:
    """One-time tickets for questions asked through an InputRequiredResult, held by this process only.

    A ticket remembers which question it was issued for (tool, arguments and message digest) and is
    spent by the first retry that presents it, whatever that retry carries.
    """

    def __init__(self) -> None:
        self._issued: dict[str, tuple[str, float]] = {}

    def issue(self, question: str) -> str:
        now = time.monotonic()
        self._issued = {t: (q, at) for t, (q, at) in self._issued.items() if now - at < TICKET_SECONDS}
        while len(self._issued) >= TICKETS_KEPT:
            del self._issued[next(iter(self._issued))]  # the oldest: dicts keep insertion order
        ticket = secrets.token_urlsafe(16)
        self._issued[ticket] = (question, now)
        return ticket

    def spend(self, ticket: str) -> str | None:
        """The question the ticket was issued for, once; None for a ticket unknown, spent or expired."""
        issued = self._issued.pop(ticket, None)
        if issued is None or time.monotonic() - issued[1] >= TICKET_SECONDS:
            return None
        return issued[0]


def asker(context: Context[Any, Any], tool: str, arguments: dict[str, Any], tickets: Tickets) -> Ask | None:
    """How to ask this call's client to confirm, or None when it cannot be asked (no elicitation capability)."""
    if not _can_elicit(context):
        return None
    version = context.protocol_version
    if version is not None and is_version_at_least(version, MULTI_ROUND_VERSION):
        return _multi_round(context, tool, arguments, tickets)
    if not context.session.can_send_request:
        return None
    return _mid_call(context)


def _mid_call(context: Context[Any, Any]) -> Ask:
    async def ask(message: str) -> bool:
        request = _form(message)
        answer: ElicitResult | None = None
        with anyio.move_on_after(ANSWER_SECONDS):
            try:
                answer = await context.session.elicit_form(
                    message=request.message,
                    requested_schema=request.requested_schema,
                    related_request_id=context.request_id,
                )
            except MCPError as exc:
                # The client refused the request (or cannot take it): no answer, so no.
                log.info("confirmation not answered: %s", exc)
        if answer is None:
            log.info("confirmation unanswered (refused or after %.0f s): going on as declined", ANSWER_SECONDS)
        return _said_yes(answer)

    return ask


def _digest(tool: str, arguments: dict[str, Any], message: str) -> str:
    text = json.dumps([tool, arguments, message], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _ticket_of(state: str | None) -> str | None:
    # The SDK's boundary verified and unsealed the state: it is what we minted, or absent.
    if not state:
        return None
    try:
        value = json.loads(state)
    except ValueError:
        return None
    ticket = value.get("ticket") if isinstance(value, dict) else None
    return ticket if isinstance(ticket, str) else None


def _multi_round(context: Context[Any, Any], tool: str, arguments: dict[str, Any], tickets: Tickets) -> Ask:
    async def ask(message: str) -> bool:
        question = _digest(tool, arguments, message)
        ticket = _ticket_of(context.request_state)
        asked = tickets.spend(ticket) if ticket is not None else None
        answer = (context.input_responses or {}).get(QUESTION)
        if asked is not None and answer is not None:
            if asked == question:
                return _said_yes(answer)
            log.info("the confirmation question changed since it was asked (the dry run differs): asking again")
        fresh = tickets.issue(question)
        raise AskLater(
            InputRequiredResult(
                input_requests={QUESTION: ElicitRequest(params=_form(message))},
                request_state=json.dumps({"ticket": fresh}),
            )
        )

    return ask
