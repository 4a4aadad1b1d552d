"""The TLS policy as data (no grpc import: jobsvc.server sets it before grpc starts)."""

# TLS 1.2: ephemeral ECDH key exchange, ECDSA certificates, AEAD ciphers only (no CBC, no RSA key exchange, no SHA1).
# TLS 1.3 suites are all AEAD and are not configurable in grpc's BoringSSL.
CIPHER_SUITES = ":".join(
    [
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
    ]
)
