"""AWS APIs for tests: moto's server over HTTP on loopback, reset before every test that uses it."""

from __future__ import annotations

import httpx
import pytest

from sandbox.paths import free_port


@pytest.fixture(scope="session")
def moto_endpoint() -> str:
    """A moto server for the whole session: ``http://127.0.0.1:PORT``."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def aws(moto_endpoint, monkeypatch):
    """A clean moto account and prefect-aws ``AwsCredentials`` pointing at it."""
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    httpx.post(f"{moto_endpoint}/moto-api/reset", timeout=10).raise_for_status()
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    return AwsCredentials(
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=moto_endpoint),
    )
