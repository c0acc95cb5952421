"""The bridge's broker credentials and TLS (bridge.yaml `username`, `password`, `tls`) against a
real mosquitto that requires them: a password file (mosquitto_passwd), anonymous clients refused,
a TLS listener and a mutual-TLS listener, with a CA and certificates made for this run.

With the right settings the bridge gets in and answers, on each listener; with a wrong password,
an untrusted CA or no client certificate it does not get in, keeps running, retries with backoff
and names the cause in one log line, not one per attempt."""

from __future__ import annotations

import datetime
import ipaddress
import os
import pwd
import queue
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.conftest import ROOT, RunningGateway, free_port
from tests.mqtt_helpers import (
    Broker,
    spawn_bridge,
    start_bridge,
    start_broker_with,
    status,
    stop_process,
    wait_port,
)

USER, PASSWORD = "bridge", "s3cret pass:word"  # a space and a colon: passed through as they are


# -- certificates --------------------------------------------------------------------------------


@dataclass
class Issuer:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _builder(subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def make_ca(common: str) -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(common, _name(common), key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return Issuer(key, cert)


def issue(ca: Issuer, common: str, server: bool) -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _builder(common, ca.cert.subject, key).add_extension(
        x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
        ),
        critical=False,
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return Issuer(key, builder.sign(ca.key, hashes.SHA256()))


def write_pem(folder: Path, name: str, item: Issuer) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    cert.write_bytes(item.cert.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        item.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key.chmod(0o600)
    return cert, key


# -- the broker ----------------------------------------------------------------------------------


@dataclass
class SecureBroker:
    broker: Broker  # .port: plain TCP, password required
    tls_port: int  # TLS (server certificate), password required
    mtls_port: int  # TLS with a client certificate required, password required
    ca: Path  # the CA that signed the broker's and the bridge's certificates
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here
    log: Path


def give_to_mosquitto(*paths: Path) -> None:
    """mosquitto drops privileges to its user when started as root: it must read these."""
    if os.geteuid() != 0:
        return
    try:
        pwd.getpwnam("mosquitto")
    except KeyError:
        return
    for path in paths:
        shutil.chown(path, user="mosquitto")


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    folder = tmp_path_factory.mktemp("secure-broker")
    # what mosquitto reads after dropping privileges: out of pytest's folders (0700, root's)
    secrets = Path(tempfile.mkdtemp(prefix="openfx-mqtt-secrets-"))
    ca = make_ca("openfx test CA")
    ca_pem = secrets / "ca.pem"
    ca_pem.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    server_cert, server_key = write_pem(secrets, "server", issue(ca, "127.0.0.1", server=True))
    client_cert, client_key = write_pem(folder, "bridge-client", issue(ca, "openfx-bridge", server=False))
    other_ca = folder / "other-ca.pem"
    other_ca.write_bytes(make_ca("someone else's CA").cert.public_bytes(serialization.Encoding.PEM))
    passwd = secrets / "passwd"
    passwd.touch(mode=0o600)
    subprocess.run(
        [shutil.which("mosquitto_passwd") or "mosquitto_passwd", "-b", str(passwd), USER, PASSWORD],
        check=True,
    )
    give_to_mosquitto(secrets, ca_pem, server_cert, server_key, passwd)
    tls_port, mtls_port = free_port(), free_port()
    tls = f"cafile {ca_pem}\ncertfile {server_cert}\nkeyfile {server_key}"
    extra = (
        f"allow_anonymous false\npassword_file {passwd}\n"
        f"listener {tls_port} 127.0.0.1\n{tls}\n"
        f"listener {mtls_port} 127.0.0.1\n{tls}\nrequire_certificate true\n"
        "log_type notice\n"
    )
    log = folder / "mosquitto.log"
    try:
        broker = start_broker_with(folder, extra, log)
    except Exception:
        shutil.rmtree(secrets, ignore_errors=True)
        raise AssertionError(log.read_text()) from None
    try:
        wait_port(tls_port)
        wait_port(mtls_port)
        yield SecureBroker(broker, tls_port, mtls_port, ca_pem, client_cert, client_key, other_ca, log)
    finally:
        broker.stop()
        shutil.rmtree(secrets, ignore_errors=True)


def bridge_config(tmp: Path, name: str, **settings: object) -> Path:
    """broker/bridge.yaml plus `settings` (the bridge takes the last -c it is given)."""
    data = yaml.safe_load((ROOT / "broker/bridge.yaml").read_text())
    data.update(settings)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# -- a device with credentials -------------------------------------------------------------------


class AuthedDevice:
    def __init__(self, port: int, username: str | None, password: str | None) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.connack: queue.Queue[mqtt.ReasonCode] = queue.Queue()
        self.client.on_connect = lambda c, u, f, reason, p: self.connack.put(reason)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.reason = self.connack.get(timeout=10)

    def call(self, topic: str, payload: bytes, reply_to: str) -> mqtt.MQTTMessage:
        subscribed: queue.Queue[bool] = queue.Queue()
        self.client.on_subscribe = lambda *a: subscribed.put(True)
        self.client.subscribe(reply_to, qos=1)
        subscribed.get(timeout=10)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_to
        props.CorrelationData = b"auth-1"
        self.client.publish(topic, payload, qos=1, properties=props).wait_for_publish(10)
        return self.messages.get(timeout=20)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def round_trip(secure: SecureBroker, payload: bytes) -> None:
    device = AuthedDevice(secure.broker.port, USER, PASSWORD)
    try:
        reply = device.call("fn/echo", payload, f"replies/{payload.decode()}")
        assert reply.payload == payload and status(reply) == "OK"
        assert reply.properties.CorrelationData == b"auth-1"
    finally:
        device.close()


# -- tests ---------------------------------------------------------------------------------------


def test_the_broker_refuses_anonymous_and_wrong_passwords(secure: SecureBroker) -> None:
    """The broker really is configured for them (else the tests below would prove nothing)."""
    for username, password in [(None, None), (USER, "wrong")]:
        device = AuthedDevice(secure.broker.port, username, password)
        try:
            assert device.reason.is_failure and device.reason.value in (0x86, 0x87), str(device.reason)
        finally:
            device.close()


@pytest.mark.parametrize("listener", ["plain", "tls", "mtls"])
def test_bridge_gets_in_with_the_right_credentials(
    secure: SecureBroker, gateway: RunningGateway, tmp_path: Path, listener: str
) -> None:
    settings: dict[str, object] = {"username": USER, "password": PASSWORD}
    port = secure.broker.port
    if listener == "tls":
        port, settings["tls"] = secure.tls_port, {"ca_certs": str(secure.ca)}
    elif listener == "mtls":
        port = secure.mtls_port
        settings["tls"] = {
            "ca_certs": str(secure.ca),
            "certfile": str(secure.client_cert),
            "keyfile": str(secure.client_key),
        }
    config = bridge_config(tmp_path, listener, **settings)
    log = tmp_path / "bridge.log"
    proc = start_bridge(
        port, (gateway.grpc_address, gateway.http_url), log, "-c", str(config), client_id=f"auth-{listener}"
    )
    try:
        round_trip(secure, listener.encode())  # the device on the plain listener, the bridge on `listener`
    finally:
        assert stop_process(proc) == 0, log.read_text()


# how each way of being kept out looks: the bridge's settings, what the broker logs for each
# refused attempt, and what the bridge's own log should name
KEPT_OUT = {
    "wrong-password": (
        "plain",
        {"password": "not the password"},
        ("disconnected, not authorised",),
        "Not authorized",
    ),
    "untrusted-ca": (
        "tls",
        {"tls": "other_ca"},
        ("OpenSSL Error", "alert unknown ca"),
        "CERTIFICATE_VERIFY_FAILED",
    ),
    "no-client-certificate": (
        "mtls",
        {"tls": "ca"},
        ("OpenSSL Error", "peer did not return a certificate"),
        "certificate required",
    ),
}


def spawn_kept_out(
    secure: SecureBroker, gateway: RunningGateway, tmp: Path, case: str
) -> tuple[subprocess.Popen[bytes], Path]:
    listener, changes, _, _ = KEPT_OUT[case]
    settings: dict[str, object] = {"username": USER, "password": PASSWORD, **changes}
    if "tls" in settings:
        settings["tls"] = {"ca_certs": str(getattr(secure, str(settings["tls"])))}
    port = {"plain": secure.broker.port, "tls": secure.tls_port, "mtls": secure.mtls_port}[listener]
    log = tmp / "bridge.log"
    proc = spawn_bridge(
        port,
        (gateway.grpc_address, gateway.http_url),
        log,
        "-c",
        str(bridge_config(tmp, case, **settings)),
        client_id=f"kept-out-{case}",
    )
    return proc, log


def wait_refusals(
    secure: SecureBroker, since: int, marker: tuple[str, ...], count: int, timeout: float = 20
) -> int:
    """Wait until the broker has refused `count` attempts: lines of its log (from offset `since`)
    with every part of `marker` (mosquitto logs one such line per refused connection)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = secure.log.read_text(errors="replace")[since:].splitlines()
        seen = sum(all(part in line for part in marker) for line in lines)
        if seen >= count:
            return seen
        assert time.monotonic() < deadline, f"the broker refused {seen} attempt(s) ({marker}), not {count}"
        time.sleep(0.02)


@pytest.mark.parametrize("case", list(KEPT_OUT))
def test_bridge_kept_out_does_not_crash(
    secure: SecureBroker, gateway: RunningGateway, tmp_path: Path, case: str
) -> None:
    """Refused by the broker (it says so in its log), the bridge never gets to subscribe, keeps
    running, never writes the password anywhere, and stops cleanly on SIGTERM."""
    since = len(secure.log.read_text(errors="replace"))
    proc, log = spawn_kept_out(secure, gateway, tmp_path, case)
    try:
        wait_refusals(secure, since, KEPT_OUT[case][2], 1)
        assert proc.poll() is None, log.read_text()
        assert "; ready" not in log.read_text() and PASSWORD not in log.read_text()
    finally:
        assert stop_process(proc) == 0, log.read_text()[-3000:]


@pytest.mark.parametrize("case", list(KEPT_OUT))
def test_bridge_kept_out_retries_and_says_why_once(
    secure: SecureBroker, gateway: RunningGateway, tmp_path: Path, case: str
) -> None:
    """What an operator needs: the bridge keeps retrying (a fixed password file or certificate lets
    it in without a restart), and its log names the cause in one line, not one per attempt."""
    since = len(secure.log.read_text(errors="replace"))
    proc, log = spawn_kept_out(secure, gateway, tmp_path, case)
    try:
        attempts = wait_refusals(secure, since, KEPT_OUT[case][2], 3, timeout=10)
        says = KEPT_OUT[case][3]
        naming = [line for line in log.read_text().splitlines() if says in line]
        assert naming, f"nothing in the bridge's log names {says!r}:\n{log.read_text()[-2000:]}"
        assert len(naming) < attempts, f"{len(naming)} lines for {attempts} attempts: {naming[:3]}"
        assert proc.poll() is None
    finally:
        assert stop_process(proc) == 0, log.read_text()[-3000:]
