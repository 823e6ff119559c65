"""Prometheus: the training workers' and the sweep driver's metrics, and the local
Prometheus server's service-discovery configuration. Imports prometheus_client."""
