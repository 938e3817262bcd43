"""Small helpers shared by the JSON endpoints.

Every JSON endpoint answers errors as `{"success": false, "error": "..."}`
with a 4xx status, and decodes its body into a msgspec Struct so that wrong
types, missing fields and oversized values are rejected before anything is
written. Unknown fields are ignored, as the real agent adds fields over time.
A database that cannot be reached for a moment is answered the same way,
with 503 and Retry-After (docs/faults.md).
"""

import functools
import logging
import re
from collections.abc import Awaitable, Callable
from inspect import iscoroutinefunction
from typing import Any, overload

import msgspec
from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

# Pairing and status bodies are a few hundred bytes; a heartbeat with many
# GPUs and active jobs stays under 16 KiB. Anything far bigger is a mistake
# or an attack, and is refused before it is read.
DEFAULT_MAX_BODY_BYTES = 16 * 1024

# A dropped connection, a restarting server, a pool with no connection to
# give within its timeout, a deadlock: transient, worth a retry. Other
# database errors (integrity, data) are bugs and stay 500s.
TRANSIENT_DATABASE_ERRORS: tuple[type[Exception], ...] = (OperationalError, InterfaceError)
DATABASE_RETRY_AFTER = 5

logger = logging.getLogger("archipelag.api")

_PATH_RE = re.compile(r" - at (?P<key>`key` in )?`\$\.?(?P<path>[^`]*)`\Z")

# For every string the coordinator keeps: PostgreSQL stores no NUL character
# in text or jsonb, though "\u0000" is valid JSON, so a NUL is refused here
# (a 400) rather than failing the write (a 500).
NO_NUL_PATTERN = r"^[^\x00]*\Z"


class ApiError(Exception):
    """An answer other than success: `status`, the `error` text, headers, and any fields beside them."""

    def __init__(
        self,
        status: int,
        error: str,
        headers: dict[str, str] | None = None,
        fields: dict[str, Any] | None = None,
    ):
        super().__init__(error)
        self.status = status
        self.error = error
        self.headers = headers or {}
        self.fields = fields or {}


# What json_api turns into a JSON answer rather than a 500.
ANSWERED_ERRORS: tuple[type[Exception], ...] = (ApiError, *TRANSIENT_DATABASE_ERRORS)


def retry_later(status: int, error: str, retry_after: int) -> ApiError:
    """A refusal the client may try again (429, 503), with the wait in Retry-After."""
    return ApiError(status, error, {"Retry-After": str(retry_after)})


def database_unavailable() -> ApiError:
    return retry_later(
        503,
        f"the coordinator cannot reach its database; retry in {DATABASE_RETRY_AFTER} seconds",
        DATABASE_RETRY_AFTER,
    )


def error_response(
    status: int, error: str, headers: dict[str, str] | None = None, fields: dict[str, Any] | None = None
) -> JsonResponse:
    response = JsonResponse({"success": False, "error": error, **(fields or {})}, status=status)
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def describe_validation_error(exc: msgspec.ValidationError | msgspec.DecodeError) -> str:
    """Turn msgspec's message into one that names the field first."""
    message = str(exc)
    if isinstance(exc, msgspec.DecodeError) and not isinstance(exc, msgspec.ValidationError):
        return "body is not valid JSON"
    match = _PATH_RE.search(message)
    if not match:
        return f"invalid body: {message}"
    path = match.group("path") or "body"
    if match.group("key"):
        path += " key"
    # The pattern itself means nothing to a client; say what it checks.
    problem = message[: match.start()].replace(f"matching regex {NO_NUL_PATTERN!r}", "without NUL characters")
    return f"invalid {path}: {problem}"


class InvalidBody(ValueError):
    """A body that is not JSON of the expected shape; the message is safe to show.

    `status` is what the HTTP API answers: 413 for a body over its limit,
    400 for anything else.
    """

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def decode_body[T](
    body: bytes, decoder: msgspec.json.Decoder[T], max_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> T:
    """Check and decode a body, raising InvalidBody for anything that is not right.

    The HTTP API and the NATS bridge both decode with this, so they refuse
    the same bodies (too large, empty, not UTF-8, not JSON, the wrong shape)
    with the same messages.
    """
    if len(body) > max_bytes:
        raise InvalidBody(f"body too large: at most {max_bytes} bytes", status=413)
    if not body.strip():
        raise InvalidBody("body is empty: send a JSON object")
    try:
        # JSON is UTF-8 (RFC 8259). msgspec checks only the strings it keeps,
        # and for those raises UnicodeDecodeError rather than an error of its
        # own, so bad bytes elsewhere would pass and bad bytes there would be
        # a 500. For ASCII bodies this check is a fast scan.
        body.decode()
    except UnicodeDecodeError:
        raise InvalidBody("body is not valid JSON: it is not UTF-8") from None
    try:
        return decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidBody(describe_validation_error(exc)) from None
    except RecursionError:
        # msgspec skips unknown fields recursively and stops at the
        # interpreter's recursion limit, a few KiB of brackets deep.
        raise InvalidBody("body is not valid JSON: nested too deeply") from None


_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def _decoder[T](type_: type[T]) -> msgspec.json.Decoder[T]:
    decoder = _decoders.get(type_)
    if decoder is None:
        decoder = _decoders[type_] = msgspec.json.Decoder(type_)
    return decoder


def parse_body[T](request: HttpRequest, type_: type[T], max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> T:
    """The request's body as a `type_`, or an ApiError saying what is wrong with it."""
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise ApiError(400, "invalid Content-Length header") from None
    if declared > max_bytes:
        # Refused on what it says it is, before it is read.
        raise ApiError(413, f"body too large: at most {max_bytes} bytes")
    body = request.body
    if body.strip() and (request.content_type or "").lower() != "application/json":
        # A page on another site can make a visitor's browser POST text/plain,
        # a form or multipart without asking first (no CORS preflight), and
        # so spend the visitor's address on our limits; application/json
        # only after a preflight, which nothing here answers. (An empty body
        # is refused as empty, whatever its type: it is counted nowhere.)
        raise ApiError(415, "send the body as JSON, with Content-Type: application/json")
    try:
        return decode_body(body, _decoder(type_), max_bytes)
    except InvalidBody as exc:
        raise ApiError(exc.status, str(exc)) from None


def client_ip(request: HttpRequest) -> str:
    """The client's address, trusting X-Forwarded-For only as far as NUM_PROXIES says."""
    num_proxies = settings.NUM_PROXIES
    if num_proxies > 0:
        forwarded = [part.strip() for part in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")]
        forwarded = [part for part in forwarded if part]
        if len(forwarded) >= num_proxies:
            return str(forwarded[-num_proxies])
    return str(request.META.get("REMOTE_ADDR") or "0.0.0.0")  # noqa: S104 (not a bind address)


def bearer_token(request: HttpRequest) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


type View = Callable[..., HttpResponse] | Callable[..., Awaitable[HttpResponse]]


@overload
def json_api[V: View](view: V) -> V: ...
@overload
def json_api[V: View](*, methods: tuple[str, ...]) -> Callable[[V], V]: ...
def json_api(view: Any = None, *, methods: tuple[str, ...] = ("POST",)) -> Any:
    """Mark a view as a JSON API endpoint answering `methods` (POST unless told otherwise).

    It is exempt from CSRF because no API endpoint reads the session cookie:
    callers prove who they are with a token or a secret in the body. An
    ApiError raised anywhere in the view becomes a JSON error response, and
    so does a transient database error (503), which the caller may retry:
    its transaction rolled back, so nothing of the request was written.
    An async view (`async def`) gets an async wrapper doing the same.
    """
    allowed = ", ".join(methods)

    def refused(request: HttpRequest, exc: Exception) -> HttpResponse:
        if isinstance(exc, ApiError):
            return error_response(exc.status, exc.error, exc.headers, exc.fields)
        logger.exception("event=database_unavailable path=%s", request.path)
        unavailable = database_unavailable()
        return error_response(unavailable.status, unavailable.error, unavailable.headers)

    def decorate(view: Any) -> Any:
        if iscoroutinefunction(view):

            @functools.wraps(view)
            async def async_wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
                if request.method not in methods:
                    return error_response(405, f"method not allowed: use {allowed}", {"Allow": allowed})
                try:
                    return await view(request, *args, **kwargs)  # type: ignore[no-any-return]
                except ANSWERED_ERRORS as exc:
                    return refused(request, exc)

            return csrf_exempt(async_wrapper)

        @functools.wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method not in methods:
                return error_response(405, f"method not allowed: use {allowed}", {"Allow": allowed})
            try:
                return view(request, *args, **kwargs)  # type: ignore[no-any-return]
            except ANSWERED_ERRORS as exc:
                return refused(request, exc)

        return csrf_exempt(wrapper)

    return decorate if view is None else decorate(view)
