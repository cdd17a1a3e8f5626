"""sgl_slim: cheaper long-context and multimodal serving for SGLang.

Algorithm packages (``attention``, ``vision``, ``audio``, ``spec``) are plain torch/Triton and never
import sglang; ``integration`` is the only package that does.
"""

__version__ = "0.1.0"
