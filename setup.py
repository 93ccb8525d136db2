"""The one compiled part of gpt2serve: CPU kernels in plain C (src/gpt2serve/_kernels.c), built
by `pip install` with the machine's C compiler and no other build dependency (no torch headers,
so the module does not depend on the torch build it runs beside). Optional: where nothing can
compile it, the install goes on and gpt2serve runs the same arithmetic with torch ops
(kernels.py)."""

import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# The AMX tile instructions the int8 and int4 kernels use: a compiler new enough for their
# intrinsics can still sit beside an assembler too old for the instructions (binutils before
# 2.36), which would fail the whole module, not only its AMX forms.
AMX_PROBE = """#include <immintrin.h>
__attribute__((target("amx-tile,amx-int8"))) void probe(const void *c, void *out) {
    _tile_loadconfig(c); _tile_zero(0); _tile_loadd(1, out, 64); _tile_loadd(2, out, 64);
    _tile_dpbusd(0, 1, 2); _tile_dpbssd(0, 1, 2); _tile_stored(0, out, 64); _tile_release();
}
"""


class BuildKernels(build_ext):
    """build_ext that builds the kernels without their AMX forms (GPT2SERVE_NO_AMX) where the
    toolchain cannot assemble AMX's instructions."""

    def build_extensions(self):
        if not self._compiles(AMX_PROBE):
            for ext in self.extensions:
                ext.define_macros.append(("GPT2SERVE_NO_AMX", "1"))
        super().build_extensions()

    def _compiles(self, code: str) -> bool:
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "probe.c"
            source.write_text(code)
            try:
                self.compiler.compile([str(source)], output_dir=tmp)
            except Exception:  # (distutils' CompileError, or no compiler at all)
                return False
        return True


# -ffp-contract=fast: ISO C mode (-std=c11) otherwise keeps every a * b + c as a multiply and an
# add instead of one FMA, and the fp32 matmul runs slower (docs/benchmarks.md, bench/kernels.py).
setup(cmdclass={"build_ext": BuildKernels}, ext_modules=[Extension(
    "gpt2serve._kernels", ["src/gpt2serve/_kernels.c"],
    extra_compile_args=["-O3", "-fopenmp", "-std=c11", "-ffp-contract=fast"],
    extra_link_args=["-fopenmp"],
    optional=True)])
