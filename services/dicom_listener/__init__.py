"""The DICOM listener (python -m services.dicom_listener): C-STORE in, StudyTasks to the
broker, structured reports back to the configured destinations."""
