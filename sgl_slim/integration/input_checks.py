"""Clear 4xx answers for bad requests that stock SGLang 0.5.23 answers with a 500 or accepts silently.

Installed in every process of a server started by ``python -m sgl_slim.launch`` (whatever the toggles);
a plain ``sglang.launch_server`` stays stock. Each check turns a client mistake into the ``ValueError`` /
error string that SGLang already maps to HTTP 400; nothing else changes.

1. Media the client pointed at but the server cannot use. ``BaseMultimodalProcessor._load_single_item`` maps
   only ``ValueError``, ``UnidentifiedImageError`` and ``requests`` errors to 400; a ``file://`` URL naming a
   missing file (``FileNotFoundError``), a directory, an unreadable file, or an image over PIL's pixel limit
   (``DecompressionBombError``) became a ``RuntimeError`` -> 500. AROUND hook: those causes become
   ``ValueError`` with the same message. Server faults (anything else) stay 500.
2. A modality the model has no placeholder for. Qwen2.5-VL's processor drops audio silently (200, the audio
   ignored); Qwen2-Audio's fails on an image (500). BEFORE hook on ``TokenizerManager._validate_mm_limits``
   (called for every request that carries media): reject it, naming the modalities the model accepts.
3. ``top_logprobs`` outside OpenAI's 0..20 (stock accepts -1 and answers with empty lists). AFTER hook on
   ``OpenAIServingChat._validate_request``.
4. Media on the server's own disk. Stock SGLang reads ``file://`` URLs and plain paths for any client. In the
   same AROUND hook as (1), before anything is read: refused with a 400 unless ``--allowed-local-media-path
   DIR`` is set and the path, with every symlink and ``..`` resolved, lies inside DIR (the resolved path is what
   SGLang then opens).
5. The audio decoder is chosen once, at the first audio item: stock SGLang tries torchcodec for every clip and,
   where torchcodec cannot decode (no FFmpeg libraries), logs a multi-page traceback per request before
   falling back to soundfile. One probe decodes a tiny WAV with torchcodec; if that fails, SGLang's audio
   loader goes straight to soundfile and one line says so. (Videos: ``standins/video_decoder.py``.)
6. A video whose frames cannot be read. SGLang's loader only opens the file (a failure there is already a 400);
   the Qwen-VL processor reads and resizes the frames later, where a decoder error (decord on frames of a few
   pixels, a damaged stream) became a 500. AROUND hook on ``qwen_vl.preprocess_video``: such an error becomes a
   ``ValueError`` naming the video; running out of memory stays a server fault. A video with fewer frames than
   one temporal patch is refused there first, saying so (stock: "nframes should in interval [2, 1]").
7. Token-level fields of ``/generate`` (and ``/v1/completions``) that the scheduler uses unchecked, where stock
   SGLang answers nothing and the server dies: a token id outside the vocabulary in ``input_ids`` (the
   embedding lookup fails), an empty prompt (``text: ""`` or ``input_ids: [[]]``; a single empty ``input_ids``
   list is already refused), ``top_logprobs_num`` above the vocabulary size (``topk`` fails), ``logprob_start_len``
   below -1 (an assertion on the input logprobs) and a JSON ``positional_embed_overrides`` (it takes tensors;
   the scheduler calls a method on it). BEFORE hook on ``TokenizerManager._validate_one_request``,
   which sees each prompt of a batch on its own with its token ids.
8. Per-prompt fields of ``/generate`` whose shape does not match the prompts. SGLang indexes each prompt's
   entry of such a list without checking its length (a batch with a shorter ``sampling_params`` or
   ``return_logprob`` list: IndexError, 500) and takes a list sent with a single prompt as the value (a
   one-element ``top_logprobs_num`` list: the scheduler compares a list with 0 and the server dies). AROUND hook
   on ``GenerateReqInput.normalize_batch_and_arguments``. Before it runs, what it (or the sampling parameters'
   own normalization) would fail on with a 500 is refused: empty ``input_embeds``, an empty ``sampling_params``
   list, ``n`` null, below 1 or above 128 (each sample is queued as a request: 100,000 kept a worker busy for
   minutes), a ``stop_regex`` that does not compile, a ``top_k`` beyond int32 (SGLang checks only its lower
   bound; the scheduler's int32 tensor of top_ks overflowed and the server died). After it, a
   single prompt's per-prompt fields must be single values (its ``rid`` too: a list made the tokenizer
   manager's rid lookup a TypeError, 500) and a batch's lists must have an entry for each prompt.
9. One prompt with several images, videos or audio clips and ``n`` > 1 (OpenAI chat ``n``). SGLang turns the
   prompt into a batch of one for parallel sampling but leaves its media lists flat, so they read as one item per
   prompt: a 400 that contradicts the request ("Prompt has 2 audio placeholders but 1 audio inputs were
   provided", "The length of image_data should be equal to the batch size."). AROUND hook on
   ``GenerateReqInput._handle_parallel_sampling``: when it turned a single prompt into a batch, the prompt's media
   lists are wrapped as that one prompt's items, as its text is.
10. Media without a placeholder in the prompt. SGLang's loader pairs each placeholder with the next item of its
   modality and drops the items left over without a word: a /generate prompt that lacks the image placeholder
   got an answer that never saw the image (200). AROUND hook on ``BaseMultimodalProcessor.load_mm_data``: when
   fewer items of a modality were loaded than sent (none of them preprocessed), a 400 says how many placeholders
   the prompt has and what a placeholder looks like. Chat requests get theirs from the chat template.
11. A ``logit_bias`` value beyond fp32's range. The sampler adds the biases in fp32, where 1e308 is inf: with
   temperature sampling the probabilities became NaN and the answer was token 0 (200). Refused in the same
   check as (8), naming the token; OpenAI's own range is -100..100, which SGLang does not enforce either.
12. A streaming ``/generate`` whose request fails a check. SGLang has already answered 200 and sends the error as
   the stream's first event; its own frontend client (``RuntimeEndpoint``, ``stream=True``) then reads a chunk
   without text and fails with ``KeyError: 'text'``, hiding the message. AROUND hook on
   ``http_server.serve_generate_request``: a streaming response is held until its first event; an error there
   becomes the HTTP 400 a non-streaming request gets (the client raises it with the message), anything else
   streams on unchanged: what SGLang's own chat endpoint does for its streams (``_handle_streaming_request``
   kick-starts the generator). The headers leave with the first token instead of before it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from urllib.parse import quote, unquote, urlparse

from sgl_slim.attention.s2o_ref import FP32_MAX       # fp32's largest finite value (the sampler's logits are fp32)
from sgl_slim.config import SlimConfig

logger = logging.getLogger("sgl_slim")

_LOAD = "sglang.srt.multimodal.processors.base_processor.BaseMultimodalProcessor._load_single_item"
_MM_LIMITS = "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_mm_limits"
_CHAT_VALIDATE = "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._validate_request"
_PREPROCESS_VIDEO = "sglang.srt.multimodal.processors.qwen_vl.preprocess_video"
_FRAME_FACTOR = "sglang.srt.multimodal.processors.qwen_vl.FRAME_FACTOR"      # frames per temporal patch
_VALIDATE_ONE = "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request"
_NORMALIZE = "sglang.srt.managers.io_struct.GenerateReqInput.normalize_batch_and_arguments"
_PARALLEL = "sglang.srt.managers.io_struct.GenerateReqInput._handle_parallel_sampling"
_LOAD_MM = "sglang.srt.multimodal.processors.base_processor.BaseMultimodalProcessor.load_mm_data"
_SERVE_GENERATE = "sglang.srt.entrypoints.http_server.serve_generate_request"
_ERROR_RESPONSE = "sglang.srt.entrypoints.http_server._create_error_response"

HOOKED_SYMBOLS: list[str] = [
    _LOAD,
    _MM_LIMITS,
    _CHAT_VALIDATE,
    _PREPROCESS_VIDEO,
    _FRAME_FACTOR,
    _VALIDATE_ONE,
    _NORMALIZE,
    _PARALLEL,
    _LOAD_MM,
    _SERVE_GENERATE,
    _ERROR_RESPONSE,
    "sglang.srt.multimodal.processors.base_processor.BaseMultiModalProcessorOutput",   # images / videos / audios
    "sglang.srt.managers.io_struct.GenerateReqInput.__getitem__",   # indexes the per-prompt lists checked here
    "sglang.srt.managers.embed_types.PositionalEmbeds",   # the only valid positional_embed_overrides
    "sglang.srt.utils.video_decoder.VideoDecoderWrapper",
    "sglang.srt.multimodal.processors.base_processor.MultimodalSpecialTokens",
    "sglang.srt.multimodal.processors.base_processor.BaseMultimodalProcessor._is_preprocessed_input",
    "sglang.srt.utils.common.load_audio",
    "sglang.srt.utils.common._BACKEND",          # load_audio tries torchcodec when this is "torchcodec"
]

MODALITIES = ("image", "video", "audio")
TOP_LOGPROBS_MAX = 20          # OpenAI's documented range for chat completions: 0..20

_REGISTERED = False
_ALLOWED_DIR: str | None = None          # realpath of --allowed-local-media-path, or None: no local media
_DECODER = {"chosen": False, "lock": threading.Lock()}


def install(cfg: SlimConfig) -> None:
    """Register the checks (idempotent; runs in every SGLang process)."""
    global _REGISTERED, _ALLOWED_DIR
    allowed = cfg.media.allowed_local_media_path
    _ALLOWED_DIR = os.path.realpath(allowed) if allowed is not None else None
    if _REGISTERED:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType  # noqa: PLC0415

    HookRegistry.register(_LOAD, _load_single_item_around, HookType.AROUND)
    HookRegistry.register(_MM_LIMITS, _validate_mm_limits_before, HookType.BEFORE)
    HookRegistry.register(_CHAT_VALIDATE, _validate_request_after, HookType.AFTER)
    HookRegistry.register(_PREPROCESS_VIDEO, _preprocess_video_around, HookType.AROUND)
    HookRegistry.register(_VALIDATE_ONE, _validate_one_request_before, HookType.BEFORE)
    HookRegistry.register(_NORMALIZE, _normalize_around, HookType.AROUND)
    HookRegistry.register(_PARALLEL, _handle_parallel_sampling_around, HookType.AROUND)
    HookRegistry.register(_LOAD_MM, _load_mm_data_around, HookType.AROUND)
    HookRegistry.register(_SERVE_GENERATE, _serve_generate_around, HookType.AROUND)
    _REGISTERED = True


def client_media_error(exc: BaseException) -> bool:
    """Whether a media loader failure was caused by what the client sent (not by the server)."""
    from PIL import Image  # noqa: PLC0415

    return isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
                            Image.DecompressionBombError))


REFUSED_LOCAL = ("local media paths are refused by this server: file:// URLs and plain paths would be read from "
                 "the server's disk; send the media inline (a data: URL) or over http(s), or start the server with "
                 "--allowed-local-media-path DIR")


def local_media_path(data, modality: str) -> str | None:
    """The path on the server's disk that SGLang's loaders would read for ``data`` (as in
    ``sglang.srt.utils.common.load_image/load_audio/load_video``), or None when it reads no local file."""
    url = getattr(data, "url", data)
    if not isinstance(url, str):
        return None                                  # bytes, PIL images, arrays, preprocessed dicts
    if url.startswith(("http://", "https://", "data:")):
        return None
    if url.startswith("file://"):
        return unquote(urlparse(url).path)
    if url.startswith("/") or modality == "AUDIO":   # images: other strings are base64; audio: always a path
        return url
    if modality == "VIDEO" and os.path.isfile(unquote(urlparse(url).path)):
        return unquote(urlparse(url).path)
    return None


def check_local_media(data, modality: str, allowed_dir: str | None):
    """``data`` unchanged when it names no local file; the resolved ``file://`` URL when it names one inside
    ``allowed_dir``; else ValueError (HTTP 400)."""
    path = local_media_path(data, modality)
    if path is None:
        return data
    if allowed_dir is None:
        raise ValueError(REFUSED_LOCAL)
    real = os.path.realpath(path)                    # symlinks and '..' resolved before the comparison
    if os.path.commonpath([real, allowed_dir]) != allowed_dir:
        raise ValueError(f"local media path {path[:200]!r} is outside --allowed-local-media-path "
                         f"(symlinks and '..' are resolved before the check)")
    return "file://" + quote(real)


def choose_audio_decoder() -> None:
    """Once per process: keep SGLang's torchcodec audio path only if torchcodec can decode a WAV here."""
    with _DECODER["lock"]:
        if _DECODER["chosen"]:
            return
        import sglang.srt.utils.common as common  # noqa: PLC0415

        if common._BACKEND != "torchcodec":
            _DECODER["chosen"] = True
            return
        try:
            import io  # noqa: PLC0415

            import numpy as np  # noqa: PLC0415
            import soundfile as sf  # noqa: PLC0415
            from torchcodec.decoders import AudioDecoder  # noqa: PLC0415

            buf = io.BytesIO()
            sf.write(buf, np.zeros(160, dtype=np.float32), 16000, format="WAV", subtype="PCM_16")
            AudioDecoder(buf.getvalue(), sample_rate=16000, num_channels=1).get_all_samples()
        except Exception as exc:  # any failure means SGLang would fail (and log a traceback) on every clip
            common._BACKEND = "soundfile"
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            logger.info("sgl_slim: torchcodec cannot decode audio in this environment (%s: %s); audio is decoded "
                        "with soundfile", type(exc).__name__, first)
        _DECODER["chosen"] = True     # only now: concurrent loads wait on the lock until the choice is made


def _load_single_item_around(original, cls, *args, **kwargs):
    args = list(args)
    data = args[0] if args else kwargs.get("data")
    modality = args[1] if len(args) > 1 else kwargs.get("modality")
    name = getattr(modality, "name", str(modality))
    preprocessed = getattr(cls, "_is_preprocessed_input", None)
    if not (isinstance(data, dict) or (preprocessed is not None and preprocessed(data))):
        data = check_local_media(data, name, _ALLOWED_DIR)
        if args:
            args[0] = data
        else:
            kwargs["data"] = data
    if name == "AUDIO" and not _DECODER["chosen"]:
        choose_audio_decoder()
    try:
        return original(cls, *args, **kwargs)
    except RuntimeError as exc:
        cause = exc.__cause__
        if cause is not None and client_media_error(cause):
            raise ValueError(str(exc)) from cause
        raise


def accepted_modalities(mm_tokens) -> list[str]:
    """Modalities a processor has placeholder tokens for (``MultimodalSpecialTokens``)."""
    if mm_tokens is None:
        return []
    return [m for m in MODALITIES
            if getattr(mm_tokens, f"{m}_token", None) is not None
            or getattr(mm_tokens, f"{m}_token_id", None) is not None]


def unsupported_modality_error(obj, mm_tokens) -> str | None:
    """The error for a request carrying media of a kind the model cannot take, or None."""
    accepted = accepted_modalities(mm_tokens)
    if not accepted:                 # a processor without declared tokens: leave it to SGLang
        return None
    sent = [m for m in MODALITIES if getattr(obj, f"{m}_data", None)]
    refused = [m for m in sent if m not in accepted]
    if not refused:
        return None
    return (f"this model does not accept {' or '.join(refused)} input "
            f"(it accepts: {', '.join(accepted)}); remove the {refused[0]} part of the request")


def _validate_mm_limits_before(self, obj, *args, **kwargs):
    processor = getattr(self, "mm_processor", None)
    message = unsupported_modality_error(obj, getattr(processor, "mm_tokens", None))
    if message is not None:
        raise ValueError(message)


def top_logprobs_error(request) -> str | None:
    value = getattr(request, "top_logprobs", None)
    if value is None or 0 <= value <= TOP_LOGPROBS_MAX:
        return None
    return f"top_logprobs must be between 0 and {TOP_LOGPROBS_MAX}, got {value}"


def _validate_request_after(result, self, request, *args, **kwargs):
    if result is not None:
        return result
    return top_logprobs_error(request)


def video_frames_error(exc: BaseException) -> ValueError | None:
    """The client error for a failure while a video's frames were read and resized, or None for a server fault
    (out of memory) and for errors that already are client errors."""
    import torch  # noqa: PLC0415

    if isinstance(exc, (ValueError, MemoryError, torch.OutOfMemoryError)) or not isinstance(exc, Exception):
        return None
    lines = str(exc).strip().splitlines()
    detail = lines[-1][:200] if lines else ""
    return ValueError(f"the video's frames could not be read ({type(exc).__name__}: {detail})")


def too_few_frames(video) -> str | None:
    """The error for a decoded video with fewer frames than one temporal patch, or None."""
    from sglang.srt.multimodal.processors import qwen_vl  # noqa: PLC0415
    from sglang.srt.utils.video_decoder import VideoDecoderWrapper  # noqa: PLC0415

    if not isinstance(video, VideoDecoderWrapper) or len(video) >= qwen_vl.FRAME_FACTOR:
        return None
    return (f"the video has {len(video)} frame{'s' if len(video) != 1 else ''}; this model needs at least "
            f"{qwen_vl.FRAME_FACTOR} (one temporal patch)")


async def _preprocess_video_around(original, *args, **kwargs):
    video = args[0] if args else kwargs.get("vr")
    message = too_few_frames(video)
    if message is not None:
        raise ValueError(message)
    try:
        return await original(*args, **kwargs)
    except Exception as exc:
        error = video_frames_error(exc)
        if error is None:
            raise
        raise error from exc


def token_fields_error(obj, input_ids, vocab_size: int) -> str | None:
    """The error for one prompt's token-level fields that would stop the scheduler, or None. ``input_ids`` are
    the prompt's token ids as the tokenizer manager validates them; only ids the client sent are range-checked
    (the tokenizer's and the multimodal processor's own are the model's)."""
    if input_ids is not None and len(input_ids) == 0:
        return "the prompt is empty: send at least one token (input_ids) or some text"
    if getattr(obj, "input_ids", None) is not None and input_ids is not None:
        low, high = min(input_ids), max(input_ids)
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            return f"input_ids contains token id {bad}, outside this model's vocabulary [0, {vocab_size})"
    top = getattr(obj, "top_logprobs_num", None)
    if isinstance(top, int) and not 0 <= top <= vocab_size:
        return f"top_logprobs_num must be between 0 and the vocabulary size {vocab_size}, got {top}"
    start = getattr(obj, "logprob_start_len", None)
    if isinstance(start, int) and start < -1:
        return f"logprob_start_len must be -1 (no prompt logprobs) or a prompt position >= 0, got {start}"
    overrides = getattr(obj, "positional_embed_overrides", None)
    if overrides is not None:
        from sglang.srt.managers.embed_types import PositionalEmbeds  # noqa: PLC0415

        if not isinstance(overrides, PositionalEmbeds):
            return ("positional_embed_overrides takes tensors (SGLang's PositionalEmbeds, from the Python Engine "
                    "API); it cannot be sent as JSON")
    return None


def _validate_one_request_before(self, obj, input_ids=None, *args, **kwargs):
    from sglang.srt.managers.io_struct import GenerateReqInput  # noqa: PLC0415

    if not isinstance(obj, GenerateReqInput):
        return
    message = token_fields_error(obj, input_ids, self.model_config.vocab_size)
    if message is not None:
        raise ValueError(message)


# Per-prompt fields of a GenerateReqInput that SGLang indexes by prompt in a batch; the first five are single
# values for a single prompt (the media, token_ids_logprob, lora_path and custom_logit_processor may be lists there).
SCALAR_PER_PROMPT = ("return_logprob", "logprob_start_len", "top_logprobs_num", "return_sampling_mask",
                     "sampling_logprobs_mode")
LIST_PER_PROMPT = ("sampling_params", *SCALAR_PER_PROMPT, "token_ids_logprob", "image_data", "video_data",
                   "audio_data", "lora_path", "custom_logit_processor", "modalities", "bootstrap_host",
                   "bootstrap_port", "bootstrap_room", "bootstrap_pair_key", "decode_tp_size",
                   "positional_embed_overrides")


INT32_MAX = 2 ** 31 - 1      # the scheduler packs each request's top_k into an int32 tensor
# samples per prompt (OpenAI's limit on n): SGLang queues one request per sample, and a client's n of 100,000 kept
# a worker busy for minutes (its abort of them on the client's time-out scans the whole queue per sample)
MAX_SAMPLES = 128


def sampling_params_error(obj) -> str | None:
    """The error for inputs SGLang fails on with a 500 before checking them (checked before normalizing): empty
    ``input_embeds``, a ``sampling_params`` list that is empty or holds a non-object (no sample count to read),
    an ``n`` that is not a whole number from 1 to MAX_SAMPLES (null: TypeError; a huge one: a busy worker), a
    ``stop_regex`` that does not compile."""
    embeds = getattr(obj, "input_embeds", None)
    if isinstance(embeds, list) and (not embeds or not isinstance(embeds[0], list) or not embeds[0]):
        return "input_embeds is empty: send one embedding per prompt token (or a list of such prompts)"
    params = getattr(obj, "sampling_params", None)
    if isinstance(params, list) and (not params or not all(isinstance(p, dict) for p in params)):
        return "sampling_params must be an object, or a non-empty list of objects with one per prompt of a batch"
    for sp in (params if isinstance(params, list) else [params]):
        if not isinstance(sp, dict):
            continue
        n = sp.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SAMPLES:
            return (f"sampling_params.n must be a whole number from 1 to {MAX_SAMPLES} (samples per prompt), "
                    f"got {n!r}")
        bias = sp.get("logit_bias")
        if isinstance(bias, dict):
            for token, value in bias.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and not abs(value) <= FP32_MAX:
                    return (f"sampling_params.logit_bias[{token!r}] = {value!r} is beyond fp32's range, in which the "
                            f"sampler adds it (OpenAI's range: -100 to 100)")
        top_k = sp.get("top_k")
        if isinstance(top_k, int) and not isinstance(top_k, bool) and top_k > INT32_MAX:
            return (f"sampling_params.top_k must be -1 (every token) or a whole number from 1 to {INT32_MAX}, "
                    f"got {top_k}")
        stop_regex = sp.get("stop_regex")
        for pattern in (stop_regex if isinstance(stop_regex, list) else [stop_regex]):
            if isinstance(pattern, str):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    return f"sampling_params.stop_regex {pattern[:100]!r} is not a valid regular expression: {exc}"
    return None


def per_prompt_shape_error(obj) -> str | None:
    """The error for per-prompt fields that do not match the prompts of a normalized GenerateReqInput, or None."""
    if obj.is_single:
        if not isinstance(obj.sampling_params, dict):
            return ("sampling_params must be one object for a single prompt (a list is for a batch: text or "
                    "input_ids as a list of prompts)")
        if obj.rid is not None and not isinstance(obj.rid, str):
            return ("rid must be a string for a single prompt (a list is for a batch: text or input_ids as a list "
                    "of prompts)")
        for name in SCALAR_PER_PROMPT:
            if isinstance(getattr(obj, name, None), list):
                return (f"{name} must be a single value for a single prompt (a list is for a batch: text or "
                        f"input_ids as a list of prompts)")
        return None
    # Lists are expanded for parallel sampling by now. Only a short list fails (SGLang ignores extra entries, and
    # a single prompt's several videos or clips with n > 1 arrive as a longer list).
    entries = obj.batch_size * obj.parallel_sample_num
    for name in LIST_PER_PROMPT:
        value = getattr(obj, name, None)
        if name == "modalities" and not value:      # SGLang reads an empty list as none
            continue
        if isinstance(value, list) and len(value) < entries:
            return f"{name}: a list needs one entry per prompt of the batch ({obj.batch_size} prompts)"
    return None


def _normalize_around(original, self, *args, **kwargs):
    message = sampling_params_error(self)
    if message is not None:
        raise ValueError(message)
    result = original(self, *args, **kwargs)
    message = per_prompt_shape_error(self)
    if message is not None:
        raise ValueError(message)
    return result


def _handle_parallel_sampling_around(original, self, *args, **kwargs):
    was_single = getattr(self, "is_single", None)
    result = original(self, *args, **kwargs)
    if was_single and not self.is_single:            # one prompt made a batch of one for its n samples
        for name in MODALITIES:
            items = getattr(self, f"{name}_data", None)
            if isinstance(items, list):
                setattr(self, f"{name}_data", [items])
    return result


def dropped_media_error(sent: dict[str, int], loaded: dict[str, int], mm_tokens) -> str | None:
    """The error for media items the loader dropped for want of a placeholder, or None.  sent / loaded: items
    per modality in the request / in the loader's output."""
    for m in MODALITIES:
        n_sent, n_loaded = sent.get(m, 0), loaded.get(m, 0)
        if n_loaded >= n_sent:
            continue
        token = getattr(mm_tokens, f"{m}_token", None)
        how = (f"put {token} in the prompt once per {m} (chat requests get it from the chat template)"
               if isinstance(token, str) else "chat requests get it from the chat template")
        return (f"the request has {n_sent} {m} input{'s' if n_sent != 1 else ''} but its prompt has "
                f"{n_loaded} {m} placeholder{'s' if n_loaded != 1 else ''}: each {m} needs its own; {how}")
    return None


_LOAD_MM_PARAMS = ("prompt", "multimodal_tokens", "image_data", "video_data", "audio_data")


async def _load_mm_data_around(original, self, *args, **kwargs):
    result = await original(self, *args, **kwargs)
    given = {**dict(zip(_LOAD_MM_PARAMS, args)), **kwargs}
    sent, loaded = {}, {}
    for m in MODALITIES:
        items = given.get(f"{m}_data") or []
        # a preprocessed item (features, not media) may stand for several placeholders: not counted
        if not isinstance(items, list) or any(self._is_preprocessed_input(x) for x in items):
            continue
        sent[m], loaded[m] = len(items), len(getattr(result, f"{m}s", None) or [])
    message = dropped_media_error(sent, loaded, given.get("multimodal_tokens"))
    if message is not None:
        raise ValueError(message)
    return result


def stream_error(event: bytes) -> dict | None:
    """The error object of a ``/generate`` stream event (``data: {"error": {...}}``), or None for an output."""
    if not event.startswith(b'data: {"error"'):
        return None
    try:
        error = json.loads(event[len(b"data: "):])["error"]
    except (ValueError, KeyError, TypeError):
        return None
    return error if isinstance(error, dict) else None


async def first_event_or_error(response, error_response, keep_background: bool = True):
    """A streaming response held until its first event: an error event becomes ``error_response(ValueError)`` (its
    status the event's code; it runs the stream's background task, the request's abort, after it is sent, unless
    ``keep_background`` is false), anything else streams on from that event."""
    body = response.body_iterator
    try:
        first = await body.__anext__()
    except StopAsyncIteration:
        first = None
    error = stream_error(first) if first is not None else None
    if error is not None:
        await body.aclose()
        exc = ValueError(error.get("message", "invalid request"))
        code = error.get("code")
        exc.status_code = code if isinstance(code, int) and 400 <= code < 600 else 400
        refused = error_response(exc)
        if keep_background:
            refused.background = response.background
        return refused

    async def resumed():
        if first is not None:
            yield first
        async for event in body:
            yield event
    response.body_iterator = resumed()
    return response


async def _serve_generate_around(original, obj, request, *args, **kwargs):
    response = await original(obj, request, *args, **kwargs)
    if not getattr(obj, "stream", False) or not hasattr(response, "body_iterator"):
        return response
    from sglang.srt.entrypoints import http_server  # noqa: PLC0415

    # a request refused before SGLang normalized it was never registered: its abort task has nothing to abort
    # (and would fail on the missing batch fields)
    return await first_event_or_error(response, http_server._create_error_response,
                                      keep_background=hasattr(obj, "is_single"))
