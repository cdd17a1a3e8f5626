"""``python -m sgl_slim.launch``: SGLang's server with sgl_slim loaded.

Every SGLang server flag works unchanged (``--model`` is SGLang's alias of ``--model-path``). sgl_slim adds
its own flags (``--help`` shows them in their own group). Order of work:

1. parse sgl_slim's flags (and ``--recipe``) alone and validate them: a bad value exits with status 2 naming
   the flag, before SGLang is even imported;
2. with no CUDA device, switch SGLang to its CPU engine (env set BEFORE sglang is imported);
3. hand the configuration to every SGLang process through one env var, resolve demo model names and apply
   the CPU defaults where the user set nothing;
4. hand over to :mod:`sgl_slim.integration.server` (the only part that imports sglang): load the plugins,
   build SGLang's arguments, run the server.

This module never imports sglang (tests/test_walls.py checks it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

from sgl_slim.config import FEATURES, ConfigError, Feature, Flag, SlimConfig

logger = logging.getLogger("sgl_slim")

RECIPE_DIR = Path(__file__).resolve().parent.parent / "launch"
SHIM_DIR = Path(__file__).resolve().parent / "standins" / "cpu_shim"
DEFAULT_MODEL = "demo"
CPU_DEFAULT_MAX_TOTAL_TOKENS = 65536


def _flags() -> list[tuple[Feature, Flag, str]]:
    """Every sgl_slim flag with its feature and argparse destination (``slim_<feature>_<setting>``), in the
    order of the feature table (sgl_slim.config.FEATURES); defaults come from each feature's settings class."""
    return [(f, flag, f"slim_{f.name}_{flag.setting}") for f in FEATURES for flag in f.flags]


def add_slim_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "sgl_slim", "sgl_slim's toggles (each off by default; every SGLang flag above still works)")
    group.add_argument("--recipe", default=None,
                       help=f"per-model defaults: a TOML path or a name in {RECIPE_DIR} (explicit flags win)")
    for feature, flag, dest in _flags():
        if flag.kind is bool:
            group.add_argument(flag.name, dest=dest, action="store_true", default=False, help=flag.help)
            continue
        default = next(f.default for f in fields(feature.config) if f.name == flag.setting)
        group.add_argument(flag.name, dest=dest, type=flag.kind, default=default, metavar=flag.setting.upper(),
                           help=f"{flag.help} (default: {default})")


def _slim_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sgl_slim.launch", add_help=False)
    add_slim_arguments(parser)
    parser.add_argument("--model-path", "--model", dest="model_path", default=None)
    return parser


def load_recipe(name: str) -> dict:
    """A recipe: ``[sgl_slim]`` flag defaults, ``[sglang]`` SGLang flag defaults, ``model``, ``why``."""
    path = Path(name)
    if not path.is_file():
        path = RECIPE_DIR / (name if name.endswith(".toml") else f"{name}.toml")
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.toml")))
        raise ConfigError("--recipe", f"unknown recipe {name!r} (known: {known})")
    try:
        recipe = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--recipe", f"{path} is not valid TOML: {exc}") from exc
    unknown = set(recipe) - {"model", "why", "sgl_slim", "sglang"}
    if unknown:
        raise ConfigError("--recipe", f"{path}: unknown keys {sorted(unknown)}")
    flags = {flag.name.lstrip("-") for _, flag, _ in _flags()}
    bad = set(recipe.get("sgl_slim", {})) - flags
    if bad:
        raise ConfigError("--recipe", f"{path}: unknown sgl_slim flags {sorted(bad)}")
    return recipe


def _recipe_defaults(recipe: dict) -> dict:
    by_flag = {flag.name.lstrip("-"): dest for _, flag, dest in _flags()}
    return {by_flag[k]: v for k, v in recipe.get("sgl_slim", {}).items()}


def _sglang_argv_from_recipe(recipe: dict) -> list[str]:
    argv = []
    for key, value in recipe.get("sglang", {}).items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False:
            argv += [flag, str(value)]
    return argv


def config_from_args(args: argparse.Namespace) -> SlimConfig:
    parts = {}
    for feature in FEATURES:
        if feature.config is None:
            continue
        kwargs = {f.name: getattr(args, f"slim_{feature.name}_{f.name}") for f in fields(feature.config)
                  if hasattr(args, f"slim_{feature.name}_{f.name}")}
        parts[feature.name] = feature.config(**kwargs)
    return SlimConfig(**parts).validate()


def parse_slim_args(argv: list[str]) -> tuple[SlimConfig, list[str], argparse.Namespace]:
    """Parse and validate sgl_slim's flags. Returns the config, SGLang's argv (recipe flags first, so the
    user's explicit flags win), and the namespace. Exits with status 2 on a bad value."""
    parser = _slim_parser()
    pre, _ = parser.parse_known_args(argv)
    recipe = {}
    try:
        if pre.recipe:
            recipe = load_recipe(pre.recipe)
            parser.set_defaults(**_recipe_defaults(recipe))
        args, _ = parser.parse_known_args(argv)
        cfg = config_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
    sglang_argv = _sglang_argv_from_recipe(recipe) + _strip_slim_flags(argv)
    if args.model_path is None:
        sglang_argv = ["--model-path", recipe.get("model", DEFAULT_MODEL)] + sglang_argv
    return cfg, sglang_argv, args


def _strip_slim_flags(argv: list[str]) -> list[str]:
    takes_value = {flag.name for _, flag, _ in _flags() if flag.kind is not bool} | {"--recipe"}
    switches = {flag.name for _, flag, _ in _flags() if flag.kind is bool}
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in switches:
            continue
        if name in takes_value:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def cuda_available() -> bool:
    import torch  # noqa: PLC0415 (torch is safe to import before sglang)
    return torch.cuda.is_available()


def enable_cpu_mode(environ=os.environ) -> None:
    """Make SGLang serve on the CPU: in this process (``environ`` is ``os.environ``; before sglang is imported)
    or in the children started with ``environ``."""
    environ["SGLANG_USE_CPU_ENGINE"] = "1"
    environ.setdefault("TORCH_COMPILE_DISABLE", "1")  # else a ~25 s compile of the vision rotary helper
    shim = str(SHIM_DIR)
    if environ is os.environ and shim not in sys.path:   # this process too (not only its children)
        sys.path.insert(0, shim)
    paths = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if shim not in paths:
        environ["PYTHONPATH"] = os.pathsep.join([shim] + paths)


def _has_flag(argv: list[str], *flags: str) -> bool:
    return any(a.split("=", 1)[0] in flags for a in argv)


def resolve_model(sglang_argv: list[str]) -> list[str]:
    """Replace a demo model name given as --model/--model-path with its built directory."""
    from sgl_slim.demo import DEMO_NAMES, ensure_demo  # noqa: PLC0415

    out = list(sglang_argv)
    for i, arg in enumerate(out):
        name, _, value = arg.partition("=")
        if name in ("--model-path", "--model"):
            if value in DEMO_NAMES:
                out[i] = f"{name}={ensure_demo(value)}"
            elif not value and i + 1 < len(out) and out[i + 1] in DEMO_NAMES:
                out[i + 1] = str(ensure_demo(out[i + 1]))
    return out


def apply_cpu_defaults(sglang_argv: list[str]) -> list[str]:
    """SGLang's flags for serving on the CPU, where the user set none: ``--device cpu``, a KV pool cap, and
    ``--sleep-on-idle`` (an idle scheduler's loop otherwise polls its sockets without pause, a whole core taken
    from the work of other processes; it then waits on them and wakes when a request arrives)."""
    extra = []
    if not _has_flag(sglang_argv, "--device"):
        extra += ["--device", "cpu"]
    if not _has_flag(sglang_argv, "--max-total-tokens", "--mem-fraction-static"):
        extra += ["--max-total-tokens", str(CPU_DEFAULT_MAX_TOTAL_TOKENS)]
    if not _has_flag(sglang_argv, "--sleep-on-idle"):
        extra += ["--sleep-on-idle"]
    return extra + sglang_argv


def cpu_thread_binding(world: int, cpus: list[int]) -> str:
    """SGLANG_CPU_OMP_THREADS_BIND for ``world`` CPU ranks: the cores split into contiguous groups, one per
    rank ('0-3|4-7'); with more ranks than cores, ranks share cores round robin ('0|1|0')."""
    if world < 1 or not cpus:
        raise ValueError(f"need at least one rank and one core, got {world} ranks and cores {cpus}")
    cpus = sorted(cpus)
    if world > len(cpus):
        groups = [[cpus[i % len(cpus)]] for i in range(world)]
    else:
        size, extra = divmod(len(cpus), world)
        groups, start = [], 0
        for i in range(world):
            end = start + size + (i < extra)
            groups.append(cpus[start:end])
            start = end

    def fmt(g: list[int]) -> str:
        if len(g) > 1 and g[-1] - g[0] == len(g) - 1:
            return f"{g[0]}-{g[-1]}"
        return ",".join(map(str, g))
    return "|".join(fmt(g) for g in groups)


def main(argv: list[str] | None = None) -> None:
    from sgl_slim.integration import server  # noqa: PLC0415 (it imports sglang only when called)

    argv = list(sys.argv[1:] if argv is None else argv)
    if _has_flag(argv, "-h", "--help"):
        cpu = not cuda_available()
        if cpu:
            enable_cpu_mode()
        server.build_server_args(SlimConfig(), argv, cpu=cpu)  # argparse prints help (both groups) and exits
        return
    cfg, sglang_argv, _ = parse_slim_args(argv)
    cpu = not cuda_available()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    if cpu:
        enable_cpu_mode()
        sglang_argv = apply_cpu_defaults(sglang_argv)
        logger.info("sgl_slim: no CUDA device: serving on the CPU (SGLang CPU engine, torch_native attention, "
                    "KV pool capped at --max-total-tokens, torch.compile off)")
    sglang_argv = resolve_model(sglang_argv)
    cfg.to_env()  # the one hand-off to every SGLang process
    server.serve(cfg, sglang_argv, cpu=cpu)


if __name__ == "__main__":
    main()
