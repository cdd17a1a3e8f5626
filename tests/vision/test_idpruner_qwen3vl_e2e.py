"""IDPruner end to end on a tiny random Qwen3-VL (CPU, float32): the path Qwen2.5-VL shares, with Qwen3-VL's own
parts: 16-pixel patches, DeepStack features (the vision tower's earlier layers added to the first LM layers at
the vision tokens, carried beside each token's row and pruned with it) and videos laid out one run per frame
group with timestamps between the runs.

One server (the session's pool): ``--idpruner --idpruner-keep-ratio 0.25 --chunked-prefill-size 48`` on a
position-sensitive copy (rope_theta 20, q/k x3), built here with transformers (no download). Oracle for images:
a transformers forward on the pruned embeddings, with the kept tokens' ORIGINAL M-RoPE positions and their own
DeepStack features at their slots; for videos the same, per frame group, with the server's timestamps.
"""

from __future__ import annotations

import io
import json
import urllib.request
from pathlib import Path

import pytest
import torch

from serving import MODEL_DIRS, cached_build, shared_server
from vl_media import LOGPROB_TOL, assert_same_generation, decode_video, image_png, video_avi

pytestmark = pytest.mark.e2e

KEEP = 0.25
MAX_NEW = 6
PROMPT_IMAGE = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the picture?"
                "<|im_end|>\n<|im_start|>assistant\n")
PROMPT_TWO = ("<|im_start|>user\nFirst <|vision_start|><|image_pad|><|vision_end|> then "
              "<|vision_start|><|image_pad|><|vision_end|> compare.<|im_end|>\n<|im_start|>assistant\n")
PROMPT_VIDEO = ("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What happens?<|im_end|>\n"
                "<|im_start|>assistant\n")


def build(out: Path) -> Path:
    """A tiny Qwen3-VL (2 LM layers of 64, a 2-block vision tower of 32 with DeepStack at block 0, patch 16,
    merge 2), random weights (seed 0), the demo tokenizer and chat template, rope_theta 20 and q/k x3."""
    from transformers import (Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                              Qwen3VLProcessor, Qwen3VLVideoProcessor)

    from sgl_slim import demo

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = demo.train_tokenizer(out)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in demo.SPECIAL_TOKENS}
    text = dict(demo.TEXT_CONFIG, vocab_size=len(tokenizer), bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], head_dim=16,
                rope_parameters={"rope_type": "default", "rope_theta": 20.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=text["hidden_size"],
                  num_position_embeddings=64, deepstack_visual_indexes=[0])
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config).float()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "language_model" in name and (".q_proj." in name or ".k_proj." in name):
                param.mul_(3.0)
    model.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["dtype"] = cfg["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    pixels = dict(patch_size=16, merge_size=2)
    Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=4 * 32 * 32, max_pixels=256 * 32 * 32,
                                                           **pixels),
                     video_processor=Qwen3VLVideoProcessor(**pixels),
                     tokenizer=tokenizer, chat_template=demo.CHAT_TEMPLATE).save_pretrained(out)
    (out / ".complete").write_text("ok\n")
    return out


def qwen3_vl_model() -> Path:
    """The model, cached beside the demo models."""
    import transformers

    from sgl_slim.demo import cache_root

    return cached_build(cache_root() / f"qwen3-vl-tiny-position-sensitive-tf{transformers.__version__}", build)


MODEL_DIRS["{qwen3_vl}"] = qwen3_vl_model
pruned_server = shared_server(["--model-path", "{qwen3_vl}", "--dtype", "float32", "--idpruner",
                               "--idpruner-keep-ratio", str(KEEP), "--chunked-prefill-size", "48",
                               "--max-total-tokens", "8192", "--skip-server-warmup"])


def generate(srv, prompt: str, images=(), videos=(), settings: dict | None = None, max_new: int = MAX_NEW):
    import base64

    body = {"text": prompt, "return_logprob": True,
            "sampling_params": {"max_new_tokens": max_new, "temperature": 0.0}}
    if images:
        body["image_data"] = [base64.b64encode(im).decode() for im in images]
    if videos:
        body["video_data"] = [base64.b64encode(v).decode() for v in videos]
    if settings:
        body["sgl_slim"] = settings
    req = urllib.request.Request(f"{srv.base_url}/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


class Oracle:
    """transformers' Qwen3-VL on the same images: vision tower, positions and DeepStack features its own, then
    the language model on the kept tokens only."""

    def __init__(self, model_dir: Path):
        from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()

    @torch.no_grad()
    def greedy(self, prompt: str, images: list[bytes], keep_ratio: float, *, videos: list[bytes] = (),
               positions: str = "original") -> dict:
        """Images, or videos (every frame kept, at 2 fps, as the server's preprocessing does for these; each
        frame group pruned on its own). positions: "original", or "renumbered" (the kept slots get the first
        slots' positions)."""
        from PIL import Image

        from sgl_slim.config import IDPrunerConfig
        from sgl_slim.vision import idpruner_select

        cfg = IDPrunerConfig(enabled=True, keep_ratio=keep_ratio)
        kind = "video" if videos else "image"
        if videos:
            frames = [decode_video(v) for v in videos]
            meta = [{"fps": 2.0, "frames_indices": list(range(len(f))), "total_num_frames": len(f),
                     "duration": len(f) / 2.0} for f in frames]
            inputs = self.processor(text=[prompt], videos=frames, video_metadata=meta, do_sample_frames=False,
                                    return_tensors="pt")
        else:
            inputs = self.processor(text=[prompt], return_tensors="pt",
                                    images=[Image.open(io.BytesIO(b)).convert("RGB") for b in images])
        ids = inputs["input_ids"]
        core = self.model.model
        grid = inputs[f"{kind}_grid_thw"]
        pos, _ = core.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                     **{f"{kind}_grid_thw": grid})
        pos = pos[:, 0]
        pixels = inputs["pixel_values_videos" if videos else "pixel_values"]
        vision = (core.get_video_features if videos else core.get_image_features)(pixels, grid)
        token = getattr(self.model.config, f"{kind}_token_id")
        embeds = self.model.get_input_embeddings()(ids)[0].clone()
        cols = torch.nonzero(ids[0] == token)[:, 0]
        embeds[cols] = torch.cat(vision.pooler_output)
        deepstack = [torch.cat(layer) for layer in vision.deepstack_features]      # [sum N, H] per LM layer
        keep_cols = torch.ones(ids.shape[1], dtype=torch.bool)
        kept_rows, slot_pos, cursor = [], pos.clone(), 0
        for rows, groups in zip(vision.pooler_output, grid[:, 0].tolist() if videos else [1] * len(images)):
            n = rows.shape[0]
            size = n // groups
            k = cfg.keep_count(size, video=bool(videos))
            local = torch.cat([j * size + idpruner_select(rows[j * size:(j + 1) * size], None, k,
                                                          mmr_lambda=cfg.mmr_lambda) for j in range(groups)])
            mine = cols[cursor:cursor + n]
            keep_cols[mine] = False
            keep_cols[mine[local]] = True
            kept_rows.append(cursor + local)
            if positions == "renumbered":
                slot_pos[:, mine[local]] = pos[:, mine[:local.numel()]]
            cursor += n
        kept = torch.nonzero(keep_cols)[:, 0]
        kept_rows = torch.cat(kept_rows)
        e, p = embeds[kept], slot_pos[:, kept]
        visual = (ids[0] == token)[kept]
        stack = [layer[kept_rows] for layer in deepstack]
        next_pos = int(pos.max()) + 1
        out, logprobs = [], []
        for t in range(MAX_NEW):
            mask = torch.cat([visual, torch.zeros(t, dtype=torch.bool)])
            hidden = core.language_model(inputs_embeds=e[None], position_ids=p[:, None, :],
                                         visual_pos_masks=mask[None], deepstack_visual_embeds=stack).last_hidden_state
            logits = self.model.lm_head(hidden[0, -1])
            tok = int(torch.argmax(logits))
            out.append(tok)
            logprobs.append(float(torch.log_softmax(logits.double(), dim=-1)[tok]))
            e = torch.cat([e, self.model.get_input_embeddings()(torch.tensor([tok]))], dim=0)
            p = torch.cat([p, torch.full((3, 1), next_pos + t, dtype=p.dtype)], dim=1)
        return {"output_ids": out, "logprobs": logprobs, "prompt_tokens": int(kept.numel())}


@pytest.fixture(scope="module")
def oracle():
    return Oracle(qwen3_vl_model())


IMG_A, IMG_B = image_png(320, 256, seed=1), image_png(224, 352, seed=2)      # 10 x 8 and 7 x 11 tokens (32 px each)


def test_oracle_is_position_and_deepstack_sensitive(oracle):
    original = oracle.greedy(PROMPT_IMAGE, [IMG_A], KEEP)
    renumbered = oracle.greedy(PROMPT_IMAGE, [IMG_A], KEEP, positions="renumbered")
    gap = max(abs(a - b) for a, b in zip(original["logprobs"], renumbered["logprobs"]))
    assert gap >= 20 * LOGPROB_TOL, f"positions barely matter on this model (logprob gap {gap:.2e})"


@pytest.mark.parametrize("prompt,images", [(PROMPT_IMAGE, [IMG_A]), (PROMPT_TWO, [IMG_A, IMG_B])],
                         ids=["one-image", "two-images"])
@pytest.mark.parametrize("keep", [KEEP, 1.0])
def test_images_match_transformers_with_original_positions_and_deepstack(pruned_server, oracle, prompt, images,
                                                                         keep):
    want = oracle.greedy(prompt, images, keep)
    got = generate(pruned_server, prompt, images, settings=None if keep == KEEP else {"idpruner_keep_ratio": keep})
    assert got["meta_info"]["prompt_tokens"] == want["prompt_tokens"], (got["meta_info"], want)
    assert_same_generation(got, want)


# 448 x 448 frames: a multiple of SGLang's resize factor (28) above its minimum pixels, so its own resize keeps
# them; the Qwen3-VL processor then scales them to 416 x 416 for 4 frames on both sides. 4 frames at 2 fps: 2 frame
# groups of 13 x 13 tokens, one placeholder run each
GROUP_TOKENS = 169
CLIP = video_avi(4, seed=3, size=448)


def test_video_oracle_is_position_sensitive(oracle):
    original = oracle.greedy(PROMPT_VIDEO, [], KEEP, videos=[CLIP])
    renumbered = oracle.greedy(PROMPT_VIDEO, [], KEEP, videos=[CLIP], positions="renumbered")
    gap = max(abs(a - b) for a, b in zip(original["logprobs"], renumbered["logprobs"]))
    assert gap >= 20 * LOGPROB_TOL, f"video positions barely matter on this model (logprob gap {gap:.2e})"


@pytest.mark.parametrize("keep", [KEEP, 1.0])
def test_video_runs_per_frame_group_match_transformers(pruned_server, oracle, keep):
    from sgl_slim.config import IDPrunerConfig

    want = oracle.greedy(PROMPT_VIDEO, [], keep, videos=[CLIP])
    got = generate(pruned_server, PROMPT_VIDEO, videos=[CLIP],
                   settings=None if keep == KEEP else {"idpruner_keep_ratio": keep})
    numbers = got["meta_info"]["sgl_slim"]
    assert numbers["vision_tokens_total"] == 2 * GROUP_TOKENS
    assert numbers["vision_tokens_kept"] == 2 * IDPrunerConfig(keep_ratio=keep).keep_count(GROUP_TOKENS)
    assert got["meta_info"]["prompt_tokens"] == want["prompt_tokens"], (got["meta_info"], want)
    assert_same_generation(got, want)
