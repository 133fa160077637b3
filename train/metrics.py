"""Metrics: JSONL + TensorBoard in the workdir (optionally Weights & Biases), a console
progress line, MFU, plots.

The workdir may be on an object store: files go through `etils.epath`, and a file written as
it grows (`metrics.jsonl`, TensorBoard's event files) is written whole again at each flush
there, since objects cannot be appended to."""

from __future__ import annotations

import json
import secrets
import sys

import jax
import tqdm
from etils import epath

from train.workdir import flatten, is_remote

# Dense bf16 peak FLOP/s per chip, from vendor data sheets.
PEAK_FLOPS = {
    "H100": 989e12,  # SXM
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p reports itself as "TPU v5"
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
}


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """Peak FLOP/s of one device by its `device_kind`, or None (CPU, unknown chip)."""
    kind = (device or jax.devices()[0]).device_kind
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name.lower() in kind.lower():
            return PEAK_FLOPS[name]
    return None


def read_metrics(path) -> list[dict]:
    """The rows of a `metrics.jsonl` file, in order. A last line cut short (a kill during a
    write) is left out; a malformed line before the last is an error naming the line."""
    path = epath.Path(path)
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON row ({error.msg})") from None
    return rows


class MetricsWriter:
    """One writer for all metrics: `metrics.jsonl` (one object per logged step) and
    TensorBoard event files, and with `wandb_project` a Weights & Biases run as well. On
    resume, rows after the restored step are dropped so the file describes a single
    trajectory, and the same W&B run continues."""

    def __init__(self, workdir: epath.Path, resume_step: int, enabled: bool = True, wandb_project: str = ""):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self._wandb = None
        if not enabled:
            return
        if self.path.exists():
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._tb = _summary_writer(workdir / "tensorboard", purge_step=resume_step + 1)
        self._file = _open_append(self.path)
        if wandb_project:
            self._wandb = _wandb_run(workdir, wandb_project)

    def hyperparameters(self, config: dict) -> None:
        """The run's config, flattened, for TensorBoard's HParams tab and as text."""
        if not self.enabled:
            return
        from tensorboardX.summary import hparams

        flat = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flatten(config).items()}
        for summary in hparams(flat, {"loss": None, "eval_loss": None}):
            self._tb.file_writer.add_summary(summary)
        self._tb.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```", 0)
        if self._wandb:
            self._wandb.config.update(flat, allow_val_change=True)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self._file.write((json.dumps(row) + "\n").encode())
        self._file.flush()
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        for key, value in scalars.items():
            self._tb.add_scalar(key, value, step)
        if self._wandb:
            self._wandb.log(scalars, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        """`text` under `tag`, verbatim: TensorBoard's Text tab, and a one-cell W&B table."""
        if not self.enabled:
            return
        self._tb.add_text(tag, "```\n" + text + "\n```", step)
        if self._wandb:
            import wandb

            self._wandb.log({tag: wandb.Table(columns=[tag], data=[[text]])}, step=step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()
        if self._wandb:
            self._wandb.finish()


WANDB_RUN_ID_FILE = "wandb_run_id"


def _wandb_run(workdir: epath.Path, project: str):
    """The workdir's W&B run in `project`, named after the workdir; a resumed run continues
    the one whose id the workdir keeps. Files go where W&B puts them (WANDB_DIR, else
    ./wandb), since the workdir may be on an object store; WANDB_MODE=offline works without
    a network."""
    import wandb

    id_file = workdir / WANDB_RUN_ID_FILE
    if id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        run_id = secrets.token_hex(6)
        id_file.write_text(run_id)
    return wandb.init(project=project, id=run_id, name=workdir.name, resume="allow")


def _summary_writer(directory, **kwargs):
    """A tensorboardX writer whose event files on an object store go through epath (tensorboardX's
    own writers for gs:// and s3:// need clients of their own)."""
    # tensorboardX imports torch when it is installed, only to accept torch tensors, which are
    # never logged here: hiding it saves 2 s at the start of every run (2.9 s against 0.9 s to
    # import tensorboardX on the 2-core CPU, torch 2.13 installed).
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter, record_writer
    finally:
        if hide_torch:
            del sys.modules["torch"]

    for scheme in ("gs", "s3"):
        record_writer.register_writer_factory(scheme, _ObjectStoreEvents())
    return SummaryWriter(str(directory), **kwargs)


class _ObjectStoreEvents:
    """tensorboardX's writer factory for event files on an object store."""

    def open(self, path: str):
        return _open_append(path)

    def directory_check(self, path: str) -> None:
        pass  # an object store has no directories to create


def _open_append(path):
    """`path` opened to append bytes: a local file, or an object written whole at each flush."""
    return _Rewritten(epath.Path(path)) if is_remote(path) else open(path, "ab")


class _Rewritten:
    """A growing object: the content is kept in memory and written whole at each flush (as
    TensorFlow's gfile appends on GCS)."""

    def __init__(self, path: epath.Path):
        self.path = path
        self.content = bytearray(path.read_bytes() if path.exists() else b"")

    def write(self, data: bytes) -> None:
        self.content += data

    def flush(self) -> None:
        self.path.write_bytes(bytes(self.content))

    def close(self) -> None:
        self.flush()


def _plain(value):
    value = value.item() if hasattr(value, "item") else value
    return float(value) if isinstance(value, float) else value


class Progress:
    """The console view of a run: on a terminal a progress bar that redraws (tqdm), else one
    plain line per logging interval; one line per evaluation either way."""

    def __init__(self, total_steps: int, first_step: int, stream=sys.stderr):
        self.total_steps = total_steps
        self.stream = stream
        self.bar = None
        if stream.isatty():
            self.bar = tqdm.tqdm(
                total=total_steps, initial=first_step, file=stream, unit="step",
                bar_format="{l_bar}{bar:20}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}",
            )

    def update(self, step: int, loss: float, tokens_per_s: float, mfu: float | None, flops_per_s: float | None):
        if mfu is not None:
            speed = f", MFU {mfu:.1%}"
        elif flops_per_s is not None:
            speed = f", {flops_per_s / 1e9:.1f} GFLOP/s"
        else:
            speed = ""
        summary = f"loss {loss:.4f}, {tokens_per_s:,.0f} tok/s{speed}"
        if self.bar is None:
            self.stream.write(f"step {step}/{self.total_steps}: {summary}\n")
            self.stream.flush()
            return
        self.bar.set_postfix_str(summary, refresh=False)
        self.bar.update(step - self.bar.n)

    def evaluation(self, step: int, metrics: dict) -> None:
        values = ", ".join(f"{name.removeprefix('eval_')} {_number(value)}" for name, value in metrics.items())
        line = f"step {step}/{self.total_steps} validation: {values}"
        if self.bar is None:
            self.stream.write(line + "\n")
            self.stream.flush()
        else:
            self.bar.write(line, file=self.stream)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _number(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:.4g}"


def plot_loss_curve(metrics_path: epath.Path, out_path: epath.Path) -> None:
    """Train loss (raw and smoothed) and validation loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=1, label="train")
        # Averages over about a twentieth of the logged points: a fixed decay would lag a
        # short run by much of its length.
        decay = min(0.99, max(0.0, 1 - 20 / len(losses)))
        ax.plot(steps, _ema(losses, decay), color="tab:blue", lw=2, label="train (moving average)")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, "o-", color="tab:orange", lw=2, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with epath.Path(out_path).open("wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def _ema(values, decay: float) -> list[float]:
    smoothed, average = [], values[0]
    for v in values:
        average = decay * average + (1 - decay) * v
        smoothed.append(average)
    return smoothed
