"""``common_ops`` for sgl_kernel's loader on a GPU host without its compiled library (GPU stand-in mode).

sgl_kernel's loader ends with a plain ``import common_ops``; in GPU stand-in mode the launcher puts this folder
on the path of every SGLang process, so the import lands here: it defines the plain-torch CUDA ops
(``sgl_slim.standins.gpu_ops``) and makes every lookup of an op nobody defined print its name.
"""

from sgl_slim.standins.gpu_ops import log_missing_lookups as _log_missing_lookups
from sgl_slim.standins.gpu_ops import register as _register

_register()
_log_missing_lookups()
