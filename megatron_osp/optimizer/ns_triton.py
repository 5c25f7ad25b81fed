"""A batched symmetric Gram kernel ("SYRK with epilogue") in Triton for Newton–Schulz.

Why: each NS step (newton_schulz.py) on a wide X (m x n, m <= n) is

    A = X X^T;   B = b A + c A A;   X <- a X + B X

and two of its three products are symmetric: X X^T, and A A = A A^T because A is. A kernel that
computes only the output tiles on or above the diagonal and writes each one also into its mirrored
place does half of those two products. Per step that is 3 m^2 n + m^3 multiply-add FLOPs (2 per
MAC) instead of 4 m^2 n + 2 m^3: 2/3 of the work for square matrices. B X stays cuBLAS
(torch.baddbmm).

``sym_gram(Y, alpha, beta)`` = alpha (Y Y^T) + beta Y for a stack Y [batch, m, k] (k == m when
beta != 0), one program per (upper tile, matrix). Accumulation is fp32; the output has Y's dtype.
Diagonal tiles keep their upper triangle and mirror it, so the result is exactly symmetric (the next
product relies on A being symmetric). Shapes need not be multiples of the tile (masked loads and
stores). On CUDA the tile configuration is autotuned over a few H100-minded configs; with
TRITON_INTERPRET=1 (set before this module is imported) the same kernel runs on CPU tensors in
Triton's interpreter, which is how the tests check it on machines without a GPU.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as e:  # the torch backend of newton_schulz needs none of this
    triton = tl = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"
else:
    _IMPORT_ERROR = None

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (BLOCK, BLOCK_K, num_warps, num_stages). Square tiles (mirroring needs them); 128 x 128 x 64 with
# 8 warps is the usual Hopper bf16 GEMM tile. Compiled for sm_90 here (no GPU; tests/test_ns_triton.py)
# they use wgmma with cp.async pipelining and do not spill; 128 x 128 with 4 warps spilled with the
# beta epilogue and was dropped. Few configs: each one compiles and is timed once per (m, k, beta)
# key, and a GPU session is short. Their speed is unmeasured.
GPU_CONFIGS = ((128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4))
# The interpreter runs programs one by one, each op in numpy: its cost is per program, so tiles that
# are small but not tiny (the tests pin 16 x 16 where they want many tiles per matrix).
INTERPRETER_CONFIG = (32, 32, 1, 1)


if triton is not None:

    @triton.jit
    def _sym_gram_kernel(
        Y, Out, M,
        stride_yb, stride_ym,  # Y and Out are contiguous: the last dim has unit stride, known at compile
        stride_ob, stride_om,  # time (loads and stores vectorise; Triton does not specialise 1s)
        alpha, beta,
        K: tl.constexpr,  # constexpr: a fixed trip count, and the interpreter (numpy >= 2.4) needs a Python int here
        HAS_BETA: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, EVEN_M: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # Program p -> upper tile (ti, tj), ti <= tj, column by column: p = tj (tj + 1) / 2 + ti.
        # The float square root is corrected by one integer step either way.
        pid = tl.program_id(0)
        tj = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
        tj = tl.where((tj + 1) * (tj + 2) // 2 <= pid, tj + 1, tj)
        tj = tl.where(tj * (tj + 1) // 2 > pid, tj - 1, tj)
        ti = pid - tj * (tj + 1) // 2
        y = Y + tl.program_id(1).to(tl.int64) * stride_yb
        o = Out + tl.program_id(1).to(tl.int64) * stride_ob

        rows = ti * BLOCK + tl.arange(0, BLOCK)
        cols = tj * BLOCK + tl.arange(0, BLOCK)
        ks = tl.arange(0, BLOCK_K)
        row_ok = rows < M
        col_ok = cols < M
        a_ptr = y + rows[:, None] * stride_ym + ks[None, :]  # Y[rows, k]     BLOCK x BLOCK_K
        b_ptr = y + cols[None, :] * stride_ym + ks[:, None]  # Y[cols, k]^T   BLOCK_K x BLOCK
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_M and EVEN_K:
                a = tl.load(a_ptr)
                b = tl.load(b_ptr)
            else:
                k_ok = (k0 + ks) < K
                a = tl.load(a_ptr, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptr, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            if UPCAST:  # interpreter only: its tl.dot gets 16-bit floats wrong; fp32 holds their products exactly
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE:  # fp32 input: no TF32 rounding, like torch's default fp32 matmul
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            a_ptr += BLOCK_K
            b_ptr += BLOCK_K

        acc = acc * alpha
        in_tile = row_ok[:, None] & col_ok[None, :]
        if HAS_BETA:  # + beta Y[rows, cols] (Y square)
            y_tile = tl.load(y + rows[:, None] * stride_ym + cols[None, :], mask=in_tile, other=0.0)
            acc += beta * y_tile.to(tl.float32)
        out = acc.to(Out.dtype.element_ty)
        out_ptr = o + rows[:, None] * stride_om + cols[None, :]
        if ti == tj:  # keep the upper triangle and mirror it: exactly symmetric
            out = tl.where(rows[:, None] <= cols[None, :], out, tl.trans(out))
            tl.store(out_ptr, out, mask=in_tile)
        else:
            mirror_ptr = o + cols[:, None] * stride_om + rows[None, :]
            if EVEN_M:
                tl.store(out_ptr, out)
                tl.store(mirror_ptr, tl.trans(out))
            else:
                tl.store(out_ptr, out, mask=in_tile)
                tl.store(mirror_ptr, tl.trans(out), mask=col_ok[:, None] & row_ok[None, :])

    _even = {
        "EVEN_M": lambda args: args["M"] % args["BLOCK"] == 0,
        "EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0,
    }
    _kernel = triton.heuristics(_even)(_sym_gram_kernel)
    _tuned = triton.autotune(
        configs=[triton.Config({"BLOCK": b, "BLOCK_K": bk}, num_warps=w, num_stages=s) for b, bk, w, s in GPU_CONFIGS],
        key=["M", "K", "HAS_BETA", "IEEE", "UPCAST"],
    )(_kernel)
    INTERPRET = type(_sym_gram_kernel).__name__ == "InterpretedFunction"
else:
    INTERPRET = False


def unavailable_reason(t: torch.Tensor) -> str | None:
    """Why the Triton path cannot run on tensor ``t`` (None: it can)."""
    if triton is None:
        return f"triton is not importable ({_IMPORT_ERROR})"
    if t.dtype not in DTYPES:
        return f"the Triton kernel takes {[str(d) for d in DTYPES]}, not {t.dtype}"
    if INTERPRET:
        return None
    if not t.is_cuda:
        return f"the tensor is on {t.device}; the Triton kernel needs CUDA (or TRITON_INTERPRET=1 for its CPU interpreter)"
    if t.dtype == torch.bfloat16 and torch.version.hip is None and torch.cuda.get_device_capability(t.device) < (8, 0):
        return f"bf16 tensor cores need compute capability >= 8.0, {torch.cuda.get_device_name(t.device)} has less"
    return None


def triton_available(t: torch.Tensor) -> bool:
    """Whether sym_gram can run on ``t``: a CUDA tensor with triton importable, or interpreter mode."""
    return unavailable_reason(t) is None


def sym_gram(Y: torch.Tensor, alpha: float = 1.0, beta: float = 0.0, *, config=None) -> torch.Tensor:
    """alpha (Y Y^T) + beta Y for Y [batch, m, k] (or one [m, k] matrix); beta needs k == m.

    ``config`` = (BLOCK, BLOCK_K, num_warps, num_stages) pins the tiling; otherwise CUDA autotunes
    over GPU_CONFIGS and the interpreter uses INTERPRETER_CONFIG.
    """
    if Y.ndim not in (2, 3):
        raise ValueError(f"sym_gram takes [m, k] or [batch, m, k], got shape {tuple(Y.shape)}")
    reason = unavailable_reason(Y)
    if reason is not None:
        raise RuntimeError(f"sym_gram: {reason}")
    squeeze = Y.ndim == 2
    Y = (Y.unsqueeze(0) if squeeze else Y).contiguous()
    batch, m, k = Y.shape
    if beta != 0 and k != m:
        raise ValueError(f"sym_gram: beta * Y needs a square Y, got {m} x {k}")
    out = torch.empty(batch, m, m, dtype=Y.dtype, device=Y.device)
    if batch and m:
        args = (Y, out, m, Y.stride(0), Y.stride(1), out.stride(0), out.stride(1), float(alpha), float(beta))
        flags = dict(K=k, HAS_BETA=beta != 0, IEEE=Y.dtype == torch.float32, UPCAST=INTERPRET and Y.dtype != torch.float32)
        if config is None and not INTERPRET:
            _tuned[lambda meta: (_tiles(m, meta["BLOCK"]), batch)](*args, **flags)
        else:
            block, block_k, warps, stages = config or INTERPRETER_CONFIG
            _kernel[(_tiles(m, block), batch)](
                *args, **flags, BLOCK=block, BLOCK_K=block_k, num_warps=warps, num_stages=stages
            )
    return out[0] if squeeze else out


def _tiles(m: int, block: int) -> int:
    t = -(-m // block)
    return t * (t + 1) // 2
