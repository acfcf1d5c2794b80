"""What every service process shares: its ``/metrics`` endpoint (server.py) and the way its
entry point runs (runner.py). Each service's own metrics live next to the code they count
(services/adapter/metrics.py, services/frontend/metrics.py, services/dicom_listener/metrics.py),
declared through families.py (one registry, label values shown at 0 from the start).
"""
