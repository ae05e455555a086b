"""HeTLM fitted from files: a prepared folder's train and val samples and tokenizer, a saved base LM and the
users' embeddings, in this process or spread over several (one per GPU) under torchrun. `hetlm fit-hetlm` runs
`fit_from_files` in each process it starts; `hetlm experiment` with hetlm.processes > 1 runs
`fit_in_processes` on the files of its run folder, which starts

    python -m torch.distributed.run --standalone --nproc_per_node=N -m hetlm.fit_hetlm JOB.json
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict
from transformers import AutoModelForCausalLM

from .cluster.base import ClusterwiseLM
from .cluster.hetlm import HeTLM, HeTLMConfig
from .outputs import check_prepared
from .tokenizer import load_tokenizer
from .distributed import close_distributed, dist_info
from .train import resolve_device


class HeTLMJob(BaseModel):
    """What one HeTLM fit reads and writes."""
    model_config = ConfigDict(extra="forbid")

    prepared: Path                  # `hetlm prepare`'s folder: train and val samples, tokenizer
    base: Path                      # the pre-trained LM every predictor starts from (save_pretrained)
    embeddings: Path                # .npz of the users' embeddings, arrays "train" and "val"
    out: Path                       # the model folder process 0 writes, with the tokenizer
    config: HeTLMConfig = HeTLMConfig()
    encoder: dict | None = None     # the encoder settings, recorded in the model for routing
    checkpoints: Path | None = None
    resume: bool = False            # continue from the latest checkpoint in `checkpoints`
    progress: bool = True
    set_decoder: bool = True        # the model folder gets the set decoder fitted on the val samples


def fit_from_files(job: HeTLMJob) -> ClusterwiseLM:
    check_prepared(job.prepared)
    train, val = (pl.read_parquet(job.prepared / f"{split}.parquet") for split in ("train", "val"))
    z = np.load(job.embeddings)
    base = AutoModelForCausalLM.from_pretrained(job.base, use_safetensors=True)
    het = HeTLM(job.config, job.checkpoints, job.resume, job.progress, job.set_decoder).fit(
        base, train, z["train"], val, z["val"], job.encoder)
    if dist_info().is_main:
        het.save_pretrained(job.out, load_tokenizer(job.prepared / "tokenizer"))
    return het.model_


def fit_in_processes(job: HeTLMJob, processes: int, job_file: Path) -> ClusterwiseLM:
    """`fit_from_files` in `processes` processes started by torchrun, the job written to `job_file`; the model
    process 0 saved is read back."""
    job_file.parent.mkdir(parents=True, exist_ok=True)
    job_file.write_text(job.model_dump_json(indent=1))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "hetlm.fit_hetlm", str(job_file)]
    if subprocess.run(command, check=False).returncode:
        raise RuntimeError(f"HeTLM in {processes} processes failed (its output is above): {' '.join(command)}")
    return ClusterwiseLM.from_pretrained(job.out, str(resolve_device(job.config.device)))


if __name__ == "__main__":  # each process torchrun starts
    try:
        fit_from_files(HeTLMJob.model_validate_json(Path(sys.argv[1]).read_text()))
    finally:
        close_distributed()
