"""Demo (`make demo`): taming an exploding tanh RNN on the adding problem.

The task is the adding problem (a sequence of T = 100 random values in [0, 1], two of them
marked, one in each half; output their sum; predicting the mean scores an MSE of 1/6). The
model is a 64-unit tanh RNN whose recurrent matrix starts as an orthogonal matrix scaled to
spectral radius 1.2, trained with SGD (momentum 0.9, lr 0.05 decaying to 0.005) five ways on the
same initial weights and the same batches: no clipping, torch's clip_grad_norm_, fusedclip's
fused_clip_, ZClip, and clip_gradient on the hidden state at every step (nothing else clipped).

Training follows a length curriculum: 300 steps each at T = 10, 20, 40 and 70, then 400 at
T = 100 (the markers are always one in each half). The final loss is the MSE on a fixed held-out
batch of 1000 sequences at T = 100, the task itself. Without clipping, the learning rate that the
clipped runs use blows the run up within a few dozen steps (the loss passes 1e6 and the run is
stopped). Clipping the gradient norm (torch, fusedclip, ZClip) learns the task: 0.016 to 0.031
at seeds 0, 1 and 2. clip_gradient on the hidden state (max_norm 0.02) stays bounded but learns
more slowly: 0.04 to 0.1 after the same 1600 steps, depending on the seed. The runs are chaotic
(torch's and fusedclip's differ only in the last bits of the norm, and end apart), so `--seed`
is there to check. The curriculum matters: without it (`--curriculum '' --final-steps 1600`)
torch's clipping stays at the predict-the-mean loss (0.185 at seed 0).

Prints a table and saves a PNG of the loss and gradient-norm curves to
bench/results/stability.png. The clip-frequency column counts the steps in which the gradients
of the parameters were scaled down; clip_gradient scales the gradient of the hidden state
inside the backward pass instead, which that column does not see ("-"). The time column is the
clipping step after backward (for none and clip_gradient: only measuring the norm).
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
METHODS = ("none", "torch", "fusedclip", "zclip", "clip_gradient")


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
        self.rnn = torch.nn.RNN(2, hidden, nonlinearity="tanh", batch_first=True)
        self.head = torch.nn.Linear(hidden, 1)
        with torch.no_grad():
            orthogonal = torch.linalg.qr(torch.randn(hidden, hidden))[0]
            self.rnn.weight_hh_l0.copy_(spectral_radius * orthogonal)
            self.rnn.bias_ih_l0.zero_()
            self.rnn.bias_hh_l0.zero_()

    def forward(self, inputs, hidden_clip: float | None = None):
        if hidden_clip is None:  # torch's RNN loop
            return self.head(self.rnn(inputs)[0][:, -1])
        # The same cell step by step, clipping the gradient of the hidden state at every step.
        rnn = self.rnn
        weights = (rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
        hidden = inputs.new_zeros(inputs.shape[0], rnn.hidden_size)
        for step in range(inputs.shape[1]):
            hidden = torch.rnn_tanh_cell(inputs[:, step], hidden, *weights)
            hidden = fusedclip.clip_gradient(hidden, max_norm=hidden_clip)
        return self.head(hidden)


def schedule(args) -> list[int]:
    """The sequence length of every training step: the curriculum, then `--length`."""
    lengths = []
    for length in args.curriculum:
        lengths += [length] * args.stage_steps
    return lengths + [args.length] * args.final_steps


@torch.no_grad()
def evaluate(model, held_out) -> float:
    inputs, target = held_out
    return torch.nn.functional.mse_loss(model(inputs), target).item()


def train(method: str, args, held_out) -> dict:
    model = TanhRNN(args.hidden, args.spectral_radius, seed=args.seed)
    parameters = list(model.parameters())
    optimizer = torch.optim.SGD(parameters, lr=args.lr, momentum=0.9)
    lengths = schedule(args)
    decay = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: args.lr_decay ** (step / len(lengths))
    )
    generator = torch.Generator().manual_seed(args.seed + 1)
    zclip = ZClip(max_norm=args.max_norm, warmup_steps=25)
    hidden_clip = args.hidden_clip if method == "clip_gradient" else None
    losses, norms, evals, clipped = [], [], [], 0
    clip_seconds = 0.0
    for step, length in enumerate(lengths):
        inputs, target = adding_batch(args.batch, length, generator)
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(inputs, hidden_clip), target)
        loss.backward()
        start = time.perf_counter()
        if method in ("none", "clip_gradient"):  # clip_gradient clipped inside backward
            norm = fusedclip.get_total_norm([p.grad for p in parameters])
            coef = torch.ones(())
        elif method == "torch":
            norm = torch.nn.utils.clip_grad_norm_(parameters, args.max_norm)
            coef = (args.max_norm / (norm + 1e-6)).clamp(max=1.0)
        elif method == "fusedclip":
            result = fusedclip.fused_clip_([p.grad for p in parameters], max_norm=args.max_norm)
            norm, coef = result.total_norm, result.clip_coef
        else:
            result = zclip.step(parameters)
            norm, coef = result.total_norm, result.clip_coef
        clip_seconds += time.perf_counter() - start
        optimizer.step()
        decay.step()
        # The demo reads every step to draw curves; training never needs to.
        losses.append(loss.item())
        norms.append(norm.item())
        clipped += int(coef.item() < 1)
        if not math.isfinite(losses[-1]) or losses[-1] > 1e6:
            break
        if (step + 1) % args.eval_every == 0:
            evals.append((step + 1, evaluate(model, held_out)))
    blew_up = len(losses) < len(lengths)
    final = math.inf if blew_up else evaluate(model, held_out)
    return {
        "method": method,
        "losses": losses,
        "norms": norms,
        "evals": evals,
        "final_loss": final,
        "diverged": blew_up or not math.isfinite(final) or final > 10 * BASELINE_MSE,
        "steps": len(losses),
        "last_loss": losses[-1],
        "clip_frequency": None if method == "clip_gradient" else clipped / len(losses),
        "clip_ms_per_step": 1e3 * clip_seconds / len(losses),
    }


def plot(runs: list[dict], args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, eval_axis, norm_axis) = plt.subplots(1, 3, figsize=(16, 4.2))
    for index, run in enumerate(runs):
        color = f"C{index}"
        loss_axis.plot(run["losses"], color=color, label=run["method"], linewidth=0.8)
        if run["evals"]:
            steps = [step for step, _ in run["evals"]]
            values = [value for _, value in run["evals"]]
            eval_axis.plot(steps, values, color=color, marker=".", label=run["method"])
        norm_axis.plot(run["norms"], color=color, label=run["method"], linewidth=0.8)
    boundaries = [args.stage_steps * (i + 1) for i in range(len(args.curriculum))]
    for axis in (loss_axis, eval_axis, norm_axis):
        for boundary in boundaries:
            axis.axvline(boundary, color="grey", linestyle=":", linewidth=0.8)
    for axis in (loss_axis, eval_axis):
        axis.axhline(BASELINE_MSE, color="k", linestyle="--", linewidth=1, label="predict the mean")
    stages = ", ".join(str(length) for length in (*args.curriculum, args.length))
    for axis, title in (
        (loss_axis, f"training loss (MSE; T = {stages})"),
        (eval_axis, f"held-out loss at T = {args.length}"),
        (norm_axis, "gradient norm of the parameters before clipping"),
    ):
        axis.set_yscale("log")
        axis.set_xlabel("step")
        axis.set_title(title, fontsize=10)
        axis.grid(True, alpha=0.3)
    loss_axis.legend(fontsize=8, loc="upper right")
    figure.suptitle(
        f"tanh RNN ({args.hidden} units), adding problem, spectral radius "
        f"{args.spectral_radius} at init, SGD lr {args.lr}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def lengths_list(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--length", type=int, default=100, help="T of the task (and held-out)")
    parser.add_argument(
        "--curriculum",
        type=lengths_list,
        default=[10, 20, 40, 70],
        help="shorter lengths trained first, comma-separated ('' for none)",
    )
    parser.add_argument("--stage-steps", type=int, default=300, help="steps per curriculum stage")
    parser.add_argument("--final-steps", type=int, default=400, help="steps at --length")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--lr-decay", type=float, default=0.1, help="final lr / initial lr")
    parser.add_argument("--spectral-radius", type=float, default=1.2)
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--hidden-clip", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0, help="initial weights; data: seed + 1")
    parser.add_argument("--held-out", type=int, default=1000, help="sequences in the test batch")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--out",
        default=os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "results", "stability.png"
        ),
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    held_out = adding_batch(args.held_out, args.length, torch.Generator().manual_seed(12345))
    runs = [train(method, args, held_out) for method in args.methods.split(",")]
    print(
        f"{'method':<14} {'final loss':>11} {'diverged':>9} {'clip freq':>10} {'clip ms/step':>13}"
    )
    for run in runs:
        frequency = run["clip_frequency"]
        frequency = "-" if frequency is None else f"{frequency:.0%}"
        final = run["final_loss"]
        final = f"{final:.4f}" if math.isfinite(final) else "-"
        note = (
            f"  (loss {run['last_loss']:.3g} at step {run['steps']}: stopped)"
            if run["steps"] < len(schedule(args))
            else ""
        )
        print(
            f"{run['method']:<14} {final:>11} {str(run['diverged']):>9} {frequency:>10} "
            f"{run['clip_ms_per_step']:>13.3f}{note}"
        )
    print(
        f"(final loss: MSE on {args.held_out} held-out sequences at T = {args.length}; "
        f"predicting the mean scores {BASELINE_MSE:.3f})"
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    plot(runs, args, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
