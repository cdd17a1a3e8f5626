"""sgl_slim.integration.standins.video_decoder: SGLang's decoder choice moves to decord only when torchcodec cannot
decode here and decord can."""

import pytest

pytest.importorskip("sglang")

from sgl_slim.config import SlimConfig  # noqa: E402
from sgl_slim.integration.standins import video_decoder  # noqa: E402


@pytest.fixture
def decoder(monkeypatch):
    import sglang.srt.utils.video_decoder as module

    monkeypatch.setattr(module, "_BACKEND", "torchcodec")
    return module


@pytest.mark.parametrize("has_ffmpeg,has_decord,want", [(False, True, "decord"), (True, True, "torchcodec"),
                                                        (False, False, "torchcodec")])
def test_switches_only_when_torchcodec_cannot_and_decord_can(decoder, monkeypatch, has_ffmpeg, has_decord, want):
    monkeypatch.setattr(video_decoder, "torchcodec_has_ffmpeg", lambda: has_ffmpeg)
    monkeypatch.setattr(video_decoder, "decord_available", lambda: has_decord)
    video_decoder.install(SlimConfig())
    assert decoder._BACKEND == want


def test_the_probe_agrees_with_torchcodec_itself():
    # torchcodec's VideoDecoder either constructs from a real video or raises because FFmpeg is missing
    from sgl_slim.bench.workload import mjpeg_avi

    import numpy as np

    video = mjpeg_avi([np.zeros((32, 32, 3), np.uint8)] * 2, fps=2)
    try:
        from torchcodec.decoders import VideoDecoder

        VideoDecoder(video)
        decodes = True
    except Exception:  # noqa: BLE001
        decodes = False
    assert video_decoder.torchcodec_has_ffmpeg() == decodes


def test_decord_decodes_a_generated_video():
    # the decoder this stand-in switches to reads the test videos (an MJPEG AVI written in tests/serving.py)
    pytest.importorskip("decord")
    import sglang.srt.utils.video_decoder as module

    from sgl_slim.bench.workload import mjpeg_avi

    import numpy as np

    frames = [np.full((48, 64, 3), 16 * i, np.uint8) for i in range(6)]
    old = module._BACKEND
    module._BACKEND = "decord"
    try:
        vr = module.VideoDecoderWrapper(mjpeg_avi(frames, fps=3))
        got = vr.get_frames_at([0, 5])
        assert len(vr) == 6 and vr.avg_fps == pytest.approx(3.0)
    finally:
        module._BACKEND = old
    assert got.shape == (2, 48, 64, 3)
    assert abs(int(got[1].mean()) - 80) <= 2            # JPEG keeps a flat frame's level to +-1
