"""One forward of the policy for generation: tokens in, next-token logits of the last position out.

`FullForward` calls the HF model itself (any causal LM; weights already resident).

`LayeredForward` runs a Llama-family decoder piece by piece so that ZeRO-3 parameters can be
gathered one group of layers at a time. It mirrors `LlamaModel.forward` of transformers 5.x:

    h      = embed_tokens(input_ids)                         group 0
    masks  = create_causal_mask(...) per layer type (full / sliding window)
    cos,sin= rotary_emb(h, position_ids)                     (no parameters)
    h      = layer_i(h, attention_mask, position_embeddings, position_ids, past_key_values)
                                                             groups 1..n, k layers each
    logits = lm_head(norm(h[:, -1:]))                        last group

Llama, Mistral and Qwen2 share this structure (Qwen2 and Mistral add sliding-window layers,
handled through the per-layer mask kind). Other architectures get a clear error.

Both return logits [B, V] float32 for the last position and extend `cache` in place.
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from grpo_ds.cpu.packed_linear import packed_linears
from grpo_ds.rollout.gather import GroupGatherer, gathered_bytes, plan_layers_per_group

LAYERED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def cache_kwarg(fn) -> str:
    """The name `fn` takes the KV cache under: transformers 5.24 renamed past_key_values to cache
    (the old name still works there, with a FutureWarning)."""
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


class FullForward:
    """The HF model's own forward; collective-free once the weights are gathered."""

    collective = False  # no all-gathers inside a forward: ranks need not stay in lockstep

    def __init__(self, model: nn.Module):
        self.model = model
        self._keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._cache = cache_kwarg(model.forward)

    def __call__(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        kwargs = {"logits_to_keep": 1} if self._keep_last else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=True, **{self._cache: cache},
                         **kwargs)
        return out.logits[:, -1, :].float()

    def idle(self) -> None:
        raise RuntimeError("FullForward never needs to idle: it runs no collectives")


def check_layered_support(model: nn.Module) -> None:
    """Raise a clear error unless `model` has the Llama-family layout the layer path needs."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    base = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if (model_type not in LAYERED_MODEL_TYPES or base is None
            or not all(hasattr(base, n) for n in needed) or not hasattr(model, "lm_head")):
        raise NotImplementedError(
            f"gather='layers' supports the Llama family {LAYERED_MODEL_TYPES} "
            f"(model.model.embed_tokens/layers/norm/rotary_emb + model.lm_head); got model_type="
            f"{model_type!r} ({type(model).__name__}). Use gather='full' for this model.")


def _mask_kinds(config, num_layers: int) -> list[str]:
    """Per-layer attention kind: config.layer_types (Qwen2) or sliding iff sliding_window (Mistral)."""
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return list(kinds[:num_layers])
    sliding = getattr(config, "sliding_window", None) is not None
    return ["sliding_attention" if sliding else "full_attention"] * num_layers


class LayeredForward:
    """Decoder run group by group; each group's ZeRO-3 parameters are gathered just in time."""

    def __init__(self, model: nn.Module, timings: dict, layers_per_group: int | None = None,
                 budget_bytes: int | None = None, prefetch: bool = True, pack: bool = False):
        check_layered_support(model)
        self.model, self.base, self.config = model, model.model, model.config
        layers = list(self.base.layers[: self.config.num_hidden_layers])
        if layers_per_group is None:
            edge = max(gathered_bytes(list(self.base.embed_tokens.parameters())),
                       gathered_bytes(list(self.base.norm.parameters())
                                      + list(model.lm_head.parameters())))
            layer_bytes = max(gathered_bytes(list(layer.parameters())) for layer in layers)
            layers_per_group = plan_layers_per_group(layer_bytes, edge, budget_bytes)
        self.layer_chunks = [layers[i:i + layers_per_group]
                             for i in range(0, len(layers), layers_per_group)]
        self.layers_per_group = layers_per_group
        self.kinds = _mask_kinds(self.config, len(layers))
        groups = ([list(self.base.embed_tokens.parameters())]
                  + [[p for layer in chunk for p in layer.parameters()] for chunk in self.layer_chunks]
                  + [list(self.base.norm.parameters()) + list(model.lm_head.parameters())])
        self.gatherer = GroupGatherer(groups, timings, prefetch=prefetch)
        # pack: each group's Linears run on weights reordered for oneDNN right after its gather,
        # the kernels of the full-gather path (the two paths sample identical tokens)
        self.pack = pack
        self.chunk_modules = [nn.ModuleList(chunk) for chunk in self.layer_chunks]
        self.head = nn.ModuleList([self.base.norm, model.lm_head])
        self.collective = any(len(g) for g in self.gatherer.groups)
        self._cache = cache_kwarg(layers[0].forward) if layers else "past_key_values"
        makers = {"full_attention": create_causal_mask,
                  "sliding_attention": create_sliding_window_causal_mask}
        # per mask kind in use: (function, its cache argument's name), looked up once, not per step
        self.mask_makers = {kind: (makers[kind], cache_kwarg(makers[kind]))
                            for kind in set(self.kinds)}

    def _masks(self, hidden, attention_mask, position_ids, cache) -> dict:
        return {kind: make(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                           position_ids=position_ids, **{cache_name: cache})
                for kind, (make, cache_name) in self.mask_makers.items()}

    def _held(self, g: int, modules: nn.Module, rows: int):
        """Group g gathered, and its Linears packed if asked (one context for both; if packing
        fails, the group is released before the error leaves)."""
        with ExitStack() as stack:
            stack.enter_context(self.gatherer.hold(g))
            if self.pack:
                stack.enter_context(packed_linears(modules, rows))
            return stack.pop_all()

    def __call__(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        hold, rows = self.gatherer.hold, input_ids.numel()
        with hold(0):
            hidden = self.base.embed_tokens(input_ids)
        # masks read the cache length, so they are built before any layer extends the cache
        masks = self._masks(hidden, attention_mask, position_ids, cache)
        rope = self.base.rotary_emb(hidden, position_ids)
        index = 0
        for g, (chunk, modules) in enumerate(zip(self.layer_chunks, self.chunk_modules), start=1):
            with self._held(g, modules, rows):
                for layer in chunk:
                    hidden = layer(hidden, attention_mask=masks[self.kinds[index]],
                                   position_embeddings=rope, position_ids=position_ids,
                                   use_cache=True, **{self._cache: cache})
                    index += 1
        with self._held(len(self.layer_chunks) + 1, self.head, hidden.shape[0]):
            logits = self.model.lm_head(self.base.norm(hidden[:, -1:, :]))
        return logits[:, -1, :].float()

    def idle(self) -> None:
        """Join the all-gathers of one forward without computing (this rank has no rows left)."""
        for g in range(len(self.layer_chunks) + 2):
            with self.gatherer.hold(g):
                pass
