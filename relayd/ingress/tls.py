"""TLS for the listeners: one server context per process, its certificate reloadable.

Reloading loads the new chain into the same context, so handshakes from then on use it while
sessions already open keep theirs: SIGHUP rotates a certificate without dropping anyone.
"""

from __future__ import annotations

import ssl

from relayd.config import ConfigError, Tls

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_context(tls: Tls, config_path: str) -> ssl.SSLContext | None:
    """A server context for ``tls``, or None when no certificate is configured."""
    if tls.cert_file is None or tls.key_file is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[tls.min_version]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    load(context, tls, config_path)
    return context


def load(context: ssl.SSLContext, tls: Tls, config_path: str) -> None:
    """(Re)load the certificate chain and key; a bad pair is a config error naming the files."""
    try:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            config_path, "tls.cert_file", f"cannot load {tls.cert_file} with {tls.key_file}: {exc}"
        ) from None
    context.minimum_version = _VERSIONS[tls.min_version]
