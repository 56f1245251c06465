"""CC-ST-AE strain mapping for 4D-STEM on HPC."""

__version__ = "0.1.0"
