"""E-commerce ranking service: query in, ordered products out, over gRPC."""

__version__ = "0.1.0"
