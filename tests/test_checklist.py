"""The recovery validation checklist: each check passes on a healthy system and fails, as data, on a broken one."""

from __future__ import annotations

import datetime as dt
import ssl
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from prefect.logging import disable_run_logger

from blocks import PostgresCluster, PostgresInstance
from blocks.errors import InvalidInput
from fixtures_kube import seed_deployment
from sandbox.paths import free_port
from tasks import checklist


def run(task, *args, **kwargs):
    with disable_run_logger():
        return task.fn(*args, **kwargs)


def test_pods_running_and_network_policies(kube):
    assert not run(checklist.check_pods_running, kube, {"app": "web"}).passed  # no pods at all
    seed_deployment(kube, "web", replicas=2)
    ok = run(checklist.check_pods_running, kube, {"app": "web"}, expected=2)
    assert ok.passed and ok.detail.startswith("2 of 2 Running"), ok.detail
    assert not run(checklist.check_pods_running, kube, {"app": "web"}, expected=3).passed

    missing = run(checklist.check_network_policies, kube, ["deny-all", "allow-api"])
    assert not missing.passed and missing.detail == "missing: deny-all, allow-api"
    kube.apply_deny_all("deny-all")
    kube.apply_deny_all("allow-api", pod_selector={"app": "api"})
    assert run(checklist.check_network_policies, kube, ["deny-all", "allow-api"]).passed
    with pytest.raises(InvalidInput):
        run(checklist.check_network_policies, kube, [])


def test_health_and_latency(health):
    url = health.endpoint("us-east-1", "api")
    assert run(checklist.check_health_200, url).passed
    fast = run(checklist.check_latency_baseline, url, baseline_p95_ms=2000, samples=10)
    assert fast.passed and "over 10 requests" in fast.detail
    assert not run(checklist.check_latency_baseline, url, baseline_p95_ms=0.001, samples=5).passed
    health.set_healthy("us-east-1", False)
    down = run(checklist.check_health_200, url)
    assert not down.passed and down.detail == "HTTP 503"
    assert "errors" in run(checklist.check_latency_baseline, url, baseline_p95_ms=2000, samples=3).detail
    assert not run(checklist.check_health_200, f"http://127.0.0.1:{free_port()}/health").passed
    assert checklist.p95([float(i) for i in range(1, 101)]) == 95.0


def test_objects_accessible(aws):
    from blocks.object_store import ObjectStore

    s3 = aws.get_client("s3")
    s3.create_bucket(Bucket="leads")
    store = ObjectStore(bucket_name="leads", credentials=aws)
    empty = run(checklist.check_objects_accessible, store, "docs/")
    assert not empty.passed and empty.detail == "no object found"
    s3.put_object(Bucket="leads", Key="docs/a.pdf", Body=b"%PDF-1.7")
    ok = run(checklist.check_objects_accessible, store, "docs/")
    assert ok.passed and ok.detail == "read 8 bytes of docs/a.pdf"
    missing = run(checklist.check_objects_accessible, ObjectStore(bucket_name="no-such-bucket", credentials=aws))
    assert not missing.passed and "NoSuchBucket" in missing.detail
    assert not run(checklist.check_objects_accessible, store, "docs/", which="secondary").passed  # none configured


def _answering(status: int) -> int:
    """A local HTTP server answering every request with ``status`` and a JSON body; returns its port."""
    from http.server import ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            body = b'{"status": {"error": "not here"}, "time": 0}'
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = _answer  # noqa: N815

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_port


def test_qdrant_populated_and_searchable(tmp_path):
    from qdrant_client import QdrantClient
    from qdrant_client.models import Distance, PointStruct, VectorParams

    from blocks.qdrant import QdrantCluster

    path = str(tmp_path / "qdrant")
    client = QdrantClient(path=path)
    client.create_collection("leads", vectors_config=VectorParams(size=4, distance=Distance.COSINE))
    client.create_collection("empty", vectors_config=VectorParams(size=4, distance=Distance.COSINE))
    client.upsert("leads", [PointStruct(id=i, vector=[i, 1.0, 0.5, 0.25], payload={"n": i}) for i in range(1, 6)])
    client.close()
    qdrant = QdrantCluster(path=path)
    ok = run(checklist.check_qdrant_searchable, qdrant, "leads", min_points=5)
    assert ok.passed and ok.detail == "5 points; a search for a stored vector found it", ok.detail
    assert run(checklist.check_qdrant_searchable, qdrant, "empty").detail == "0 points, expected at least 1"
    missing = run(checklist.check_qdrant_searchable, qdrant, "missing")
    assert not missing.passed and "not found" in missing.detail
    # A server that does not answer, and one that answers with an error: failed checks, not exceptions.
    down = QdrantCluster(url=f"http://127.0.0.1:{free_port()}", timeout_seconds=2)
    refused = run(checklist.check_qdrant_searchable, down, "leads")
    assert not refused.passed and "unreachable" in refused.detail, refused.detail
    broken = QdrantCluster(url=f"http://127.0.0.1:{_answering(500)}", timeout_seconds=2)
    failing = run(checklist.check_qdrant_searchable, broken, "leads")
    assert not failing.passed and "HTTP 500" in failing.detail, failing.detail


def _tls_server(tmp_path, days: int) -> int:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api.test")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=days)).sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / f"cert{days}.pem", tmp_path / f"key{days}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    port = free_port()
    server = HTTPServer(("127.0.0.1", port), BaseHTTPRequestHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.handle_request, daemon=True).start()
    return port


def test_tls_certificate_days_to_expiry(tmp_path):
    good = run(checklist.check_tls_certificate, "127.0.0.1", _tls_server(tmp_path, 90), min_days=30)
    assert good.passed and good.detail.startswith(("89 days", "90 days")), good.detail
    soon = run(checklist.check_tls_certificate, "127.0.0.1", _tls_server(tmp_path, 5), min_days=30)
    assert not soon.passed and "days to expiry (minimum 30)" in soon.detail
    assert not run(checklist.check_tls_certificate, "127.0.0.1", free_port(), timeout_seconds=1).passed


def test_database_connectivity_fails_as_data_for_an_unreachable_instance(work_root):
    dead = PostgresCluster(primary=PostgresInstance(port=free_port()), password="x", recovery_directory=str(work_root),
                           connect_timeout_seconds=1)
    result = run(checklist.check_database_connectivity, dead)
    assert not result.passed and "cannot connect" in result.detail
