"""The gRPC layer over jobsvc.manager.

The TLS cipher policy must reach grpc's core before it initialises, so it is set here, before any module of this
package imports grpc (grpcio has no Python API for it; see tls.py).
"""

import os

from jobsvc.server.policy import CIPHER_SUITES

os.environ["GRPC_SSL_CIPHER_SUITES"] = CIPHER_SUITES
