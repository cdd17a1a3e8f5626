"""sgl_slim's SGLang plugin: the ``sglang.srt.plugins`` entry point.

SGLang calls :func:`register` in EVERY process it starts (launcher, tokenizer, scheduler per TP/DP rank,
detokenizer), possibly more than once. Registration is idempotent and logs one line per process.
The configuration comes from the launcher through :data:`sgl_slim.config.ENV_VAR`, read here and only here.
"""

from __future__ import annotations

import importlib
import logging
import os

from sgl_slim.config import ENV_VAR, SlimConfig

logger = logging.getLogger("sgl_slim")


def _ensure_log_handler() -> None:
    # The plugin runs before SGLang configures logging in its child processes: give sgl_slim's logger its own
    # handler so its one line per process is always printed (to stderr, like SGLang's own log).
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False

# feature name in SlimConfig -> module in sgl_slim.integration with install(cfg) / adjust_server_args(...)
FEATURE_MODULES = {
    "s2o": "s2o_backend",
    "idpruner": "idpruner_hooks",
    "samp": "samp_hooks",
    "eagle": "eagle_cpu",
}

# Registered whenever sgl_slim is installed, whatever the flags: cheap, and needed before SGLang parses
# its command line (e.g. the attention backend name must be a valid choice in every process).
ALWAYS_MODULES = ("s2o_backend",)

# Installed in every process of a server started by ``python -m sgl_slim.launch`` (the configuration variable
# is set), whatever the toggles; a plain ``sglang.launch_server`` stays stock.
LAUNCHED_MODULES = ("input_checks", "containment", "cpu_parallel")

_state: dict = {"installed": set(), "config": None, "announced": False}


def feature_module(name: str):
    """The integration module of a feature; a clear error when that feature is not built yet."""
    module = FEATURE_MODULES[name]
    try:
        return importlib.import_module(f"sgl_slim.integration.{module}")
    except ModuleNotFoundError as exc:
        if exc.name == f"sgl_slim.integration.{module}":
            raise NotImplementedError(f"--{name} is not available in this build of sgl_slim "
                                      f"(sgl_slim.integration.{module} is missing)") from exc
        raise


def register() -> SlimConfig:
    """Install what the handed-down configuration enables. Safe to call any number of times."""
    _ensure_log_handler()
    cfg = SlimConfig.from_env()
    if _state["config"] is not None and _state["config"] != cfg:
        logger.warning("sgl_slim: configuration changed within process %d; installing the new features", os.getpid())
    _state["config"] = cfg
    new = []
    launched = ENV_VAR in os.environ
    for module in LAUNCHED_MODULES if launched else ():
        if module not in _state["installed"]:
            _install(importlib.import_module(f"sgl_slim.integration.{module}"), module, cfg)
            _state["installed"].add(module)
            new.append(module)
    wanted = [m for m in ALWAYS_MODULES] + [FEATURE_MODULES[f] for f in cfg.enabled_features()]
    for module in wanted:
        if module in _state["installed"]:
            continue
        feature = next(f for f, m in FEATURE_MODULES.items() if m == module)
        try:
            mod = feature_module(feature)
        except NotImplementedError:
            if module in ALWAYS_MODULES and feature not in cfg.enabled_features():
                continue
            raise
        _install(mod, f"--{feature}", cfg)
        _state["installed"].add(module)
        new.append(feature)
    # Per-request numbers in meta_info and Prometheus (sgl_slim/integration/metrics.py): whenever a feature is on.
    if cfg.enabled_features() and "metrics" not in _state["installed"]:
        _install(importlib.import_module("sgl_slim.integration.metrics"), "sgl_slim metrics", cfg)
        _state["installed"].add("metrics")
        new.append("metrics")
    if new or not _state["announced"]:
        _state["announced"] = True
        logger.info("sgl_slim: registered in process %d (%s): %s; features on: %s", os.getpid(), process_role(),
                    ", ".join(new) or "nothing new", ", ".join(cfg.enabled_features()) or "none")
    return cfg


def _install(mod, what: str, cfg: SlimConfig) -> None:
    try:
        mod.install(cfg)
    except Exception as exc:
        # SGLang logs and swallows plugin exceptions; an enabled feature must not vanish silently.
        logger.exception("sgl_slim: installing %s failed", what)
        raise SystemExit(f"sgl_slim: could not install {what}: {exc}") from exc


def process_role() -> str:
    """A readable name for this process (SGLang titles its processes, e.g. 'sglang::scheduler')."""
    try:
        import setproctitle  # noqa: PLC0415 (SGLang depends on it; optional here)
        return setproctitle.getproctitle().split()[0]
    except ImportError:
        import multiprocessing  # noqa: PLC0415
        return multiprocessing.current_process().name


def installed_features() -> set[str]:
    """Integration modules installed in this process (for tests and the /sgl_slim status)."""
    return set(_state["installed"])
