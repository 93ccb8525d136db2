"""What the process may use: the container's CPU quota and free memory, and whether this torch
build has kernels for the GPU it was given. Each is a small pure decision with thin readers
around it, so it can be tested without a container or a GPU."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger("gpt2serve.hardware")

CGROUP_ROOT = Path("/sys/fs/cgroup")
# The image tags docs/deploy.md builds: CUDA 12.6 wheels still carry Maxwell..Volta (sm_50..70);
# the default CUDA 13 wheels start at Turing (sm_75).
LEGACY_GPU_TAG, DEFAULT_GPU_TAG = "0.1.0-cu126", "0.1.0"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs the container may use by its CFS quota (a pod's `limits.cpu`), None if unlimited.
    cgroup v2 writes `cpu.max` as "QUOTA PERIOD" or "max PERIOD"; v1 has cfs_quota_us (-1 when
    unlimited) and cfs_period_us under cpu/ or cpu,cpuacct/."""
    v2 = _read(root / "cpu.max")
    if v2 is not None:
        quota, _, period = v2.partition(" ")
        if quota == "max" or not period:
            return None
        return int(quota) / int(period)
    for sub in ("cpu", "cpu,cpuacct"):
        quota, period = _read(root / sub / "cpu.cfs_quota_us"), _read(root / sub / "cpu.cfs_period_us")
        if quota is not None and period is not None:
            return None if int(quota) <= 0 else int(quota) / int(period)
    return None


def default_threads(root: Path = CGROUP_ROOT) -> int:
    """Threads when --threads is not given: the CPU limit rounded down (at least 1), never more
    than the cores we may run on. Rounded down because an OpenMP team larger than the quota gets
    throttled mid-step, and every thread of a matmul then waits for the throttled one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    return cores if limit is None else max(1, min(cores, math.floor(limit)))


def memory_available(root: Path = CGROUP_ROOT, meminfo: Path = Path("/proc/meminfo")
                     ) -> int | None:
    """Bytes this process could still allocate: the kernel's MemAvailable, or what is left
    under the container's memory limit (cgroup v2 memory.max - memory.current, v1
    limit_in_bytes - usage_in_bytes) when that is less. None if neither can be read."""
    found = []
    for line in (_read(meminfo) or "").splitlines():
        if line.startswith("MemAvailable:"):
            found.append(int(line.split()[1]) * 1024)
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes",
                                    "memory/memory.usage_in_bytes")):
        limit, usage = _read(root / limit_file), _read(root / usage_file)
        # v1 writes "unlimited" as a huge number, v2 as "max"
        if limit and usage and limit.isdigit() and int(limit) < 2**60:
            found.append(max(0, int(limit) - int(usage)))
            break
    return min(found) if found else None


def arch_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a device of this compute capability can run this build's kernels: an sm_XY
    cubin runs on the same major version with an equal or higher minor (sm_80 on sm_86), and
    compute_XY PTX is compiled by the driver for any equal or newer device. `sm_90a`-style
    arch-specific cubins run only on that exact device."""
    major, minor = capability
    for arch in arch_list:
        kind, _, num = arch.partition("_")
        exact = num.endswith("a")
        num = num.rstrip("af")
        if not num.isdigit():
            continue
        a_major, a_minor = int(num[:-1]), int(num[-1])
        if kind == "sm" and (a_major, a_minor) == (major, minor):
            return True
        if kind == "sm" and not exact and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def gpu_image_hint(capability: tuple[int, int], arch_list: list[str], name: str = "GPU"
                   ) -> str | None:
    """One line naming the image to use when this torch build has no kernels for the device,
    else None. An empty arch list means a build without CUDA, which cannot get here."""
    if not arch_list or arch_supported(capability, arch_list):
        return None
    sm = f"sm_{capability[0]}{capability[1]}"
    tag = LEGACY_GPU_TAG if capability < (7, 5) else DEFAULT_GPU_TAG
    return (f"{name} ({sm}) has no kernels in this image's torch (built for "
            f"{' '.join(arch_list)}): use the image tagged gpt2serve:{tag} instead "
            f"(docs/deploy.md, 'Images')")


def check_cuda_device(device) -> None:
    """Log one clear line before the first kernel fails with 'no kernel image is available'."""
    import torch

    hint = gpu_image_hint(torch.cuda.get_device_capability(device), torch.cuda.get_arch_list(),
                          torch.cuda.get_device_name(device))
    if hint:
        log.error(hint)


# --- The CPU's vector ISA, as each kernel library will use it ------------------------------
# Kernel libraries dispatch on CPUID at run time, and each has its own cap. An AVX2 cap for all
# of them (what `bench/offline.py --isa avx2` sets), checked on an AVX-512 + VNNI host:
AVX2_CAP_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",          # torch's own vectorized kernels
    "ONEDNN_MAX_CPU_ISA": "AVX2",           # oneDNN: torch's and OpenVINO's copies
    "OV_CPU_MAX_ISA": "AVX2",               # OpenVINO's own CPU kernels (with the one above)
    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",   # fbgemm: our int8 matmuls
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",      # MKL sgemm (no effect seen on an AMD host)
    "CT2_FORCE_CPU_ISA": "AVX2",            # CTranslate2
}

# The AVX-512 subsets fbgemm's and torch's AVX-512 kernels need (x86-64-v4 without CD).
AVX512_FLAGS = {"avx512f", "avx512bw", "avx512dq", "avx512vl"}
# AMX as oneDNN (and llama.cpp's AMX build) use it: the tiles and their int8 products
AMX_FLAGS = {"amx_tile", "amx_int8"}

# fbgemm's FBGEMM_ENABLE_INSTRUCTIONS values, and which of them each detected ISA allows
# (fbgemm src/Utils.cc, fbgemmInstructionSet: a forced ISA the CPU lacks is ignored).
_FBGEMM_FORCED = {"AVX2": "avx2", "AVX512": "avx512", "AVX512_E1": "avx512_vnni",
                  "AVX512_256": "avx512_ymm", "AVX512_E1_256": "avx512_vnni_ymm"}
_FBGEMM_ALLOWED = {
    "avx2": {"avx2"},
    "avx512": {"avx512", "avx512_ymm", "avx2"},
    "avx512_vnni": {"avx512_vnni", "avx512_vnni_ymm", "avx512", "avx512_ymm", "avx2"},
}


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first CPU's fields as the kernel reports them ("model name", "cpu family",
    "model", ...; empty where there is no cpuinfo)."""
    first = (_read(cpuinfo) or "").split("\n\n")[0]
    return {k.strip(): v.strip() for k, v in
            (line.split(":", 1) for line in first.splitlines() if ":" in line)}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags as the kernel reports them (empty where there is no cpuinfo)."""
    return set(cpu_info(cpuinfo).get("flags", "").split())


def fbgemm_isa(flags: set[str] | None = None, env=None) -> str | None:
    """The ISA fbgemm's int8 GEMMs will run with: what it detects (AVX-512 VNNI, AVX-512, AVX2;
    AVX-VNNI without AVX-512 counts as plain AVX2, fbgemm has no kernel for it), lowered by
    FBGEMM_ENABLE_INSTRUCTIONS. None where fbgemm has no x86 kernel at all. ONEDNN_MAX_CPU_ISA
    does not reach fbgemm (measured: VNNI stays on under it). `quantized::linear_dynamic` runs
    fbgemm under torch's default quantized engine on x86 ("x86"), which quantize.py keeps."""
    flags = cpu_flags() if flags is None else flags
    env = os.environ if env is None else env
    if "avx512_vnni" in flags:
        detected = "avx512_vnni"
    elif AVX512_FLAGS <= flags:
        detected = "avx512"
    elif "avx2" in flags:
        detected = "avx2"
    else:
        return None
    forced = _FBGEMM_FORCED.get(env.get("FBGEMM_ENABLE_INSTRUCTIONS", "").upper())
    return forced if forced in _FBGEMM_ALLOWED[detected] else detected


def int8_weight_levels(flags: set[str] | None = None, env=None) -> int:
    """Largest |w| of our int8 weights. Without VNNI, fbgemm multiplies u8 activations by s8
    weights in pairs summed into int16 (vpmaddubsw), which saturates once 2 * 255 * |w| >
    32767: 7-bit weights (63) avoid that. With VNNI (vpdpbusd sums into int32) all 8 bits
    (127) are exact. Decided by the kernel that will run, so a capped fbgemm gets 63."""
    isa = fbgemm_isa(flags, env)
    return 127 if isa is not None and "vnni" in isa else 63


def isa_caps(env=None) -> dict[str, str]:
    """The ISA cap variables set in this environment (those of AVX2_CAP_ENV)."""
    env = os.environ if env is None else env
    return {k: env[k] for k in AVX2_CAP_ENV if k in env}


def host_isa(flags: set[str] | None = None) -> str:
    """One line: the CPU's widest vector ISA, VNNI, BF16 and AMX (oneDNN's int8 and bf16 tiles),
    before any cap."""
    flags = cpu_flags() if flags is None else flags
    isa = ("AVX512" if AVX512_FLAGS <= flags
           else "AVX2" if "avx2" in flags else "no AVX2")
    vnni = (" +VNNI" if "avx512_vnni" in flags and isa == "AVX512"
            else " +AVX-VNNI" if "avx_vnni" in flags else "")
    bf16 = " +BF16" if "avx512_bf16" in flags else ""
    amx = " +AMX" if AMX_FLAGS <= flags else ""
    return f"{isa}{vnni}{bf16}{amx}"


def last_level_cache() -> int:
    """Bytes of the largest CPU cache sysfs reports, 32 MiB where it says nothing."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        text = (_read(index / "size") or "").upper()
        units = {"K": 1 << 10, "M": 1 << 20}
        if text[:-1].isdigit() and text[-1] in units:
            sizes.append(int(text[:-1]) * units[text[-1]])
    return max(sizes, default=32 << 20)
