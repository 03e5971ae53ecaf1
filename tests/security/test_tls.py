"""TLS for gRPC and HTTP from certificate files, and for the runner."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

import aiohttp
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc import aio

from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import config_service_pb2_grpc as cs_grpc
from conveyor.v1 import types_pb2 as pb
from tests.helpers import Api, ControlHandle, RunnerProcess


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_grpc_http_and_runner_work_over_tls(
    database_url: str, tmp_path: Path, repo: Path
) -> None:
    cert, key = self_signed(tmp_path)
    handle = ControlHandle(database_url)
    handle.plane.settings = handle.settings = handle.settings.with_(
        tls_cert=str(cert), tls_key=str(key)
    )
    await handle.start()
    try:
        assert handle.plane.http_url.startswith("https://")
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        async with aio.secure_channel(handle.plane.grpc_address, creds) as channel:
            stub = cs_grpc.ConfigServiceStub(channel)
            md = (("authorization", f"Bearer {handle.admin_token}"),)
            reply = await stub.ListProjects(cs.ListProjectsRequest(), metadata=md)
            assert list(reply.projects) == []
        async with aio.insecure_channel(handle.plane.grpc_address) as plain:
            with pytest.raises(aio.AioRpcError) as err:
                await cs_grpc.ConfigServiceStub(plain).ListProjects(
                    cs.ListProjectsRequest(), metadata=md, timeout=3
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        context = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{handle.plane.http_url}/healthz", ssl=context) as response:
                assert response.status == 200
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await session.get(f"{handle.plane.http_url}/healthz")

        runner = RunnerProcess(handle.plane.grpc_address, handle.runner_token, tmp_path / "runner")
        await runner.start(env={"CONVEYOR_TLS_CA": str(cert)})
        try:
            await handle.wait_runners(1)
            api = Api(handle.plane.grpc_address, handle.admin_token, tls_ca=cert)
            try:
                await api.create_project("tls", repo)
                build = await api.trigger("tls")
                done = await api.wait_status(build.id)
                assert done.status == pb.BUILD_STATUS_SUCCEEDED, done.status_reason
            finally:
                await api.close()
        finally:
            await runner.stop()
    finally:
        await handle.stop()
