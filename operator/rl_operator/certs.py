"""TLS for the admission webhook: a private CA and a serving certificate, made with ``cryptography``.

The API server calls the webhook over HTTPS and verifies it against the CA bundle in the
webhook configuration (which the operator writes: ``rl_operator.admission``). Files are reused while they are valid
for the requested names and for at least another day.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class WebhookCerts:
    ca: Path
    cert: Path
    key: Path


def _san(names: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for n in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return out


def service_ref(service: str) -> tuple[str, str, int]:
    """``namespace/name:port`` -> ``(namespace, name, port)``.

    Raises:
        ValueError: not in that form.
    """
    ref, _, port = service.rpartition(":")
    namespace, _, name = ref.partition("/")
    if not namespace or not name or not port.isdigit():
        raise ValueError(f"webhook service {service!r}: expected namespace/name:port")
    return namespace, name, int(port)


def make_webhook_certs(names: list[str], days: int = 365, client: bool = False) -> dict[str, bytes]:
    """A new private CA and a serving certificate for these DNS names / IPs (the first is the
    subject), valid for ``days``; with ``client``, a client certificate instead (extended key
    usage clientAuth: what the API server presents to the webhook). Returns PEM bytes under the
    keys of a ``kubernetes.io/tls`` Secret as cert-manager writes it: ``ca.crt``, ``tls.crt``,
    ``tls.key``."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rlops webhook CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_san(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client else
                                              ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return {
        "ca.crt": ca.public_bytes(serialization.Encoding.PEM),
        "tls.crt": cert.public_bytes(serialization.Encoding.PEM),
        "tls.key": key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()),
    }


def certs_usable(data: dict[str, bytes], names: list[str], min_days: float = 30) -> bool:
    """Whether ``data`` (``ca.crt``, ``tls.crt``, ``tls.key`` PEM bytes) holds a serving
    certificate for all of ``names`` that stays valid for at least ``min_days`` more days, and
    the CA that signed it."""
    try:
        cert = x509.load_pem_x509_certificate(data["tls.crt"])
        ca = x509.load_pem_x509_certificate(data["ca.crt"])
        serialization.load_pem_private_key(data["tls.key"], password=None)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        cert.verify_directly_issued_by(ca)
    except (KeyError, ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    left = cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    return left >= dt.timedelta(days=min_days) and set(_san(names)) <= set(san)


def write_webhook_certs(directory: str | Path, data: dict[str, bytes]) -> WebhookCerts:
    """Write ``ca.crt``, ``tls.crt``, ``tls.key`` (the key mode 0600) into ``directory``.

    Raises:
        OSError: the directory cannot be written.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = WebhookCerts(ca=d / "ca.crt", cert=d / "tls.crt", key=d / "tls.key")
    files.key.write_bytes(data["tls.key"])
    files.key.chmod(0o600)
    files.cert.write_bytes(data["tls.crt"])
    files.ca.write_bytes(data["ca.crt"])
    return files


def ensure_webhook_certs(directory: str | Path, names: list[str], days: int = 365, client: bool = False) -> WebhookCerts:
    """Create (or reuse) ``ca.crt``, ``tls.crt``, ``tls.key`` in ``directory`` for these DNS names / IPs
    (``client``: a client certificate, :func:`make_webhook_certs`).

    Raises:
        OSError: the directory cannot be written.
    """
    d = Path(directory)
    files = WebhookCerts(ca=d / "ca.crt", cert=d / "tls.crt", key=d / "tls.key")
    try:
        found = {"ca.crt": files.ca.read_bytes(), "tls.crt": files.cert.read_bytes(), "tls.key": files.key.read_bytes()}
    except OSError:
        found = {}
    if certs_usable(found, names, min_days=1):
        return files
    return write_webhook_certs(d, make_webhook_certs(names, days, client))


def main(argv: list[str] | None = None) -> int:
    """``python -m rl_operator.certs client DIR NAME``: make (or reuse) a private CA and a client
    certificate for ``NAME`` in ``DIR`` (``ca.crt``, ``tls.crt``, ``tls.key``): the certificate
    the local control plane's API server presents to the approval webhook (``hack/cluster-up.sh``)."""
    import sys
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] != "client":
        print("usage: python -m rl_operator.certs client DIR NAME", file=sys.stderr)
        return 2
    files = ensure_webhook_certs(args[1], [args[2]], client=True)
    print(files.cert)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
