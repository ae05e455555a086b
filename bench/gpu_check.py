"""The GPU check (run through bench/gpu_check.sh): each paper preset over a 10k-page vocabulary trains
--steps steps in bf16 on prepared data, generates the next session for --users users, then one HeTLM
epoch with 3 clusters runs, and with 2+ GPUs a 2-process torchrun training step. Never uses the network.

Writes one line to bench/results/gpu_check.jsonl: per check, tokens/s (non-pad training tokens per second
of training steps), peak GPU memory, users/s. --cpu-smoke runs the same code at toy sizes on the CPU
(toy shapes of each preset's family, a few steps, fp32) and writes elsewhere: the test suite runs it.

Data: --prepared DIR (a `hetlm prepare` folder), else the Taobao log under $HETLM_SHARED_DATA (the
shipped sample when it is absent), prepared once into /tmp/hetlm-bench.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import REPO, SHARED_DATA, SHIPPED, record  # noqa: E402  (sets the offline environment first)

import polars as pl  # noqa: E402
import torch  # noqa: E402

from hetlm.models import PRESETS, Preset, build_model, count_parameters  # noqa: E402

PAPER_PRESETS = ["opt-350m", "smollm2-360m", "qwen2.5-0.5b"]
CACHE = Path(tempfile.gettempdir()) / "hetlm-bench"
COLUMNS = ["check", "parameters", "seconds", "tokens_per_s", "users_per_s", "samples_per_s", "final_loss", "peak_gpu_gb"]


def row(**values) -> dict:
    """A table row with every column ("-" where a check has no such figure)."""
    return {column: values.get(column, "-") for column in COLUMNS}


def toy(preset: str) -> Preset:
    """A CPU-sized shape of the preset's family."""
    return Preset(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, family=PRESETS[preset].family)


def prepared_data(prepared: Path | None) -> Path:
    from hetlm.prepare import PrepareConfig, prepare

    if prepared is not None:
        return prepared
    shared = SHARED_DATA / "taobao-userbehavior" / "UserBehavior_head.csv"
    log = shared if shared.exists() else SHIPPED
    out = CACHE / f"gpu-check-{log.parent.name}"
    if not (out / "summary.json").exists():
        prepare("taobao", log, out, PrepareConfig(max_train_targets_per_user=3))
    return out


def peak_memory_gb(device: torch.device) -> float | str:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else "-"


def check_preset(name: str, shape: str | Preset, vocab: int, train: pl.DataFrame, users: list[list[int]],
                 args, device: torch.device, out: Path) -> dict:
    from hetlm.generate import generate_next_sessions
    from hetlm.train import TrainConfig, train_lm

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = build_model(shape, vocab)
    config = TrainConfig(lr=1e-4, batch_size=args.batch_size, max_steps=args.steps, bf16=args.bf16, device=str(device),
                         save_every=10**9, early_stopping_patience=None)
    started = time.perf_counter()
    result = train_lm(model, train, None, config, out / name, progress=False)
    model.eval()
    generating = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        generate_next_sessions(model, users, args.max_new_tokens, args.generate_batch_size, progress=False)
    done = time.perf_counter()
    return row(check=f"{name}: train {args.steps} steps, generate {len(users)} users", parameters=count_parameters(model),
               seconds=done - started, tokens_per_s=result.tokens_per_s, users_per_s=len(users) / (done - generating),
               final_loss=result.history["train"][-1]["loss"], peak_gpu_gb=peak_memory_gb(device))


def check_hetlm(shape: str | Preset, vocab: int, train: pl.DataFrame, args, device: torch.device) -> dict:
    from hetlm.cluster.hetlm import HeTLM, HeTLMConfig
    from hetlm.encoders import make_encoder

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    z = make_encoder("pagebag", show_progress=False).transform(train["history"].to_list())
    torch.manual_seed(0)
    base = build_model(shape, vocab)
    config = HeTLMConfig(n_clusters=3, epochs=1, batch_size=args.batch_size, selector_pretrain_epochs=20,
                         predictor_lr=1e-4, selector_lr=1e-3, bf16=args.bf16, device=str(device))
    fitted = HeTLM(config, progress=False).fit(base, train, z).model_
    return row(check=f"HeTLM epoch, 3 clusters of {args.hetlm_preset}, {train.height} samples",
               parameters=3 * count_parameters(base), seconds=fitted.info["seconds"],
               samples_per_s=train.height / fitted.info["seconds"], peak_gpu_gb=peak_memory_gb(device))


def ddp_step(args) -> None:
    """One rank of the 2-process check (under torchrun): a few steps of DDP training; rank 0 writes the row."""
    from hetlm.distributed import close_distributed, init_distributed
    from hetlm.train import TrainConfig, train_lm

    info = init_distributed()
    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    prepared = prepared_data(args.prepared)
    train = pl.read_parquet(prepared / "train.parquet").head(args.train_samples)
    shape = toy(PAPER_PRESETS[1]) if args.cpu_smoke else PAPER_PRESETS[1]
    torch.manual_seed(0)
    model = build_model(shape, args.vocab)
    config = TrainConfig(lr=1e-4, batch_size=args.batch_size, max_steps=args.ddp_steps, bf16=args.bf16,
                         device=str(device), save_every=10**9, early_stopping_patience=None)
    with tempfile.TemporaryDirectory() as tmp:
        result = train_lm(model, train, None, config, tmp, progress=False)
    if info.is_main:
        Path(args.ddp_row).write_text(json.dumps(row(
            check=f"torchrun 2 processes: {PAPER_PRESETS[1]} {args.ddp_steps} steps", parameters=count_parameters(model),
            tokens_per_s=result.tokens_per_s, final_loss=result.history["train"][-1]["loss"],
            peak_gpu_gb=peak_memory_gb(device))))
    close_distributed()


def run_ddp(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        row = Path(tmp) / "row.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   str(Path(__file__).resolve()), "--ddp-step", "--ddp-row", str(row), *sys.argv[1:]]
        subprocess.run(command, check=True, cwd=REPO)
        return json.loads(row.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU (the test suite's run)")
    parser.add_argument("--prepared", type=Path, help="a `hetlm prepare` folder")
    parser.add_argument("--out", type=Path, help="results file (default: bench/results/gpu_check.jsonl; "
                                                 "with --cpu-smoke, /tmp/hetlm-bench/gpu_check_cpu_smoke.jsonl)")
    parser.add_argument("--ddp", action="store_true", help="run the 2-process step with fewer than 2 GPUs too (gloo on CPU)")
    parser.add_argument("--ddp-step", action="store_true", help=argparse.SUPPRESS)  # a torchrun rank of the 2-process step
    parser.add_argument("--ddp-row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    smoke = args.cpu_smoke
    args.vocab = 10_000
    args.steps, args.ddp_steps = (3, 2) if smoke else (50, 10)
    args.batch_size, args.train_samples = (8, 64) if smoke else (32, 20_000)
    args.n_users, args.max_new_tokens, args.generate_batch_size = (20, 8, 8) if smoke else (500, 40, 64)
    args.bf16 = not smoke
    args.hetlm_preset = PAPER_PRESETS[1]
    if args.ddp_step:
        return ddp_step(args)
    if not smoke and not torch.cuda.is_available():
        sys.exit("no GPU: run with --cpu-smoke for the CPU version")

    started = time.perf_counter()
    device = torch.device("cpu") if smoke else torch.device("cuda")
    prepared = prepared_data(args.prepared)
    train = pl.read_parquet(prepared / "train.parquet").head(args.train_samples)
    test_inputs = pl.read_parquet(prepared / "test.parquet")["input_ids"].to_list()
    users = (test_inputs * math.ceil(args.n_users / len(test_inputs)))[:args.n_users]  # a small log has fewer test users
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in PAPER_PRESETS:
            rows.append(check_preset(preset, toy(preset) if smoke else preset, args.vocab, train, users, args, device, Path(tmp)))
    hetlm_shape = toy(args.hetlm_preset) if smoke else args.hetlm_preset
    rows.append(check_hetlm(hetlm_shape, args.vocab, train.head(args.train_samples // 4), args, device))
    gpus = torch.cuda.device_count()
    if gpus >= 2 or args.ddp:
        rows.append(run_ddp(args))
    seconds = time.perf_counter() - started
    out = args.out or (CACHE / "gpu_check_cpu_smoke.jsonl" if smoke else None)
    record("gpu_check", {"cpu_smoke": smoke, "prepared": str(prepared), "vocab": args.vocab, "steps": args.steps,
                         "batch_size": args.batch_size, "bf16": args.bf16, "users": args.n_users, "gpus": gpus,
                         "train_samples": train.height}, rows,
           {"seconds": seconds, "within_8_min": seconds < 480,
            "ddp_step": "ran" if gpus >= 2 or args.ddp else "skipped: fewer than 2 GPUs"}, path=out)


if __name__ == "__main__":
    main()
