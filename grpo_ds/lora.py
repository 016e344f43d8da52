"""LoRA adapters on the ZeRO-3 policy, through PEFT, and the reference as the adapter-free base.

    y = W x + (alpha / r) * B (A dropout(x))        W frozen [out, in], A [r, in], B [out, r]

(Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"). PEFT replaces each
targeted Linear of the loaded HF model *in place* by a wrapper holding the frozen Linear
(`base_layer`) and A, B. So the HF model the engine trains, the rollout decodes with (full gather
or layer groups: A and B are parameters of the layer they sit in, gathered with it) and the
reference scores with is one object; nothing here merges weights, and generation is exact.

Base dtype and placement. The base is loaded sharded under `zero.Init` exactly as without LoRA,
in `model.dtype` (bf16 on a GPU: 2 bytes per parameter, split over the ranks). It is frozen, so
ZeRO-3 keeps no fp32 master copy, gradient or Adam moment of it: those exist for A and B only
(DeepSpeed builds optimizer partitions for `requires_grad` parameters alone, and only those are
handed to it). A and B are created outside `zero.Init` in the base's dtype and partitioned by
`deepspeed.initialize`. For the largest model per machine, the preset
`ds_configs/zero3_lora_offload.json` moves the partitioned base (and the adapters' optimizer) to
host memory (`offload_param: cpu`); `offload_param: nvme` (ZeRO-Infinity) goes further.

Reference. With beta > 0 the reference log-probs are the policy's own forward inside PEFT's
`disable_adapter()`: every LoRA layer returns `base_layer(x)`, which is the base model, bit for
bit. No second model is built or loaded.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from grpo_ds.config import LoraConfig

ADAPTER = "default"  # PEFT's adapter name; a run trains one adapter


def peft_lora_config(lora: LoraConfig):
    """The `peft.LoraConfig` for `model.lora` (a fresh adapter)."""
    from peft import LoraConfig as PeftLoraConfig

    targets = lora.target_modules
    return PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules="all-linear" if targets == ["all-linear"] else targets,
                          bias="none", task_type="CAUSAL_LM")


def add_adapters(lm: torch.nn.Module, lora: LoraConfig, seed: int):
    """Put LoRA adapters into the loaded HF model `lm` (in place) and freeze everything else.

    Returns the `PeftModel` around `lm` (for `disable_adapter` and the adapter's config); `lm`
    itself stays the module to train. A is initialised from `seed` on every rank alike (B starts
    at zero, so the policy starts as the base). The adapters are in `lm`'s dtype: DeepSpeed's
    bf16 mode requires one dtype, and the fp32 master copy lives in the optimizer."""
    from peft import PeftModel, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if lora.adapter_path:
            from grpo_ds.lora_checks import check_adapter_dir

            check_adapter_dir(lora.adapter_path)
            model = PeftModel.from_pretrained(lm, lora.adapter_path, adapter_name=ADAPTER,
                                              is_trainable=True, autocast_adapter_dtype=False)
        else:
            model = get_peft_model(lm, peft_lora_config(lora), adapter_name=ADAPTER,
                                   autocast_adapter_dtype=False)
    if model.get_base_model() is not lm:
        raise RuntimeError("PEFT did not adapt the model in place; the engine would train a copy")
    return model


def adapter_parameters(lm: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of the trainable adapter weights of `lm`, in module order."""
    return [(n, p) for n, p in lm.named_parameters() if p.requires_grad]


def adapter_numel(lm: torch.nn.Module) -> int:
    """Elements of the adapters (ZeRO-3 partitioned parameters count whole: ds_numel)."""
    return sum(getattr(p, "ds_numel", p.numel()) for _, p in adapter_parameters(lm))


class AdapterFreeReference:
    """The reference model as the policy with its adapters off: called like the reference engine
    (`reference(input_ids, attention_mask, completion_ids, temperature)` -> (logprobs [N, Tc],
    entropy)), it runs the policy engine in eval mode (no dropout) inside `disable_adapter()`."""

    def __init__(self, policy, peft_model):
        self.policy, self.peft_model = policy, peft_model

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask, completion_ids, temperature=1.0,
                 with_entropy=False):
        with self.adapters_off():
            return self.policy(input_ids, attention_mask, completion_ids, temperature,
                               with_entropy)

    @contextmanager
    def adapters_off(self):
        was_training = self.policy.training
        self.policy.eval()
        try:
            with self.peft_model.disable_adapter():
                yield
        finally:
            self.policy.train(was_training)


def adapter_state_dict(engine, peft_model) -> dict[str, torch.Tensor] | None:
    """The adapter weights in PEFT's saved names (`...lora_A.weight`), gathered whole on rank 0
    (None on other ranks). Collective under ZeRO-3: every rank calls it."""
    import deepspeed
    import deepspeed.comm as dist
    from peft import get_peft_model_state_dict

    params = [p for _, p in adapter_parameters(engine.module.lm)]
    state = None
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if dist.get_rank() == 0:
            whole = {k: v.detach().to("cpu", copy=True)
                     for k, v in peft_model.state_dict().items() if "lora_" in k}
            state = get_peft_model_state_dict(peft_model, state_dict=whole,
                                              adapter_name=ADAPTER)
    return state


def save_adapter(engine, peft_model, tokenizer, out_dir, dtype: torch.dtype) -> None:
    """Write a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) that
    `PeftModel.from_pretrained(base, out_dir)` loads. Collective: every rank calls it."""
    import deepspeed.comm as dist
    from safetensors.torch import save_file

    state = adapter_state_dict(engine, peft_model)
    if dist.get_rank() == 0:
        from pathlib import Path

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        peft_model.peft_config[ADAPTER].save_pretrained(str(out))
        save_file({k: v.to(dtype).contiguous() for k, v in state.items()},
                  str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(out))
    dist.barrier()


def adapter_config_dict(peft_model) -> dict:
    """The adapter's PEFT config as plain JSON (sets as sorted lists), for the run state."""
    def plain(value):
        if isinstance(value, (set, frozenset)):
            return sorted(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {k: plain(v) for k, v in peft_model.peft_config[ADAPTER].to_dict().items()}


def merge_lora_weights(state: dict[str, torch.Tensor],
                       scalings: dict[str, float]) -> dict[str, torch.Tensor]:
    """HF weights from PEFT-wrapped ones: W' = W + scaling * B @ A per adapted Linear (computed in
    float32, stored in W's dtype); `q_proj.base_layer.weight` becomes `q_proj.weight` and the A, B
    entries go. `scalings`: adapted module name -> alpha / r. Keys without adapters pass as is."""
    merged = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if ".base_layer." not in key:
            merged[key] = value
            continue
        module, leaf = key.split(".base_layer.")
        if leaf == "weight":
            a = state[f"{module}.lora_A.{ADAPTER}.weight"].float()  # [r, in]
            b = state[f"{module}.lora_B.{ADAPTER}.weight"].float()  # [out, r]
            value = (value.float() + scalings[module] * (b @ a)).to(value.dtype)
        merged[f"{module}.{leaf}"] = value
    return merged


def lora_scalings(lm: torch.nn.Module) -> dict[str, float]:
    """Adapted module name (relative to `lm`) -> its scaling alpha / r."""
    return {name: m.scaling[ADAPTER] for name, m in lm.named_modules()
            if isinstance(getattr(m, "scaling", None), dict) and ADAPTER in m.scaling}


def save_adapter_and_merged(engine, peft_model, tokenizer, run_dir, dtype: str) -> None:
    """End of a LoRA run: RUN/adapter (PEFT directory) and RUN/model (HF model, adapters
    merged). Collective: every rank calls it; rank 0 holds the full 16-bit weights once."""
    from pathlib import Path

    import deepspeed.comm as dist

    from grpo_ds.model import DTYPES

    save_adapter(engine, peft_model, tokenizer, Path(run_dir) / "adapter", DTYPES[dtype])
    state = engine._zero3_consolidated_16bit_state_dict()  # collective
    if dist.get_rank() == 0:
        lm = engine.module.lm
        state = {k.removeprefix("lm."): v for k, v in state.items()}
        merged = merge_lora_weights(state, lora_scalings(lm))
        write_merged(lm, {k: v.to(DTYPES[dtype]) for k, v in merged.items()}, tokenizer,
                     Path(run_dir) / "model")
    dist.barrier()


def write_merged(lm: torch.nn.Module, merged: dict[str, torch.Tensor], tokenizer, out_dir) -> None:
    """Save `merged` (HF names) as a plain HF model directory with `lm`'s config."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    config = lm.config
    if getattr(config, "tie_word_embeddings", False):
        merged = {k: v for k, v in merged.items() if k != "lm_head.weight"}  # the embedding's
    config.save_pretrained(str(out_dir))
    if getattr(lm, "generation_config", None) is not None:
        lm.generation_config.save_pretrained(str(out_dir))
    save_file({k: v.contiguous() for k, v in merged.items()},
              str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(out_dir))
