"""Demo (`make demo`): taming an exploding tanh RNN on the adding problem.

A tanh RNN whose recurrent matrix starts with spectral radius > 1 learns the adding problem
(T = 100: output the sum of the two marked values of a sequence; predicting the mean scores an
MSE of 1/6) with plain SGD, trained five ways: no clipping, torch's clip_grad_norm_, fusedclip's,
ZClip, and clip_gradient on the hidden state at every step. Prints a table and saves a PNG of
the loss and gradient-norm curves to bench/results/stability.png.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

import fusedclip
from fusedclip.stability import ZClip

BASELINE_MSE = 1 / 6  # Var(U1 + U2) for two uniform values: the loss of predicting the mean


def adding_batch(batch: int, length: int, generator: torch.Generator):
    values = torch.rand(batch, length, generator=generator)
    markers = torch.zeros(batch, length)
    first = torch.randint(0, length // 2, (batch,), generator=generator)
    second = torch.randint(length // 2, length, (batch,), generator=generator)
    markers[torch.arange(batch), first] = 1.0
    markers[torch.arange(batch), second] = 1.0
    target = (values * markers).sum(dim=1, keepdim=True)
    return torch.stack([values, markers], dim=2), target


class TanhRNN(torch.nn.Module):
    def __init__(self, hidden: int, spectral_radius: float, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.cell = torch.nn.RNNCell(2, hidden, nonlinearity="tanh")
        self.head = torch.nn.Linear(hidden, 1)
        with torch.no_grad():
            orthogonal = torch.linalg.qr(torch.randn(hidden, hidden))[0]
            self.cell.weight_hh.copy_(spectral_radius * orthogonal)

    def forward(self, inputs, hidden_clip: float | None = None):
        hidden = inputs.new_zeros(inputs.shape[0], self.cell.hidden_size)
        for step in range(inputs.shape[1]):
            hidden = self.cell(inputs[:, step], hidden)
            if hidden_clip is not None:
                hidden = fusedclip.clip_gradient(hidden, max_norm=hidden_clip)
        return self.head(hidden)


def train(method: str, args) -> dict:
    model = TanhRNN(args.hidden, args.spectral_radius, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    zclip = ZClip(max_norm=args.max_norm, warmup_steps=25)
    losses, norms, clipped = [], [], 0
    clip_seconds = 0.0
    for _ in range(args.steps):
        inputs, target = adding_batch(args.batch, args.length, generator)
        optimizer.zero_grad(set_to_none=True)
        prediction = model(
            inputs, hidden_clip=args.hidden_clip if method == "clip_gradient" else None
        )
        loss = torch.nn.functional.mse_loss(prediction, target)
        loss.backward()
        start = time.perf_counter()
        if method == "none":
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
            coef = torch.ones(())
        elif method == "torch":
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_norm)
            coef = (args.max_norm / (norm + 1e-6)).clamp(max=1.0)
        elif method == "fusedclip":
            result = fusedclip.fused_clip_(
                [p.grad for p in model.parameters()], max_norm=args.max_norm
            )
            norm, coef = result.total_norm, result.clip_coef
        elif method == "zclip":
            result = zclip.step(model.parameters())
            norm, coef = result.total_norm, result.clip_coef
        else:  # clip_gradient already clipped inside backward; measure what reached the weights
            norm = fusedclip.get_total_norm([p.grad for p in model.parameters()])
            coef = torch.ones(())
        clip_seconds += time.perf_counter() - start
        optimizer.step()
        losses.append(
            loss.item()
        )  # the demo reads every step to draw curves; training never needs to
        norms.append(norm.item())
        clipped += int(coef.item() < 1)
        if not math.isfinite(losses[-1]) or losses[-1] > 1e6:
            break
    final = sum(losses[-args.tail :]) / len(losses[-args.tail :])
    return {
        "method": method,
        "losses": losses,
        "norms": norms,
        "final_loss": final,
        "diverged": not math.isfinite(final)
        or len(losses) < args.steps
        or final > 10 * BASELINE_MSE,
        "clip_frequency": clipped / len(losses),
        "clip_ms_per_step": 1e3 * clip_seconds / len(losses),
    }


def plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, norm_axis) = plt.subplots(1, 2, figsize=(12, 4.2))
    for run in runs:
        loss_axis.plot(run["losses"], label=run["method"], linewidth=1)
        norm_axis.plot(run["norms"], label=run["method"], linewidth=1)
    loss_axis.axhline(
        BASELINE_MSE, color="k", linestyle="--", linewidth=1, label="predict the mean"
    )
    for axis, title in (
        (loss_axis, "training loss (MSE)"),
        (norm_axis, "gradient norm before clipping"),
    ):
        axis.set_yscale("log")
        axis.set_xlabel("step")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    loss_axis.legend(fontsize=8)
    figure.suptitle("tanh RNN, adding problem T=100, spectral radius > 1, SGD")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--length", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--spectral-radius", type=float, default=1.5)
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--hidden-clip", type=float, default=0.001)
    parser.add_argument("--tail", type=int, default=50, help="steps averaged for the final loss")
    parser.add_argument(
        "--out",
        default=os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "results", "stability.png"
        ),
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = [
        train(method, args) for method in ("none", "torch", "fusedclip", "zclip", "clip_gradient")
    ]
    print(
        f"{'method':<14} {'final loss':>11} {'diverged':>9} {'clip freq':>10} {'clip ms/step':>13}"
    )
    for run in runs:
        print(
            f"{run['method']:<14} {run['final_loss']:>11.4g} {str(run['diverged']):>9} "
            f"{run['clip_frequency']:>10.0%} {run['clip_ms_per_step']:>13.3f}"
        )
    print(f"(predicting the mean scores {BASELINE_MSE:.3f})")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    plot(runs, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
