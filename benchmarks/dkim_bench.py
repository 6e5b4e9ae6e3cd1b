"""DKIM signing throughput on one core: relayd.mime.dkim.Signer against dkimpy and bare OpenSSL.

    .venv/bin/python benchmarks/dkim_bench.py [--seconds 5] [--size 2048] [--cpu 0]

Each case signs the same message in a loop for --seconds (after a short warm-up) and reports
calls per second: one signature per call, two for the dual-signing case. "openssl rsa alone" is
the RSA private-key operation through `cryptography` with nothing around it: the ceiling for
rsa-sha256 on this CPU. Keys are
generated in a temporary directory; one signature per case is checked with dkimpy's verifier
before timing, so the figures are for signatures that verify.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import dkim
from cryptography.hazmat.backends.openssl import backend
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from relayd.config import DKIM_HEADERS, Dkim, DkimKey
from relayd.mime.dkim import Signer, keygen

DOMAIN = "example.com"


def build_message(size: int) -> bytes:
    """A typical transactional message of about `size` bytes, CRLF, as relayd spools it."""
    head = (
        b"Received: from app1.example.com ([10.0.0.5])\r\n\tby relay.example.com (relayd) with "
        b"ESMTP id 01JH3K8Q7M2X;\r\n\tThu, 1 Jan 2026 00:00:00 +0000\r\n"
        b"From: Example Shop <orders@example.com>\r\n"
        b"To: Ann Customer <ann@example.org>\r\n"
        b"Subject: Your order #10234 has shipped\r\n"
        b"Date: Thu, 1 Jan 2026 00:00:00 +0000\r\n"
        b"Message-ID: <01JH3K8Q7M2X@example.com>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"List-Unsubscribe: <https://example.com/u/10234>\r\n"
        b"\r\n"
    )
    line = b"Your parcel left our warehouse today.  It should arrive within 3 days.\r\n"
    room = max(0, size - len(head) - 2)
    return head + (line * (room // len(line) + 1))[:room] + b"\r\n"


def run(call: Callable[[], object], seconds: float) -> tuple[int, float, float]:
    """Call repeatedly for `seconds`; returns the call count, wall and CPU seconds spent."""
    count, wall, cpu = 0, time.perf_counter(), time.process_time()
    deadline = wall + seconds
    while time.perf_counter() < deadline:
        for _ in range(10):
            call()
        count += 10
    return count, time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="time per case")
    parser.add_argument("--size", type=int, default=2048, help="message size in bytes")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per case")
    parser.add_argument("--cpu", type=int, help="CPU to pin to (Linux; default: not pinned)")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})

    message = build_message(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        rsa_path, rsa_txt = keygen(DOMAIN, "rsa1", "rsa", out)
        ed_path, ed_txt = keygen(DOMAIN, "ed1", "ed25519", out)
        rsa_key = DkimKey(DOMAIN, "rsa1", "rsa-sha256", rsa_path, "dkim.keys[0]")
        ed_key = DkimKey(DOMAIN, "ed1", "ed25519-sha256", ed_path, "dkim.keys[1]")
        config = out / "relayd.toml"

        def signer(*keys: DkimKey) -> Signer:
            return Signer(Dkim(keys, "", True, DKIM_HEADERS), config)

        records = {
            f"{sel}._domainkey.{DOMAIN}.".encode(): "".join(re.findall(r'"([^"]*)"', txt)).encode()
            for sel, txt in (("rsa1", rsa_txt), ("ed1", ed_txt))
        }

        def verifies(signed: bytes) -> bool:
            return dkim.verify(signed, dnsfunc=lambda name, timeout=5: records.get(name))

        rsa_signer, ed_signer = signer(rsa_key), signer(ed_key)
        dual_signer = signer(rsa_key, ed_key)
        rsa_pem = rsa_path.read_bytes()
        private = serialization.load_pem_private_key(rsa_pem, password=None)
        header_bytes = message[: message.index(b"\r\n\r\n")][:600]
        include = [h.lower().encode() for h in DKIM_HEADERS]

        def dkimpy_sign() -> bytes:
            return dkim.sign(
                message,
                b"rsa1",
                DOMAIN.encode(),
                rsa_pem,
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=include,
            )

        assert verifies(rsa_signer.sign(message)), "relayd rsa-sha256 signature does not verify"
        assert verifies(dkimpy_sign() + message), "dkimpy signature does not verify"
        nacl = importlib.util.find_spec("nacl") is not None
        if nacl:
            assert verifies(ed_signer.sign(message)), "relayd ed25519 signature does not verify"

        seconds = args.seconds
        cases: list[tuple[str, Callable[[], object], float]] = [
            ("relayd rsa-sha256", lambda: rsa_signer.sign(message), seconds),
            ("relayd ed25519-sha256", lambda: ed_signer.sign(message), seconds),
            ("relayd rsa + ed25519 (2 signatures)", lambda: dual_signer.sign(message), seconds),
            (
                "openssl rsa alone (ceiling)",
                lambda: private.sign(header_bytes, padding.PKCS1v15(), hashes.SHA256()),
                seconds,
            ),
            ("dkimpy rsa-sha256 (pure Python)", dkimpy_sign, seconds / 2),
        ]
        pinned = "not pinned" if args.cpu is None else f"pinned to CPU {args.cpu}"
        print(f"command: {shlex.join([sys.executable, *sys.argv])}")
        print(
            f"python {platform.python_version()}, {backend.openssl_version_text()}, "
            f"{_cpu_model()}, {pinned}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
            f"message {len(message)} bytes; "
            f"ed25519 checked by dkimpy: {'yes' if nacl else 'no (PyNaCl missing)'}"
        )
        for _, call, _ in cases:  # warm-up: first-call costs stay out of the figures
            run(call, 0.2)
        totals = {name: [0, 0.0, 0.0] for name, _, _ in cases}
        for _ in range(args.rounds):  # interleaved, so load from elsewhere hits every case
            for name, call, case_seconds in cases:
                part = run(call, case_seconds / args.rounds)
                totals[name] = [a + b for a, b in zip(totals[name], part, strict=True)]
        print(f"{'case':<36} {'calls/s':>8} {'per CPU-s':>10} {'CPU us/call':>12} {'calls':>7}")
        for name, (count, wall, cpu) in totals.items():
            print(
                f"{name:<36} {count / wall:>8,.0f} {count / cpu:>10,.0f}"
                f" {1e6 * cpu / count:>12,.0f} {count:>7}"
            )
    return 0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
