"""Compile every Triton kernel of tada_kernels for one NVIDIA H200 (sm_90) on this machine, no GPU needed,
and report what the code does: registers, spills, shared memory, tensor-core MMAs, vector and async loads.

    python bench/codegen.py        # the trainer's shapes (ResNet-50 map, bf16, channels-last), and grouped_mlp's
                                   # kernels fed an NCHW map's strided view directly, which the op avoids by copying

The ops run on CPU tensors with every kernel launch intercepted: each launch is specialised the way
Triton specialises it at run time (integers equal to 1 become constants, values and pointers divisible
by 16 are marked so), compiled to PTX and a cubin with Triton's own compiler and ptxas, and the SASS
is read with nvdisasm. Nothing is executed. Writes a markdown report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

MAP_SIDE, CHANNELS, HIDDEN, BATCH, CLASSES = 7, 2048, 1024, 64, 65  # ResNet-50 at 224 pixels, Office-Home
NVIDIA_BIN = None  # set in main(): triton's bundled ptxas and nvdisasm


@dataclass
class Launch:
    kernel: object  # a triton JITFunction
    args: tuple
    kwargs: dict
    op: str


@dataclass
class Codegen:
    op: str
    kernel: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    tensor_core_mmas: int
    vector_loads: int  # global loads of 64 or 128 bits
    scalar_loads: int  # global loads of 32 bits or less
    half_word_loads: int  # of them, 16-bit loads: one bf16 element per load
    async_copies: int  # cp.async / TMA: loads straight into shared memory

    @property
    def clean(self) -> bool:
        return self.spill_bytes == 0


def capture_launches(layout: str, dtype: torch.dtype) -> list[Launch]:
    """Run each op forward and backward on CPU tensors with launches recorded instead of executed."""
    import triton.runtime.jit as jit

    from tada_kernels.ops import attention_pool, attentive_entropy, entropy_attention, grouped_mlp

    launches: list[Launch] = []
    current = {"op": ""}

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, current["op"]))

    jit.JITFunction.run = record
    for module in (grouped_mlp, entropy_attention, attention_pool, attentive_entropy):
        module.resolve_backend = lambda backend, device: "triton"
        module.interpreting = lambda: False

    K = MAP_SIDE * MAP_SIDE
    feature_map = torch.randn(BATCH, CHANNELS, MAP_SIDE, MAP_SIDE, dtype=dtype)
    if layout == "channels_last":
        feature_map = feature_map.contiguous(memory_format=torch.channels_last)
    x = feature_map.flatten(2).transpose(1, 2).requires_grad_()  # [B, K, C], as the model forms it
    weights = [torch.randn(K, CHANNELS, HIDDEN), torch.randn(K, HIDDEN), torch.randn(K, HIDDEN, HIDDEN),
               torch.randn(K, HIDDEN), torch.randn(K, HIDDEN), torch.randn(K)]
    weights = [w.requires_grad_() for w in weights]  # fp32 master weights, as under bf16 training
    current["op"] = "grouped_mlp"
    if layout == "nchw_strided":  # the kernels themselves on the strided view, past the op's copy
        grouped_mlp._GroupedMLP.apply(x, *weights, 0.5, 3).sum().backward()
        return launches
    grouped_mlp.grouped_mlp(x, *weights, dropout=0.5, training=True, seed=3).sum().backward()

    current["op"] = "entropy_attention"
    f = feature_map.detach().requires_grad_()
    logits = torch.randn(BATCH, K, requires_grad=True)
    h, w = entropy_attention.entropy_attention(f, logits, detach=False)
    torch.autograd.backward([h, w], [torch.ones_like(h), torch.ones_like(w)])

    current["op"] = "attention_pool"  # the model's path with average pooling: h is never written
    f = feature_map.detach().requires_grad_()
    pooled, w = attention_pool.attention_pool(f, logits, detach=False)
    torch.autograd.backward([pooled, w], [torch.ones_like(pooled), torch.ones_like(w)])

    current["op"] = "attentive_entropy"
    class_logits = torch.randn(2 * BATCH, CLASSES, dtype=dtype, requires_grad=True)
    domain_logits = torch.randn(2 * BATCH, requires_grad=True)
    attentive_entropy.attentive_entropy(class_logits, domain_logits, detach=False).backward()
    return launches


def compile_launch(launch: Launch, target):
    """Specialise and compile one recorded launch exactly as JITFunction.run would for `target`."""
    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {"debug": False, "instrumentation_mode": "", **launch.kwargs}
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def analyse(op: str, compiled, work: Path) -> Codegen:
    name = compiled.metadata.name
    ptx, cubin = work / f"{name}.ptx", work / f"{name}.cubin"
    ptx.write_text(compiled.asm["ptx"])
    cubin.write_bytes(compiled.asm["cubin"])
    verbose = subprocess.run([str(NVIDIA_BIN / "ptxas"), "-v", "-arch=sm_90a", str(ptx), "-o", str(work / "x.cubin")],
                             capture_output=True, text=True).stderr
    registers = int(re.search(r"Used (\d+) registers", verbose).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", verbose))
    sass = subprocess.run([str(NVIDIA_BIN / "nvdisasm"), str(cubin)], capture_output=True, text=True).stdout
    loads = re.findall(r"\bLDG\.E(?:\.([A-Z0-9.]+))?", sass)
    vector = sum(1 for width in loads if width and re.search(r"(64|128)", width))
    return Codegen(
        op=op, kernel=name, registers=registers, spill_bytes=spills, shared_bytes=compiled.metadata.shared,
        tensor_core_mmas=len(re.findall(r"\b(?:HMMA|HGMMA|WGMMA|UTMMA)\b", sass)),
        vector_loads=vector, scalar_loads=len(loads) - vector,
        half_word_loads=sum(1 for width in loads if width and re.search(r"[US]16", width)),
        async_copies=len(re.findall(r"\b(?:LDGSTS|UTMALDG|UBLKCP)\b", sass)),
    )


def report_codegen(layout: str = "channels_last", dtype: torch.dtype = torch.bfloat16) -> list[Codegen]:
    """The codegen of every kernel launch the ops make in the trainer's shapes (also used by the tests)."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget

    global NVIDIA_BIN
    NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    target = GPUTarget("cuda", 90, 32)
    seen, results = set(), []
    with tempfile.TemporaryDirectory() as work:
        for launch in capture_launches(layout, dtype):
            compiled = compile_launch(launch, target)
            key = (compiled.metadata.name, compiled.metadata.hash)
            if key not in seen:
                seen.add(key)
                results.append(analyse(launch.op, compiled, Path(work)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=("channels_last", "nchw_strided"), default=None,
                        help="one layout (default: both, channels_last with every op, nchw_strided with grouped_mlp)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--report", default="bench/results/codegen_sm90.md")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of writing the report")
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    layouts = [args.layout] if args.layout else ["channels_last", "nchw_strided"]
    results = {layout: report_codegen(layout, dtype) for layout in layouts}
    if args.json:
        print(json.dumps({layout: [dataclasses.asdict(r) for r in rows] for layout, rows in results.items()}))
        return
    from report import write_report

    lines = [
        "# Triton kernels compiled for sm_90 (NVIDIA H200), inspected without a GPU", "",
        f"Shapes of the trainer on ResNet-50: B = {BATCH}, K = {MAP_SIDE * MAP_SIDE} regions, C = {CHANNELS}, "
        f"H = {HIDDEN}, {CLASSES} classes; activations {args.dtype} with fp32 master weights, dropout 0.5. "
        "Registers and spills from ptxas -v; instruction counts from the SASS (static counts in the code, "
        "not executed counts). Scalar loads are global loads of 32 bits or less; in brackets, those of 16 bits "
        "(one bf16 element each).", "",
    ]
    titles = {"channels_last": "The trainer's layout: a channels-last feature map (every op)",
              "nchw_strided": "grouped_mlp's kernels fed an NCHW map's [B, K, C] view (C strided by H * W) "
                              "directly; the op itself copies such a view contiguous first"}
    for layout, rows in results.items():
        lines += [
            f"## {titles[layout]}", "",
            "| op | kernel | registers | spill bytes | shared memory (bytes) | tensor-core MMAs | vector loads "
            "| scalar loads (16-bit) | async copies |",
            "|---|---|---|---|---|---|---|---|---|",
            *[f"| {r.op} | {r.kernel} | {r.registers} | {r.spill_bytes} | {r.shared_bytes} | {r.tensor_core_mmas} "
              f"| {r.vector_loads} | {r.scalar_loads} ({r.half_word_loads}) | {r.async_copies} |" for r in rows], "",
            f"Spills: {'none' if all(r.clean for r in rows) else 'some kernels spill (see the table)'}.", "",
        ]
    write_report(args.report, lines)


if __name__ == "__main__":
    sys.exit(main())
