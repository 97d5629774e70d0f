"""TLS, mutual TLS and bearer tokens, each with a right and a wrong credential; switches for
reflection, ListModels' path and the metrics bind address (issue 9, item 9).

Certificates are made in the test: a CA, a server certificate for 127.0.0.1/localhost and a
client certificate signed by it, plus a rogue CA and client that nobody trusts.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from bitserve.errors import ConfigError
from bitserve.settings import build_settings
from bitserve_client import Client, UnauthenticatedError, UnavailableError
from bitserve_client.security import channel

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

TOKEN = "s3cret-token-for-tests-0123456789"
OTHER_TOKEN = "second-token-from-env"


def _name(cn: str):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject, key, issuer, issuer_key, *, ca=False, server=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem_cert(c) -> bytes:
    return c.public_bytes(serialization.Encoding.PEM)


def _pem_key(k) -> bytes:
    return k.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    out = {}
    for ca_name in ("ca", "rogue"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _cert(f"test {ca_name} CA", ca_key, f"test {ca_name} CA", ca_key, ca=True)
        client_key = ec.generate_private_key(ec.SECP256R1())
        client = _cert(f"{ca_name} client", client_key, f"test {ca_name} CA", ca_key)
        out[f"{ca_name}_ca"] = _pem_cert(ca)
        out[f"{ca_name}_client_cert"] = _pem_cert(client)
        out[f"{ca_name}_client_key"] = _pem_key(client_key)
        if ca_name == "ca":
            server_key = ec.generate_private_key(ec.SECP256R1())
            server = _cert("bitserve test server", server_key, "test ca CA", ca_key, server=True)
            out["server_cert"], out["server_key"] = _pem_cert(server), _pem_key(server_key)
    for k, v in out.items():
        (d / f"{k}.pem").write_bytes(v)
    out["dir"] = d
    return out


def model(tiny_models):
    return [{"name": "sent", "task": "sentiment", "path": str(tiny_models["sentiment"])}]


def test_tls_right_and_wrong_roots(server_factory, tiny_models, pki):
    d = pki["dir"]
    srv = server_factory(
        model(tiny_models), tls_cert_file=str(d / "server_cert.pem"), tls_key_file=str(d / "server_key.pem")
    )
    with Client(srv.target, root_certificates=pki["ca_ca"], timeout=30) as c:
        assert c.sentiment("good").label in {"positive", "negative"}
    with Client(srv.target, root_certificates=d / "ca_ca.pem", timeout=30) as c:  # a path works too
        assert c.list_models()[0].name == "sent"
    with Client(srv.target, root_certificates=pki["rogue_ca"], timeout=5) as c:
        with pytest.raises(UnavailableError):
            c.sentiment("good")
    with Client(srv.target, timeout=5) as c:  # plaintext to a TLS port
        with pytest.raises(UnavailableError):
            c.sentiment("good")
    # The container probe speaks TLS too.
    from bitserve.cli import main

    assert main(["health", "--target", srv.target, "--root-certs", str(d / "ca_ca.pem")]) == 0
    assert (
        main(["health", "--target", srv.target, "--root-certs", str(d / "rogue_ca.pem"), "--timeout", "3"])
        == 1
    )


def test_mutual_tls_right_and_wrong_client_certificates(server_factory, tiny_models, pki):
    d = pki["dir"]
    srv = server_factory(
        model(tiny_models),
        tls_cert_file=str(d / "server_cert.pem"),
        tls_key_file=str(d / "server_key.pem"),
        tls_client_ca_file=str(d / "ca_ca.pem"),
    )
    right = {"private_key": pki["ca_client_key"], "certificate_chain": pki["ca_client_cert"]}
    with Client(srv.target, root_certificates=pki["ca_ca"], timeout=30, **right) as c:
        assert c.sentiment("good").label in {"positive", "negative"}
    wrong = {"private_key": pki["rogue_client_key"], "certificate_chain": pki["rogue_client_cert"]}
    for creds in (wrong, {}):  # a certificate from an untrusted CA, and none at all
        with Client(srv.target, root_certificates=pki["ca_ca"], timeout=5, **creds) as c:
            with pytest.raises(UnavailableError):
                c.sentiment("good")


@pytest.fixture(scope="module")
def token_srv(server_factory, tiny_models, tmp_path_factory):
    import os

    f = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    f.write_text(f"# one token per line\n{TOKEN}\n")
    os.environ["BITSERVE_TEST_TOKENS"] = f"{OTHER_TOKEN}, "
    try:
        return server_factory(
            model(tiny_models), auth_tokens_file=str(f), auth_tokens_env="BITSERVE_TEST_TOKENS"
        )
    finally:
        del os.environ["BITSERVE_TEST_TOKENS"]


def test_token_right_and_wrong(token_srv, caplog):
    caplog.set_level(logging.DEBUG)
    for token in (TOKEN, OTHER_TOKEN):  # from the file, and from the environment variable
        with Client(token_srv.target, token=token, timeout=30) as c:
            assert c.sentiment("good").label in {"positive", "negative"}
            assert c.list_models()[0].name == "sent"
    cases = [
        (TOKEN + "x", "invalid bearer token"),
        (TOKEN[:-1], "invalid bearer token"),
        (None, "missing credentials: send metadata 'authorization: Bearer <token>'"),
    ]
    for token, message in cases:
        with Client(token_srv.target, token=token, timeout=30) as c:
            with pytest.raises(UnauthenticatedError) as err:
                c.sentiment("good")
            assert err.value.message == message
            with pytest.raises(UnauthenticatedError):
                list(c.generate_stream("hi"))
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert TOKEN not in logged and OTHER_TOKEN not in logged


def test_token_with_a_wrong_scheme_is_refused(token_srv):
    with grpc.insecure_channel(token_srv.target) as ch:
        call = ch.unary_unary("/bitserve.v1.Inference/ListModels")
        with pytest.raises(grpc.RpcError) as err:
            call(b"", metadata=[("authorization", f"Basic {TOKEN}")], timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert TOKEN not in err.value.details()


def test_health_is_open_to_probes_by_default_and_closable(token_srv, server_factory, tiny_models, tmp_path):
    def check(target, token=None):
        with channel(target, [], token=token) as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status

    assert check(token_srv.target) == health_pb2.HealthCheckResponse.SERVING
    f = tmp_path / "t"
    f.write_text(TOKEN)
    closed = server_factory(model(tiny_models), auth_tokens_file=str(f), auth_health=True)
    with pytest.raises(grpc.RpcError) as err:
        check(closed.target)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert check(closed.target, TOKEN) == health_pb2.HealthCheckResponse.SERVING


def test_reflection_and_model_paths_can_be_switched_off(server_factory, tiny_models):
    srv = server_factory(model(tiny_models), reflection=False, expose_model_paths=False)
    with Client(srv.target, timeout=30) as c:
        assert c.list_models()[0].path == ""
    with grpc.insecure_channel(srv.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_paths_are_listed_by_default(server_factory, tiny_models):
    srv = server_factory(model(tiny_models))
    with Client(srv.target, timeout=30) as c:
        assert c.list_models()[0].path == str(tiny_models["sentiment"])


def test_metrics_get_their_own_bind_address(server_factory, tiny_models):
    srv = server_factory(model(tiny_models), metrics_host="127.0.0.2")
    body = urllib.request.urlopen(f"http://127.0.0.2:{srv.metrics_port}/metrics", timeout=10).read()
    assert b"bitserve_model_loaded" in body
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=5)


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ({"tls_cert_file": "c.pem"}, "server: tls_cert_file and tls_key_file go together"),
        ({"tls_client_ca_file": "ca.pem"}, "server: tls_client_ca_file (mutual TLS) needs tls_cert_file"),
    ],
)
def test_incomplete_tls_settings_are_config_errors(server, message):
    cfg = {"server": server, "models": [{"name": "a", "task": "classify", "path": "."}]}
    with pytest.raises(ConfigError) as err:
        build_settings(config_data=cfg, environ={}, check_paths=False)
    assert str(err.value).startswith(message)


def test_unreadable_credentials_name_the_setting(tiny_models, tmp_path):
    from tests.conftest import start_server

    with pytest.raises(ConfigError) as err:
        start_server(model(tiny_models), auth_tokens_file=str(tmp_path / "missing"))
    assert str(err.value).startswith("server.auth_tokens_file: cannot read")
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ConfigError) as err:
        start_server(model(tiny_models), auth_tokens_file=str(empty))
    assert "holds no token" in str(err.value)
