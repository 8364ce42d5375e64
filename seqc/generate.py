"""Autoregressive decoding on a compiled language model's state API:
``seqc.generate(model, prompt_tokens, max_new_tokens, ...)`` runs the prompt
once (``forward(..., return_state=True)``: its KV caches / recurrent states),
then one ``step()`` per new token.  Greedy by default; temperature, top-k and
top-p (nucleus) sampling with transformers' filter semantics; a stop token
ends each row on its own; a seed makes sampling reproducible.  torch is
imported on first use (``import seqc`` does not need it)."""
from __future__ import annotations

import numpy as np

from .errors import SeqcError


def filter_top_k(logits, k: int):
    """Logits outside the k largest of each row set to -inf (ties with the k-th value are kept)."""
    import torch
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -torch.inf)


def filter_top_p(logits, p: float):
    """Keep the smallest set of most probable tokens whose probabilities sum to at least `p`
    (the token that crosses `p` stays; at least one token stays); the rest -> -inf."""
    import torch
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    probs = ordered.softmax(-1)
    before = probs.cumsum(-1) - probs                 # mass of the more probable tokens
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -torch.inf)


def _check(max_new_tokens, temperature, top_k, top_p):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise SeqcError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0 or temperature != temperature:
        raise SeqcError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise SeqcError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise SeqcError(f"top_p must lie in (0, 1] or be None, got {top_p!r}")


def _prompt(model, prompt_tokens):
    import torch
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "step"):
        raise SeqcError("generate needs a compiled torch-backend model (seqc.compile(..., backend='torch'))")
    tokens = torch.as_tensor(np.asarray(prompt_tokens) if isinstance(prompt_tokens, (list, tuple)) else prompt_tokens)
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise SeqcError(f"prompt_tokens must be integer token ids, got {tokens.dtype}")
    if tokens.dim() not in (1, 2) or tokens.shape[-1] == 0:
        raise SeqcError(f"prompt_tokens must be (batch, length >= 1) or (length >= 1,), got {tuple(tokens.shape)}")
    param = next(model.parameters(), None)
    return tokens.long().to(param.device if param is not None else "cpu")


def generate(model, prompt_tokens, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, stop_token: int | None = None, seed: int | None = None):
    """Continue each prompt by up to `max_new_tokens` tokens; returns prompt + new tokens, (B, P + n)
    (1-D in, 1-D out).  temperature 0 picks the most likely token (top_k / top_p then do
    nothing); otherwise tokens are sampled from softmax(logits / temperature) after the top-k,
    then the top-p filter.  A row that produced `stop_token` is finished: it is filled with
    `stop_token` while other rows go on, and decoding ends when every row is finished."""
    import torch
    _check(max_new_tokens, temperature, top_k, top_p)
    tokens = _prompt(model, prompt_tokens)
    single = tokens.dim() == 1
    if single:
        tokens = tokens[None]
    generator = None
    if seed is not None:
        generator = torch.Generator(device=tokens.device).manual_seed(int(seed))
    out = [tokens]
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    with torch.no_grad():
        if max_new_tokens:
            logits, state = model(tokens, return_state=True)
            last = logits[:, -1]
        for i in range(max_new_tokens):
            nxt = _pick(last.float() if last.dtype in (torch.float16, torch.bfloat16) else last,
                        temperature, top_k, top_p, generator)
            if stop_token is not None:
                nxt = torch.where(done, torch.full_like(nxt, stop_token), nxt)
                done = done | (nxt == stop_token)
            out.append(nxt[:, None])
            if i + 1 == max_new_tokens or bool(done.all()):
                break
            last, state = model.step(nxt, state)
    result = torch.cat(out, 1)
    return result[0] if single else result


def _pick(logits, temperature, top_k, top_p, generator):
    import torch
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = filter_top_p(logits, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
