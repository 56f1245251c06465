"""Numeric kernels: configs, detector geometry, pattern kernels, the model, the training loop,
refinement, phases, strain maths and map assembly, and the centre-of-mass baseline.

No I/O and no orchestration: numpy, scipy, torch and xarray objects in, the same out.
"""
