"""A frozen Hugging Face sequence classifier as a reward function.

Named in the config as `model:/path/to/classifier`. It is placed like the reference model (its own
ZeRO-3 engine, parameters offloaded to CPU by default, or sharded on the device) and follows the
reward contract `fn(prompts=, completions=, **columns) -> list[float]`: the score is the
classifier's single logit on prompt + completion (for conversational rows, the prompt and
completion messages rendered by the classifier's chat template, as TRL does).

Its forward gathers parameters collectively under ZeRO-3, so every rank must run the same number
of micro-batches: the local count is padded to the maximum over ranks with a throw-away batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import deepspeed
import deepspeed.comm as dist
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.integrations import HfDeepSpeedConfig

from grpo_ds.rewards.loading import RewardSpecError

PREFIX = "model:"


def check_classifier(path: str) -> None:
    """Fail before launch when `path` is not a local single-logit sequence classifier."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise RewardSpecError(f"reward model {path!r}: no config.json there (a local HF model dir)")
    config = json.loads(config_file.read_text())
    architectures = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise RewardSpecError(
            f"reward model {path!r} is not a sequence classifier: its architectures are "
            f"{architectures or 'not stated'}; expected a *ForSequenceClassification model")
    labels = config.get("num_labels", len(config.get("id2label", {})) or 2)
    if labels != 1:
        raise RewardSpecError(
            f"reward model {path!r} has {labels} labels; a reward model has one score "
            "(num_labels=1)")


class RewardModel:
    def __init__(self, path: str, ds_config: dict, micro_batch_size: int = 16,
                 dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
        check_classifier(path)
        self.__name__ = f"reward_model:{Path(path).name}"
        self.micro_batch_size = micro_batch_size
        live = HfDeepSpeedConfig(ds_config)  # weakly referenced by transformers while loading
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation)
        del live
        model.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model.config.pad_token_id = self.tokenizer.pad_token_id
        self.engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        self.engine.eval()

    @torch.no_grad()
    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        # Conversational rows (as TRL does): prompt and completion messages through the reward
        # model's own chat template.
        texts = [self.tokenizer.apply_chat_template(p + c, tokenize=False)
                 if isinstance(p, list) else p + c for p, c in zip(prompts, completions)]
        size = self.micro_batch_size
        local = -(-len(texts) // size)
        rounds = torch.tensor([local], device=self.engine.device)
        dist.all_reduce(rounds, op=dist.ReduceOp.MAX)
        scores: list[float] = []
        for index in range(int(rounds.item())):
            part = texts[index * size:(index + 1) * size]
            batch = self.tokenizer(part or [""], return_tensors="pt", padding=True)
            # use_cache=False: a classifier's one forward needs no KV cache kept for later.
            logits = self.engine(input_ids=batch["input_ids"].to(self.engine.device),
                                 attention_mask=batch["attention_mask"].to(self.engine.device),
                                 use_cache=False).logits
            if part:
                scores.extend(logits[:, 0].float().tolist())
        return scores
