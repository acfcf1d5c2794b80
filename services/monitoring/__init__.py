"""Prometheus metrics of the services: the ``/metrics`` endpoint (server.py) and the metrics
of the DICOM listener (dicom_listener.py). The adapter's and the frontend's own metrics live
next to the code they count (services/adapter/metrics.py, services/frontend/metrics.py).
"""
