"""meshtrust: zero-trust service identity and mutual TLS, Istio-compatible, runnable anywhere."""

__version__ = "0.1.0"
__all__ = ["__version__"]
