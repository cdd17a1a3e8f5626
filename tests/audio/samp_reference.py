"""transformers-side reference for the Samp end-to-end tests: the same demo-audio checkpoint, the encoder run
WITHOUT its padding mask (as SGLang runs it), each clip compressed by the plain-loop Samp reference, and a greedy
decode over the compressed embeddings with ordinary consecutive positions."""

from __future__ import annotations

import torch

from sgl_slim.audio import attention_stats, layer_attention_probs, pool_stats, samp_compress, samp_compress_ref
from sgl_slim.config import SampConfig
from sgl_slim.integration.samp_hooks import audio_token_lengths

REF_MAX_TOKENS = 100


def load(model_dir):
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration
    proc = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    return proc, model


@torch.no_grad()
def compressed_inputs(proc, model, prompt: str, audios: list, samp: SampConfig | None):
    """(input_ids [L], inputs_embeds [L, H], per-clip (N, K, kept groups)) for one request."""
    inputs = proc(text=[prompt], audio=audios, padding=True, return_tensors="pt", audio_kwargs={"truncation": True})
    ids = inputs.input_ids[0]
    tower, projector = model.model.audio_tower, model.model.multi_modal_projector
    captured = []
    handle = tower.layers[-1].register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    try:
        clips = projector(tower(inputs.input_features).last_hidden_state)          # no padding mask
    finally:
        handle.remove()
    probs = layer_attention_probs(tower.layers[-1], captured[0])                   # [C, H, T, T]
    lens = audio_token_lengths(inputs.feature_attention_mask)
    token_id = model.config.audio_token_index
    new_ids, rows, info = [], [], []
    pos, c = 0, 0
    while pos < len(ids):
        if ids[pos] != token_id:
            new_ids.append(int(ids[pos]))
            pos += 1
            continue
        n = lens[c]
        clip = clips[c, :n]
        k = samp.keep_count(n) if samp is not None else n
        groups = [[i] for i in range(n)]
        if k != n:
            stats = pool_stats(attention_stats(probs[c][:, :2 * n, :2 * n]), pool=2, n_tokens=n)
            # the plain-loop reference is O(K^4 N): beyond ~100 tokens use the fast path (equal to it in
            # tests/audio/test_samp.py)
            compress = samp_compress_ref if n <= REF_MAX_TOKENS else samp_compress
            clip, groups = compress(clip, stats, keep=k, merge_threshold=samp.merge_threshold)
        new_ids += [token_id] * k
        rows.append(clip)
        info.append((n, k, groups))
        pos += n
        c += 1
    new_ids = torch.tensor(new_ids)
    embeds = model.get_input_embeddings()(new_ids).clone()
    if rows:                                   # a clip under ~0.03 s has no audio token at all
        embeds[new_ids == token_id] = torch.cat(rows)
    return new_ids, embeds, info


@torch.no_grad()
def greedy(model, embeds: torch.Tensor, max_new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy ids and their logprobs from inputs_embeds [L, H] (positions 0..L-1)."""
    out = model(inputs_embeds=embeds[None], use_cache=True)
    past, logits = out.past_key_values, out.logits[0, -1]
    ids, logprobs = [], []
    for _ in range(max_new_tokens):
        lp = torch.log_softmax(logits.float(), dim=-1)
        nxt = int(lp.argmax())
        ids.append(nxt)
        logprobs.append(float(lp[nxt]))
        out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
    return ids, logprobs


def load_audio_like_sglang(data: bytes, sr: int = 16000):
    """sglang 0.5.23 ``load_audio`` without torchcodec (its soundfile + torchaudio fallback)."""
    import io

    import numpy as np
    import soundfile as sf
    import torchaudio

    audio, original_sr = sf.read(io.BytesIO(data))
    if audio.ndim > 1:
        audio = np.mean(audio, axis=1)
    if original_sr != sr:
        audio = torchaudio.functional.resample(torch.from_numpy(audio).float()[None], original_sr, sr)[0].numpy()
    return audio
