"""Kernel benchmark: the Triton kernels against their PyTorch twins and torch's own ops, on the GPU.

    PYTHONPATH=src python bench/kernels.py [--out bench/results] [--commit abc1234] [--budget 300]
    PYTHONPATH=src TRITON_INTERPRET=1 python bench/kernels.py --smoke    # tiny shapes on the CPU: the script runs

Measures the two ceilings first (device-to-device copy, bf16 matmul), checks each kernel against its
reference in bf16 at the model's shapes, then times (CUDA graphs of several calls on rotated inputs,
median of replays):
- absorbed MLA decode at H = 128 (DeepSeek-V3) and 16 (Moonlight), C = 512, R = 64, batch 1/64/256,
  context 256/4096, a few launch shapes; achieved GB/s against the copy bandwidth;
- the FP8 block-scaled GEMM at V3 shapes, both activation schemes, against torch._scaled_mm with
  1x128/128x128 block scales and a bf16 torch.matmul; TFLOP/s and weight GB/s;
- fp8_dequantize; the routed experts (fused Triton against the sort-and-segment PyTorch path);
- that the decode-path kernels run under torch.cuda.set_sync_debug_mode("error").
Writes <out>/<date>-<gpu>-kernels.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
import traceback
from pathlib import Path

import torch
import triton

from dsv3.kernels import dispatch, reference
from dsv3.kernels import fp8_gemm, mla_decode as mla_kernel, moe as moe_kernel, scaled_mm

FP8 = torch.float8_e4m3fn


class Bench:
    def __init__(self, args):
        self.args, self.t0 = args, time.time()
        self.cuda = torch.cuda.is_available() and not args.smoke
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32   # the interpreter cannot multiply bf16
        self.results: dict = {"errors": []}

    def left(self) -> float:
        return self.args.budget - (time.time() - self.t0)

    def section(self, name, fn):
        if self.left() <= 0:
            self.results["errors"].append(f"{name}: skipped, time budget spent")
            return
        start = time.time()
        try:
            fn()
        except Exception:  # a broken section must not cost the others
            self.results["errors"].append(f"{name}: {traceback.format_exc()[-1500:]}")
            print(f"!! {name} failed:\n{traceback.format_exc()[-1500:]}", flush=True)
        print(f"-- {name}: {time.time() - start:.1f} s", flush=True)
        self.save()

    def timed(self, fns, reps: int = 20, graph: bool = True) -> tuple[float, str]:
        """Seconds per call: a CUDA graph of one call of each fn (inputs rotate), median of `reps` replays."""
        if not self.cuda:
            start = time.perf_counter()
            for f in fns:
                f()
            return (time.perf_counter() - start) / len(fns), "cpu"
        for f in fns:
            f()
        torch.cuda.synchronize()
        mode = "graph"
        if graph:
            try:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for f in fns:
                        f()
                run = g.replay
            except Exception as e:
                mode, run = f"eager ({type(e).__name__})", None
        if not graph or run is None:
            mode = "eager" if not graph else mode

            def run():
                for f in fns:
                    f()
        run()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3 / len(fns))
        return statistics.median(times), mode

    # ---- sections ---------------------------------------------------------------------------------
    def environment(self):
        r = self.results
        r["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        r["gpu"] = torch.cuda.get_device_name() if self.cuda else "cpu (smoke)"
        r["torch"], r["triton"], r["commit"] = torch.__version__, triton.__version__, self.args.commit
        if not self.cuda:
            return
        n = 1 << 29                                            # 1 GiB of bf16 each way
        src, dst = torch.randn(n, device="cuda", dtype=torch.bfloat16), torch.empty(n, device="cuda", dtype=torch.bfloat16)
        t, _ = self.timed([lambda: dst.copy_(src)], reps=10, graph=False)
        r["copy_TBps"] = 2 * n * 2 / t / 1e12
        del src, dst
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        t, _ = self.timed([lambda: a @ b], reps=10, graph=False)
        r["matmul_TFLOPs"] = 2 * 8192 ** 3 / t / 1e12
        try:
            a8, b8 = a.to(FP8), b.to(FP8)
            one = torch.ones((), device="cuda")
            t, _ = self.timed([lambda: torch._scaled_mm(a8, b8.t(), one, one, out_dtype=torch.bfloat16)], reps=10,
                              graph=False)
            r["fp8_matmul_TFLOPs"] = 2 * 8192 ** 3 / t / 1e12
        except Exception as e:
            r["fp8_matmul_TFLOPs"] = f"failed: {e}"[:300]
        print({k: r[k] for k in ("gpu", "torch", "triton", "copy_TBps", "matmul_TFLOPs", "fp8_matmul_TFLOPs")},
              flush=True)

    def paged(self, lens, heads, c=512, r=64, block_size=16):
        dev, dt = self.device, self.dtype
        width = max(-(-n // block_size) for n in lens)
        num_blocks = len(lens) * width
        cache = torch.randn(num_blocks, block_size, c + r, device=dev).to(dt)
        tables = torch.randperm(num_blocks, device=dev)[: len(lens) * width].view(len(lens), width).int()
        ctx = torch.tensor(lens, dtype=torch.int32, device=dev)
        q_latent = torch.randn(len(lens), heads, c, device=dev).to(dt)
        q_rope = torch.randn(len(lens), heads, r, device=dev).to(dt)
        return q_latent, q_rope, cache, tables, ctx

    def correctness(self):
        rows = self.results.setdefault("correctness", [])
        s = self.args.smoke

        def add(name, out, ref):
            out, ref = out.double(), ref.double()
            err = ((out - ref).norm() / ref.norm()).item() if torch.isfinite(out).all() else float("nan")
            rows.append({"check": name, "rel_err": err})
            print(f"{name}: {err:.2e}", flush=True)

        c, r = (32, 16) if s else (512, 64)
        for heads, lens in [(4 if s else 128, [1, 100, 1000 if not s else 50, 40 if s else 4097]),
                            (4 if s else 16, [7, 333])]:
            q, qr, cache, tables, ctx = self.paged(lens, heads, c, r)
            ref = reference.mla_decode(q.double(), qr.double(), cache.double(), tables, ctx, c, 0.1)
            add(f"mla_decode H={heads} lens={lens}", mla_kernel.mla_decode(q, qr, cache, tables, ctx, c, 0.1), ref)
            add(f"mla_decode H={heads} one split", mla_kernel.mla_decode(q, qr, cache, tables, ctx, c, 0.1,
                                                                          num_splits=1), ref)
        m, n, k = (5, 200, 320) if s else (37, 4096, 7168)
        w, ws = reference.fp8_quantize(torch.randn(n, k, device=self.device) * 0.05)
        x = torch.randn(m, k, device=self.device).to(self.dtype)
        ref = reference.fp8_linear(x.double(), w, ws)
        add(f"fp8_linear w8a16 {m}x{n}x{k} vs dequantized", fp8_gemm.fp8_linear(x, w, ws, quantize_activations=False), ref)
        add(f"fp8_linear fp8 {m}x{n}x{k} vs dequantized", fp8_gemm.fp8_linear(x, w, ws), ref)
        add(f"fp8_linear one row 1x{n}x{k} (the GEMV) vs dequantized", dispatch.fp8_linear(x[:1], w, ws), ref[:1])
        xq, xs = reference.fp8_quantize(x.float(), block=(1, 128))
        ref_q = reference.fp8_dequantize(xq, xs, torch.float64) @ reference.fp8_dequantize(w, ws, torch.float64).T
        add(f"fp8_linear fp8 {m}x{n}x{k} vs act-quantized reference", fp8_gemm.fp8_linear(x, w, ws), ref_q)
        w2, ws2 = reference.fp8_quantize(torch.randn(576, 256 if s else 7168, device=self.device))
        add("fp8_dequantize (576 rows: partial edge block)", fp8_gemm.fp8_dequantize(w2, ws2, self.dtype),
            reference.fp8_dequantize(w2, ws2, self.dtype))
        e, d, i, t, kk = (6, 160, 96, 7, 3) if s else (16, 1024, 256, 37, 8)
        x = torch.randn(t, d, device=self.device).to(self.dtype)
        ids = torch.rand(t, e + 2, device=self.device).topk(kk, dim=-1).indices - 1     # -1 and e: other ranks
        wts = torch.rand(t, kk, device=self.device)
        gu, dn = torch.randn(e, 2 * i, d, device=self.device) * 0.05, torch.randn(e, d, i, device=self.device) * 0.05
        gq, gs = reference.fp8_quantize(gu)
        dq, ds = reference.fp8_quantize(dn)
        ref = reference.routed_experts(x.double(), ids, wts, gq, gs, dq, ds)
        add("fused_experts fp8 w8a16", moe_kernel.fused_experts(x, ids, wts, gq, gs, dq, ds, quantize_activations=False),
            ref)
        add("fused_experts fp8 (activations quantized)", moe_kernel.fused_experts(x, ids, wts, gq, gs, dq, ds), ref)
        one = torch.randperm(e, device=self.device)[:kk].view(1, kk)                     # one token, all here
        add("fused_experts fp8 one token (the GEMVs)", moe_kernel.fused_experts(x[:1], one, wts[:1], gq, gs, dq, ds,
                                                                                False, all_local=True),
            reference.routed_experts(x[:1].double(), one, wts[:1], gq, gs, dq, ds))
        gb, db = gu.to(self.dtype), dn.to(self.dtype)
        ref = reference.routed_experts(x.double(), ids, wts, gb.double(), None, db.double(), None)
        add("fused_experts bf16", moe_kernel.fused_experts(x, ids, wts, gb, None, db, None), ref)

    def sync_free(self):
        """Each decode-path op under set_sync_debug_mode('error'): a host synchronisation raises."""
        rows = self.results.setdefault("sync_free", [])
        if not self.cuda:
            return
        from dsv3.config import ModelConfig
        from dsv3.model.moe import Experts

        q, qr, cache, tables, ctx = self.paged([100, 900], 16)
        w, ws = reference.fp8_quantize(torch.randn(1024, 2048, device="cuda"))
        x = torch.randn(8, 2048, device="cuda", dtype=torch.bfloat16)
        ids = torch.rand(8, 64, device="cuda").topk(6, dim=-1).indices
        wts = torch.rand(8, 6, device="cuda")
        cfg = ModelConfig(hidden_size=2048, moe_intermediate_size=1408, n_routed_experts=64, num_experts_per_tok=6)
        experts = Experts(cfg, dtype=torch.bfloat16).cuda()
        for p in experts.parameters():
            torch.nn.init.normal_(p, std=0.02)
        gq, gs = reference.fp8_quantize(experts.gate_up_proj.float())
        dq, ds = reference.fp8_quantize(experts.down_proj.float())
        checks = {
            "mla_decode (triton)": lambda: dispatch.mla_decode(q, qr, cache, tables, ctx, 512, 0.1),
            "fp8_linear (triton)": lambda: dispatch.fp8_linear(x, w, ws),
            "fused_experts fp8 (triton)": lambda: moe_kernel.fused_experts(x, ids, wts, gq, gs, dq, ds),
            "Experts.forward bf16 (sort + torch._grouped_mm)": lambda: experts(x, ids, wts),
        }
        for name, fn in checks.items():
            fn()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                fn()
                ok = "no host sync"
            except Exception as e:
                ok = f"SYNCS: {str(e)[:200]}"
            finally:
                torch.cuda.set_sync_debug_mode("default")
            rows.append({"op": name, "result": ok})
            print(f"{name}: {ok}", flush=True)

    def mla(self):
        rows = self.results.setdefault("mla_decode", [])
        s = self.args.smoke
        c, r, bs = (32, 16, 16) if s else (512, 64, 16)
        batches, contexts = ((1, 2), (32, 64)) if s else ((1, 64, 256), (256, 4096))
        rotations = 2 if s else 4
        pool_tokens = max(batches) * max(contexts) * rotations
        pool = torch.randn(pool_tokens // bs, bs, c + r, device=self.device).to(self.dtype)   # (blocks, bs, C+R)
        copy_bw = self.results.get("copy_TBps")
        sweep = {128: [dict(block_h=16, block_n=32, num_warps=4), dict(block_h=16, block_n=64, num_warps=4),
                       dict(block_h=32, block_n=32, num_warps=8), dict(block_h=64, block_n=32, num_warps=8)],
                 16: [dict(block_h=16, block_n=32, num_warps=4), dict(block_h=16, block_n=64, num_warps=4),
                      dict(block_h=16, block_n=32, num_warps=8), dict(block_h=16, block_n=32, num_stages=3)]}
        for heads in ((4,) if s else (128, 16)):
            for batch in batches:
                for ctx_len in contexts:
                    if self.left() < 20:
                        self.results["errors"].append(f"mla H={heads} B={batch} ctx={ctx_len}: skipped, budget")
                        continue
                    width = ctx_len // bs
                    sets = []
                    for _ in range(rotations):
                        tables = torch.randperm(pool.shape[0], device=self.device)[: batch * width].view(batch, width).int()
                        q = torch.randn(batch, heads, c, device=self.device).to(self.dtype)
                        qr = torch.randn(batch, heads, r, device=self.device).to(self.dtype)
                        sets.append((q, qr, tables))
                    ctx = torch.full((batch,), ctx_len, dtype=torch.int32, device=self.device)
                    nbytes = batch * ctx_len * (c + r) * pool.element_size() + batch * heads * (2 * c + r) * 2
                    variants = [("default", {})]
                    if batch in (1, 64) and ctx_len == max(contexts) and not s:
                        variants += [(str(v), v) for v in sweep[heads]]
                        if batch == 1:
                            variants += [("splits=8", dict(num_splits=8)), ("splits=16", dict(num_splits=16))]
                    for name, kw in variants:
                        fns = [lambda q=q, qr=qr, t=t, kw=kw: mla_kernel.mla_decode(q, qr, pool, t, ctx, c, 0.1, **kw)
                               for q, qr, t in sets]
                        try:
                            sec, mode = self.timed(fns)
                        except Exception as e:
                            rows.append({"heads": heads, "batch": batch, "context": ctx_len, "variant": name,
                                         "error": str(e)[:300]})
                            continue
                        rows.append({"heads": heads, "batch": batch, "context": ctx_len, "variant": name, "us": sec * 1e6,
                                     "GBps": nbytes / sec / 1e9, "mode": mode,
                                     "copy_fraction": nbytes / sec / 1e12 / copy_bw if copy_bw else None})
                        print(rows[-1], flush=True)
                    if batch * ctx_len <= 64 * 4096:
                        fns = [lambda q=q, qr=qr, t=t: reference.mla_decode(q, qr, pool, t, ctx, c, 0.1) for q, qr, t in sets]
                        sec, mode = self.timed(fns, reps=5, graph=False)
                        rows.append({"heads": heads, "batch": batch, "context": ctx_len, "variant": "reference (torch)",
                                     "us": sec * 1e6, "GBps": nbytes / sec / 1e9, "mode": mode})
                        print(rows[-1], flush=True)

    def gemm(self):
        rows = self.results.setdefault("fp8_gemm", [])
        s = self.args.smoke
        shapes = [(256, 128)] if s else [(18432, 7168), (7168, 18432), (24576, 1536), (7168, 16384)]
        ms = (1, 40) if s else (1, 64, 2048, 8192)
        sweep = {1: [dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=4),
                     dict(BLOCK_M=16, BLOCK_N=128, num_warps=4, num_stages=4),
                     dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=6)],
                 64: [dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4),
                      dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=6)],
                 2048: [dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=4),
                        dict(BLOCK_M=128, BLOCK_N=256, num_warps=8, num_stages=3),
                        dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4)]}
        for n, k in shapes:
            copies = [reference.fp8_quantize(torch.randn(n, k, device=self.device) * 0.02) for _ in range(2 if s else 3)]
            dense = [reference.fp8_dequantize(w, ws, self.dtype) for w, ws in copies]
            for m in ms:
                if self.left() < 20:
                    self.results["errors"].append(f"gemm {m}x{n}x{k}: skipped, budget")
                    continue
                x = torch.randn(m, k, device=self.device).to(self.dtype)
                xq, xs = reference.fp8_quantize(x.float(), block=(1, 128))
                xs_col = xs.t().contiguous().t()                    # (M, K/128), column-major as cuBLASLt wants
                flops, wbytes = 2 * m * n * k, n * k
                methods = {
                    "triton fp8 (act quant fused)": [lambda w=w, ws=ws: fp8_gemm.fp8_linear(x, w, ws) for w, ws in copies],
                    "triton w8a16": [lambda w=w, ws=ws: fp8_gemm.fp8_linear(x, w, ws, quantize_activations=False)
                                     for w, ws in copies],
                    "torch._scaled_mm blockwise (acts pre-quantized)": [
                        lambda w=w, ws=ws: torch._scaled_mm(xq, w.t(), xs_col, ws.t(), out_dtype=torch.bfloat16)
                        for w, ws in copies],
                    "torch bf16 matmul (dense weights)": [lambda d=d: x @ d.t() for d in dense],
                    "dsv3 scaled_mm.fp8_linear (quantize + pad + _scaled_mm)": [
                        lambda w=w, ws=ws: scaled_mm.fp8_linear(x, w, ws) for w, ws in copies],
                    "dsv3 dispatch.fp8_linear": [lambda w=w, ws=ws: dispatch.fp8_linear(x, w, ws) for w, ws in copies],
                }
                if m == 1:
                    methods["reference fp8_linear (dequantize + matmul)"] = [
                        lambda w=w, ws=ws: reference.fp8_linear(x, w, ws) for w, ws in copies]
                if not s:
                    for cfg in sweep.get(m, []):
                        methods[f"triton fp8 {cfg}"] = [lambda w=w, ws=ws, cfg=cfg: fp8_gemm.fp8_linear(x, w, ws, config=cfg)
                                                        for w, ws in copies]
                ref = None
                for name, fns in methods.items():
                    try:
                        out = fns[0]()
                        if ref is None:
                            ref = reference.fp8_linear(x.float(), copies[0][0], copies[0][1])
                        err = ((out.float() - ref).norm() / ref.norm()).item()
                        sec, mode = self.timed(fns, reps=10 if m >= 2048 else 20)
                    except Exception as e:
                        rows.append({"m": m, "n": n, "k": k, "method": name, "error": str(e)[:300]})
                        print(rows[-1], flush=True)
                        continue
                    wb = wbytes * (2 if "bf16 matmul" in name else 1)
                    rows.append({"m": m, "n": n, "k": k, "method": name, "us": sec * 1e6, "TFLOPs": flops / sec / 1e12,
                                 "weight_GBps": wb / sec / 1e9, "rel_err_vs_dequantized": err, "mode": mode})
                    print(rows[-1], flush=True)
            del copies, dense

    def dequant(self):
        rows = self.results.setdefault("fp8_dequantize", [])
        n, k = (256, 256) if self.args.smoke else (18432, 7168)
        copies = [reference.fp8_quantize(torch.randn(n, k, device=self.device)) for _ in range(2)]
        for name, f in (("triton", fp8_gemm.fp8_dequantize), ("reference (torch)", reference.fp8_dequantize)):
            sec, mode = self.timed([lambda w=w, ws=ws: f(w, ws, self.dtype) for w, ws in copies], reps=10)
            rows.append({"shape": [n, k], "impl": name, "us": sec * 1e6, "GBps": n * k * 3 / sec / 1e9, "mode": mode})
            print(rows[-1], flush=True)

    def moe(self):
        rows = self.results.setdefault("routed_experts", [])
        s = self.args.smoke
        setups = ([("smoke fp8", 8, 64, 32, 3, True, (1, 64)), ("smoke plain", 8, 64, 32, 3, False, (5,))] if s else
                  [("v3 fp8", 256, 7168, 2048, 8, True, (1, 64, 2048)),
                   ("moonlight bf16", 64, 2048, 1408, 6, False, (1, 64, 256, 2048))])
        for name, e, d, i, k, fp8, token_counts in setups:
            if self.left() < 30:
                self.results["errors"].append(f"moe {name}: skipped, budget")
                continue
            if fp8:
                def fp8_weight(shape):
                    # Random e4m3 bytes without the NaN codes (0x7f, 0xff): 11 GB for V3 without an fp32 detour.
                    bits = torch.randint(0, 0x7F, shape, dtype=torch.uint8, device=self.device)
                    sign = torch.randint(0, 2, shape, dtype=torch.uint8, device=self.device) << 7
                    return (bits | sign).view(FP8)
                gu, dn = fp8_weight((e, 2 * i, d)), fp8_weight((e, d, i))
                gs = torch.rand(e, -(-2 * i // 128), -(-d // 128), device=self.device) * 1e-3
                ds = torch.rand(e, -(-d // 128), -(-i // 128), device=self.device) * 1e-3
            else:
                gu = (torch.randn(e, 2 * i, d, device=self.device) * 0.02).to(self.dtype)
                dn = (torch.randn(e, d, i, device=self.device) * 0.02).to(self.dtype)
                gs = ds = None
            expert_bytes = (3 * i * d) * gu.element_size()
            for tokens in token_counts:
                if self.left() < 20:
                    self.results["errors"].append(f"moe {name} N={tokens}: skipped, budget")
                    continue
                sets = []
                for _ in range(3):
                    x = torch.randn(tokens, d, device=self.device).to(self.dtype)
                    ids = torch.rand(tokens, e, device=self.device).topk(k, dim=-1).indices
                    sets.append((x, ids, torch.rand(tokens, k, device=self.device)))
                touched = sum(len(torch.unique(ids)) for _, ids, _ in sets) / len(sets)
                nbytes = touched * expert_bytes
                flops = 2 * tokens * k * 3 * i * d
                impls = {"fused triton": lambda x, ids, w: moe_kernel.fused_experts(x, ids, w, gu, gs, dn, ds)}
                if fp8:
                    impls["fused triton w8a16"] = lambda x, ids, w: moe_kernel.fused_experts(
                        x, ids, w, gu, gs, dn, ds, quantize_activations=False)
                if not fp8 or tokens == 64:
                    impls["sort + torch._grouped_mm (model path)"] = lambda x, ids, w: self.sorted_experts(
                        x, ids, w, gu, gs, dn, ds)
                for impl, f in impls.items():
                    try:
                        sec, mode = self.timed([lambda a=a: f(*a) for a in sets],
                                               reps=3 if (fp8 and "sort" in impl) else 10)
                    except Exception as ex:
                        rows.append({"setup": name, "tokens": tokens, "impl": impl, "error": str(ex)[:300]})
                        print(rows[-1], flush=True)
                        continue
                    rows.append({"setup": name, "tokens": tokens, "impl": impl, "us": sec * 1e6,
                                 "experts_touched": touched, "weight_GBps": nbytes / sec / 1e9,
                                 "TFLOPs": flops / sec / 1e12, "mode": mode})
                    print(rows[-1], flush=True)
            del gu, dn, gs, ds
            if self.cuda:
                torch.cuda.empty_cache()

    def sorted_experts(self, x, ids, w, gu, gs, dn, ds):
        """The model's own PyTorch path (Experts.forward without the fused branch), on these weights."""
        from dsv3.model.moe import Experts
        experts = Experts.__new__(Experts)
        torch.nn.Module.__init__(experts)
        experts.n_local, experts.first = gu.shape[0], 0
        experts.gate_up_proj, experts.gate_up_proj_scale_inv, experts.down_proj, experts.down_proj_scale_inv = gu, gs, dn, ds
        old = dispatch.fused_experts_available
        dispatch.fused_experts_available = lambda *a: False
        try:
            return experts(x, ids, w)
        finally:
            dispatch.fused_experts_available = old

    # ---- output -----------------------------------------------------------------------------------
    def save(self):
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        gpu = self.results.get("gpu", "unknown").replace(" ", "-")
        stem = f"{datetime.date.today()}-{gpu}-kernels"
        (out / f"{stem}.json").write_text(json.dumps(self.results, indent=1, default=str))
        (out / f"{stem}.md").write_text(self.markdown())

    def markdown(self) -> str:
        r = self.results
        lines = [f"# Kernels: {r.get('gpu')} · torch {r.get('torch')} · triton {r.get('triton')} · "
                 f"commit {r.get('commit')} · {r.get('date')}", "",
                 f"copy {r.get('copy_TBps', 0):.2f} TB/s · bf16 matmul {r.get('matmul_TFLOPs', 0):.0f} TFLOP/s · "
                 f"fp8 matmul {r.get('fp8_matmul_TFLOPs')} TFLOP/s", ""]
        lines += ["## correctness (bf16 vs float64 reference)", "", "| check | rel err |", "| --- | --- |"]
        lines += [f"| {x['check']} | {x['rel_err']:.2e} |" for x in r.get("correctness", [])]
        lines += ["", "## host synchronisation", "", "| op | result |", "| --- | --- |"]
        lines += [f"| {x['op']} | {x['result']} |" for x in r.get("sync_free", [])]
        lines += ["", "## MLA decode (C=512, R=64, block 16)", "", "| H | batch | context | variant | µs | GB/s | of copy |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for x in r.get("mla_decode", []):
            if "us" in x:
                frac = f"{x['copy_fraction']:.0%}" if x.get("copy_fraction") else ""
                lines.append(f"| {x['heads']} | {x['batch']} | {x['context']} | {x['variant']} | {x['us']:.1f} | "
                             f"{x['GBps']:.0f} | {frac} |")
        lines += ["", "## FP8 GEMM (y = x W^T, W e4m3 128x128 blocks)", "",
                  "| M | N | K | method | µs | TFLOP/s | weight GB/s | rel err vs dequantized |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [table_row(x, ["m", "n", "k", "method"],
                            lambda x: [f"{x['us']:.1f}", f"{x['TFLOPs']:.1f}", f"{x['weight_GBps']:.0f}",
                                       f"{x['rel_err_vs_dequantized']:.1e}"]) for x in r.get("fp8_gemm", [])]
        lines += ["", "## fp8_dequantize", "", "| shape | impl | µs | GB/s |", "| --- | --- | --- | --- |"]
        lines += [f"| {x['shape']} | {x['impl']} | {x['us']:.1f} | {x['GBps']:.0f} |" for x in r.get("fp8_dequantize", [])]
        lines += ["", "## routed experts", "", "| setup | tokens | impl | µs | experts touched | weight GB/s | TFLOP/s |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [table_row(x, ["setup", "tokens", "impl"],
                            lambda x: [f"{x['us']:.1f}", f"{x['experts_touched']:.0f}", f"{x['weight_GBps']:.0f}",
                                       f"{x['TFLOPs']:.1f}"]) for x in r.get("routed_experts", [])]
        if r["errors"]:
            lines += ["", "## errors", ""] + [f"- {one_line(e.splitlines()[0], 60)}: {one_line(e.splitlines()[-1], 200)}" for e in r["errors"]]
        return "\n".join(lines) + "\n"


def table_row(x: dict, keys: list[str], measured, width: int = 4) -> str:
    """A Markdown row: the case's keys, then its `width` measured cells, or its error and empty cells."""
    cells = [str(x[k]) for k in keys]
    cells += measured(x) if "us" in x else [f"error: {one_line(x['error'])}"] + [""] * (width - 1)
    return "| " + " | ".join(cells) + " |"


def one_line(text: str, width: int = 80) -> str:
    return " ".join(str(text).split())[:width]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--commit", default=os.environ.get("DSV3_COMMIT", "unknown"))
    p.add_argument("--budget", type=float, default=300.0, help="seconds; later rows are skipped past it")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (with TRITON_INTERPRET=1)")
    p.add_argument("--sections", default="environment,correctness,sync_free,mla,gemm,moe,dequant")
    args = p.parse_args()
    bench = Bench(args)
    torch.manual_seed(0)
    for name in args.sections.split(","):
        bench.section(name, getattr(bench, name))
    print(bench.markdown())


if __name__ == "__main__":
    main()
