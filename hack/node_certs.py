"""Client certificates for the real node's kubelet and kube-proxy, signed by the local control
plane's CA (the one kwokctl made for the cluster), with ``cryptography``. Reused while valid
and signed by that CA (a recreated cluster has a new one).

    python hack/node_certs.py PKI_DIR OUT_DIR NODE_NAME

writes ``kubelet.crt/.key`` (``system:node:<NODE_NAME>`` in ``system:nodes``: the Node authorizer
lets it manage its own node and pods only) and ``kube-proxy.crt/.key`` (``system:kube-proxy``,
bound to ``system:node-proxier`` by the API server's default RBAC). Reused while valid. Prints
``issued <file>`` for each certificate it (re)made: a running kubelet must restart onto it.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def issue(ca_dir: Path, out: Path, stem: str, common_name: str, org: str | None) -> None:
    crt, key = out / f"{stem}.crt", out / f"{stem}.key"
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    if crt.exists() and key.exists():  # reused while valid and signed by this cluster's CA
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
        try:
            cert.verify_directly_issued_by(ca_cert)
            fresh = cert.not_valid_after_utc - dt.timedelta(days=1) > dt.datetime.now(dt.timezone.utc)
        except (ValueError, TypeError, InvalidSignature):  # a recreated cluster has a new CA
            fresh = False
        if fresh:
            return
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    private = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if org:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca_cert.subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    key.chmod(0o600)
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    print(f"issued {crt}")


def main() -> None:
    pki, out, node = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    issue(pki, out, "kubelet", f"system:node:{node}", "system:nodes")
    issue(pki, out, "kube-proxy", "system:kube-proxy", None)


if __name__ == "__main__":
    main()
