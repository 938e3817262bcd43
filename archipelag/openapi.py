"""The OpenAPI 3.1 description of the JSON API, served at /api/v1/openapi.json.

docs/api.md is the prose; this is what client generators and the mobile
app's developers use. The request bodies are generated from the very msgspec
structs that decode them (islands.agent, islands.mobile), so a bound or a
field cannot change in one and not the other; the answers are written out
here. tests/test_openapi.py runs schemathesis against a live daphne with
this document: every answer must be one it describes.
"""

import functools
import re
from typing import Any

import msgspec
from django.http import HttpRequest, HttpResponse

from archipelag.api import error_response
from islands.agent import (
    EnhancedHeartbeat,
    HostRegistration,
    JobStatus,
    JobSubmission,
    MaintenanceAnnouncement,
    PollRequest,
)
from islands.mobile import MobilePairRequest

# A JSON Schema (and ECMAScript) pattern ends with `$`; msgspec's end with
# \Z because Python's `$` also matches before a final newline. In a
# document for other languages' validators `$` says what is meant.
_PYTHON_END = re.compile(r"\\Z$")

TIMESTAMP = {"type": "string", "format": "date-time"}
CREDITS = {"type": "string", "pattern": r"^[0-9]+\.[0-9]{4}$", "description": "Credits, 4 decimal places"}
NULLABLE_TIMESTAMP = {"type": ["string", "null"], "format": "date-time"}
UUID = {"type": "string", "format": "uuid"}


def _error(description: str, **headers: str) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if headers:
        answer["headers"] = {
            name: {"description": text, "schema": {"type": "string"}, "required": True}
            for name, text in headers.items()
        }
    return answer


ERRORS: dict[str, dict[str, Any]] = {
    "400": _error("The body is empty, not JSON, or a field is wrong; the message names it"),
    "401": _error("The code, secret or device secret is wrong, used or unknown"),
    # The token-authenticated endpoints name the scheme they expect.
    "401-bearer": _error(
        "The token or key is missing, wrong, revoked or expired",
        **{"WWW-Authenticate": "Bearer"},
    ),
    "403": _error("The body names another host than the token's Island"),
    "404": _error("No such thing for this caller"),
    "405": _error("Not the method the endpoint takes", Allow="The methods it takes"),
    "409": _error("A conflict the message names"),
    "410": _error("Something that can only happen once already happened"),
    "413": _error("The body is over the endpoint's limit"),
    "415": _error("The body is not sent as application/json"),
    "429": _error("Too many requests", **{"Retry-After": "Seconds to wait"}),
    "503": _error("Not now; retrying is safe", **{"Retry-After": "Seconds to wait"}),
}


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}


def _operation(
    summary: str,
    answers: dict[str, dict[str, Any]],
    errors: list[int | str],
    *,
    body: str | None = None,
    security: str | None = None,
    parameters: list[dict[str, Any]] | None = None,
    operation_id: str,
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "responses": {**answers, **{str(status)[:3]: ERRORS[str(status)] for status in errors}},
    }
    if body is not None:
        operation["requestBody"] = _body(body)
    operation["security"] = [{security: []}] if security else []
    if parameters:
        operation["parameters"] = parameters
    return operation


JOB_ID_PARAMETER = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "description": "The job's id as the dispatcher submitted it",
    "schema": {"type": "string", "minLength": 1, "maxLength": 128},
}

RESPONSE_SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": {
        "type": "object",
        "required": ["success", "error"],
        "properties": {
            "success": {"const": False},
            "error": {"type": "string", "minLength": 1},
            "rule": {"type": "string", "description": "409 on a named Island: the rule it fails"},
            "reasons": {
                "type": "object",
                "additionalProperties": {"type": "integer", "minimum": 0},
                "description": "503 `no eligible island`: how many Islands each rule excluded",
            },
        },
    },
    "Ok": {"type": "object", "required": ["success"], "properties": {"success": {"const": True}}},
    "PairingIssued": {
        "type": "object",
        "required": [
            "success",
            "code",
            "expires_in_seconds",
            "pair_url",
            "device_secret",
            "poll_interval_seconds",
        ],
        "properties": {
            "success": {"const": True},
            "code": {"type": "string", "pattern": "^[0-9A-HJKMNP-TV-Z]{6}$"},
            "expires_in_seconds": {"type": "integer", "minimum": 0},
            "pair_url": {"type": "string", "format": "uri"},
            "device_secret": {"type": "string", "minLength": 1},
            "poll_interval_seconds": {"type": "integer", "minimum": 1},
        },
    },
    "PollAnswer": {
        "oneOf": [
            {
                "type": "object",
                "required": ["status", "expires_in_seconds"],
                "properties": {
                    "status": {"const": "pending"},
                    "expires_in_seconds": {"type": "integer", "minimum": 0},
                },
            },
            {
                "type": "object",
                "required": ["status", "island_id", "token"],
                "properties": {"status": {"const": "paired"}, "island_id": UUID, "token": {"type": "string"}},
            },
            {"type": "object", "required": ["status"], "properties": {"status": {"const": "expired"}}},
        ]
    },
    "MobilePaired": {
        "type": "object",
        "required": ["success", "island_id", "token", "token_expires_at", "account"],
        "properties": {
            "success": {"const": True},
            "island_id": UUID,
            "token": {"type": "string"},
            "token_expires_at": TIMESTAMP,
            "account": {"type": "string", "description": "The account's name, masked: a***e"},
        },
    },
    "JobsPoll": {
        "type": "object",
        "required": ["success", "jobs", "cancelled"],
        "properties": {
            "success": {"const": True},
            "jobs": {
                "type": "array",
                "maxItems": 32,
                "items": {
                    "type": "object",
                    "description": "The agent's AssignJob, and what it pays",
                    "required": ["job_id", "workload_id", "lease_expires", "runtime_type", "credits"],
                    "properties": {
                        "job_id": {"type": "string"},
                        "workload_id": {"type": "string"},
                        "input": {},
                        "lease_expires": {"type": "integer", "description": "Unix milliseconds"},
                        "runtime_type": {"type": "string"},
                        "credits": CREDITS,
                    },
                },
            },
            "cancelled": {"type": "array", "items": {"type": "string"}},
        },
    },
    "StatusApplied": {
        "type": "object",
        "required": ["success", "applied", "state"],
        "properties": {
            "success": {"const": True},
            "applied": {"type": "boolean"},
            "state": {"type": "string"},
        },
    },
    "Job": {
        "type": "object",
        "required": [
            "job_id",
            "island_id",
            "host_id",
            "workload",
            "runtime",
            "credits",
            "budget",
            "state",
            "attempt",
            "assigned_at",
            "lease_expires_at",
        ],
        "properties": {
            "job_id": {"type": "string"},
            "island_id": {"type": ["string", "null"], "format": "uuid"},
            "host_id": {"type": ["string", "null"]},
            "workload": {"type": "string"},
            "runtime": {"type": "string"},
            "credits": CREDITS,
            "budget": CREDITS,
            "state": {
                "enum": [
                    "assigned",
                    "started",
                    "streaming",
                    "queued",
                    "succeeded",
                    "failed",
                    "cancelled",
                    "timed_out",
                ]
            },
            "attempt": {"type": "integer", "minimum": 1},
            "assigned_at": TIMESTAMP,
            "lease_expires_at": TIMESTAMP,
            "started_at": NULLABLE_TIMESTAMP,
            "finished_at": NULLABLE_TIMESTAMP,
            "error": {"type": "string"},
            "attempts": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": [
                        "attempt",
                        "island_id",
                        "host_id",
                        "assigned_at",
                        "started_at",
                        "finished_at",
                        "outcome",
                        "credits",
                    ],
                    "properties": {
                        "attempt": {"type": "integer", "minimum": 1},
                        "island_id": UUID,
                        "host_id": {"type": "string"},
                        "assigned_at": TIMESTAMP,
                        "started_at": NULLABLE_TIMESTAMP,
                        "finished_at": NULLABLE_TIMESTAMP,
                        "outcome": {
                            "enum": [
                                "succeeded",
                                "failed",
                                "cancelled",
                                "withdrawn",
                                "timed_out",
                                "undelivered",
                                None,
                            ]
                        },
                        "credits": CREDITS,
                    },
                },
            },
        },
    },
    "JobPlaced": {
        "type": "object",
        "required": ["success", "created", "job"],
        "properties": {"success": {"const": True}, "created": {"type": "boolean"}, "job": _ref("Job")},
    },
    "JobAnswer": {
        "type": "object",
        "required": ["success", "job"],
        "properties": {"success": {"const": True}, "job": _ref("Job")},
    },
    "MaintenanceAnswer": {
        "type": "object",
        "required": ["success", "maintenance_until"],
        "properties": {"success": {"const": True}, "maintenance_until": NULLABLE_TIMESTAMP},
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"enum": ["ok", "failing"]}},
    },
}


def _paths() -> dict[str, Any]:
    body_errors: list[int | str] = [400, 405, 413, 415]
    return {
        "/api/v1/ping": {
            "get": _operation(
                "Reach the coordinator (no token, no database)",
                {"200": _ok("Always", _ref("Ok"))},
                [],
                operation_id="ping",
            ),
            "post": _operation(
                "The same as GET; a body is accepted and not read",
                {"200": _ok("Always", _ref("Ok"))},
                [],
                operation_id="pingPost",
            ),
        },
        "/healthz": {
            "get": _operation(
                "The coordinator, its database and Redis",
                {"200": _ok("All well", _ref("Health")), "503": _ok("Something fails", _ref("Health"))},
                [405],
                operation_id="healthz",
            ),
        },
        "/api/v1/islands/pairing": {
            "post": _operation(
                "An Island asks for a code to show its owner",
                {"201": _ok("A code, and the secret to collect the token with", _ref("PairingIssued"))},
                [*body_errors, 409, 429, 503],
                body="HostRegistration",
                operation_id="requestPairingCode",
            ),
        },
        "/api/v1/islands/pairing/poll": {
            "post": _operation(
                "The Island asks whether its code was redeemed, and collects its token once",
                {"200": _ok("Pending, paired (with the token, once) or expired", _ref("PollAnswer"))},
                [*body_errors, 401, 410, 429, 503],
                body="PollRequest",
                operation_id="pollPairing",
            ),
        },
        "/api/v1/mobile/pair": {
            "post": _operation(
                "A phone redeems the session shown at /pair/mobile",
                {"201": _ok("The phone is an Island of the account", _ref("MobilePaired"))},
                [*body_errors, 401, 409, 410, 429, 503],
                body="MobilePairRequest",
                operation_id="pairPhone",
            ),
        },
        "/api/v1/islands/heartbeat": {
            "post": _operation(
                "An Island's heartbeat (every 10 s)",
                {"200": _ok("Recorded", _ref("Ok"))},
                [*body_errors, "401-bearer", 403, 503],
                body="EnhancedHeartbeat",
                security="islandToken",
                operation_id="heartbeat",
            ),
        },
        "/api/v1/islands/jobs/poll": {
            "post": _operation(
                "The jobs placed on the Island that it has not started, and those withdrawn",
                {"200": _ok("Its jobs", _ref("JobsPoll"))},
                ["401-bearer", 405, 503],
                security="islandToken",
                operation_id="pollJobs",
            ),
        },
        "/api/v1/islands/maintenance": {
            "post": _operation(
                "The Island announces a maintenance window (at most 24 h ahead, 24 h per 7 days), or ends it",
                {"200": _ok("When its maintenance now ends (null: none)", _ref("MaintenanceAnswer"))},
                [*body_errors, "401-bearer", 503],
                body="MaintenanceAnnouncement",
                security="islandToken",
                operation_id="announceMaintenance",
            ),
        },
        "/api/v1/islands/jobs/{job_id}/status": {
            "post": _operation(
                "The Island reports a job's state",
                {"200": _ok("Applied, or a repeat (applied: false)", _ref("StatusApplied"))},
                [*body_errors, "401-bearer", 404, 409, 503],
                body="JobStatus",
                security="islandToken",
                parameters=[JOB_ID_PARAMETER],
                operation_id="reportJobStatus",
            ),
        },
        "/api/v1/jobs": {
            "post": _operation(
                "A dispatcher submits a job",
                {
                    "201": _ok("Placed", _ref("JobPlaced")),
                    "200": _ok("The same job again: the same placement", _ref("JobPlaced")),
                },
                [*body_errors, "401-bearer", 404, 409, 503],
                body="JobSubmission",
                security="dispatcherKey",
                operation_id="submitJob",
            ),
        },
        "/api/v1/jobs/{job_id}": {
            "get": _operation(
                "A job, where it is, and its attempts",
                {"200": _ok("The job", _ref("JobAnswer"))},
                ["401-bearer", 404, 405, 503],
                security="dispatcherKey",
                parameters=[JOB_ID_PARAMETER],
                operation_id="getJob",
            ),
        },
        "/api/v1/jobs/{job_id}/cancel": {
            "post": _operation(
                "Withdraw a job that has not ended",
                {"200": _ok("The job, now cancelled", _ref("JobAnswer"))},
                ["401-bearer", 404, 405, 409, 503],
                security="dispatcherKey",
                parameters=[JOB_ID_PARAMETER],
                operation_id="cancelJob",
            ),
        },
    }


def _end_patterns(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            key: _PYTHON_END.sub("$", value)
            if key == "pattern" and isinstance(value, str)
            else _end_patterns(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_end_patterns(value) for value in node]
    return node


@functools.cache
def document() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document, built once per process."""
    _, requests = msgspec.json.schema_components(
        [
            HostRegistration,
            PollRequest,
            MobilePairRequest,
            EnhancedHeartbeat,
            JobStatus,
            JobSubmission,
            MaintenanceAnnouncement,
        ],
        ref_template="#/components/schemas/{name}",
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Archipelag.io coordinator",
            "version": "1",
            "description": "The JSON API of Islands, phones and dispatchers. docs/api.md is the prose.",
        },
        "paths": _paths(),
        "components": {
            "schemas": {**_end_patterns(requests), **RESPONSE_SCHEMAS},
            "securitySchemes": {
                "islandToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The Island's token from pairing (isl_...)",
                },
                "dispatcherKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A dispatcher key from manage.py create_dispatcher_key (dsp_...)",
                },
            },
        },
    }


def openapi_json(request: HttpRequest) -> HttpResponse:
    """GET /api/v1/openapi.json."""
    if request.method not in ("GET", "HEAD"):
        return error_response(405, "method not allowed: use GET", {"Allow": "GET, HEAD"})
    return HttpResponse(msgspec.json.encode(document()), content_type="application/json")
