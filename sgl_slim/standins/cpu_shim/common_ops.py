"""``common_ops`` for sgl_kernel's loader on a machine without CUDA (sgl_slim CPU mode only).

sgl_kernel's loader ends with a plain ``import common_ops``; the launcher puts this folder on the path in CPU
mode, so the import lands here and defines sgl_slim's pure-torch stand-ins (see ``sgl_slim.standins.cpu_ops``).
"""

from sgl_slim.standins.cpu_ops import register as _register

_register()
