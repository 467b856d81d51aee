"""CMakeLists.txt builds the same sources into a library that registers working ops."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch.utils

ROOT = Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent("""
    import sys, torch
    torch.ops.load_library(sys.argv[1])
    from safeattn import reference, intervals  # pure Python; does not load safeattn._C
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 64), torch.randn(2, 2, 9, 64), torch.randn(2, 2, 9, 64)
    iv = intervals.causal(2, 9, 9, window=4)
    out = torch.ops.safeattn.interval_attention(q, k, v, iv, None, None)
    err = (out.double() - reference.interval_attention(q.double(), k.double(), v.double(), iv)).abs().max()
    assert err < 1e-5, err
    print("ok", float(err))
""")


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_library_registers_ops(tmp_path):
    build = tmp_path / "build"
    prefix = torch.utils.cmake_prefix_path
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}"],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    lib = build / "libsafeattn_ops.so"
    assert lib.exists()
    # A fresh interpreter: safeattn._C would register the same library name twice.
    env = dict(os.environ, PYTHONPATH=str(ROOT / "safeattn" / "..") )
    code = "import sys, types; sys.modules['safeattn._C'] = types.ModuleType('safeattn._C')\n" + CHECK
    res = subprocess.run([sys.executable, "-c", code, str(lib)], capture_output=True, text=True,
                         env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok")
