"""The webhook's certificate: when a stored one may be served, and when the operator restarts onto another."""

from rl_operator import certs
from rl_operator.handlers.startup import webhook_cert_stale


def test_webhook_certificates_usable_only_for_their_names_signer_and_lifetime():
    names = ["rlops-operator.rlops-system.svc"]
    good = certs.make_webhook_certs(names)
    assert certs.certs_usable(good, names)
    assert not certs.certs_usable(good, ["other.svc"])                      # other names
    assert not certs.certs_usable(certs.make_webhook_certs(names, days=20), names)  # inside 30 days
    foreign_ca = {**good, "ca.crt": certs.make_webhook_certs(names)["ca.crt"]}
    assert not certs.certs_usable(foreign_ca, names)                        # CA did not sign it
    assert not certs.certs_usable({**good, "tls.key": b"junk"}, names)
    assert not certs.certs_usable({"tls.crt": good["tls.crt"]}, names)      # incomplete


def test_the_operator_restarts_onto_a_renewed_webhook_certificate():
    names = ["rlops-operator.rlops-system.svc"]
    served = certs.make_webhook_certs(names)
    assert not webhook_cert_stale((served, "7"), names, served)
    assert webhook_cert_stale((certs.make_webhook_certs(names), "8"), names, served)   # a replica renewed it
    assert webhook_cert_stale(None, names, served)                                     # deleted
    expiring = certs.make_webhook_certs(names, days=10)
    assert webhook_cert_stale((expiring, "9"), names, expiring)                        # due for renewal
