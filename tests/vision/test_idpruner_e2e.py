"""IDPruner end to end on the CPU demo server (float32, so rounding cannot flip a greedy token).

Two servers (the session's server pool, tests/serving.py), started together, on a POSITION-SENSITIVE copy of
the demo model (small rope_theta, scaled q/k: the stock demo barely reacts to wrong image positions):
  - pruned:   --idpruner --idpruner-keep-ratio 0.25 --chunked-prefill-size 48
  - identity: --idpruner --idpruner-keep-ratio 1.0
Oracle: a transformers forward of the same checkpoint on the same pruned embeddings with the kept tokens'
ORIGINAL M-RoPE positions (selection by sgl_slim.vision.idpruner_select on transformers' own vision output; per
frame group for a video).
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from serving import MODEL_DIRS, cached_build, shared_server
from vl_media import LOGPROB_TOL, assert_same_generation, decode_video, image_png, video_avi

pytestmark = pytest.mark.e2e

KEEP_RATIO = 0.25
MAX_NEW = 8
CHUNK = 48
PROMPT_ONE = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the picture?"
              "<|im_end|>\n<|im_start|>assistant\n")
PROMPT_TWO = ("<|im_start|>user\nFirst <|vision_start|><|image_pad|><|vision_end|> then "
              "<|vision_start|><|image_pad|><|vision_end|> compare.<|im_end|>\n<|im_start|>assistant\n")
PROMPT_VIDEO = ("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What happens in the video?"
                "<|im_end|>\n<|im_start|>assistant\n")
PROMPT_IMAGE_VIDEO = ("<|im_start|>user\nThis <|vision_start|><|image_pad|><|vision_end|> and this "
                      "<|vision_start|><|video_pad|><|vision_end|> differ how?<|im_end|>\n<|im_start|>assistant\n")


# ----------------------------------------------------------------------------------------------------------
# model and images
# ----------------------------------------------------------------------------------------------------------

def make_position_sensitive(src: Path, dst: Path) -> Path:
    """Copy the demo checkpoint with rope_theta 20 and q/k scaled x3, so image positions change greedy output."""
    import shutil

    from safetensors.torch import load_file, save_file

    if (dst / ".complete").is_file():
        return dst
    shutil.copytree(src, dst, dirs_exist_ok=True)
    cfg = json.loads((dst / "config.json").read_text())
    for section in (cfg, cfg.get("text_config", {})):
        if "rope_parameters" in section and isinstance(section["rope_parameters"], dict):
            section["rope_parameters"]["rope_theta"] = 20.0
        if "rope_theta" in section:
            section["rope_theta"] = 20.0
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for shard in dst.glob("*.safetensors"):
        tensors = load_file(shard)
        for name in tensors:
            if "language_model" in name and (".q_proj." in name or ".k_proj." in name):
                tensors[name] = tensors[name] * 3.0
        save_file(tensors, shard, metadata={"format": "pt"})
    (dst / ".complete").write_text("ok\n")
    return dst


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ----------------------------------------------------------------------------------------------------------
# servers
# ----------------------------------------------------------------------------------------------------------

def position_sensitive_demo() -> Path:
    """The position-sensitive copy, cached beside the demo model."""
    from sgl_slim.demo import ensure_demo

    demo = ensure_demo("demo")
    return cached_build(demo.with_name(demo.name + "-position-sensitive"),
                        lambda folder: make_position_sensitive(demo, folder))


MODEL_DIRS["{demo_position_sensitive}"] = position_sensitive_demo
SERVER_COMMON = ["--model-path", "{demo_position_sensitive}", "--dtype", "float32", "--idpruner",
                 "--max-total-tokens", "8192", "--skip-server-warmup"]
# the pruned server prefills in chunks of CHUNK tokens: two-image prompts span chunks, so the position fix-up must
# work per chunk
pruned_server = shared_server([*SERVER_COMMON, "--idpruner-keep-ratio", str(KEEP_RATIO),
                               "--chunked-prefill-size", str(CHUNK)])
identity_server = shared_server([*SERVER_COMMON, "--idpruner-keep-ratio", "1.0"])


@pytest.fixture(scope="module")
def model_dir():
    return position_sensitive_demo()


@pytest.fixture(scope="module")
def servers(pruned_server, identity_server):
    return {"pruned": pruned_server.port, "identity": identity_server.port}


def generate(port: int, prompt: str, images: list[bytes], max_new: int = MAX_NEW, videos: list[bytes] = (),
             settings: dict | None = None):
    body = {"text": prompt, "return_logprob": True,
            "sampling_params": {"max_new_tokens": max_new, "temperature": 0.0}}
    if images:
        body["image_data"] = [b64(im) for im in images]
    if videos:
        body["video_data"] = [b64(v) for v in videos]
    if settings:
        body["sgl_slim"] = settings
    return post(port, body)


def post(port: int, body: dict):
    """(status, JSON answer or error text) of a /generate request."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


# ----------------------------------------------------------------------------------------------------------
# transformers oracle
# ----------------------------------------------------------------------------------------------------------

class Oracle:
    def __init__(self, model_dir: Path):
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.image_token_id = self.model.config.image_token_id
        self.video_token_id = self.model.config.video_token_id

    @torch.no_grad()
    def greedy(self, prompt: str, images: list[bytes], keep_ratio: float, *, positions: str = "original",
               max_new: int = MAX_NEW, videos: list[bytes] = (), video_keep_ratio: float | None = None) -> dict:
        """positions: "original" (kept tokens keep theirs) or "renumbered" (the K slots get consecutive ones).
        Videos are decoded whole (every frame, as the server's preprocessing keeps them at 2 fps) and pruned per
        frame group."""
        from PIL import Image

        from sgl_slim.config import IDPrunerConfig
        from sgl_slim.vision import idpruner_select

        cfg = IDPrunerConfig(enabled=True, keep_ratio=keep_ratio, video_keep_ratio=video_keep_ratio)
        pil = [Image.open(io.BytesIO(im)).convert("RGB") for im in images]
        inputs = self.processor(text=[prompt], images=pil or None, videos=[decode_video(v) for v in videos] or None,
                                return_tensors="pt")
        ids = inputs["input_ids"]                                                      # [1, L]
        mm_types = inputs.get("mm_token_type_ids")
        if mm_types is None:
            mm_types = (ids == self.image_token_id).int()
        pos, _ = self.model.model.get_rope_index(ids, mm_token_type_ids=mm_types,
                                                 image_grid_thw=inputs.get("image_grid_thw"),
                                                 video_grid_thw=inputs.get("video_grid_thw"),
                                                 second_per_grid_ts=inputs.get("second_per_grid_ts"))
        pos = pos[:, 0]                                                                # [3, L]
        embeds = self.model.get_input_embeddings()(ids)[0].clone()                     # [L, H]
        keep_cols = torch.ones(ids.shape[1], dtype=torch.bool)
        slot_pos = pos.clone()
        # (feature rows per item, token id, frame groups per item, whether a video)
        kinds = []
        if images:
            feats = self.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            kinds.append((feats.pooler_output, self.image_token_id, [1] * len(images), False))
        if videos:
            feats = self.model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
            kinds.append((feats.pooler_output, self.video_token_id,
                          [int(t) for t in inputs["video_grid_thw"][:, 0]], True))
        for rows_per_item, token, groups_per_item, video in kinds:
            token_cols = torch.nonzero(ids[0] == token)[:, 0]
            cursor = 0
            for f, groups in zip(rows_per_item, groups_per_item):
                n = f.shape[0]
                cols = token_cols[cursor:cursor + n]
                cursor += n
                embeds[cols] = f
                size = n // groups
                k = cfg.keep_count(size, video=video)
                local = torch.cat([j * size + idpruner_select(f[j * size:(j + 1) * size], None, k,
                                                              mmr_lambda=cfg.mmr_lambda) for j in range(groups)])
                keep_cols[cols] = False
                keep_cols[cols[local]] = True
                if positions == "renumbered":
                    slot_pos[:, cols[local]] = pos[:, cols[:local.numel()]]
        kept = torch.nonzero(keep_cols)[:, 0]
        e, p = embeds[kept], slot_pos[:, kept]
        next_pos = int(pos.max()) + 1
        out, logprobs = [], []
        for t in range(max_new):
            logits = self.model(inputs_embeds=e[None], position_ids=p[:, None, :]).logits[0, -1]
            tok = int(torch.argmax(logits))
            out.append(tok)
            logprobs.append(float(torch.log_softmax(logits.double(), dim=-1)[tok]))
            e = torch.cat([e, self.model.get_input_embeddings()(torch.tensor([tok]))], dim=0)
            p = torch.cat([p, torch.full((3, 1), next_pos + t, dtype=p.dtype)], dim=1)
        return {"output_ids": out, "logprobs": logprobs, "prompt_tokens": int(kept.numel()),
                "unpruned_tokens": int(ids.shape[1])}


@pytest.fixture(scope="module")
def oracle(model_dir):
    # SGLang 0.5.23's Qwen2.5-VL vision tower lets all frames of a video attend to each other in its full-attention
    # blocks (one attention segment per clip); transformers keeps each frame group to itself. What is checked here
    # is the language model on the pruned embeddings, so the oracle's tower does as the server's (transformers'
    # own clip-level option). Measured on this model copy, 8 frames: 3e-4 apart in logprobs otherwise, 3e-7 with
    # it; images (one frame group) are unaffected.
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf

    seqlens = hf.get_vision_attention_seqlens
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hf, "get_vision_attention_seqlens", lambda grid_thw, config, merge_temporal=False, kwargs=None:
                      seqlens(grid_thw, config, merge_temporal=True, kwargs=kwargs))
        yield Oracle(model_dir)


# ----------------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------------

IMG_A = image_png(280, 224, seed=1)      # 10 x 8 = 80 tokens
IMG_B = image_png(196, 308, seed=2)      # 7 x 11 = 77 tokens


def test_oracle_is_position_sensitive(oracle):
    original = oracle.greedy(PROMPT_ONE, [IMG_A], KEEP_RATIO)
    renumbered = oracle.greedy(PROMPT_ONE, [IMG_A], KEEP_RATIO, positions="renumbered")
    gap = max(abs(a - b) for a, b in zip(original["logprobs"], renumbered["logprobs"]))
    assert gap >= 20 * LOGPROB_TOL, (
        f"the demo copy barely reacts to image positions (logprob gap {gap:.2e}): the position checks below "
        "would prove nothing")


@pytest.mark.parametrize("prompt,images", [(PROMPT_ONE, [IMG_A]), (PROMPT_TWO, [IMG_A, IMG_B])],
                         ids=["one-image", "two-images"])
def test_pruned_matches_transformers_with_original_positions(servers, oracle, prompt, images):
    want = oracle.greedy(prompt, images, KEEP_RATIO)
    status, got = generate(servers["pruned"], prompt, images)
    assert status == 200, got
    assert got["meta_info"]["prompt_tokens"] == want["prompt_tokens"], (got["meta_info"], want)
    assert_same_generation(got, want)


def test_concurrent_requests_batch_and_each_matches_transformers(servers, oracle):
    from concurrent.futures import ThreadPoolExecutor

    jobs = [("<|im_start|>user\nCount to five.<|im_end|>\n<|im_start|>assistant\n", []),   # text only
            (PROMPT_ONE, [IMG_B]), (PROMPT_TWO, [IMG_B, IMG_A]),
            (PROMPT_ONE.replace("picture", "image"), [IMG_A])]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: generate(servers["pruned"], *job), jobs))
    assert all(status == 200 for status, _ in results), results
    for (prompt, images), (_, got) in zip(jobs, results):
        if images:
            assert_same_generation(got, oracle.greedy(prompt, images, KEEP_RATIO))


def test_prompt_tokens_reduced_by_expected_count(servers, oracle):
    from sgl_slim.config import IDPrunerConfig

    _, pruned = generate(servers["pruned"], PROMPT_TWO, [IMG_A, IMG_B], max_new=1)
    _, full = generate(servers["identity"], PROMPT_TWO, [IMG_A, IMG_B], max_new=1)
    cfg = IDPrunerConfig(enabled=True, keep_ratio=KEEP_RATIO)
    dropped = (80 - cfg.keep_count(80)) + (77 - cfg.keep_count(77))
    assert full["meta_info"]["prompt_tokens"] - pruned["meta_info"]["prompt_tokens"] == dropped


def test_keep_one_equals_no_pruning(servers, oracle):
    want = oracle.greedy(PROMPT_TWO, [IMG_A, IMG_B], 1.0)
    status, got = generate(servers["identity"], PROMPT_TWO, [IMG_A, IMG_B])
    assert status == 200, got
    assert got["meta_info"]["prompt_tokens"] == want["unpruned_tokens"]
    assert_same_generation(got, want)


def test_identical_requests_hit_the_cache_and_agree(servers):
    prompt = PROMPT_ONE.replace("What", "Tell me what")
    _, first = generate(servers["pruned"], prompt, [IMG_B])
    _, second = generate(servers["pruned"], prompt, [IMG_B])
    assert second["output_ids"] == first["output_ids"]
    # a cache hit prefills only the suffix: the stock attention backend then sums in another order, so the
    # float32 logprobs agree to rounding (a stock server without sgl_slim differs the same way), not bit for bit
    lp1 = [x[0] for x in first["meta_info"]["output_token_logprobs"]]
    lp2 = [x[0] for x in second["meta_info"]["output_token_logprobs"]]
    assert max(abs(a - b) for a, b in zip(lp1, lp2)) < 1e-5, (lp1, lp2)
    assert second["meta_info"].get("cached_tokens", 0) > 0, second["meta_info"]
    # same image in another prompt (another offset): embedding-cache hit, positions still right
    _, third = generate(servers["pruned"], "Hi. " + prompt, [IMG_B])
    assert third["meta_info"]["prompt_tokens"] > first["meta_info"]["prompt_tokens"]


def test_same_image_at_another_offset_matches_transformers(servers, oracle):
    prompt = "<|im_start|>system\nBe brief.<|im_end|>\n" + PROMPT_ONE
    generate(servers["pruned"], PROMPT_ONE, [IMG_A])                 # warm the embedding cache
    want = oracle.greedy(prompt, [IMG_A], KEEP_RATIO)
    status, got = generate(servers["pruned"], prompt, [IMG_A])
    assert status == 200, got
    assert_same_generation(got, want)


@pytest.mark.parametrize("size", [(1, 1), (3000, 2000)], ids=["1x1", "3000x2000"])
def test_tiny_and_large_images_are_handled(servers, size):
    status, got = generate(servers["pruned"], PROMPT_ONE, [image_png(*size, seed=3)], max_new=2)
    assert status == 200 or 400 <= status < 500, (status, got)
    if status == 200:
        assert got["meta_info"]["prompt_tokens"] > 0
    status, ok = generate(servers["pruned"], PROMPT_ONE, [IMG_A], max_new=2)
    assert status == 200, ok


# ----------------------------------------------------------------------------------------------------------
# videos: pruned per frame group (2 frames each), positions (t, h, w) kept
# ----------------------------------------------------------------------------------------------------------

# 336 x 336 frames: SGLang's Qwen-VL preprocessing keeps every frame and the size (at or above its minimum
# pixels, a multiple of 28), so 2 frames make one group of 12 x 12 tokens
VIDEO = video_avi(8, seed=1, size=336)    # 4 groups of 144 tokens
GROUP_TOKENS = 144


def test_video_oracle_is_position_sensitive(oracle):
    original = oracle.greedy(PROMPT_VIDEO, [], KEEP_RATIO, videos=[VIDEO])
    renumbered = oracle.greedy(PROMPT_VIDEO, [], KEEP_RATIO, videos=[VIDEO], positions="renumbered")
    gap = max(abs(a - b) for a, b in zip(original["logprobs"], renumbered["logprobs"]))
    assert gap >= 20 * LOGPROB_TOL, f"video positions barely matter on the demo copy (logprob gap {gap:.2e})"


@pytest.mark.parametrize("prompt,images", [(PROMPT_VIDEO, []), (PROMPT_IMAGE_VIDEO, [IMG_B])],
                         ids=["video", "image-and-video"])
def test_pruned_video_matches_transformers_with_original_positions(servers, oracle, prompt, images):
    want = oracle.greedy(prompt, images, KEEP_RATIO, videos=[VIDEO])
    status, got = generate(servers["pruned"], prompt, images, videos=[VIDEO])
    assert status == 200, got
    assert got["meta_info"]["prompt_tokens"] == want["prompt_tokens"], (got["meta_info"], want)
    assert_same_generation(got, want)


def test_video_keep_one_equals_no_pruning_and_pruning_cuts_the_prompt(servers, oracle):
    from sgl_slim.config import IDPrunerConfig

    want = oracle.greedy(PROMPT_VIDEO, [], 1.0, videos=[VIDEO])
    status, full = generate(servers["identity"], PROMPT_VIDEO, [], videos=[VIDEO])
    assert status == 200, full
    assert full["meta_info"]["prompt_tokens"] == want["unpruned_tokens"]
    assert_same_generation(full, want)
    _, pruned = generate(servers["pruned"], PROMPT_VIDEO, [], videos=[VIDEO], max_new=1)
    kept = 4 * IDPrunerConfig(keep_ratio=KEEP_RATIO).keep_count(GROUP_TOKENS, video=True)     # 4 x 36
    assert full["meta_info"]["prompt_tokens"] - pruned["meta_info"]["prompt_tokens"] == 4 * GROUP_TOKENS - kept


def test_a_requests_own_video_ratio_matches_transformers(servers, oracle):
    settings = {"idpruner_video_keep_ratio": 0.5}
    want = oracle.greedy(PROMPT_IMAGE_VIDEO, [IMG_A], KEEP_RATIO, videos=[VIDEO], video_keep_ratio=0.5)
    status, got = generate(servers["pruned"], PROMPT_IMAGE_VIDEO, [IMG_A], videos=[VIDEO], settings=settings)
    assert status == 200, got
    assert got["meta_info"]["prompt_tokens"] == want["prompt_tokens"], (got["meta_info"], want)
    assert got["meta_info"]["sgl_slim"]["idpruner_video_keep_ratio"] == 0.5
    assert_same_generation(got, want)


BAD_MEDIA = {
    "image": {"corrupt": "not-base64-at-all!!", "empty": "", "truncated-png": b64(b"\x89PNG\r\n\x1a\n truncated")},
    "video": {"corrupt": "not-base64-at-all!!", "empty": "", "not-a-video": b64(b"RIFF\x10\x00\x00\x00AVI junk"),
              "header-without-frames": b64(VIDEO[:400]), "an-image": b64(image_png(64, 64, seed=5)),
              "one-frame": b64(video_avi(1, seed=6, size=336)), "frames-of-8x8-pixels": b64(video_avi(4, seed=0, size=8))},
}


@pytest.mark.parametrize("kind,name", [(kind, name) for kind, cases in BAD_MEDIA.items() for name in cases],
                         ids=lambda value: value)
def test_bad_media_are_rejected_and_server_keeps_serving(servers, kind, name):
    prompt, good = (PROMPT_ONE, {"images": [IMG_A]}) if kind == "image" else (PROMPT_VIDEO, {"videos": [VIDEO]})
    status, answer = post(servers["pruned"], {"text": prompt, f"{kind}_data": [BAD_MEDIA[kind][name]],
                                              "sampling_params": {"max_new_tokens": 2}})
    assert 400 <= status < 500, (status, str(answer)[:300])
    if name == "one-frame":
        assert "the video has 1 frame; this model needs at least 2" in str(answer), answer
    status, ok = generate(servers["pruned"], prompt, good.get("images", []), videos=good.get("videos", ()),
                          max_new=2)
    assert status == 200, ok


def test_a_mixed_batch_gives_what_servers_started_with_those_flags_give(servers):
    # one concurrent batch on the keep-0.25 server: requests asking keep 1.0 (image, then video) beside requests
    # with no object; each equals the same request on the server started with that flag (1.0: the identity server)
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(PROMPT_ONE, [IMG_A], (), {"idpruner_keep_ratio": 1.0}, "identity"),
            (PROMPT_ONE, [IMG_A], (), None, "pruned"),
            (PROMPT_VIDEO, [], [VIDEO], {"idpruner_video_keep_ratio": 1.0}, "identity"),
            (PROMPT_VIDEO, [], [VIDEO], None, "pruned")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        batch = list(pool.map(lambda j: generate(servers["pruned"], j[0], j[1], videos=j[2], settings=j[3]), jobs))
    for (prompt, images, videos, settings, server), (status, got) in zip(jobs, batch):
        assert status == 200, got
        want_status, want = generate(servers[server], prompt, images, videos=videos)
        assert want_status == 200, want
        assert got["meta_info"]["prompt_tokens"] == want["meta_info"]["prompt_tokens"], settings
        lps = [lp for lp, *_ in want["meta_info"]["output_token_logprobs"]]
        assert_same_generation(got, {"output_ids": want["output_ids"], "logprobs": lps})
