"""What a training run records: the metrics log beside its checkpoint (one JSON record per epoch), TensorBoard's
curves, and each epoch's line under the progress bar."""

import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from files import append_atomically, unwritable_folder, write_atomically

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


class LogSettings(Protocol):
    """Where a run's logs go: a RunConfig, or the flags that make one."""

    checkpoint_path: str | Path
    log_dir: str | None
    tensorboard: bool


def perplexity(loss: float) -> float:
    """exp(loss), and infinity where that is more than a float holds (a diverged run) rather than an OverflowError."""
    return math.inf if loss > math.log(sys.float_info.max) else math.exp(loss)


def json_safe(record: dict) -> dict:
    """The record with null for each NaN or infinite number, which JSON has no words for (json.dumps would write a
    bare NaN that JSON readers refuse)."""
    return {key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in record.items()}


def append_metrics(path: str | Path, record: dict) -> None:
    """One JSON object per line, so a run's curves can be plotted while it trains; numbers that are not finite
    are null. A write that fails (a full disk) leaves no half line and is a one-line OSError naming the file."""
    append_atomically(path, json.dumps(json_safe(record), allow_nan=False) + "\n")


def strict_json(text: str):
    """The JSON value of text, a ValueError for what JSON has no word for (NaN, Infinity), which json.loads takes."""
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def read_metrics(path: Path, left_out_of: str) -> list[tuple[bytes, dict]]:
    """The metrics log's records, each with its line. Damaged lines (garbage, bad UTF-8, NaN or Infinity, a
    record without a whole-number step) are left out with one warning naming the file, and `left_out_of` what;
    a last line cut short by a killed run is left out unnoticed."""
    records, damaged = [], 0
    lines = path.read_bytes().splitlines(keepends=True)
    for number, line in enumerate(lines, start=1):
        try:
            record = strict_json(line.decode("utf-8")) if line.endswith(b"\n") else None
        except ValueError:  # UnicodeDecodeError and JSONDecodeError both
            record = None
        if isinstance(record, dict) and type(record.get("step")) is int:
            records.append((line, record))
        elif line.endswith(b"\n") or number < len(lines):
            damaged += 1
    if damaged:
        warnings.warn(f"{path}: {damaged} damaged line(s) (not a JSON record with a whole-number step) left out of "
                      f"{left_out_of}", stacklevel=2)
    return records


def records_up_to(path: Path, step: int) -> None:
    """Keep only the metrics log's records of steps up to `step`, where a run starts (or resumes): epochs that
    ran after the checkpoint was saved run again and are logged again, never twice. A last line cut short by a
    killed run goes too, and damaged lines go with a warning that names the file."""
    if not path.exists():
        return
    kept = b"".join(line for line, record in read_metrics(path, "the metrics log") if record["step"] <= step)
    if kept != path.read_bytes():
        write_atomically(path, lambda file: file.write(kept))


def log_folder(args: LogSettings) -> Path:
    """Where TensorBoard's run of this checkpoint goes: <log_dir>/<checkpoint name>, log_dir by default runs/ beside
    the checkpoint."""
    checkpoint = Path(args.checkpoint_path)
    return (Path(args.log_dir) if args.log_dir else checkpoint.parent / "runs") / checkpoint.stem


def check_log_dir(args: LogSettings) -> None:
    """Raise a one-line ValueError, before any work, when TensorBoard's curves could not be written."""
    if args.tensorboard and (problem := unwritable_folder(log_folder(args))):
        raise ValueError(f"--log_dir {args.log_dir or log_folder(args).parent}: {problem}")


def tensorboard_writer(run: LogSettings, flags: dict, start_step: int) -> "SummaryWriter":
    """A TensorBoard SummaryWriter in <log_dir>/<checkpoint name> (log_dir by default runs/ beside the checkpoint),
    with the run's flags as text. Every step is logged at its global step, so a resumed run continues its own
    curves there; earlier runs' events after start_step are hidden (purged), so a run that starts over replaces the
    curves as it replaces the checkpoint."""
    from torch.utils.tensorboard import SummaryWriter  # here, not at the top: importing it takes most of a second

    first_step = start_step + 1  # step n is logged once n optimizer steps are done
    writer = SummaryWriter(log_folder(run), purge_step=first_step)
    flags = "\n".join(f"| --{name} | {value} |" for name, value in sorted(flags.items()))
    writer.add_text("flags", "| flag | value |\n| --- | --- |\n" + flags, first_step)
    return writer


class EpochLog:
    """Each step's loss on the progress bar; each epoch's means, throughput and validation figures printed and
    appended to the metrics file; with a TensorBoard writer, the curves of both. A loss's further figures (such as
    DPO's rewards/margins) are logged beside the loss, under their own names, validation_ before them."""

    def __init__(self, progress, metrics_path: str | Path | None, tensorboard: "SummaryWriter | None" = None,
                 flops_per_unit: float | None = None, peak_flops: float | None = None, perplexity: bool = True):
        """metrics_path None: this process keeps count but reports nothing (the other ranks under torchrun).
        tensorboard: a SummaryWriter or None. The model FLOPs utilization is logged when flops_per_unit (the
        FLOPs of training on one unit) and peak_flops (per second, all the processes' devices together) are known.
        perplexity: log exp(validation loss) too (a cross entropy's)."""
        self.progress = progress
        self.metrics_path = Path(metrics_path) if metrics_path else None
        self.tensorboard = tensorboard
        self.utilization_per_unit = flops_per_unit / peak_flops if flops_per_unit and peak_flops else None
        self.perplexity = perplexity
        self._start_epoch()

    def _start_epoch(self) -> None:
        self.losses, self.gradient_norms, self.figures, self.start = [], [], {}, time.perf_counter()

    def add_step(self, step: int, loss: float, gradient_norm: float, learning_rate: float,
                 figures: dict[str, float] | None = None) -> None:
        self.progress.update()
        self.progress.set_postfix(loss=f"{loss:.3f}", lr=f"{learning_rate:.2e}")
        self.losses.append(loss)
        self.gradient_norms.append(gradient_norm)
        self.learning_rate = learning_rate
        for name, value in (figures or {}).items():
            self.figures.setdefault(name, []).append(value)
        self._add_scalars(step, {"train/loss": loss, "train/gradient_norm": gradient_norm,
                                 "train/learning_rate": learning_rate}
                          | {f"train/{name}": value for name, value in (figures or {}).items()})

    def end_epoch(self, epoch: int, step: int, unit: str, units: int, validation_loss: float | None,
                  validation_figures: dict[str, float] | None = None, benchmarks: dict[str, float] | None = None
                  ) -> None:
        """Log the epoch that just ended; `units` of `unit` (tokens, samples) were trained on in it; validation_figures:
        the loss's further figures on the held-out split; benchmarks: more figures of the model, by TensorBoard tag
        (such as hellaswag/acc)."""
        units_per_second = units / (time.perf_counter() - self.start)
        record = {
            "epoch": epoch,
            "step": step,
            "loss": sum(self.losses) / len(self.losses),
            "gradient_norm": sum(self.gradient_norms) / len(self.gradient_norms),
            "learning_rate": self.learning_rate,
            f"{unit}_per_second": units_per_second,
        } | {name: sum(values) / len(values) for name, values in self.figures.items()}
        if self.utilization_per_unit:
            record["mfu"] = units_per_second * self.utilization_per_unit
        if validation_loss is not None:
            record["validation_loss"] = validation_loss
            if self.perplexity:
                record["validation_perplexity"] = perplexity(validation_loss)
        validation_figures = validation_figures or {}
        record |= {f"validation_{name}": value for name, value in validation_figures.items()} | (benchmarks or {})
        if self.metrics_path:
            self.progress.write(" ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                                         for key, value in record.items()))
            append_metrics(self.metrics_path, record)
        self._add_scalars(step, {f"speed/{unit}_per_second": units_per_second, "speed/mfu": record.get("mfu"),
                                 "validation/loss": validation_loss,
                                 "validation/perplexity": record.get("validation_perplexity")}
                          | {f"validation/{name}": value for name, value in validation_figures.items()}
                          | (benchmarks or {}))
        self._start_epoch()

    def _add_scalars(self, step: int, values: dict[str, float | None]) -> None:
        if self.tensorboard:
            for tag, value in values.items():
                if value is not None:
                    self.tensorboard.add_scalar(tag, value, step)

    def close(self) -> None:
        """End the progress bar and write out what TensorBoard still holds."""
        self.progress.close()
        if self.tensorboard:
            self.tensorboard.close()
