"""Stop conditions on freshly sampled tokens: stop token ids and stop strings.

A stop string is detected by decoding the tail of each live completion after every step and
looking for the string in it. The tail holds the last `window` tokens, enough for the longest
stop string when every token decodes to at least one character (tokens that decode to nothing,
such as partial UTF-8 bytes, can hide a match that spans more tokens; a known limitation).
The token that completes the string is kept (mask 1); no text is cut inside a token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class StopChecker:
    def __init__(self, stop_token_ids: Sequence[int], stop_strings: Sequence[str], tokenizer,
                 device: torch.device):
        if stop_strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer: HybridRollout(..., tokenizer=tok)")
        self.stop_ids = (torch.as_tensor(list(stop_token_ids), dtype=torch.long, device=device)
                         if stop_token_ids else None)
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.tokenizer = tokenizer
        self.window = max((len(s) for s in self.stop_strings), default=0) + 2

    def __call__(self, tokens: torch.Tensor, history: torch.Tensor, step: int) -> torch.Tensor:
        """tokens [B] just sampled at `step`; history [B, >= step+1] holds each row's completion.

        Returns done [B] bool.
        """
        if self.stop_ids is not None:
            done = torch.isin(tokens, self.stop_ids)
        else:
            done = torch.zeros_like(tokens, dtype=torch.bool)
        if self.stop_strings:
            start = max(0, step + 1 - self.window)
            tails = self.tokenizer.batch_decode(history[:, start:step + 1].tolist())
            hits = [any(s in text for s in self.stop_strings) for text in tails]
            done |= torch.as_tensor(hits, dtype=torch.bool, device=tokens.device)
        return done
