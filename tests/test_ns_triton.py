"""The symmetric Triton kernel of Newton–Schulz (optimizer/ns_triton.py) and the backend option.

No GPU here: the kernel is checked in Triton's CPU interpreter. TRITON_INTERPRET=1 must be set
before triton.jit decorates the kernel, so those checks live in ns_triton_interpreter.py (not
collected on its own) and test_interpreter_runs_the_kernel_checks runs them in a subprocess with
it set; the variable never reaches the other tests. The Gram checks use 16 x 16 tiles (several per matrix), NS runs
with INTERPRETER_CONFIG (32 x 32: fewer programs, the interpreter's cost); no shape is a multiple
of the tile.

Tolerances: fp32 sym_gram vs float64 within 2e-6 of the largest entry (fp32 rounding over <= 72
products); bf16 within one bf16 ulp per entry (the interpreter truncates fp32 -> bf16, a GPU rounds
to nearest: half an ulp); newton_schulz triton vs torch (both fp32) within 2e-5 per entry, and
the triton result passes test_newton_schulz.py's float64 SVD checks unchanged.
"""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import megatron_osp.optimizer
from megatron_osp.optimizer import Muon, OptimSettings, newton_schulz

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_CHECKS = Path(__file__).with_name("ns_triton_interpreter.py")
N_KERNEL_CHECKS = 24  # the cases in KERNEL_CHECKS; the subprocess must pass all of them


def _nt():
    return importlib.import_module("megatron_osp.optimizer.ns_triton")


def test_interpreter_runs_the_kernel_checks():
    pytest.importorskip("triton")
    # The repository root on the path: the subprocess must import this checkout, installed or not.
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=path)
    out = subprocess.run(  # -n 0: in this process, not in workers of its own (pyproject.toml's addopts)
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", str(KERNEL_CHECKS)],
        capture_output=True, text=True, env=env, timeout=300, cwd=Path(__file__).parent,
    )
    report = out.stdout[-6000:] + out.stderr[-2000:]
    assert out.returncode == 0, report
    passed = re.search(r"(\d+) passed", out.stdout)
    assert passed and int(passed.group(1)) == N_KERNEL_CHECKS, report
    assert "skipped" not in out.stdout.splitlines()[-1], report


# ---------------------------------------------------------------------- backend selection (no interpreter)
def test_triton_backend_without_triton_is_a_clear_error(monkeypatch):
    importlib.import_module("megatron_osp.optimizer.ns_triton")  # so monkeypatch restores the real one
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    monkeypatch.delitem(sys.modules, "megatron_osp.optimizer.ns_triton")
    monkeypatch.delattr(megatron_osp.optimizer, "ns_triton", raising=False)
    G = torch.randn(2, 16, 24)
    with pytest.raises(RuntimeError, match=r"backend='triton'.*triton is not importable"):
        newton_schulz(G, backend="triton")
    torch.testing.assert_close(newton_schulz(G, backend="auto"), newton_schulz(G, backend="torch"), rtol=0, atol=0)
    assert not sys.modules["megatron_osp.optimizer.ns_triton"].triton_available(G)
    with pytest.raises(RuntimeError, match="triton is not importable"):
        Muon([torch.nn.Parameter(torch.randn(8, 8))], ns_backend="triton")


@pytest.mark.skipif(IN_INTERPRETER, reason="the interpreter runs CPU tensors")
def test_triton_backend_on_cpu_is_a_clear_error():
    pytest.importorskip("triton")
    G = torch.randn(2, 16, 24)
    assert not _nt().triton_available(G)
    with pytest.raises(RuntimeError, match=r"backend='triton'.*needs CUDA"):
        newton_schulz(G, backend="triton")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        _nt().sym_gram(G)


def test_auto_is_torch_on_cpu_and_bad_names_fail():
    G = torch.randn(3, 20, 36)
    torch.testing.assert_close(newton_schulz(G, backend="auto"), newton_schulz(G, backend="torch"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        newton_schulz(G, backend="cuda")
    with pytest.raises(ValueError, match="optimizer.muon_ns_backend"):
        OptimSettings(name="muon", muon_ns_backend="cuda")
    with pytest.raises(ValueError, match="optimizer.muon_ns_backend"):
        Muon([torch.nn.Parameter(torch.randn(8, 8))], ns_backend="cuda")
    # "auto" since the kernel was faster on every osp-1.4b shape on an H200 (docs/benchmarks.md); torch on CPU
    assert OptimSettings(name="muon").muon_ns_backend == "auto"


@pytest.mark.skipif(IN_INTERPRETER, reason="compiles the real kernel, not the interpreted one")
def test_kernel_compiles_for_hopper_without_a_gpu():
    """The main config, compiled to sm_90 PTX and SASS here: tensor-core wgmma, pipelined async
    copies, no register spills (what a GPU run would first fail or slow down on)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    nt = _nt()
    fn = nt._sym_gram_kernel
    names = fn.arg_names
    block, block_k, warps, stages = nt.GPU_CONFIGS[0]
    m = k = 2048
    consts = dict(K=k, HAS_BETA=True, IEEE=False, UPCAST=False, EVEN_M=True, EVEN_K=True, BLOCK=block, BLOCK_K=block_k)
    sig = {n: "constexpr" if n in consts else "*bf16" if n in ("Y", "Out") else "fp32" if n in ("alpha", "beta")
           else "i32" for n in names}
    aligned = {n for n in names if n not in consts and n not in ("alpha", "beta")}  # all 16-divisible here
    try:  # an internal API: skip (saying so) where another triton version spells it differently
        src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in consts.items()},
                        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    except TypeError as e:
        pytest.skip(f"triton {triton.__version__}'s ASTSource differs: {e}")
    kernel = compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    ptx = kernel.asm["ptx"]
    assert "wgmma.mma_async" in ptx and "cp.async" in ptx
    assert kernel.metadata.shared >= 2 * 2 * block * block_k * 2  # >= 2 stages of two bf16 tiles
    try:  # the ptxas this triton itself uses for sm_90 (internal API, as above)
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = Path(get_ptxas(90).path)
    except (ImportError, TypeError, AttributeError, RuntimeError):
        ptxas = None
    if ptxas is not None and ptxas.exists():
        ptx_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"sym_gram_{os.getpid()}.ptx"
        ptx_file.write_text(ptx)
        try:
            res = subprocess.run([str(ptxas), "-v", "--gpu-name=sm_90a", str(ptx_file), "-o", os.devnull],
                                 capture_output=True, text=True, timeout=120)
        finally:
            ptx_file.unlink()
        assert res.returncode == 0, res.stderr
        assert "0 bytes spill stores" in res.stderr, res.stderr
