"""sgl_slim's SGLang plugin: the ``sglang.srt.plugins`` entry point.

SGLang calls :func:`register` in EVERY process it starts (launcher, tokenizer, scheduler per TP/DP rank,
detokenizer), possibly more than once. Registration is idempotent and logs one line per process.
The configuration comes from the launcher through :data:`sgl_slim.config.ENV_VAR`, read here and only here.
"""

from __future__ import annotations

import importlib
import logging
import os

from sgl_slim.config import ALWAYS, ENV_VAR, FEATURES, WHEN_LAUNCHED, WITH_ANY_ON, SlimConfig, feature

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


_state: dict = {"installed": set(), "config": None, "announced": False}


def feature_module(name: str):
    """The integration module of a feature of the table; a clear error when that feature is not built yet."""
    module = f"sgl_slim.integration.{feature(name).module}"
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            raise NotImplementedError(f"--{name} is not available in this build of sgl_slim "
                                      f"({module} is missing)") from exc
        raise


def register() -> SlimConfig:
    """Install what the handed-down configuration enables. Safe to call any number of times."""
    _ensure_log_handler()
    cfg = SlimConfig.from_env()
    if _state["config"] is not None and _state["config"] != cfg:
        logger.warning("sgl_slim: configuration changed within process %d; installing the new features", os.getpid())
    _state["config"] = cfg
    on = cfg.enabled_features()
    # What to install, in the table's order within each step (SGLang composes the hooks on one function in
    # registration order): (part, its name in the log line, its name in an error).
    steps = [(p, p.module, p.module) for p in FEATURES if p.install == WHEN_LAUNCHED and ENV_VAR in os.environ]
    steps += [(p, p.name, f"--{p.name}") for p in FEATURES if p.install == ALWAYS or p.name in on]
    steps += [(p, p.name, f"sgl_slim {p.name}") for p in FEATURES if p.install == WITH_ANY_ON and on]
    new = []
    for part, label, what in steps:
        if part.module in _state["installed"]:
            continue
        try:
            mod = feature_module(part.name)
        except NotImplementedError:
            if part.install == ALWAYS and part.name not in on:   # not built, and not asked for
                continue
            raise
        _install(mod, what, cfg)
        _state["installed"].add(part.module)
        new.append(label)
    if new or not _state["announced"]:
        _state["announced"] = True
        logger.info("sgl_slim: registered in process %d (%s): %s; features on: %s", os.getpid(), process_role(),
                    ", ".join(new) or "nothing new", ", ".join(on) or "none")
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
