"""Calls to AWS APIs: the clients every block uses, and one rule for which failures are worth retrying.

The rule, for every AWS call a block makes:

- transient (the block raises its ``...Unavailable`` subclass, ``transient`` True): throttling (a
  throttling error code, or HTTP 429), a server error (HTTP 5xx, or an internal-error code), and a
  connection that could not be opened, was lost, or timed out;
- definite (the block's plain error subclass, ``transient`` False): authentication and authorisation
  (HTTP 401/403, ``AccessDenied``, ``InvalidClientTokenId``, ``SignatureDoesNotMatch``, ``ExpiredToken``,
  ...), validation (``ValidationError``, ``InvalidParameterValue``, botocore's parameter checks), not
  found, missing credentials, and anything else.

A translated error names the operation, the AWS error code, the HTTP status and AWS's message; it
never carries credentials, request signatures or parameter values.

Example:
    ```python
    from botocore.exceptions import BotoCoreError, ClientError
    from blocks._aws import client, translate
    try:
        client(credentials, "route53").get_change(Id=change_id)
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, f"reading change {change_id}", error=DnsError, unavailable=DnsUnavailable) from exc
    ```
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
    SSLError,
    ValidationError as BotoValidationError,
    WaiterError,
)

from blocks.errors import RecoveryError

# Error codes AWS services answer when they throttle a caller (botocore's standard retry mode uses the same list).
THROTTLING_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException", "TooManyRequestsException",
    "ProvisionedThroughputExceededException", "RequestLimitExceeded", "BandwidthLimitExceeded", "RequestThrottled",
    "SlowDown", "PriorRequestNotComplete", "EC2ThrottledException",
})
# Codes of a failure on AWS's side, whatever the HTTP status that came with them.
SERVER_CODES = frozenset({
    "InternalError", "InternalFailure", "InternalServerError", "InternalServiceError", "ServiceUnavailable",
    "ServiceUnavailableException", "RequestTimeout", "RequestTimeoutException",
})
AUTH_CODES = frozenset({
    "AccessDenied", "AccessDeniedException", "InvalidClientTokenId", "SignatureDoesNotMatch", "ExpiredToken",
    "ExpiredTokenException", "UnrecognizedClientException", "InvalidAccessKeyId", "InvalidToken", "AuthFailure",
    "UnauthorizedOperation", "MissingAuthenticationToken", "IncompleteSignature", "InvalidSignatureException",
    "AllAccessDisabled", "AccountProblem",
})
VALIDATION_CODES = frozenset({
    "ValidationError", "ValidationException", "InvalidParameterValue", "InvalidParameterValueException",
    "InvalidParameterCombination", "InvalidParameter", "InvalidParameterException", "MissingParameter",
    "InvalidInput", "InvalidArgument", "InvalidRequest", "MalformedXML", "InvalidRequestException",
    "InvalidBucketName", "InvalidChangeBatch",
})

# Settings of every AWS client the blocks build; a ``config`` in the credentials' aws_client_parameters wins.
CLIENT_CONFIG = Config(retries={"mode": "standard", "total_max_attempts": 3}, connect_timeout=10, read_timeout=60)

E = TypeVar("E", bound=RecoveryError)


@dataclass(frozen=True)
class AwsFailure:
    """What went wrong in one AWS call, classified by the one rule."""

    kind: str  # throttled, server error, connection, timed out, not authorised, invalid, not found, refused
    transient: bool
    code: str = ""
    status: int = 0
    operation: str = ""
    message: str = ""

    def describe(self) -> str:
        head = " ".join(p for p in (self.operation, self.kind) if p)
        status = f"HTTP {self.status}" if self.status else ""
        what = " ".join(p for p in (self.code, f"({status})" if status else "") if p)
        return f"{head}: {what} {self.message}".strip() if what or self.message else head


def answer_is_transient(code: str | None, status: int | None) -> bool:
    """The rule for an error answer: throttling or server-side failure (code or HTTP status)."""
    status = int(status or 0)
    return (code or "") in THROTTLING_CODES or (code or "") in SERVER_CODES or status == 429 or 500 <= status <= 599


def _answer_kind(code: str, status: int) -> str:
    if code in THROTTLING_CODES or status == 429:
        return "throttled"
    if code in SERVER_CODES or 500 <= status <= 599:
        return "server error"
    if code in AUTH_CODES or status in (401, 403):
        return "not authorised"
    if status == 404 or code.startswith("NoSuch") or code.endswith(("NotFound", "NotFoundException", "NotFoundFault")):
        return "not found"
    if code in VALIDATION_CODES or code.startswith(("Invalid", "Malformed")):
        return "invalid"
    return "refused"


def _scrub(text: str) -> str:
    """``text`` without URL query strings (presigned signatures), signing headers or echoed parameter values."""
    text = re.sub(r"(https?://[^\s?'\"]*)\?[^\s'\"]*", r"\1?<redacted>", text or "")
    text = re.sub(r"\b(Signature|Credential|X-Amz-Security-Token|X-Amz-Credential|X-Amz-Signature)=[^\s,&'\"]+",
                  r"\1=<redacted>", text, flags=re.IGNORECASE)
    return re.sub(r"value: .*?, (type|valid)", r"value: <redacted>, \1", text, flags=re.DOTALL)


def _botocore_cause(exc: BaseException) -> BaseException | None:
    """The botocore error behind a boto3 error (a managed transfer re-raises what failed inside it)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ClientError, BotoCoreError)) and current is not exc:
            return current
        current = getattr(current, "last_exception", None) or current.__cause__ or current.__context__
    return None


def classify(exc: BaseException) -> AwsFailure:
    """Classify a botocore/boto3 error (or a lost connection) by the one rule."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {}) or {}
        code = str(error.get("Code") or "")
        status = int((exc.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode") or 0)
        kind = _answer_kind(code, status)
        return AwsFailure(kind, answer_is_transient(code, status), code, status, exc.operation_name or "",
                          _scrub(str(error.get("Message") or "")))
    name = type(exc).__name__
    if isinstance(exc, SSLError):
        return AwsFailure("TLS refused", False, name, message=_scrub(str(exc)))
    if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError)):
        timed_out = "Timeout" in name
        return AwsFailure("timed out" if timed_out else "connection lost", True, name, message=_scrub(str(exc)))
    if isinstance(exc, WaiterError):
        last = exc.last_response if isinstance(exc.last_response, dict) else {}
        error = last.get("Error") or {}
        reason = str(exc.kwargs.get("reason", ""))
        if error.get("Code"):
            code = str(error["Code"])
            status = int((last.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
            return AwsFailure(_answer_kind(code, status), answer_is_transient(code, status), code, status,
                              message=_scrub(f"{reason}: {error.get('Message', '')}"))
        waited_out = "max attempts exceeded" in reason.lower()
        return AwsFailure("wait timed out" if waited_out else "wait failed", waited_out, name, message=_scrub(str(exc)))
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return AwsFailure("not authorised", False, name, message=_scrub(str(exc)))
    if isinstance(exc, (ParamValidationError, BotoValidationError)):
        return AwsFailure("invalid", False, name, message=_scrub(str(exc)))
    if isinstance(exc, BotoCoreError):
        return AwsFailure("refused", False, name, message=_scrub(str(exc)))
    cause = _botocore_cause(exc)
    if cause is not None:
        return classify(cause)
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return AwsFailure("connection lost", True, name, message=_scrub(str(exc)))
    return AwsFailure("failed", False, name, message=_scrub(str(exc)))


def is_transient(exc: BaseException) -> bool:
    """True when the one rule calls ``exc`` transient."""
    return classify(exc).transient


def translate(exc: BaseException, context: str, *, error: type[E], unavailable: type[E] | None = None) -> E:
    """The project error for a failed AWS call: ``unavailable`` when transient, ``error`` otherwise.

    Raise it ``from exc``. The instance's ``transient`` attribute follows the rule even when the block
    has no transient subclass (``unavailable`` None).

    Args:
        exc: what boto3/botocore raised.
        context: what the block was doing, e.g. ``"reading secret 'prod/db'"``.
        error: the block's definite error class.
        unavailable: the block's transient error class (a subclass of ``error``).
    """
    failure = classify(exc)
    cls = unavailable if failure.transient and unavailable is not None else error
    translated = cls(f"{context}: {failure.describe()}")
    if translated.transient != failure.transient:
        translated.transient = failure.transient
    return translated


def error_code(exc: BaseException | None) -> str | None:
    """The AWS error code of a ClientError, or of the ClientError a translated error was raised from."""
    while exc is not None:
        response = getattr(exc, "response", None)
        if isinstance(exc, ClientError) and isinstance(response, dict):
            return (response.get("Error") or {}).get("Code")
        exc = exc.__cause__
    return None


def http_status(exc: BaseException | None) -> int:
    """The HTTP status of a ClientError (or of the one behind a translated error); 0 when there is none."""
    while exc is not None:
        if isinstance(exc, ClientError):
            return int((exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
        exc = exc.__cause__
    return 0


# ---------------------------------------------------------------------------------------------- clients

_LOCK = threading.Lock()


def client(credentials: Any, service: str, *, region_name: str | None = None, **settings: Any):
    """A boto3 client of ``service`` from prefect-aws credentials (``AwsCredentials`` or ``MinIOCredentials``).

    Every client gets :data:`CLIENT_CONFIG` (standard retry mode, 3 attempts, bounded connect and read
    timeouts); ``settings`` are further ``botocore.config.Config`` options of this client (e.g.
    ``max_pool_connections``); a ``config`` in the credentials' ``aws_client_parameters`` wins over both.
    Clients are cached per credentials, service, region and settings.
    """
    return _cached_client(credentials, service, region_name, tuple(sorted(settings.items())))


@lru_cache(maxsize=32)
def _cached_client(credentials: Any, service: str, region_name: str | None, settings: tuple):
    params = credentials.aws_client_parameters.get_params_override()
    config = CLIENT_CONFIG.merge(Config(**dict(settings))) if settings else CLIENT_CONFIG
    params["config"] = config.merge(params["config"]) if params.get("config") is not None else config
    region = region_name or getattr(credentials, "region_name", None)
    if region:
        params["region_name"] = region
    with _LOCK:
        return credentials.get_boto3_session().client(service, **params)
