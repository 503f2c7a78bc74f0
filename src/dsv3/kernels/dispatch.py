"""The one place the model chooses between a fast kernel and its reference twin.

CUDA tensors take the Triton kernels when Triton is installed; everything else (CPU runs, tests, CI)
takes the PyTorch path. The switches for A/B runs (DSV3_KERNELS=reference: the PyTorch path everywhere;
DSV3_OVERLAP=0, DSV3_SHARED_INLINE=0, DSV3_OVERLAP_TOKENS, DSV3_FUSED_PAIRS, DSV3_EXPAND_PROMPTS) are read once,
into the frozen `OPTIONS`; `configure(...)` replaces it, `using(...)` for the length of a `with` block.

The deterministic mode (`KernelOptions.deterministic`, the engine's `--deterministic`) makes every row's result
independent of the other rows of its batch: on a GPU every matmul takes one fixed-launch GEMM
(fp8_gemm.fixed_linear), attention a fixed number of KV splits, the router a fixed launch; on the CPU, where a
BLAS product's result can depend on its number of rows, each row's products are computed alone.
"""

from __future__ import annotations

import importlib.util
import os
import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsv3.kernels import reference, scaled_mm

if importlib.util.find_spec("triton") is not None:
    from dsv3.kernels import fp8_gemm, gemv, glue, mla_decode as mla_decode_kernel, mla_prompt, moe as moe_kernel
else:
    fp8_gemm = gemv = glue = mla_decode_kernel = mla_prompt = moe_kernel = None

@dataclass(frozen=True)
class KernelOptions:
    kernels: str = "auto"              # 'reference': the PyTorch path everywhere (DSV3_KERNELS)
    # Independent work of a small batch (the shared experts beside the router and routed experts; kv_a_proj beside
    # q_proj) on a second CUDA stream: at decode sizes each kernel is too short to use the whole GPU (DSV3_OVERLAP).
    overlap: bool = True
    # The most tokens a forward overlaps that work for (DSV3_OVERLAP_TOKENS): the engine's 512-token mixed steps
    # (EngineConfig.mixed_step_tokens) too, moonlight-16b on an H200: 256 decode + 256 prompt rows 11.7-12.0 ms
    # against 12.0 at 256, 256 clients 19,506-19,775 tok/s against 19,280 (bench/results/*-o512-093d08a*).
    overlap_tokens: int = 512
    # bf16: (token, expert) pairs per expert, on average, up to which the fused MoE runs (fused_experts_available;
    # DSV3_FUSED_PAIRS); beyond, the grouped GEMM.
    fused_pairs: int = 128
    # Rows mode's fresh prompt rows in the expanded form where the engine marks them (MLA.rows_attention); False:
    # every row absorbed, as before (DSV3_EXPAND_PROMPTS=0).
    expand_prompts: bool = True
    # One token: the shared experts inside the routed experts' launches, shared_experts_inline (DSV3_SHARED_INLINE).
    shared_inline: bool = True
    # DeepSeek's scheme (activations to e4m3 per 128 columns) on the FP8 tensor cores; False keeps bf16 activations
    # and computes the reference's function. Both measured alike on an H100 in decode
    # (bench/results/2026-11-22-NVIDIA-H100-80GB-HBM3-kernels.md); torch._scaled_mm quantizes them too.
    quantize_activations: bool = True
    # Batch-invariant results (the module docstring): each row's values do not depend on what else is in its
    # batch. The engine sets it around its forwards (EngineConfig.deterministic), CUDA graph capture included.
    deterministic: bool = False

    def __post_init__(self):
        if self.kernels not in ("auto", "reference"):
            raise ValueError(f"DSV3_KERNELS must be 'auto' or 'reference', got {self.kernels!r}")

    @classmethod
    def from_env(cls) -> KernelOptions:
        return cls(kernels=os.environ.get("DSV3_KERNELS", "auto"), overlap=os.environ.get("DSV3_OVERLAP", "1") != "0",
                   shared_inline=os.environ.get("DSV3_SHARED_INLINE", "1") != "0",
                   overlap_tokens=int(os.environ.get("DSV3_OVERLAP_TOKENS", "512")),
                   fused_pairs=int(os.environ.get("DSV3_FUSED_PAIRS", "128")),
                   expand_prompts=os.environ.get("DSV3_EXPAND_PROMPTS", "1") != "0")


OPTIONS = KernelOptions.from_env()
_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def configure(**changes) -> KernelOptions:
    """Replace some of OPTIONS (bench/ A/B runs); returns the options before, to restore them."""
    global OPTIONS
    before, OPTIONS = OPTIONS, dataclasses.replace(OPTIONS, **changes)
    return before


@contextmanager
def using(**changes) -> Iterator[KernelOptions]:
    """OPTIONS with some fields replaced inside the block, restored after it (even on an error)."""
    before = configure(**changes)
    try:
        yield OPTIONS
    finally:
        configure(**dataclasses.asdict(before))


def _by_row(fn: Callable, *rows: torch.Tensor):
    """fn on row i of each tensor of `rows` (along dim 0) alone, the results concatenated (fn returns a tensor
    or a tuple of them): the deterministic mode's CPU path. CPU BLAS picks its kernel, and so the summation
    order, by the shape, so a row computed beside others may round differently from the same row alone; each
    row is copied out first, so that it is read at the same alignment however it was cut from the batch."""
    n = rows[0].shape[0]
    if n <= 1:
        return fn(*rows)
    outs = [fn(*(t[i:i + 1].clone() for t in rows)) for i in range(n)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


def _fixed_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor | None, bias: torch.Tensor | None,
                  out_dtype: torch.dtype | None) -> torch.Tensor:
    """The deterministic mode's x W^T (+ b): the fixed-launch GEMM on the GPU, row by row elsewhere."""
    if use_triton(x):
        y = fp8_gemm.fixed_linear(x, weight, scale_inv, out_dtype=out_dtype,
                                  quantize_activations=OPTIONS.quantize_activations)
        return y if bias is None else y + bias
    w = weight if scale_inv is None else reference.fp8_dequantize(weight, scale_inv, x.dtype)
    flat = x.reshape(-1, x.shape[-1])
    y = _by_row(lambda row: F.linear(row, w, bias), flat).view(*x.shape[:-1], w.shape[0])
    return y if out_dtype is None else y.to(out_dtype)


def use_fast(t: torch.Tensor) -> bool:
    """CUDA, not forced off, no gradient wanted (the fast paths have no backward) and no autocast (it
    changes the reference's dtypes op by op, which the kernels do not follow)."""
    return (t.is_cuda and OPTIONS.kernels == "auto" and not (t.requires_grad and torch.is_grad_enabled())
            and not torch.is_autocast_enabled("cuda"))


def runs_fp8(device: torch.device) -> bool:
    """Whether FP8 weights run on their own kernels here (the FP8 GEMV and GEMM: Triton on compute capability
    8.9+, the first with FP8 tensor cores) rather than the reference's dequantize-at-every-call."""
    return (device.type == "cuda" and fp8_gemm is not None and OPTIONS.kernels == "auto"
            and torch.cuda.get_device_capability(device) >= (8, 9))


def use_triton(t: torch.Tensor) -> bool:
    return use_fast(t) and fp8_gemm is not None


def fp8_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    if use_triton(weight):
        return fp8_gemm.fp8_dequantize(weight, scale_inv, dtype)
    return reference.fp8_dequantize(weight, scale_inv, dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """F.linear for 16-bit weights; out_dtype float32: reference.linear_float32, the float32 sums never rounded to
    16 bits (the GEMV and cuBLAS write them directly, with no float32 copy of the weight). A few rows on the GPU
    take the GEMV kernel (gemv.py: it overlaps the kernel ahead of it, measured 6.0 -> 3.5 us a 2048 x 2048
    projection in a chain, cuBLAS 6.0)."""
    if OPTIONS.deterministic:
        return _fixed_linear(x, weight, None, bias, out_dtype)
    if use_triton(x) and gemv.applies(x, weight):
        return gemv.linear(x, weight, bias, out_dtype=out_dtype)
    if out_dtype is None or out_dtype == x.dtype:
        return F.linear(x, weight, bias)
    if out_dtype != torch.float32:
        raise ValueError(f"linear: out_dtype must be None, x's dtype or float32, got {out_dtype}")
    if use_fast(x) and bias is None and x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(x.reshape(-1, x.shape[-1]), weight.t(), out_dtype=torch.float32).view(*x.shape[:-1], -1)
    return reference.linear_float32(x, weight, bias)


def linear_pair(x: torch.Tensor, first: torch.Tensor, second: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x first^T, x second^T) as one GEMV launch (gemv.linear_pair) where the GEMV applies to both, else None:
    the caller runs the two linears itself."""
    if OPTIONS.deterministic:
        return None
    if use_triton(x) and gemv.applies(x, first) and gemv.applies(x, second) and first.shape[1] == second.shape[1]:
        return gemv.linear_pair(x, first, second)
    return None


def per_head(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """See reference.per_head; decode sizes take the GEMV kernel."""
    if OPTIONS.deterministic:
        if use_triton(x):
            return fp8_gemm.fixed_per_head(x, weight)
        return _by_row(lambda row: reference.per_head(row, weight), x)
    if use_triton(x) and gemv.applies(x, weight):
        return gemv.per_head(x, weight)
    return reference.per_head(x, weight)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """Decode sizes: the GEMV kernel, with the weights dequantized in its registers (reference.fp8_linear's
    function). Else cuBLASLt's blockwise FP8 GEMM where it applies (measured 1.7-4.6x faster than the Triton
    kernel at M >= 64), else the Triton kernel, else the reference."""
    if OPTIONS.deterministic:
        return _fixed_linear(x, weight, scale_inv, None, None)
    if use_triton(x) and gemv.applies(x, weight, scale_inv):
        return gemv.linear(x, weight, scale=scale_inv)
    if use_fast(x) and scaled_mm.supported(x, weight, scale_inv):
        return scaled_mm.fp8_linear(x, weight, scale_inv)
    if use_triton(x):
        return fp8_gemm.fp8_linear(x, weight, scale_inv, quantize_activations=OPTIONS.quantize_activations)
    return reference.fp8_linear(x, weight, scale_inv)


def mla_decode(q_latent: torch.Tensor, q_rope: torch.Tensor, latent_cache: torch.Tensor, block_tables: torch.Tensor,
               context_lens: torch.Tensor, kv_lora_rank: int, softmax_scale: float,
               w_uv: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over the latent cache, (S, H, C); given w_uv (H, v, C), projected per head: (S, H, v).
    Deterministic: a fixed number of KV splits merged in a fixed order (mla_decode_kernel.DETERMINISTIC_SPLITS),
    each row over exactly its own context on the CPU, and W_UV through per_head's fixed GEMM."""
    if OPTIONS.deterministic:
        if use_triton(q_latent):
            out = mla_decode_kernel.mla_decode_fixed(q_latent, q_rope, latent_cache, block_tables, context_lens,
                                                     kv_lora_rank, softmax_scale)
        else:
            def one(q: torch.Tensor, r: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
                return reference.mla_decode(q, r, latent_cache, tables, lens, kv_lora_rank, softmax_scale)

            out = _by_row(one, q_latent, q_rope, block_tables, context_lens)
        return out if w_uv is None else per_head(out, w_uv)
    if use_triton(q_latent):
        return mla_decode_kernel.mla_decode(q_latent, q_rope, latent_cache, block_tables, context_lens,
                                            kv_lora_rank, softmax_scale, w_uv=w_uv)
    out = reference.mla_decode(q_latent, q_rope, latent_cache, block_tables, context_lens, kv_lora_rank,
                               softmax_scale)
    return out if w_uv is None else reference.per_head(out, w_uv)


def prompt_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
                     v: torch.Tensor, first_rows: torch.Tensor, fresh: torch.Tensor, softmax_scale: float,
                     out: torch.Tensor) -> torch.Tensor:
    """The expanded attention of a rows-mode step's fresh prompt rows, into out (reference.prompt_attention)."""
    if use_triton(q_nope):
        return mla_prompt.prompt_attention(q_nope, q_pe, k_nope, k_pe, v, first_rows, fresh, softmax_scale, out)
    return reference.prompt_attention(q_nope, q_pe, k_nope, k_pe, v, first_rows, fresh, softmax_scale, out)


def _grouped_mm_aligned(x: torch.Tensor, weights: torch.Tensor) -> bool:
    # torch._grouped_mm needs 16-byte aligned strides, and on CUDA bf16 on sm90+.
    if not hasattr(torch, "_grouped_mm"):
        return False
    align = 16 // x.element_size()
    if x.shape[1] % align or weights.shape[1] % align:
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return True


def grouped_mm(x: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x grouped by expert; see reference.grouped_mm. Uses torch's grouped GEMM where it runs."""
    if weights.dtype == torch.float8_e4m3fn:
        raise TypeError("grouped_mm takes dequantized expert weights")
    if OPTIONS.deterministic:  # (reads counts on the host: the CPU's path, or 32-bit experts on a GPU)
        *parts, rest = x.split(counts.tolist() + [x.shape[0] - int(counts.sum())])   # rest: rows of no group
        return torch.cat([_fixed_linear(part, w, None, None, None) for w, part in zip(weights, parts)]
                         + [rest.new_zeros(len(rest), weights.shape[1])])
    if _grouped_mm_aligned(x, weights):
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        return torch._grouped_mm(x, weights.transpose(1, 2), offs=offsets)
    return reference.grouped_mm(x, weights, counts)


def fused_experts_available(x: torch.Tensor, gate_up: torch.Tensor, pairs: int) -> bool:
    """The fused Triton MoE takes FP8 experts on a GPU: it reads only the experts that got tokens and never
    dequantizes them. bf16 experts take it too for decode-sized batches: torch._grouped_mm reads every
    expert's weights even when most got no token (moonlight-16b, batch 1 on an H100: 9.1 ms a step, the
    time to read all experts). Prefill-sized bf16 batches stay on the grouped GEMM, 10-20% faster there; the
    bound is OPTIONS.fused_pairs pairs an expert (moonlight-16b on an H200, 256 decode rows beside 256 prompt rows,
    48 an expert: a step 12.3 ms fused against 16.4 on the grouped GEMM with its sort, gathers and scans; beside 512,
    14.5 against 16.8; bench/results/*-closed-loop-mixed-d04ab53.txt)."""
    if not use_triton(x) or x.dtype not in (torch.bfloat16, torch.float16):  # the kernels are checked in 16 bits
        return False
    if OPTIONS.deterministic:  # the fixed GEMM at every batch size
        return True
    return gate_up.dtype == torch.float8_e4m3fn or pairs <= OPTIONS.fused_pairs * gate_up.shape[0]


def fused_experts(x: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor,
                  gate_up: torch.Tensor, gate_up_scale: torch.Tensor | None,
                  down: torch.Tensor, down_scale: torch.Tensor | None, all_local: bool = False,
                  shared: torch.Tensor | None = None, join: Callable[[], None] | None = None,
                  shared_mlp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """See reference.routed_experts (plus reference.moe_combine with shared, or with the shared experts'
    output of shared_mlp's weights); only where fused_experts_available (and shared_experts_inline for
    shared_mlp)."""
    return moe_kernel.fused_experts(x, local_ids, weights, gate_up, gate_up_scale, down, down_scale,
                                    quantize_activations=OPTIONS.quantize_activations, all_local=all_local, shared=shared,
                                    join=join, shared_mlp=shared_mlp, fixed=OPTIONS.deterministic)


def shared_experts_inline(x: torch.Tensor, gate_up: torch.Tensor, gate_up_scale: torch.Tensor | None,
                          down: torch.Tensor, all_local: bool,
                          shared_mlp: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> bool:
    """One token on the GPU: the shared experts run as more experts in the routed experts' two GEMV launches
    (kernels/moe.py one_token_gemv), instead of three kernels of their own beside them, whose programs
    queued behind the routed ones (moonlight-16b batch 1 on an H100, bench/NOTES.md)."""
    return (OPTIONS.shared_inline and not OPTIONS.deterministic and fused_experts_available(x, gate_up, 1)
            and moe_kernel.one_token_gemv(x, gate_up, gate_up_scale, down, all_local, shared_mlp))


# ---- the elementwise glue of a layer (glue.py): one kernel each where PyTorch runs several ----------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x) and use_triton(weight) and (residual is None or use_triton(residual)):
        return glue.rms_norm(x, weight, eps, residual)
    return reference.rms_norm(x, weight, eps, residual)


def mla_rope_and_cache(q_pe: torch.Tensor, kv: torch.Tensor, rope: torch.Tensor, norm_weight: torch.Tensor,
                       eps: float, cache: torch.Tensor, slot_mapping: torch.Tensor, interleaved: bool) -> torch.Tensor:
    # The kernel rounds the normed latent to kv's dtype, the reference to its promotion with the weight's.
    if use_triton(kv) and use_triton(q_pe) and use_triton(norm_weight) and norm_weight.dtype == kv.dtype:
        return glue.mla_rope_and_cache(q_pe, kv, rope, norm_weight, eps, cache, slot_mapping, interleaved)
    return reference.mla_rope_and_cache(q_pe, kv, rope, norm_weight, eps, cache, slot_mapping, interleaved)


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
          norm_topk_prob: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(x) and use_triton(weight):
        return glue.route(x, weight, bias, top_k, n_group, topk_group, norm_topk_prob, scaling,
                          fixed=OPTIONS.deterministic)
    if OPTIONS.deterministic:
        return _by_row(lambda row: reference.route(row, weight, bias, top_k, n_group, topk_group, norm_topk_prob,
                                                   scaling), x.reshape(-1, x.shape[-1]))
    return reference.route(x, weight, bias, top_k, n_group, topk_group, norm_topk_prob, scaling)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if use_triton(gate) and use_triton(up):
        return glue.silu_mul(gate, up)
    return reference.silu_mul(gate, up)


def expert_sum(ys: torch.Tensor, order: torch.Tensor, mine: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    if use_triton(ys):
        return moe_kernel.expert_sum(ys, order, mine, weights)
    return reference.expert_sum(ys, order, mine, weights)


def moe_combine(routed: torch.Tensor, shared: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if use_triton(routed) and use_triton(shared):
        return glue.moe_combine(routed, shared, dtype)
    return reference.moe_combine(routed, shared, dtype)


def fill_pending(ids: torch.Tensor, sources: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    if use_triton(ids):
        return glue.fill_pending(ids, sources, last)
    return reference.fill_pending(ids, sources, last)


def continue_speculation(ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, context_lens: torch.Tensor,
                         tables: torch.Tensor, continues: torch.Tensor, record: torch.Tensor, block_size: int) -> None:
    if use_triton(ids) and record.shape[1] == 4:  # (the kernel: one draft; chained drafts take the PyTorch twin)
        return glue.continue_speculation(ids, positions, slots, context_lens, tables, continues, record, block_size)
    return reference.continue_speculation(ids, positions, slots, context_lens, tables, continues, record, block_size)


def record_speculation(ids: torch.Tensor, tokens: torch.Tensor, record: torch.Tensor) -> None:
    if use_triton(ids) and record.shape[1] == 4:
        return glue.record_speculation(ids, tokens, record)
    return reference.record_speculation(ids, tokens, record)


def argmax(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's argmax of x (M, V), into out (M,) int64 if given."""
    if use_triton(x) and x.dim() == 2:
        return glue.argmax(x, out)
    return torch.argmax(x, dim=-1, out=out) if out is not None else reference.argmax(x)


# ---- two streams ------------------------------------------------------------------------------------------

class Fork:
    """Work queued inside `with fork:` runs on a side stream, after everything queued before it and beside
    what the main stream queues next; `join()` makes the main stream wait for it. Where overlap does not
    apply (CPU, the reference path, training, batches above OPTIONS.overlap_tokens) both are no-ops and the
    block runs in order. Inside a CUDA graph capture the fork and join become the graph's edges.

    Tensors cross safely: the side stream starts after the inputs were written, and whatever it allocates
    goes back to its own stream's pool, reused only by later side-stream work, which waits for the main
    stream (and so for every use of those tensors) when it forks again."""

    def __init__(self, x: torch.Tensor):
        on = OPTIONS.overlap and x.is_cuda and use_fast(x) and x.numel() <= OPTIONS.overlap_tokens * x.shape[-1]
        if on and x.device not in _side_streams:
            _side_streams[x.device] = torch.cuda.Stream(x.device)
        self.stream = _side_streams[x.device] if on else None
        self.context = torch.cuda.stream(self.stream) if on else nullcontext()

    def __enter__(self) -> Fork:
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        self.context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.context.__exit__(*exc)

    def join(self) -> None:
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
