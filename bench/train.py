"""`python -m bench.train`: whole training steps, the number users care about.

Two small models, a GPT-style decoder and a ResNet-style CNN, trained with AdamW (fused where
torch has it for the device) under AMP: bfloat16 autocast on a CPU; float16 with a GradScaler and
bfloat16 on a GPU. Each step is forward, backward, then one of three ways to unscale, clip and
step:
  torch         scaler.unscale_(opt); clip_grad_norm_(...); scaler.step(opt); scaler.update()
  unscale_clip_ fusedclip.amp.unscale_clip_(scaler, opt, max_norm); scaler.step(opt); update
  clip_step     fusedclip.amp.clip_step(opt, max_norm, scaler=scaler); scaler.update()
each eager and with the model compiled (torch.compile; the clipping itself stays eager).

Before timing, each variant trains the same steps from the same weights on the same batches; its
losses must equal torch's to rounding (what the clip factor's last bits change). Timing: every
sample starts from the same saved weights, optimizer and scaler state (restored outside the
timed region), the variants take turns step by step, and each step is timed whole (end to end)
and split at the end of backward: the clip's share is the time after backward over the step.
Results go to --out/train-<device>-<commit>.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
import time

import torch
from torch import nn

import fusedclip.amp
from bench import measure, report, stats

VARIANTS = ("torch", "unscale_clip_", "clip_step")
MAX_NORM = 0.5  # below the models' first gradient norms: every step clips
# Losses after a few steps may differ by what the clip factor's last bits change (seen: 3e-6 in
# bfloat16); a clip off by one part in a thousand moves them by about 1e-2.
LOSS_RTOL = 1e-3


class TinyGPT(nn.Module):
    """Token and position embeddings, pre-norm causal self-attention blocks, a tied output head."""

    def __init__(self, vocab: int, context: int, width: int, layers: int, heads: int):
        super().__init__()
        self.token = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [batch, context] -> logits
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        hidden = self.token(tokens) + self.position(positions)
        hidden = self.blocks(hidden, mask=self.mask, is_causal=True)
        return self.norm(hidden) @ self.token.weight.T


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, stride: int):
        super().__init__()
        out = channels * stride
        self.body = nn.Sequential(
            nn.Conv2d(channels, out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU(),
            nn.Conv2d(out, out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out),
        )
        self.skip = (
            nn.Identity()
            if stride == 1
            else nn.Sequential(nn.Conv2d(channels, out, 1, stride, bias=False), nn.BatchNorm2d(out))
        )

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


class TinyResNet(nn.Module):
    def __init__(self, width: int, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.stages = nn.Sequential(
            ResidualBlock(width, 1), ResidualBlock(width, 2), ResidualBlock(2 * width, 2)
        )
        self.head = nn.Linear(4 * width, classes)

    def forward(self, images):  # [batch, 3, H, W] -> [batch, classes]
        return self.head(self.stages(self.stem(images)).mean(dim=(2, 3)))


# (model factory, batch maker, loss) per model and device size.
SIZES = {
    "cpu": {
        "gpt": dict(vocab=2048, context=64, width=128, layers=2, heads=4, batch=8),
        "cnn": dict(width=16, batch=16, side=32),
    },
    "cuda": {
        "gpt": dict(vocab=8192, context=256, width=512, layers=6, heads=8, batch=16),
        "cnn": dict(width=64, batch=64, side=32),
    },
}


def make_model(name: str, device: str, seed: int = 0):
    """The model and a function of the step index that returns (inputs, targets)."""
    size = SIZES[device][name]
    torch.manual_seed(seed)
    if name == "gpt":
        model = TinyGPT(
            size["vocab"], size["context"], size["width"], size["layers"], size["heads"]
        )

        def batch(index: int):
            generator = torch.Generator().manual_seed(index)
            tokens = torch.randint(
                0, size["vocab"], (size["batch"], size["context"] + 1), generator=generator
            )
            tokens = tokens.to(device)
            return tokens[:, :-1], tokens[:, 1:]

        def loss(output, target):
            return nn.functional.cross_entropy(output.float().flatten(0, 1), target.flatten())
    else:
        model = TinyResNet(size["width"])

        def batch(index: int):
            generator = torch.Generator().manual_seed(index)
            images = torch.randn(size["batch"], 3, size["side"], size["side"], generator=generator)
            labels = torch.randint(0, 10, (size["batch"],), generator=generator)
            return images.to(device), labels.to(device)

        def loss(output, target):
            return nn.functional.cross_entropy(output.float(), target)

    return model.to(device), batch, loss


def _fused_adamw(parameters, device: str) -> torch.optim.Optimizer:
    try:
        return torch.optim.AdamW(parameters, lr=1e-3, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device
        return torch.optim.AdamW(parameters, lr=1e-3)


class Trainer:
    """One model, optimizer and scaler; `step(variant, index)` runs one training step and
    returns (loss, seconds to the end of backward, seconds of the whole step)."""

    def __init__(self, name: str, device: str, dtype: torch.dtype, compiled: bool):
        self.device, self.dtype = device, dtype
        self.model, self.batch, self.loss = make_model(name, device)
        self.forward = torch.compile(self.model) if compiled else self.model
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = _fused_adamw(self.parameters, device)
        self.scaler = torch.amp.GradScaler(
            device, init_scale=2.0**12, enabled=dtype == torch.float16
        )
        self.step("torch", 0)  # creates the optimizer's state (and compiles): then saved
        self.saved = (
            copy.deepcopy(self.model.state_dict()),
            copy.deepcopy(self.optimizer.state_dict()),
            copy.deepcopy(self.scaler.state_dict()),
        )

    def restore(self) -> None:
        model_state, optimizer_state, scaler_state = self.saved
        self.model.load_state_dict(model_state)
        # load_state_dict keeps tensors that already have the right dtype and device: without a
        # copy the optimizer's in-place updates would change the saved state itself.
        self.optimizer.load_state_dict(copy.deepcopy(optimizer_state))
        if self.scaler.is_enabled():
            self.scaler.load_state_dict(scaler_state)
        self.optimizer.zero_grad(set_to_none=True)
        measure.synchronize(self.device)

    def step(self, variant: str, index: int) -> tuple[float, float, float]:
        inputs, targets = self.batch(index)
        measure.synchronize(self.device)
        started = time.perf_counter()
        with torch.autocast(self.device, dtype=self.dtype):
            loss = self.loss(self.forward(inputs), targets)
        self.scaler.scale(loss).backward()
        measure.synchronize(self.device)
        backward_done = time.perf_counter()
        if variant == "torch":
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters, MAX_NORM)
            self.scaler.step(self.optimizer)
        elif variant == "unscale_clip_":
            fusedclip.amp.unscale_clip_(self.scaler, self.optimizer, MAX_NORM)
            self.scaler.step(self.optimizer)
        else:
            fusedclip.amp.clip_step(self.optimizer, MAX_NORM, scaler=self.scaler)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        measure.synchronize(self.device)
        ended = time.perf_counter()
        return float(loss.detach()), backward_done - started, ended - started


def check_losses(trainer: Trainer, steps: int) -> dict[str, float]:
    """Largest relative loss difference from torch's, per variant, over `steps` steps from the
    saved state on the same batches."""
    losses = {}
    for variant in VARIANTS:
        trainer.restore()
        losses[variant] = [trainer.step(variant, index)[0] for index in range(1, steps + 1)]
    differences = {}
    for variant in VARIANTS[1:]:
        worst = max(
            abs(a - b) / abs(b) for a, b in zip(losses[variant], losses["torch"], strict=True)
        )
        if worst > LOSS_RTOL:
            raise AssertionError(
                f"{variant}'s losses {losses[variant]} differ from torch's {losses['torch']} "
                f"by {worst:.2e} (more than {LOSS_RTOL})"
            )
        differences[variant] = worst
    return differences


def time_steps(trainer: Trainer, budget: measure.Budget) -> dict[str, dict[str, list[float]]]:
    """Per variant: whole-step and after-backward milliseconds, variants interleaved per round."""
    samples = {v: {"step_ms": [], "clip_ms": []} for v in VARIANTS}
    started = time.perf_counter()
    for index in range(budget.max_samples):
        for variant in VARIANTS:
            trainer.restore()
            _, backward_s, step_s = trainer.step(variant, 1)
            samples[variant]["step_ms"].append(1e3 * step_s)
            samples[variant]["clip_ms"].append(1e3 * (step_s - backward_s))
        if index + 1 >= budget.min_samples and time.perf_counter() - started > budget.seconds:
            break
    return samples


def run(
    device: str, models: list[str], dtypes: list[torch.dtype], modes: list[str], budget, check_steps
):
    rows = []
    for name in models:
        for dtype in dtypes:
            for mode in modes:
                trainer = Trainer(name, device, dtype, compiled=mode == "compiled")
                differences = check_losses(trainer, check_steps)
                samples = time_steps(trainer, budget)
                base = samples["torch"]["step_ms"]
                for variant in VARIANTS:
                    step = stats.summarize(samples[variant]["step_ms"])
                    clip = stats.summarize(samples[variant]["clip_ms"])
                    rows.append(
                        {
                            "model": name,
                            "dtype": str(dtype).removeprefix("torch."),
                            "mode": mode,
                            "variant": variant,
                            "parameters": sum(p.numel() for p in trainer.parameters),
                            "step_ms": step.as_dict(),
                            "after_backward_ms": clip.as_dict(),
                            "clip_share": clip.median / step.median,
                            "vs_torch": stats.ratio(base, samples[variant]["step_ms"]).as_dict(),
                            "loss_max_rel_diff": differences.get(variant, 0.0),
                            "samples": samples[variant],
                        }
                    )
                print_rows(rows[-len(VARIANTS) :], header=len(rows) == len(VARIANTS))
    return rows


def print_rows(rows: list[dict], header: bool = True) -> None:
    if header:
        line = (
            f"{'model':<5} {'dtype':<9} {'mode':<9} {'variant':<14} {'step ms':>9} {'IQR':>5} "
            f"{'after bwd ms':>12} {'share':>6} {'vs torch [95%]':>22} {'loss diff':>9}"
        )
        print(line)
        print("-" * len(line))
    for row in rows:
        step = row["step_ms"]
        r = row["vs_torch"]
        print(
            f"{row['model']:<5} {row['dtype']:<9} {row['mode']:<9} {row['variant']:<14} "
            f"{step['median']:>9.2f} {50 * (step['q3'] - step['q1']) / step['median']:>4.0f}% "
            f"{row['after_backward_ms']['median']:>12.2f} {row['clip_share']:>6.1%} "
            f"{stats.Ratio(r['median'], r['low'], r['high']).text() if row['variant'] != 'torch' else '-':>22} "
            f"{row['loss_max_rel_diff']:>9.1e}"
        )
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--models", default="gpt,cnn")
    parser.add_argument(
        "--dtypes", default=None, help="default: bfloat16 on a CPU, float16,bfloat16 on a GPU"
    )
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds of timing per model, dtype and mode"
    )
    parser.add_argument("--min-samples", type=int, default=5)
    parser.add_argument("--max-samples", type=int, default=100)
    parser.add_argument("--check-steps", type=int, default=3, help="steps whose losses must agree")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", default=None, help="default: as python -m bench")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [
        getattr(torch, d)
        for d in (args.dtypes or ("bfloat16" if device == "cpu" else "float16,bfloat16")).split(",")
    ]
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    budget = measure.Budget(
        args.budget if args.budget is not None else (4.0 if device == "cpu" else 2.0),
        args.min_samples,
        args.max_samples,
    )
    rows = run(device, args.models.split(","), dtypes, modes, budget, args.check_steps)
    result = report.environment(device) | {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "budget": vars(budget),
        "max_norm": MAX_NORM,
        "sizes": SIZES[device],
        "steps": rows,
    }
    from bench.__main__ import default_out_dir

    path = report.write_json(result, args.out or default_out_dir(), prefix="train-")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
