#!/usr/bin/env python3
"""torch_ref.py: PyTorch's scaled_dot_product_attention on the shapes of
kvrt-bench's GPU attention rows, for a side-by-side table with kvrt and its
cuBLAS baseline (tools/gpu-check joins them).

  bench/torch_ref.py [--runs N] [--quick] [--json FILE] [--device cuda:0]
                     [--dry-run] [op ...]
  ops: attention_decode attention_prefill attention_mla (default: all three)

Shapes (as kvrt-bench's GPU rows):
  attention_decode   32 q / 8 kv heads, d128, f16, batch {1,16,64,256} x
                     context {1k,4k,16k,32k}, one new token (sees every key)
  attention_prefill  32 q / 8 kv heads, d128, f16, one sequence of 1k and of
                     8k new tokens, causal
  attention_mla      128 q heads over one latent row of 576 (K) / 512 (V),
                     bf16, batch {16,64,128} x context {4k,16k}
--quick takes the first batch and context of each. K and V are dense
[batch][kv_heads][context][dim] tensors (SDPA has no paged layout); GQA
through enable_gqa where this torch has it, else K and V repeated per query
head (the line says which).

For each shape: one row with SDPA choosing its backend ("sdpa":"auto",
"sdpa_backend" the one it picked, as torch reports it or, for torches that
do not, the first backend of flash, efficient, cudnn, math that accepts the
inputs), and one row with each of flash and cudnn forced, where they accept
them. Times are the median of --runs (default 20) CUDA-event timed calls
after two warm-ups; "copy_gbps" is a device copy of 1 GiB timed after each
run (read plus write bytes), "fraction" = gbps / copy_gbps, as kvrt-bench.

Each row is one JSON line on stdout (and appended to --json) in
kvrt-bench's schema:
  {"op":..,"backend":"torch","impl":"torch_sdpa","sdpa":"auto"|"flash"|..,
   "sdpa_backend":..,"dtype":..,"shape":{"q_heads":..,"kv_heads":..,
   "head_dim":.. | "latent_dim":..,"rope_dim":..,"batch":..,"context":..,
   "new_tokens":..,"layers":1},"median_ms":..,"bytes":..,"gbps":..,
   "copy_gbps":..,"fraction":..,"tflops":..,"torch":..,"device_name":..}
with "context" the keys per sequence and bytes and tflops counted as
kvrt-bench counts them (K and V read once, q read, out written). A shape
that fails (out of memory, no backend) prints {"op":..,"skip":reason}.

--dry-run prints the shapes' lines without torch (no times). Without torch,
or without a CUDA device, it exits 77 with a message (a skip for meson and
tools/gpu-check); bad arguments exit 2.
"""

import argparse
import json
import statistics
import sys

OPS = ("attention_decode", "attention_prefill", "attention_mla")
DTYPE_BYTES = {"f16": 2, "bf16": 2}


GQA_HEADS = {"q_heads": 32, "kv_heads": 8, "head_dim": 128}
MLA_HEADS = {"q_heads": 128, "latent_dim": 512, "rope_dim": 64}


def shapes(op, quick):
    """The shapes of one op, as dicts in kvrt-bench's shape schema."""
    if op == "attention_prefill":
        return [dict(GQA_HEADS, batch=1, context=t, new_tokens=t, layers=1)
                for t in ((1024,) if quick else (1024, 8192))]
    if op == "attention_decode":
        heads, batches, contexts = GQA_HEADS, (1, 16, 64, 256), (1024, 4096, 16384, 32768)
    else:
        heads, batches, contexts = MLA_HEADS, (16, 64, 128), (4096, 16384)
    if quick:
        batches, contexts = batches[:1], contexts[:1]
    return [dict(heads, batch=b, context=c, new_tokens=1, layers=1)
            for b in batches for c in contexts]


def dims(shape):
    """(kv_heads, dk, dv) of a shape."""
    if "latent_dim" in shape:
        return 1, shape["latent_dim"] + shape["rope_dim"], shape["latent_dim"]
    return shape["kv_heads"], shape["head_dim"], shape["head_dim"]


def work(shape, dtype):
    """(bytes, flops) of one step, counted as kvrt-bench counts them."""
    kvh, dk, dv = dims(shape)
    es = DTYPE_BYTES[dtype]
    b, n, t, h = shape["batch"], shape["context"], shape["new_tokens"], shape["q_heads"]
    row = dk * es if "latent_dim" in shape else kvh * (dk + dv) * es  # MLA: V is K's latent
    nbytes = b * n * row + b * t * h * (dk + dv) * es
    visible = sum(n - t + i + 1 for i in range(t))  # causal over the new tokens
    return nbytes, b * visible * h * 2.0 * (dk + dv)


def dtype_of(op):
    return "bf16" if op == "attention_mla" else "f16"


def emit(line, json_file):
    text = json.dumps(line, separators=(",", ":"))
    print(text, flush=True)
    if json_file is not None:
        json_file.write(text + "\n")
        json_file.flush()


def parse_args(argv):
    p = argparse.ArgumentParser(prog="torch_ref.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("ops", nargs="*")
    a = p.parse_args(argv)
    if a.runs < 1:
        p.error("--runs must be >= 1")
    for op in a.ops:
        if op not in OPS:
            p.error("unknown op %r (%s)" % (op, ", ".join(OPS)))
    a.ops = a.ops or list(OPS)
    return a


class Runner:
    """The torch side: tensors, SDPA backends, timing."""

    def __init__(self, torch, device, runs):
        self.torch = torch
        self.device = torch.device(device)
        self.runs = runs
        self.name = torch.cuda.get_device_name(self.device)
        self.backends = {}
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            self.sdpa_kernel = sdpa_kernel
            for name, attr in (("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"),
                               ("cudnn", "CUDNN_ATTENTION"), ("math", "MATH")):
                if hasattr(SDPBackend, attr):
                    self.backends[name] = getattr(SDPBackend, attr)
        except ImportError:
            self.sdpa_kernel = None
        src = torch.empty(1 << 29, dtype=torch.float16, device=self.device)  # 1 GiB
        self.copy_src, self.copy_dst = src, torch.empty_like(src)

    def sdpa(self, q, k, v, causal, gqa):
        f = self.torch.nn.functional.scaled_dot_product_attention
        if gqa:
            return f(q, k, v, is_causal=causal, enable_gqa=True)
        return f(q, k, v, is_causal=causal)

    def picked(self, q, k, v, causal, gqa):
        """The backend SDPA picks for these inputs."""
        choice = getattr(self.torch, "_fused_sdp_choice", None)
        if choice is not None:
            try:
                kw = {"is_causal": causal}
                if gqa:
                    kw["enable_gqa"] = True
                i = int(choice(q, k, v, **kw))
                for name, b in self.backends.items():
                    if int(b.value if hasattr(b, "value") else b) == i:
                        return name
            except Exception:  # an older signature: probe instead
                pass
        for name in ("flash", "efficient", "cudnn", "math"):
            if name in self.backends and self.accepts(name, q, k, v, causal, gqa):
                return name
        return "unknown"

    def accepts(self, name, q, k, v, causal, gqa):
        try:
            with self.sdpa_kernel([self.backends[name]]):
                self.sdpa(q, k, v, causal, gqa)
            self.torch.cuda.synchronize(self.device)
            return True
        except RuntimeError:
            return False

    def time(self, fn):
        """Median ms of fn and of the copy probe, each run followed by one copy."""
        torch = self.torch
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        ms, copy_ms = [], []
        for r in range(-2, self.runs):
            torch.cuda.synchronize(self.device)
            ev[0].record()
            fn()
            ev[1].record()
            ev[2].record()
            self.copy_dst.copy_(self.copy_src)
            ev[3].record()
            torch.cuda.synchronize(self.device)
            if r >= 0:
                ms.append(ev[0].elapsed_time(ev[1]))
                copy_ms.append(ev[2].elapsed_time(ev[3]))
        copy_bytes = 2.0 * self.copy_src.numel() * self.copy_src.element_size()
        return statistics.median(ms), copy_bytes / (statistics.median(copy_ms) * 1e-3) / 1e9

    def inputs(self, shape, dtype):
        torch = self.torch
        td = torch.bfloat16 if dtype == "bf16" else torch.float16
        kvh, dk, dv = dims(shape)
        b, n, t, h = shape["batch"], shape["context"], shape["new_tokens"], shape["q_heads"]
        q = torch.rand(b, h, t, dk, dtype=td, device=self.device) * 2 - 1
        k = torch.rand(b, kvh, n, dk, dtype=td, device=self.device) * 2 - 1
        if "latent_dim" in shape:
            v = k[..., :dv]  # V is K's latent part, as in the cache
        else:
            v = torch.rand(b, kvh, n, dv, dtype=td, device=self.device) * 2 - 1
        version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
        gqa = version >= (2, 5)  # SDPA's enable_gqa
        if h != kvh and not gqa:
            k = k.repeat_interleave(h // kvh, dim=1)
            v = v.repeat_interleave(h // kvh, dim=1)
        return q, k, v, gqa

    def rows(self, op, shape):
        dtype = dtype_of(op)
        causal = shape["new_tokens"] > 1
        q, k, v, gqa = self.inputs(shape, dtype)
        nbytes, flops = work(shape, dtype)
        picked = self.picked(q, k, v, causal, gqa) if self.sdpa_kernel else "unknown"
        modes = [("auto", None)] + [(m, m) for m in ("flash", "cudnn")
                                    if m in self.backends and m != picked]
        for mode, forced in modes:
            if forced is not None and not self.accepts(forced, q, k, v, causal, gqa):
                continue

            def call():
                if forced is None:
                    self.sdpa(q, k, v, causal, gqa)
                else:
                    with self.sdpa_kernel([self.backends[forced]]):
                        self.sdpa(q, k, v, causal, gqa)
            ms, copy_gbps = self.time(call)
            gbps = nbytes / (ms * 1e-3) / 1e9
            yield {"op": op, "backend": "torch", "impl": "torch_sdpa", "sdpa": mode,
                   "sdpa_backend": picked if forced is None else forced, "dtype": dtype,
                   "shape": shape, "median_ms": round(ms, 4), "bytes": nbytes,
                   "gbps": round(gbps, 3), "copy_gbps": round(copy_gbps, 3),
                   "fraction": round(gbps / copy_gbps, 4),
                   "tflops": round(flops / (ms * 1e-3) / 1e12, 4),
                   "gqa": "enable_gqa" if gqa else ("repeat" if shape["q_heads"] != dims(shape)[0]
                                                    else "none"),
                   "torch": self.torch.__version__, "device_name": self.name}


def main(argv):
    a = parse_args(argv)
    json_file = open(a.json, "a") if a.json else None
    if a.dry_run:
        for op in a.ops:
            for shape in shapes(op, a.quick):
                nbytes, flops = work(shape, dtype_of(op))
                emit({"op": op, "backend": "torch", "impl": "torch_sdpa", "dry_run": True,
                      "dtype": dtype_of(op), "shape": shape, "bytes": nbytes,
                      "flops": flops}, json_file)
        return 0
    try:
        import torch
    except ImportError:
        print("torch_ref.py: skipped: PyTorch is not installed (import torch failed)",
              file=sys.stderr)
        return 77
    if not torch.cuda.is_available():
        print("torch_ref.py: skipped: torch %s sees no CUDA device" % torch.__version__,
              file=sys.stderr)
        return 77
    runner = Runner(torch, a.device, a.runs)
    print("torch_ref.py: torch %s on %s, SDPA backends %s, median of %d runs"
          % (torch.__version__, runner.name, ",".join(runner.backends) or "unknown", a.runs),
          file=sys.stderr)
    for op in a.ops:
        for shape in shapes(op, a.quick):
            try:
                for line in runner.rows(op, shape):
                    emit(line, json_file)
            except (RuntimeError, MemoryError) as e:  # torch's OOM is a RuntimeError
                emit({"op": op, "backend": "torch", "impl": "torch_sdpa", "shape": shape,
                      "skip": str(e).splitlines()[0][:200]}, json_file)
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
