"""The one compiled part of gpt2serve: CPU kernels in plain C (src/gpt2serve/_kernels.c), built
by `pip install` with the machine's C compiler and no other build dependency (no torch headers,
so the module does not depend on the torch build it runs beside). Optional: where nothing can
compile it, the install goes on and gpt2serve runs the same arithmetic with torch ops
(kernels.py)."""

from setuptools import Extension, setup

# -ffp-contract=fast: ISO C mode (-std=c11) otherwise keeps every a * b + c as a multiply and an
# add instead of one FMA, and the fp32 matmul runs slower (docs/benchmarks.md, bench/kernels.py).
setup(ext_modules=[Extension(
    "gpt2serve._kernels", ["src/gpt2serve/_kernels.c"],
    extra_compile_args=["-O3", "-fopenmp", "-std=c11", "-ffp-contract=fast"],
    extra_link_args=["-fopenmp"],
    optional=True)])
