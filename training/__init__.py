"""Training, evaluation, tau calibration and sweeps for CoGaLoRA classifiers (``python -m training``)."""
