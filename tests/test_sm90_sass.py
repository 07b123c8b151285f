"""The sm_90a attention kernel still compiles to what makes it fast (no GPU needed).

nvcc builds one head dim for sm_90a and cuobjdump (shipped with Triton) lists its SASS: the
products must be warpgroup HGMMAs of the tile's shape, the loads TMA, the register split must
take effect (setmaxnreg is silently dropped without a known entry register count), and ptxas
must neither serialize the wgmmas nor spill in the consumers.
"""
from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "attention" / "flash_fwd_sm90_hdim128.cu"


def _cuobjdump():
    try:
        import triton
    except ImportError:
        return None
    path = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else shutil.which("cuobjdump")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    nvcc, cuobjdump = shutil.which("nvcc"), _cuobjdump()
    if nvcc is None or cuobjdump is None or not SOURCE.exists():
        pytest.skip("needs nvcc and cuobjdump")
    cubin = tmp_path_factory.mktemp("sm90") / "hdim128.cubin"
    build = subprocess.run(
        [nvcc, "-std=c++17", "-gencode", "arch=compute_90a,code=sm_90a", "-cubin", "--expt-relaxed-constexpr",
         "-Xptxas", "-v", f"-I{ROOT / 'csrc'}", str(SOURCE), "-o", str(cubin)],
        capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    sass = subprocess.run([cuobjdump, "--dump-sass", str(cubin)], capture_output=True, text=True, timeout=120)
    assert sass.returncode == 0, sass.stderr[-2000:]
    return build.stderr, sass.stdout


def test_sm90_kernel_uses_hopper_instructions(compiled):
    ptxas, sass = compiled
    assert re.search(r"HGMMA\.64x128x16\.F32\.BF16", sass), "S = Q K^T and O += P V should be m64n128k16 wgmmas"
    # (the fp16 instantiation prints without an input-type suffix)
    assert re.search(r"HGMMA\.64x128x16\.F32 ", sass), "the fp16 instantiation should use wgmma too"
    assert "UTMALDG.4D" in sass, "Q, K and V should arrive by TMA"
    assert "USETMAXREG.DEALLOC" in sass and "USETMAXREG.TRY_ALLOC" in sass, "setmaxnreg was dropped"
    assert not re.search(r"C75(0[4-9]|1\d|20)", ptxas), f"ptxas serialized or dropped something:\n{ptxas}"


def test_sm90_kernel_does_not_spill(compiled):
    ptxas, _ = compiled
    spills = re.findall(r"(\d+) bytes spill stores", ptxas)
    assert spills and all(s == "0" for s in spills), ptxas
