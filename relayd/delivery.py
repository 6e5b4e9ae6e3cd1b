"""Delivery: one outbound SMTP connection carrying jobs to one site.

Opens to the site's hosts in order (falling back to the next MX or address when one cannot be
reached or greets with an error), with opportunistic STARTTLS, from the chosen source address
and with its EHLO name. Each recipient is judged by its own RCPT reply and the DATA reply:
2xx delivered, 4xx deferred, 5xx bounced; a lost connection or a timeout defers.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import aiosmtplib

from relayd.config import HostPort
from relayd.dns import LookupFailure, Resolver
from relayd.events import log
from relayd.spool import Job, State


@dataclass(frozen=True)
class Outcome:
    """One recipient's result, with what the log needs about where it went."""

    code: int
    reply: str

    @property
    def state(self) -> State:
        if 200 <= self.code < 300:
            return State.DELIVERED
        return State.BOUNCED if self.code >= 500 else State.DEFERRED


class ConnectFailure(Exception):
    def __init__(self, code: int, reply: str, mx: str) -> None:
        super().__init__(f"{code} {reply}")
        self.code, self.reply, self.mx = code, reply, mx


def _insecure_context() -> ssl.SSLContext:
    """Opportunistic TLS as Postfix's "may": encrypt, but do not verify (RFC 7435)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


_TLS = _insecure_context()


class Connection:
    """An open SMTP session to one MX host."""

    def __init__(self, smtp: aiosmtplib.SMTP, mx: str, source_ip: str) -> None:
        self.smtp, self.mx, self.source_ip = smtp, mx, source_ip
        self.broken = False

    @classmethod
    async def open(
        cls,
        hosts: list[HostPort],
        resolver: Resolver,
        source_ip: str | None,
        ehlo: str,
        starttls: bool,
        connect_timeout: float,
        command_timeout: float,
    ) -> Connection:
        """Connect to the first host that answers with a usable greeting."""
        last = ConnectFailure(421, "4.4.1 no MX host could be reached", "")
        for host in hosts:
            try:
                addresses = await resolver.addresses(host.host)
            except LookupFailure as exc:
                last = ConnectFailure(exc.code, exc.reply, host.host)
                continue
            if not addresses:
                last = ConnectFailure(421, f"4.4.4 MX host {host.host} has no address", host.host)
            for ip in addresses:
                if source_ip and (":" in ip) != (":" in source_ip):
                    continue  # an IPv4 source cannot reach an IPv6 host
                mx = f"{host.host}[{ip}]:{host.port}"
                try:
                    smtp = await _session(
                        ip, host.port, source_ip, ehlo, starttls, connect_timeout, command_timeout
                    )
                except _TlsFailed:  # as Postfix "may": the same host again, in plain text
                    try:
                        smtp = await _session(
                            ip, host.port, source_ip, ehlo, False, connect_timeout, command_timeout
                        )
                    except (aiosmtplib.SMTPException, OSError) as exc:
                        last = _failure(exc, mx)
                        continue
                except (aiosmtplib.SMTPException, OSError) as exc:
                    last = _failure(exc, mx)
                    continue
                return cls(smtp, mx, source_ip or smtp.transport.get_extra_info("sockname")[0])
        raise last

    async def send(self, job: Job) -> list[tuple[int, Outcome]]:
        """One transaction for ``job``: (recipient row id, outcome) for each recipient."""
        smtp = self.smtp
        phase = "MAIL FROM"
        outcomes: list[tuple[int, Outcome]] = []
        try:
            options = []
            if job.smtputf8:
                if not smtp.supports_extension("smtputf8"):
                    msg = "5.6.7 remote server does not support SMTPUTF8"
                    return [(r.id, Outcome(553, msg)) for r in job.recipients]
                options.append("SMTPUTF8")
            if not job.body.isascii() and smtp.supports_extension("8bitmime"):
                options.append("BODY=8BITMIME")
            encoding = "utf-8" if job.smtputf8 else "ascii"
            try:
                await _command(smtp, b"MAIL", f"FROM:<{job.sender}>", encoding, options)
            except aiosmtplib.SMTPResponseException as exc:
                await self._reset()
                return [(r.id, Outcome(exc.code, exc.message)) for r in job.recipients]
            accepted = []
            for r in job.recipients:
                phase = "RCPT TO"
                try:
                    await _command(smtp, b"RCPT", f"TO:<{r.rcpt}>", encoding)
                    accepted.append(r)
                except aiosmtplib.SMTPResponseException as exc:
                    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
                        raise
                    outcomes.append((r.id, Outcome(exc.code, exc.message)))
            if not accepted:
                await self._reset()
                return outcomes
            phase = "DATA"
            try:
                response = await smtp.data(job.body)
                done = Outcome(response.code, response.message)
            except aiosmtplib.SMTPResponseException as exc:
                if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
                    raise
                done = Outcome(exc.code, exc.message)
            return outcomes + [(r.id, done) for r in accepted]
        except Exception as exc:
            self.broken = True
            if isinstance(exc, aiosmtplib.SMTPException | OSError):
                reply = f"4.4.2 lost connection with {self.mx} while sending {phase}: {exc}"
            else:  # a fault of ours: defer (nothing is lost) and leave a trace
                log.error("send_failed", queue_id=job.queue_id, mx=self.mx, error=repr(exc))
                reply = f"4.3.0 local error while sending {phase}: {exc!r}"
            seen = {rid for rid, _ in outcomes}
            lost = Outcome(421, reply)
            return outcomes + [(r.id, lost) for r in job.recipients if r.id not in seen]

    async def _reset(self) -> None:
        try:
            await self.smtp.rset()
        except (aiosmtplib.SMTPException, OSError):
            self.broken = True

    async def close(self) -> None:
        if self.smtp.is_connected:
            try:
                if not self.broken:
                    await self.smtp.quit(timeout=5)
            except (aiosmtplib.SMTPException, OSError):
                pass
            finally:
                self.smtp.close()


async def _command(
    smtp: aiosmtplib.SMTP, verb: bytes, arg: str, encoding: str, options: Sequence[str] = ()
) -> None:
    """MAIL or RCPT with the address as the spool has it (ingress checked its syntax), without
    aiosmtplib's parse of every address by the email package; a refusal raises as there."""
    extra = [option.encode("ascii") for option in options]
    response = await smtp.execute_command(verb, arg.encode(encoding), *extra)
    if response.code not in (250, 251):
        raise aiosmtplib.SMTPResponseException(response.code, response.message)


class _TlsFailed(Exception):
    """STARTTLS was offered but did not work out."""


async def _session(
    ip: str,
    port: int,
    source_ip: str | None,
    ehlo: str,
    starttls: bool,
    connect_timeout: float,
    command_timeout: float,
) -> aiosmtplib.SMTP:
    """Connected, greeted, EHLO done, and TLS if wanted and offered."""
    smtp = aiosmtplib.SMTP(
        hostname=ip,
        port=port,
        local_hostname=ehlo,
        source_address=(source_ip, 0) if source_ip else None,
        timeout=command_timeout,
        start_tls=False,
    )
    try:
        await smtp.connect(timeout=connect_timeout)
        await smtp.ehlo()
        if starttls and smtp.supports_extension("starttls"):
            try:
                await smtp.starttls(tls_context=_TLS, validate_certs=False)
            except (aiosmtplib.SMTPException, OSError) as exc:
                raise _TlsFailed(str(exc)) from exc
            await smtp.ehlo()  # extensions may differ under TLS (RFC 3207 4.2)
        return smtp
    except BaseException:
        smtp.close()
        raise


def _failure(exc: BaseException, mx: str) -> ConnectFailure:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return ConnectFailure(exc.code, exc.message, mx)
    return ConnectFailure(421, f"4.4.1 connect to {mx} failed: {exc}", mx)
