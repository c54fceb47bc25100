"""npgpt: GPT-2 from scratch in NumPy, backward pass by hand, fine-tuned on the CPU."""
import os as _os

# Numba's parallel kernels and BLAS's matmuls take turns on the same cores. OpenMP threads that
# spin after a parallel region (the default) keep those cores busy while BLAS wants them: on two
# cores a kernel + matmul pair measured 50x slower. Sleeping threads cost microseconds to wake.
# This must be set before the OpenMP runtime loads, so it is set when npgpt is imported.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
