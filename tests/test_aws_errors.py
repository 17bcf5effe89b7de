"""One rule for AWS failures: every block that calls AWS raises its own error, transient by the same rule.

A local HTTP server answers real boto3 clients in each service's wire format (S3 and Route 53 REST-XML,
IAM/RDS query XML, EC2 XML, Secrets Manager JSON) with a throttle, a server error, an auth refusal or a
validation error, or drops the connection; moto's server gives the validation and not-found answers of
real requests. The clients make a single attempt (``total_max_attempts: 1`` in the credentials) so the
server's request count shows what the retry policy did.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from botocore.exceptions import BotoCoreError, ClientError

from blocks._aws import CLIENT_CONFIG, classify, client
from blocks.aws_security import AwsError, AwsUnavailable, IamPrincipals, QuarantineSecurityGroup, SecretsManagerStore
from blocks.backup_sources import BackupSources, ObjectPrefixSource
from blocks.dns import DnsError, DnsRecord, DnsUnavailable, DnsZone
from blocks.errors import RecoveryError
from blocks.evidence_vault import EvidenceManifest, EvidenceVault
from blocks.models import ModelRegistry, ModelRegistryError, ModelRegistryUnavailable
from blocks.object_store import ObjectStore, ObjectStoreError, ObjectStoreUnavailable
from blocks.qdrant import QdrantCluster, QdrantError, QdrantUnavailable
from blocks.rds import RdsDatabase, RdsError, RdsUnavailable
from sandbox.paths import free_port

SECRET_KEY = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"


# ---------------------------------------------------------------------------------------------- the fake AWS endpoint


@dataclass
class Script:
    """What the server answers next: an HTTP answer, ``close`` (drop the connection) or ``hang`` (never answer)."""

    status: int = 200
    headers: dict = field(default_factory=dict)
    body: bytes = b""
    action: str = "answer"


class FakeAws:
    """An HTTP server on 127.0.0.1 that gives every request the scripted answer and counts the requests."""

    def __init__(self):
        self.script = Script()
        self.hits = 0
        self.release = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                fake.hits += 1
                script = fake.script
                if script.action == "close":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if script.action == "hang":
                    fake.release.wait(10)
                    self.close_connection = True
                    return
                self.send_response(script.status)
                for name, value in script.headers.items():
                    self.send_header(name, value)
                body = b"" if self.command == "HEAD" else script.body
                self.send_header("Content-Length", str(len(script.body)))
                self.send_header("x-amzn-RequestId", "req-1")
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, script: Script) -> None:
        self.script, self.hits = script, 0


@pytest.fixture(scope="module")
def fake_aws():
    fake = FakeAws()
    fake.thread.start()
    yield fake
    fake.release.set()
    fake.server.shutdown()
    fake.server.server_close()


def _credentials(endpoint: str, **config):
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    settings = {"retries": {"mode": "standard", "total_max_attempts": 1}, "connect_timeout": 2, "read_timeout": 2,
                **config}
    return AwsCredentials(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                          aws_client_parameters=AwsClientParameters(endpoint_url=endpoint, config=settings))


# ---------------------------------------------------------------------------------------------- wire formats


def _xml(status: int, code: str, message: str, wrapper: str) -> Script:
    if wrapper == "s3":
        body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message>" \
               "<RequestId>req-1</RequestId></Error>"
    elif wrapper == "ec2":
        body = f"<?xml version='1.0' encoding='UTF-8'?><Response><Errors><Error><Code>{code}</Code>" \
               f"<Message>{message}</Message></Error></Errors><RequestID>req-1</RequestID></Response>"
    else:  # query protocol (IAM, STS, RDS) and Route 53: an ErrorResponse
        body = f"<?xml version='1.0'?><ErrorResponse xmlns='{wrapper}'><Error><Type>Sender</Type><Code>{code}</Code>" \
               f"<Message>{message}</Message></Error><RequestId>req-1</RequestId></ErrorResponse>"
    return Script(status, {"Content-Type": "application/xml" if wrapper == "s3" else "text/xml"}, body.encode())


def _json(status: int, code: str, message: str) -> Script:
    return Script(status, {"Content-Type": "application/x-amz-json-1.1"},
                  json.dumps({"__type": code, "message": message}).encode())


S3, ROUTE53 = "s3", "https://route53.amazonaws.com/doc/2013-04-01/"
IAM, RDS, EC2 = "https://iam.amazonaws.com/doc/2010-05-08/", "http://rds.amazonaws.com/doc/2014-10-31/", "ec2"

# What AWS answers, per protocol, for each class of failure: (status, code, message).
ANSWERS = {
    "throttled": {S3: (503, "SlowDown", "Please reduce your request rate."), "json": (400, "ThrottlingException", "Rate exceeded"),
                  IAM: (400, "Throttling", "Rate exceeded"), RDS: (400, "Throttling", "Rate exceeded"),
                  EC2: (503, "RequestLimitExceeded", "Request limit exceeded."), ROUTE53: (400, "Throttling", "Rate exceeded")},
    "too many requests": {S3: (429, "TooManyRequests", "Too many requests"), "json": (429, "TooManyRequestsException", "Slow down"),
                          IAM: (429, "RequestThrottled", "Slow down"), RDS: (429, "SomeNewThrottle", "Slow down"),
                          EC2: (429, "RequestLimitExceeded", "Slow down"), ROUTE53: (429, "Throttled", "Slow down")},
    "server error": {S3: (500, "InternalError", "We encountered an internal error."), "json": (500, "InternalFailure", "Internal"),
                     IAM: (500, "ServiceFailure", "Internal"), RDS: (503, "ServiceUnavailable", "Unavailable"),
                     EC2: (500, "InternalError", "Internal"), ROUTE53: (502, "ServiceUnavailable", "Bad gateway")},
    "auth": {S3: (403, "AccessDenied", "Access Denied"), "json": (400, "UnrecognizedClientException", "The security token is invalid."),
             IAM: (403, "InvalidClientTokenId", "The security token included in the request is invalid."),
             RDS: (403, "SignatureDoesNotMatch", "The request signature we calculated does not match."),
             EC2: (401, "AuthFailure", "AWS was not able to validate the provided access credentials"),
             ROUTE53: (403, "ExpiredToken", "The security token included in the request is expired")},
    "validation": {S3: (400, "InvalidArgument", "Invalid argument."), "json": (400, "ValidationException", "Invalid name."),
                   IAM: (400, "ValidationError", "1 validation error detected"), RDS: (400, "InvalidParameterValue", "Bad value"),
                   EC2: (400, "InvalidParameterValue", "Bad value"), ROUTE53: (400, "InvalidInput", "Invalid request")},
}
TRANSIENT = {"throttled": True, "too many requests": True, "server error": True, "auth": False, "validation": False}


def _script(case: str, protocol: str) -> Script:
    status, code, message = ANSWERS[case][protocol]
    return _json(status, code, message) if protocol == "json" else _xml(status, code, message, protocol)


# ---------------------------------------------------------------------------------------------- every AWS-calling block


def _s3_bucket(credentials, name: str = "dr-bucket"):
    from prefect_aws.s3 import S3Bucket

    return S3Bucket(bucket_name=name, credentials=credentials)


def _object_store(c):
    return ObjectStore(bucket_name="dr-bucket", credentials=c, environment="sandbox").list_objects("docs/")


def _model_registry(c):
    return ModelRegistry(bucket=_s3_bucket(c), environment="sandbox").list_versions("ranker")


def _qdrant_backups(c):
    return QdrantCluster(url="http://127.0.0.1:6333", backup_bucket=_s3_bucket(c)).stored_backups("leads", "export")


def _evidence_vault(c):
    manifest = EvidenceManifest("dr-evidence", "evidence/x", "evidence/x/manifest.json", "v1", "0" * 64,
                                datetime.now(timezone.utc).isoformat(), "COMPLIANCE")
    return EvidenceVault(bucket="dr-evidence", credentials=c).read_manifest(manifest)


def _backup_sources(c):
    source = ObjectPrefixSource(kind="objects", bucket="dr-backups", prefix="nightly/")
    return BackupSources(object_prefixes=[source], aws_credentials=c).check_object_prefix(source)


def _secrets(c):
    return SecretsManagerStore(credentials=c).tags("prod/db/app")


def _iam(c):
    return IamPrincipals(credentials=c).create_access_key("ci-deployer")


def _ec2(c):
    return QuarantineSecurityGroup(credentials=c).group_rules("sg-0123456789abcdef0")


def _dns(c):
    zone = DnsZone(credentials=c, hosted_zone_id="Z123", records=[DnsRecord(name="api.example.com")],
                   primary_target="a.example.com", secondary_target="b.example.com")
    return zone.change_status("C123")


def _rds(c):
    return RdsDatabase(credentials=c, instance_identifier="orders", replica_identifier="orders-dr").describe("orders")


# block -> (verb, protocol, its definite error class, its transient error class)
BLOCKS = {
    "ObjectStore": (_object_store, S3, ObjectStoreError, ObjectStoreUnavailable),
    "ModelRegistry": (_model_registry, S3, ModelRegistryError, ModelRegistryUnavailable),
    "QdrantCluster": (_qdrant_backups, S3, QdrantError, QdrantUnavailable),
    "EvidenceVault": (_evidence_vault, S3, AwsError, AwsUnavailable),
    "BackupSources": (_backup_sources, S3, ObjectStoreError, ObjectStoreUnavailable),
    "SecretsManagerStore": (_secrets, "json", AwsError, AwsUnavailable),
    "IamPrincipals": (_iam, IAM, AwsError, AwsUnavailable),
    "QuarantineSecurityGroup": (_ec2, EC2, AwsError, AwsUnavailable),
    "DnsZone": (_dns, ROUTE53, DnsError, DnsUnavailable),
    "RdsDatabase": (_rds, RDS, RdsError, RdsUnavailable),
}


def _raised(verb, credentials) -> RecoveryError:
    with pytest.raises(RecoveryError) as info:
        verb(credentials)
    return info.value


@pytest.mark.parametrize("case", list(ANSWERS))
@pytest.mark.parametrize("block", list(BLOCKS))
def test_each_block_raises_its_own_error_transient_by_the_one_rule(fake_aws, block, case):
    verb, protocol, error, unavailable = BLOCKS[block]
    status, code, message = ANSWERS[case][protocol]
    fake_aws.answer(_script(case, protocol))
    raised = _raised(verb, _credentials(fake_aws.url))
    expected = unavailable if TRANSIENT[case] else error
    assert type(raised) is expected, f"{block} {case}: {type(raised).__name__}: {raised}"
    assert raised.transient is TRANSIENT[case]
    assert isinstance(raised.__cause__, ClientError)
    text = str(raised)
    assert code in text and message in text and f"HTTP {status}" in text, text
    assert SECRET_KEY not in text and SECRET_KEY not in repr(raised)
    assert fake_aws.hits == 1  # one attempt: the client retried nothing itself


@pytest.mark.parametrize("case", ["too many requests", "auth", "validation"])
def test_the_minio_client_of_the_object_store_follows_the_same_rule(fake_aws, case):
    fake_aws.answer(_script(case, S3))
    store = ObjectStore(bucket_name="dr-bucket", credentials=_credentials(fake_aws.url), client="minio",
                        environment="sandbox")
    raised = _raised(lambda c: store.list_objects("docs/"), None)
    assert type(raised) is (ObjectStoreUnavailable if TRANSIENT[case] else ObjectStoreError)
    assert raised.transient is TRANSIENT[case] and ANSWERS[case][S3][1] in str(raised)
    assert SECRET_KEY not in str(raised)


@pytest.mark.parametrize("block", ["ObjectStore", "SecretsManagerStore", "DnsZone", "IamPrincipals"])
def test_a_dropped_connection_is_transient(fake_aws, block):
    verb, _protocol, _error, unavailable = BLOCKS[block]
    fake_aws.answer(Script(action="close"))
    raised = _raised(verb, _credentials(fake_aws.url))
    assert type(raised) is unavailable and raised.transient
    assert isinstance(raised.__cause__, BotoCoreError)
    assert "connection lost" in str(raised)


@pytest.mark.parametrize("block", ["ModelRegistry", "RdsDatabase"])
def test_a_read_timeout_is_transient(fake_aws, block):
    verb, _protocol, _error, unavailable = BLOCKS[block]
    fake_aws.answer(Script(action="hang"))
    started = time.monotonic()
    raised = _raised(verb, _credentials(fake_aws.url, read_timeout=0.5))
    assert time.monotonic() - started < 5
    assert type(raised) is unavailable and raised.transient
    assert "timed out" in str(raised) and "ReadTimeoutError" in str(raised)


@pytest.mark.parametrize("block", ["QdrantCluster", "QuarantineSecurityGroup", "BackupSources"])
def test_an_endpoint_that_refuses_connections_is_transient(block):
    verb, _protocol, _error, unavailable = BLOCKS[block]
    raised = _raised(verb, _credentials(f"http://127.0.0.1:{free_port()}"))
    assert type(raised) is unavailable and raised.transient
    assert "EndpointConnectionError" in str(raised)


def test_missing_credentials_are_definite(fake_aws, monkeypatch):
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    credentials = AwsCredentials(region_name="us-east-1", aws_client_parameters=AwsClientParameters(
        endpoint_url=fake_aws.url, config={"retries": {"total_max_attempts": 1}}))
    fake_aws.answer(Script())
    raised = _raised(_secrets, credentials)
    assert type(raised) is AwsError and not raised.transient
    assert "NoCredentialsError" in str(raised) and fake_aws.hits == 0


# ---------------------------------------------------------------------------------------------- against moto


def test_botocore_parameter_validation_is_definite(aws):
    raised = _raised(lambda c: IamPrincipals(credentials=c).access_keys(""), aws)
    assert type(raised) is AwsError and not raised.transient
    assert "ParamValidationError" in str(raised) and "listing access keys of ''" in str(raised)


def test_an_invalid_request_refused_by_the_service_is_definite(aws):
    raised = _raised(lambda c: EvidenceVault(bucket="b1", credentials=c).ensure_bucket(), aws)
    assert type(raised) is AwsError and not raised.transient
    assert "InvalidBucketName" in str(raised) and "HTTP 400" in str(raised)


def test_not_found_is_definite(aws):
    raised = _raised(lambda c: SecretsManagerStore(credentials=c).tags("prod/db/missing"), aws)
    assert type(raised) is AwsError and not raised.transient
    assert "ResourceNotFoundException" in str(raised) and "not found" in str(raised)


# ---------------------------------------------------------------------------------------------- clients and retries


def test_clients_share_one_retry_config_that_the_credentials_can_override(fake_aws):
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    plain = AwsCredentials(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name="eu-west-1",
                           aws_client_parameters=AwsClientParameters(endpoint_url=fake_aws.url))
    built = client(plain, "s3", max_pool_connections=7)
    assert built.meta.config.retries == CLIENT_CONFIG.retries == {"mode": "standard", "total_max_attempts": 3}
    assert built.meta.config.max_pool_connections == 7 and built.meta.config.connect_timeout == 10
    assert built.meta.region_name == "eu-west-1"
    assert client(plain, "rds", region_name="us-west-2").meta.region_name == "us-west-2"
    assert client(plain, "s3", max_pool_connections=7) is built
    assert client(_credentials(fake_aws.url), "s3").meta.config.retries == {"mode": "standard", "total_max_attempts": 1}


def test_the_shared_config_retries_a_throttled_call_inside_the_client(fake_aws):
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    credentials = AwsCredentials(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                                 aws_client_parameters=AwsClientParameters(endpoint_url=fake_aws.url))
    fake_aws.answer(_script("auth", "json"))
    assert type(_raised(_secrets, credentials)) is AwsError and fake_aws.hits == 1
    fake_aws.answer(_script("throttled", "json"))
    assert type(_raised(_secrets, credentials)) is AwsUnavailable and fake_aws.hits == 3


def test_a_waiter_that_gives_up_is_transient_and_a_failed_one_is_definite():
    from botocore.exceptions import WaiterError

    assert classify(WaiterError("DBInstanceAvailable", "Max attempts exceeded", {})).transient
    assert not classify(WaiterError("DBInstanceAvailable", "Waiter encountered a terminal failure state", {})).transient
    throttled = {"Error": {"Code": "Throttling", "Message": "Rate exceeded"}, "ResponseMetadata": {"HTTPStatusCode": 400}}
    assert classify(WaiterError("DBInstanceAvailable", "An error occurred (Throttling)", throttled)).transient


def test_the_task_retry_policy_retries_throttling_and_not_an_auth_refusal(fake_aws, prefect_api):
    from prefect import flow

    from tasks.object_store import list_bucket

    store = ObjectStore(bucket_name="dr-bucket", credentials=_credentials(fake_aws.url), environment="sandbox")
    quick = list_bucket.with_options(retry_delay_seconds=0, retry_jitter_factor=None)
    assert quick.retries == 3
    hits = {}

    @flow(name="aws-error-retries")
    def list_under_failures():
        for case in ("throttled", "auth"):
            fake_aws.answer(_script(case, S3))
            state = quick(store, "docs/", return_state=True)
            hits[case] = (fake_aws.hits, state)
        return True

    list_under_failures()
    throttled_hits, throttled = hits["throttled"]
    auth_hits, refused = hits["auth"]
    assert throttled.is_failed() and throttled_hits == 4  # the first attempt and 3 retries
    assert auth_hits == 1 and refused.is_failed()  # no retry
    with pytest.raises(ObjectStoreUnavailable):
        throttled.result()
    with pytest.raises(ObjectStoreError) as info:
        refused.result()
    assert not info.value.transient
