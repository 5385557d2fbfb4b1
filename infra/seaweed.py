"""SeaweedFS locked down: the S3 API asks for our keys, every other port for our certificate.

`weed mini` runs a master, a volume server, a filer, an admin server and the S3 gateway, each with an
HTTP and a gRPC port. All of them but the S3 API speak mutual TLS with a certificate of the state dir's
own CA, made at the first `up` (the CA's key is not kept: nothing else is ever signed): a request
without the certificate fails its handshake, so no process on the machine can list, read, write or
delete what is stored around the S3 API. The volume server and the filer also check SeaweedFS's JWTs
(keys fresh at every start). Secrets reach the process in its environment, which only its owner can
read, never on its command line; the admin UI is off.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from infra.settings import Settings, write_private

IDENTITY = "compound"  # the one identity of SeaweedFS's s3.json, holding our S3 keys
CERT_YEARS = 10
# Each component's gRPC server and client, and the HTTP servers of all but the S3 gateway.
GRPC_SECTIONS = ("MASTER", "VOLUME", "FILER", "S3", "ADMIN", "WORKER", "CLIENT")
HTTPS_SECTIONS = ("MASTER", "VOLUME", "FILER", "ADMIN")
JWT_KEYS = ("WEED_JWT_SIGNING_KEY", "WEED_JWT_SIGNING_READ_KEY",  # volume writes and reads
            "WEED_JWT_FILER_SIGNING_KEY", "WEED_JWT_FILER_SIGNING_READ_KEY")  # filer writes and reads


@dataclass(frozen=True)
class Tls:
    """The certificate every SeaweedFS component serves and presents, and the CA that signed it."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def at(cls, directory: Path) -> Tls:
        return cls(ca=directory / "ca.pem", cert=directory / "cert.pem", key=directory / "key.pem")

    def ensure(self) -> None:
        """Make the certificate unless there is one."""
        if not all(path.is_file() for path in (self.ca, self.cert, self.key)):
            self.key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._make()

    def _make(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        now = datetime.datetime.now(datetime.UTC)
        start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=365 * CERT_YEARS)

        def name(common: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

        ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        ca = (x509.CertificateBuilder().subject_name(name("compound local CA")).issuer_name(name("compound local CA"))
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(start).not_valid_after(end)
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .sign(ca_key, hashes.SHA256()))
        cert = (x509.CertificateBuilder().subject_name(name(IDENTITY)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                            x509.DNSName("localhost")]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        pem = serialization.Encoding.PEM
        write_private(self.key, key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()).decode())
        write_private(self.cert, cert.public_bytes(pem).decode())
        write_private(self.ca, ca.public_bytes(pem).decode())


def environment(tls: Tls) -> dict[str, str]:
    """SeaweedFS's security settings (its security.toml, as WEED_* variables) for one start."""
    env = {"WEED_GRPC_CA": str(tls.ca), "WEED_HTTPS_CLIENT_ENABLED": "true", "WEED_HTTPS_CLIENT_CA": str(tls.ca),
           "WEED_HTTPS_CLIENT_CERT": str(tls.cert), "WEED_HTTPS_CLIENT_KEY": str(tls.key),
           "WEED_ACCESS_UI": "false", "WEED_FILER_EXPOSE_DIRECTORY_METADATA_ENABLED": "false"}
    for section in GRPC_SECTIONS:
        env |= {f"WEED_GRPC_{section}_CERT": str(tls.cert), f"WEED_GRPC_{section}_KEY": str(tls.key)}
    for section in HTTPS_SECTIONS:
        env |= {f"WEED_HTTPS_{section}_CERT": str(tls.cert), f"WEED_HTTPS_{section}_KEY": str(tls.key),
                f"WEED_HTTPS_{section}_CA": str(tls.ca)}
    return env | {name: secrets.token_urlsafe(32) for name in JWT_KEYS}


def identities(settings: Settings) -> str:
    """SeaweedFS's s3.json: our keys, allowed everything; no anonymous identity."""
    identity = {
        "name": IDENTITY,
        "credentials": [{"accessKey": settings.s3_access_key.get_secret_value(),
                         "secretKey": settings.s3_secret_key.get_secret_value()}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }
    return json.dumps({"identities": [identity]}, indent=2)


def keys_in(identity_file: Path) -> tuple[str, str] | None:
    """Our keys in SeaweedFS's identity file (as `identities` wrote it), if it is readable."""
    try:
        found = json.loads(identity_file.read_bytes())["identities"]
        credentials = next(i for i in found if i["name"] == IDENTITY)["credentials"][0]
        access_key, secret_key = credentials["accessKey"], credentials["secretKey"]
    except (OSError, ValueError, LookupError, TypeError, StopIteration):  # missing or damaged too
        return None
    if isinstance(access_key, str) and isinstance(secret_key, str) and access_key and secret_key:
        return access_key, secret_key
    return None
