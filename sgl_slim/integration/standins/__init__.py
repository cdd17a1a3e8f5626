"""The SGLang-side stand-ins: hooks and backends that let SGLang run where its compiled pieces cannot
(CPU engine, GPU hosts without sgl_kernel's library). The ops themselves are in ``sgl_slim.standins``."""
