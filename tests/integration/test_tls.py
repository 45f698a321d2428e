"""TLS (``rediss://``) end to end: a TLS-only redis-server with certificates made here (CA,
server certificate for 127.0.0.1, client certificate for mutual TLS), a real worker and the
SDK over it; untrusted, plain-text and certificate-less clients refused.

Skipped, with the reason, when the local redis-server was built without TLS.
"""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from headrace.client import Client
from headrace.cluster.ops.embedded_redis import find_redis_server, free_port
from headrace.workers.backends.fake import affine_reference, make_fake
from headrace.workers.engine.thread import WorkerThread
from headrace.workers.settings import WorkerSettings


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, issuer_key: ec.EllipticCurvePrivateKey, *,
          ca: bool = False, server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False, decipher_only=False),
                            critical=True)
    elif server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate | None = None, key: ec.EllipticCurvePrivateKey | None = None) -> Path:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        assert key is not None
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)
    return path


@dataclass(frozen=True)
class TlsRedis:
    port: int
    ca: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that did not sign the server certificate

    def url(self, *, ca: Path | None = None, client_cert: bool = True, host: str = "127.0.0.1") -> str:
        q = f"ssl_ca_certs={quote(str(ca or self.ca))}"
        if client_cert:
            q += f"&ssl_certfile={quote(str(self.client_cert))}&ssl_keyfile={quote(str(self.client_key))}"
        return f"rediss://{host}:{self.port}/0?{q}"


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    ca_key, other_key, srv_key, cli_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    ca = _write(tmp_path / "ca.crt", _cert("headrace test CA", ca_key, "headrace test CA", ca_key, ca=True))
    other = _write(tmp_path / "other-ca.crt", _cert("other CA", other_key, "other CA", other_key, ca=True))
    srv_crt = _write(tmp_path / "server.crt", _cert("127.0.0.1", srv_key, "headrace test CA", ca_key, server=True))
    srv_k = _write(tmp_path / "server.key", key=srv_key)
    cli_crt = _write(tmp_path / "client.crt", _cert("headrace worker", cli_key, "headrace test CA", ca_key))
    cli_k = _write(tmp_path / "client.key", key=cli_key)
    port = free_port()
    args = [find_redis_server(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(tmp_path), "--tls-cert-file", str(srv_crt), "--tls-key-file",
            str(srv_k), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "yes"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    server = TlsRedis(port, ca, cli_crt, cli_k, other)
    try:
        give_up = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                if "tls" in out.lower() and ("not supported" in out.lower() or "bad directive" in out.lower()):
                    pytest.skip(f"this redis-server has no TLS support: {out.strip()[-200:]}")
                raise AssertionError(f"TLS redis-server exited {proc.returncode}: {out[-500:]}")
            try:
                if redis.Redis.from_url(server.url(), socket_connect_timeout=0.5).ping():
                    break
            except redis.RedisError:
                if time.monotonic() > give_up:
                    raise
                time.sleep(0.05)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.timeout(60)
def test_worker_and_sdk_over_mutual_tls(tls_redis: TlsRedis) -> None:
    url = tls_redis.url()
    s = WorkerSettings(model="affine", redis_url=url, consumer="tls-worker", block_ms=100, max_wait_ms=2,
                       lease_s=2.0, drain_timeout_s=5, trim_interval_s=0.5)
    wt = WorkerThread(s, make_fake("affine")).start()
    try:
        with Client(url, client_id="tls-client") as c:
            xs = [np.full(4, float(i), np.float32) for i in range(50)]
            results = c.map("affine", [{"x": x} for x in xs], progress=False, timeout_s=20)
        for res, x in zip(results, xs, strict=True):
            assert res.ok and res.timings.worker == "tls-worker"
            np.testing.assert_array_equal(res.outputs["y"], affine_reference(x))
        assert wt.healthy()
    finally:
        wt.stop()
    # The connection really was TLS: the server has no plain-text port at all.
    cfg = redis.Redis.from_url(url, decode_responses=True).config_get("*port")
    assert cfg["port"] == "0" and cfg["tls-port"] == str(tls_redis.port)


@pytest.mark.timeout(30)
def test_tls_refuses_untrusted_plaintext_and_certificate_less_clients(tls_redis: TlsRedis) -> None:
    attempts = {
        "server cert not signed by the client's CA": tls_redis.url(ca=tls_redis.other_ca),
        "hostname not in the server certificate": tls_redis.url(host="localhost"),
        "no client certificate (mutual TLS)": tls_redis.url(client_cert=False),
        "plain text to the TLS port": f"redis://127.0.0.1:{tls_redis.port}/0",
    }
    for why, url in attempts.items():
        r = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        with pytest.raises(redis.exceptions.ConnectionError):
            r.ping()
            pytest.fail(f"connected although: {why}")
        r.close()
    assert redis.Redis.from_url(tls_redis.url()).ping()
