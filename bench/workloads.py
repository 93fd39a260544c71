"""Gradient sets to benchmark: real models' published layer shapes (no weights) and synthetic sets.

Each workload is a list of (shape, dtype); `for_device` sizes the list to the device and the
profile: "full" (what `make bench` runs: tens to a few hundred MB on a CPU, at least 1 GB on a
GPU where its memory allows), "quick" (the few rows that carry the targets; on a GPU the short
profile of `make gpu-check`) and "tiny" (a few MB: the dry run that checks the harness end to
end in seconds).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Shape = tuple[int, ...]
F32, BF16 = torch.float32, torch.bfloat16


@dataclass(frozen=True)
class Workload:
    name: str
    shapes: list[tuple[Shape, torch.dtype]]

    @property
    def numel(self) -> int:
        return sum(_numel(shape) for shape, _ in self.shapes)

    @property
    def bytes(self) -> int:
        return sum(_numel(shape) * dtype.itemsize for shape, dtype in self.shapes)

    def make(self, device: str, seed: int = 0) -> list[torch.Tensor]:
        # Drawn on the device itself: a GPU's gradient sets of several GB would take a CPU
        # tens of seconds to draw and copy.
        generator = torch.Generator(device=device).manual_seed(seed)
        tensors = []
        for shape, dtype in self.shapes:
            values = torch.randn(shape, generator=generator, dtype=torch.float32, device=device)
            tensors.append(values.to(dtype))
        return tensors


def _numel(shape: Shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def gpt2(n_layer: int = 12, d_model: int = 768, vocab: int = 50257, context: int = 1024):
    """GPT-2 (124M at the defaults): the Hugging Face parameter list, biases included."""
    shapes: list[Shape] = [(vocab, d_model), (context, d_model)]
    for _ in range(n_layer):
        shapes += [(d_model,), (d_model,)]  # ln_1
        shapes += [(d_model, 3 * d_model), (3 * d_model,), (d_model, d_model), (d_model,)]  # attn
        shapes += [(d_model,), (d_model,)]  # ln_2
        shapes += [(d_model, 4 * d_model), (4 * d_model,), (4 * d_model, d_model), (d_model,)]
    shapes += [(d_model,), (d_model,)]  # ln_f
    return shapes


def llama(n_layer: int, d_model: int, ffn: int, vocab: int, kv_heads_ratio: int = 4):
    """A Llama-style decoder: RMSNorm weights, q/k/v/o with grouped KV heads, SwiGLU MLP, untied
    embedding and output head. Llama-3.2-1B: llama(16, 2048, 8192, 128256); 8B: (32, 4096, 14336)."""
    kv = d_model // kv_heads_ratio
    shapes: list[Shape] = [(vocab, d_model)]
    for _ in range(n_layer):
        shapes += [(d_model,), (d_model, d_model), (kv, d_model), (kv, d_model), (d_model, d_model)]
        shapes += [(d_model,), (ffn, d_model), (ffn, d_model), (d_model, ffn)]
    shapes += [(d_model,), (vocab, d_model)]
    return shapes


def resnet50():
    """ResNet-50's conv, batch-norm and fc parameter shapes (25.6M parameters)."""
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]
    in_channels = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            out_channels = width * 4
            shapes += [(width, in_channels, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(out_channels, width, 1, 1), (out_channels,), (out_channels,)]
            if block == 0:
                shapes += [(out_channels, in_channels, 1, 1), (out_channels,), (out_channels,)]
            in_channels = out_channels
    shapes += [(1000, 2048), (1000,)]
    return shapes


def lstm(n_layer: int = 2, input_size: int = 1024, hidden: int = 1024, vocab: int = 10000):
    """A 2-layer word-level LSTM language model: embedding, LSTM weights and biases, decoder."""
    shapes: list[Shape] = [(vocab, input_size)]
    for layer in range(n_layer):
        layer_input = input_size if layer == 0 else hidden
        shapes += [(4 * hidden, layer_input), (4 * hidden, hidden), (4 * hidden,), (4 * hidden,)]
    shapes += [(vocab, hidden), (vocab,)]
    return shapes


def _all(dtype, shapes):
    return [(shape, dtype) for shape in shapes]


PROFILES = ("full", "quick", "tiny")


def for_device(device: str, profile: str = "full") -> list[Workload]:
    """The workloads for `device` and `profile` (one of PROFILES), sized to it."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    quick = profile == "quick"
    if profile == "tiny":
        return [
            Workload("4x64K-fp32", _all(F32, [(64 << 10,)] * 4)),
            Workload("300x1K", _all(F32, [(1 << 10,)] * 300)),
            Workload(
                "mixed-fp32-bf16-tiny", [((16 << 10,), F32 if i % 2 else BF16) for i in range(8)]
            ),
        ]
    if device == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info()
        workloads = [
            Workload("gpt2-124m", _all(F32, gpt2())),
            Workload("llama-1b", _all(F32, llama(16, 2048, 8192, 128256))),
            Workload("resnet50", _all(F32, resnet50())),
            Workload("lstm-2layer", _all(F32, lstm())),
            Workload("huge-1x1G", _all(F32, [(1 << 28,)])),
            Workload("8x8M-fp32", _all(F32, [(8 << 20,)] * 8)),
            Workload("2000x16K", _all(F32, [(16 << 10,)] * 2000)),
            Workload("mixed-fp32-bf16", [((4 << 20,), F32 if i % 2 else BF16) for i in range(128)]),
        ]
        llama_8b = Workload("llama-8b", _all(F32, llama(32, 4096, 14336, 128256)))
        if not quick and free_bytes > 4 * llama_8b.bytes:  # gradients, their copy, params, state
            workloads.insert(2, llama_8b)
        if quick:  # the rows that carry the H200's targets, in about two minutes
            names = (
                "gpt2-124m",
                "llama-1b",
                "huge-1x1G",
                "8x8M-fp32",
                "2000x16K",
                "mixed-fp32-bf16",
            )
            workloads = [w for w in workloads if w.name in names]
        return workloads
    workloads = [
        Workload("8x8M-fp32", _all(F32, [(8 << 20,)] * 8)),
        Workload("2000x16K", _all(F32, [(16 << 10,)] * 2000)),
        Workload("llm-like", _all(F32, llama(6, 512, 1408, 32000))),
        Workload("gpt2-small-4layer", _all(F32, gpt2(n_layer=4, vocab=8192))),
        Workload("resnet50", _all(F32, resnet50())),
        Workload("lstm-2layer", _all(F32, lstm(hidden=512, input_size=512))),
        Workload("mixed-fp32-bf16", [((1 << 20,), F32 if i % 2 else BF16) for i in range(64)]),
    ]
    if quick:
        workloads = workloads[:3]
    return workloads
