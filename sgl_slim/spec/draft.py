"""EAGLE-3 draft: one decoder layer on the target's fused low/mid/high hidden states plus the token embedding.

Shapes and names follow SGLang's ``LlamaForCausalLMEagle3`` (models/llama_eagle3.py) so that an exported
draft behaves the same there as here:

    h_t       = fc(cat(aux_low_t, aux_mid_t, aux_high_t))     # step 0: target features, [.., H]
              | g_{t}^{(i-1)}                                 # step i > 0: the draft's own pre-norm output
    x         = cat(input_layernorm(embed(token)), hidden_norm(h_t))      # [.., 2H]
    a         = h_t + o_proj(attn(q/k/v_proj(x)))                       # q/k/v take 2H
    g         = a + mlp(post_attention_layernorm(a))                      # pre-norm output, fed back
    logits    = lm_head(norm(g))                                          # [.., draft_vocab]
    target_id = draft_id + d2t[draft_id]

Column t of step 0 sees target features h_t and token x_{t+1} at position t and predicts x_{t+2}. Step i
at column t sees g_t^{(i-1)} and token x_{t+1+i} at position t+i, attends to step-0 keys at columns <= t
plus its own column's keys of steps 1..i, and predicts x_{t+2+i} (training-time test). At serving time
this is exactly SGLang's draft extend (step 0) followed by chain decode steps (topk = 1).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sgl_slim.spec.textlm import MLP, Attention, RMSNorm, TextConfig, rope_cos_sin


@dataclass(frozen=True)
class DraftConfig:
    vocab_size: int                 # target vocabulary
    draft_vocab_size: int           # the draft's own (reduced) vocabulary
    hidden_size: int
    target_hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    aux_layer_ids: tuple[int, ...]  # target layers whose outputs are fused (low, mid, high)

    @classmethod
    def for_target(cls, target: TextConfig, draft_vocab_size: int,
                   aux_layer_ids: tuple[int, ...] | None = None) -> "DraftConfig":
        return cls(
            vocab_size=target.vocab_size,
            draft_vocab_size=min(draft_vocab_size, target.vocab_size),
            hidden_size=target.hidden_size,
            target_hidden_size=target.hidden_size,
            intermediate_size=target.intermediate_size,
            num_heads=target.num_heads,
            num_kv_heads=target.num_kv_heads,
            head_dim=target.head_dim,
            rms_norm_eps=target.rms_norm_eps,
            rope_theta=target.rope_theta,
            max_position_embeddings=target.max_position_embeddings,
            aux_layer_ids=tuple(aux_layer_ids or default_aux_layer_ids(target.num_layers)),
        )

    def attn_config(self) -> TextConfig:
        return TextConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                          intermediate_size=self.intermediate_size, num_layers=1, num_heads=self.num_heads,
                          num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
                          rope_theta=self.rope_theta, max_position_embeddings=self.max_position_embeddings,
                          tie_word_embeddings=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["aux_layer_ids"] = list(self.aux_layer_ids)
        return d


def default_aux_layer_ids(num_layers: int) -> tuple[int, ...]:
    """Low, middle and high layers. SGLang's default is (1, L/2 - 1, L - 4), which degenerates for L < 8.

    The capture of layer k happens at the input of layer k + 1, so k must be <= L - 2.
    """
    if num_layers >= 8:
        return (1, num_layers // 2 - 1, num_layers - 4)
    if num_layers < 3:
        raise ValueError(f"an EAGLE-3 draft needs a target with >= 3 layers, got {num_layers}")
    return (0, (num_layers - 2) // 2, num_layers - 2)


class Eagle3Draft(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.cfg = cfg
        acfg = cfg.attn_config()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)   # frozen copy of the target's
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(len(cfg.aux_layer_ids) * cfg.target_hidden_size, cfg.hidden_size, bias=False)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(acfg, 2 * cfg.hidden_size, qkv_bias=False)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))   # target - draft id
        self.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))         # in draft vocab?

    # ---- vocabulary --------------------------------------------------------------------------------------
    def set_vocab(self, draft_to_target: torch.Tensor) -> None:
        """draft_to_target: [draft_vocab] target ids (distinct), in draft-id order."""
        ids = draft_to_target.long()
        if ids.numel() != self.cfg.draft_vocab_size or ids.unique().numel() != ids.numel():
            raise ValueError(f"need {self.cfg.draft_vocab_size} distinct target ids, got {ids.numel()}")
        self.d2t.copy_(ids - torch.arange(ids.numel(), device=ids.device))
        self.t2d.zero_()
        self.t2d[ids] = True

    def target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def draft_ids(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Target ids -> draft ids, -100 (ignored by cross-entropy) where the draft vocab lacks the token."""
        lookup = torch.full((self.cfg.vocab_size,), -100, dtype=torch.long, device=target_ids.device)
        ids = torch.arange(self.cfg.draft_vocab_size, device=target_ids.device)
        lookup[self.target_ids(ids)] = ids
        return lookup[target_ids]

    # ---- one layer, split so that training-time test can reuse keys ------------------------------------
    def _qkv(self, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor):
        """tokens [B, S], hidden [B, S, H], positions [B, S] -> q [B,Hq,S,D], k/v [B,Hkv,S,D]."""
        x = torch.cat([self.input_layernorm(self.embed_tokens(tokens)), self.hidden_norm(hidden)], dim=-1)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        return self.self_attn.project(x, cos.to(x.dtype), sin.to(x.dtype))

    def _finish(self, hidden: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual, MLP, norm: -> (pre-norm output g [B,S,H], logits [B,S,draft_vocab])."""
        a = hidden + self.self_attn.o_proj(attn)
        g = a + self.mlp(self.post_attention_layernorm(a))
        return g, self.lm_head(self.norm(g))

    def _attend(self, q, k0, v0, diag_k: list, diag_v: list, query_cols: torch.Tensor) -> torch.Tensor:
        """q [B,Hq,S,D] at columns ``query_cols`` [S] -> [B,S,Hq*D].

        Keys: step-0 keys k0 [B,Hkv,T,D] at columns <= the query's column, plus the query's own column in
        every later step (diag_k[j] [B,Hkv,S,D]).
        """
        rep = q.shape[1] // k0.shape[1]
        k0, v0 = k0.repeat_interleave(rep, 1), v0.repeat_interleave(rep, 1)
        diag_k = [k.repeat_interleave(rep, 1) for k in diag_k]
        diag_v = [v.repeat_interleave(rep, 1) for v in diag_v]
        scale = 1.0 / math.sqrt(q.shape[-1])
        s0 = (q @ k0.transpose(-1, -2)) * scale                                   # [B,H,S,T]
        cols = torch.arange(k0.shape[2], device=q.device)
        s0 = s0.masked_fill(cols[None, :] > query_cols[:, None], float("-inf"))
        sd = [((q * k).sum(-1, keepdim=True)) * scale for k in diag_k]           # each [B,H,S,1]
        p = torch.softmax(torch.cat([s0] + sd, dim=-1).float(), dim=-1).to(q.dtype)
        out = p[..., : k0.shape[2]] @ v0
        for j, v in enumerate(diag_v):
            out = out + p[..., k0.shape[2] + j: k0.shape[2] + j + 1] * v
        b, h, s, d = out.shape
        return out.transpose(1, 2).reshape(b, s, h * d)

    # ---- training-time test ------------------------------------------------------------------------------
    def forward_ttt(self, aux: torch.Tensor, tokens: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """aux [B, T, A*Ht] target features, tokens [B, T] -> per step i, logits [B, T-1, draft_vocab].

        Step i column t predicts token t+2+i; its input token is tokens[t+1+i] (ground truth = the target's
        own greedy choice). Columns whose input token would lie past the end use token 0 and must be masked
        out of the loss by the caller.
        """
        b, t_len, _ = aux.shape
        cols = torch.arange(t_len - 1, device=aux.device)
        hidden = self.fc(aux[:, :-1])
        step_tokens = tokens[:, 1:]
        q, k0, v0 = self._qkv(step_tokens, hidden, cols[None].expand(b, -1))
        g, logits = self._finish(hidden, self._attend(q, k0, v0, [], [], cols))
        out = [logits]
        diag_k, diag_v = [], []
        for i in range(1, steps):
            step_tokens = F.pad(tokens[:, 1 + i:], (0, i))                  # x_{t+1+i}, 0 past the end
            hidden = g
            q, k, v = self._qkv(step_tokens, hidden, (cols + i)[None].expand(b, -1))
            diag_k.append(k)
            diag_v.append(v)
            g, logits = self._finish(hidden, self._attend(q, k0, v0, diag_k, diag_v, cols))
            out.append(logits)
        return out

    # ---- serving-equivalent chain drafting ----------------------------------------------------------------
    @torch.no_grad()
    def step0(self, aux: torch.Tensor, tokens: torch.Tensor):
        """Draft extend over a whole sequence: aux [B, T, A*Ht], tokens [B, T].

        Returns (k0, v0, g, logits) for columns 0..T-2 (column t: features h_t, token x_{t+1}).
        """
        b, t_len, _ = aux.shape
        cols = torch.arange(t_len - 1, device=aux.device)
        hidden = self.fc(aux[:, :-1])
        q, k0, v0 = self._qkv(tokens[:, 1:], hidden, cols[None].expand(b, -1))
        g, logits = self._finish(hidden, self._attend(q, k0, v0, [], [], cols))
        return k0, v0, g, logits

    @torch.no_grad()
    def extend(self, aux: torch.Tensor, next_tokens: torch.Tensor, start: int, cache: tuple | None):
        """Incremental step0: columns start..start+S-1 from aux [B, S, A*Ht] (target features at those
        positions) and next_tokens [B, S] (the tokens one position later). ``cache`` = (k0, v0) of columns
        0..start-1 or None (start must be 0). Returns ((k0, v0) of columns 0..start+S-1, g, logits), g and
        logits for the new columns only; equal to step0() over the whole sequence, column by column.
        """
        b, s, _ = aux.shape
        have = 0 if cache is None else cache[0].shape[2]
        if have != start:
            raise ValueError(f"draft cache holds {have} columns, extend starts at column {start}")
        cols = torch.arange(start, start + s, device=aux.device)
        hidden = self.fc(aux)
        q, k, v = self._qkv(next_tokens, hidden, cols[None].expand(b, -1))
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        g, logits = self._finish(hidden, self._attend(q, k, v, [], [], cols))
        return (k, v), g, logits

    def chain_step(self, tok: torch.Tensor, hidden: torch.Tensor, k0, v0, diag_k: list, diag_v: list,
                   qcol: torch.Tensor, pos: torch.Tensor):
        """One chain draft step (a draft decode step): tok [B] target ids at positions pos [B, 1], hidden
        [B, 1, H] the previous step's pre-norm output; appends this step's key/value to diag_k/diag_v.
        Returns (g [B, 1, H], next token [B] as target ids)."""
        q, k, v = self._qkv(tok[:, None], hidden, pos)
        diag_k.append(k)
        diag_v.append(v)
        g, lg = self._finish(hidden, self._attend(q, k0, v0, diag_k, diag_v, qcol))
        return g, self.target_ids(lg[:, 0].argmax(-1))

    @torch.no_grad()
    def propose(self, k0, v0, g, logits, col: int, steps: int) -> torch.Tensor:
        """Chain of ``steps`` draft tokens (target ids) [B, steps] from column ``col`` of a step0() result.

        Only keys of columns <= col are seen, so one step0() over a whole sequence serves every prefix.
        """
        b = k0.shape[0]
        tok = self.target_ids(logits[:, col].argmax(-1))                       # [B]
        out = [tok]
        hidden = g[:, col: col + 1]
        qcol = torch.tensor([col], device=k0.device)
        diag_k, diag_v = [], []
        for i in range(1, steps):
            pos = torch.full((b, 1), col + i, device=k0.device)
            hidden, tok = self.chain_step(tok, hidden, k0, v0, diag_k, diag_v, qcol, pos)
            out.append(tok)
        return torch.stack(out, dim=1)


def fuse_aux(hiddens: list[torch.Tensor], layer_ids: tuple[int, ...]) -> torch.Tensor:
    """Target per-layer hiddens (index k+1 = output of layer k) -> fused features [B, T, A*Ht]."""
    return torch.cat([hiddens[k + 1] for k in layer_ids], dim=-1)


def ttt_loss(logits: list[torch.Tensor], labels: torch.Tensor, decay: float = 0.8, with_acc: bool = True):
    """Weighted training-time-test loss.

    logits[i]: [B, T-1, V_draft] from forward_ttt; labels: [B, T] draft ids of the target's greedy next token
    at each position (labels[:, j] = what the target predicts after token j; -100 = not in the draft vocab).
    Step i column t predicts the token after position t+1+i. Returns (loss, per-step accuracies); the
    accuracies (a host sync each) are skipped (empty list) when ``with_acc`` is false.
    """
    total = logits[0].new_zeros(())
    accs = []
    t1 = labels.shape[1] - 1
    for i, lg in enumerate(logits):
        lab = labels[:, 1 + i:]                                       # [B, T-1-i]
        lab = F.pad(lab, (0, t1 - lab.shape[1]), value=-100)
        total = total + (decay ** i) * F.cross_entropy(lg.flatten(0, 1).float(), lab.flatten(), ignore_index=-100)
        if not with_acc:
            continue
        valid = lab != -100
        accs.append(((lg.argmax(-1) == lab) & valid).sum().item() / max(1, valid.sum().item()))
    return total, accs
