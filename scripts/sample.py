"""Greedy (or sampled) text from any checkpoint: ``python scripts/sample.py checkpoint=runs/<run> prompt="..."``."""

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from memoryformer.cli import reports_user_errors
from memoryformer.config import register_resolvers
from memoryformer.evaluation.harness import latest_checkpoint
from memoryformer.models.decode import enable_compiled_decode, to_inference_dtype
from memoryformer.train.checkpoint import load_for_inference

register_resolvers()


@hydra.main(config_path="../conf", config_name="sample", version_base="1.3")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    checkpoint = Path(cfg.checkpoint) if cfg.checkpoint else latest_checkpoint(cfg.runs_dir)
    model, tokenizer = load_for_inference(checkpoint)
    model = to_inference_dtype(model.eval(), cfg.dtype)
    if cfg.compile:
        enable_compiled_decode(model)
    torch.manual_seed(cfg.seed)
    ids = tokenizer(cfg.prompt, return_tensors="pt").input_ids
    out = model.generate(
        ids,
        max_new_tokens=cfg.max_new_tokens,
        do_sample=cfg.temperature > 0,
        temperature=cfg.temperature if cfg.temperature > 0 else None,
        top_k=cfg.top_k if cfg.temperature > 0 else None,
        pad_token_id=tokenizer.eos_token_id,
    )
    print(cfg.prompt + tokenizer.decode(out[0, ids.shape[1] :]))


if __name__ == "__main__":
    main()
