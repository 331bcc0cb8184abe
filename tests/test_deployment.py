"""Flower's deployment engine on this machine: a SuperLink and three SuperNodes on 127.0.0.1,
each with its own node config (architecture), running this app with ``flwr run``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from harness import BIN, Processes, free_port, needs_real_data, wait_for_port
from simulations.data import default_data_dir

# needs_real_data: the text client reads the vocabulary
pytestmark = [pytest.mark.slow, pytest.mark.deployment, needs_real_data]

ROOT = Path(__file__).resolve().parent.parent


def run_federation(tmp_path: Path, tls: bool, rounds: int, auth: bool = False) -> list[dict]:
    """``rounds`` of the tiny federation on a SuperLink and three SuperNodes; with ``auth``
    (over TLS) only SuperNodes registered with ``flwr supernode register`` may join, and a
    fourth one, unregistered, tries to."""
    home, logs, out = tmp_path / "flwr", tmp_path / "logs", tmp_path / "out"
    for d in (home, logs, out):
        d.mkdir()
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "MERGENET_DATA_DIR": str(default_data_dir()),
    }
    link_port = free_port()
    security, link_security, connection = ["--insecure"], ["--insecure"], "insecure = true"
    if tls:
        ca, cert, key = make_certificates(tmp_path / "certs")
        link_security = ["--ssl-ca-certfile", ca, "--ssl-certfile", cert, "--ssl-keyfile", key]
        security = ["--root-certificates", ca]
        connection = f'root-certificates = "{ca}"'
    (home / "config.toml").write_text(
        f'[superlink.edge]\naddress = "127.0.0.1:{link_port}"\n{connection}\n'
    )
    procs = Processes(logs, env)
    try:
        link = procs.start(
            "superlink",
            "flower-superlink",
            *link_security,
            *(["--enable-supernode-auth"] if auth else []),
            "--host",
            "127.0.0.1",
            "--port",
            str(link_port),
        )
        wait_for_port(link_port, link)
        keys = [node_key(tmp_path / "keys", f"edge-{pid}") for pid in range(4)] if auth else []
        for _, public in keys[:3]:  # the fourth stays unregistered
            register = [str(BIN / "flwr"), "supernode", "register", public, "edge"]
            done = subprocess.run(register, env=env, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stdout + done.stderr
        for pid in range(4 if auth else 3):
            node_config = f"partition-id={pid % 3} num-partitions=3 client-id='edge-{pid}'"
            procs.start(
                f"supernode{pid}",
                "flower-supernode",
                *security,
                *(["--auth-supernode-private-key", keys[pid][0]] if auth else []),
                "--superlink",
                f"127.0.0.1:{link_port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port()),
                "--node-config",
                node_config,
            )
        overrides = f"federation=tiny num_rounds={rounds}"
        run = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                ".",
                "edge",
                "--stream",
                "--run-config",
                f"overrides='{overrides}' output-dir='{out}'",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + procs.tail()
        if auth:  # the unregistered SuperNode was refused and gave up
            intruder = procs.procs[-1]
            assert intruder.poll() not in (None, 0), procs.tail()
            assert "Failed to activate SuperNode" in (logs / "supernode3.log").read_text()
        runs = list(out.iterdir())
        assert len(runs) == 1, run.stdout[-3000:] + procs.tail()
        return [json.loads(x) for x in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    finally:
        procs.stop()
        assert all(p.poll() is not None for p in procs.procs)


def node_key(folder: Path, name: str) -> tuple[str, str]:
    """A SuperNode's EC key pair, as Flower's authentication example makes them: the private
    key in OpenSSH PEM, the public one in OpenSSH's one-line form. Returns their paths."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return str(private), str(public)


def make_certificates(folder: Path) -> tuple[str, str, str]:
    """A CA and a certificate for 127.0.0.1 signed by it, made here (nothing downloaded)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir()
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mergenet-fl test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca.crt": ca, "server.pem": cert}
    for name, c in paths.items():
        (folder / name).write_bytes(c.public_bytes(serialization.Encoding.PEM))
    (folder / "server.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(folder / "ca.crt"), str(folder / "server.pem"), str(folder / "server.key")


def check_clients(lines: list[dict], rounds: int) -> None:
    assert not [x for x in lines if "dropped" in x]
    for rnd in range(1, rounds + 1):
        for stage in ("train", "evaluate"):
            rows = {
                x["client"]: x
                for x in lines
                if x.get("round") == rnd and x.get("stage") == stage and "client" in x
            }
            assert sorted(rows) == ["edge-0", "edge-1", "edge-2"]
            assert sorted(x["group"] for x in rows.values()) == [
                "bert-text",
                "mbv2-images",
                "resnet8-images",
            ]
    evaluated = [x for x in lines if x.get("stage") == "evaluate" and "accuracy" in x]
    assert all(0.0 <= x["accuracy"] <= 1.0 for x in evaluated)


def test_superlink_and_three_supernodes(tmp_path):
    lines = run_federation(tmp_path, tls=False, rounds=2)
    check_clients(lines, rounds=2)
    server = [x["server"] for x in lines if "server" in x and x["stage"] == "train"]
    assert server[-1]["pieces"] == 3.0  # round 2 was a transfer round across the three devices


def test_superlink_and_supernodes_over_tls(tmp_path):
    check_clients(run_federation(tmp_path, tls=True, rounds=1), rounds=1)


def test_only_registered_supernodes_join_a_superlink_with_supernode_auth(tmp_path):
    lines = run_federation(tmp_path, tls=True, rounds=1, auth=True)
    check_clients(lines, rounds=1)  # edge-0..2 only: edge-3 never joined
