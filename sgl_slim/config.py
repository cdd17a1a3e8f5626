"""sgl_slim's configuration: typed, frozen, validated once.

The launcher builds a :class:`SlimConfig` from its flags, validates it, and hands it to every SGLang
process through ONE environment variable (:data:`ENV_VAR`, JSON). Processes read it back with
:func:`SlimConfig.from_env` in exactly one place (the plugin). Nothing else reads the environment.

:data:`FEATURES`, at the end, is the one table of sgl_slim's features: per feature its settings class, its
launcher flags, its glue module in ``sgl_slim/integration/``, when that module is installed and the fields it
reports per request. Nothing here imports sglang.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from pathlib import Path

ENV_VAR = "SGLSLIM_CONFIG"  # not SGL_*: SGLang treats that prefix as its own deprecated one


class ConfigError(ValueError):
    """An invalid setting; ``flag`` names the command-line flag to change."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


def _check_keep_ratio(flag: str, value: float) -> None:
    if not (0.0 < value <= 1.0):
        raise ConfigError(flag, f"keep ratio must be in (0, 1], got {value}")


@dataclass(frozen=True)
class S2OConfig:
    enabled: bool = False
    # Defaults measured on the H200 (benchmarks/s2o.md, "Defaults"): variant v4 at tau 1e-2 (rel-L2 0.9-1.5% on
    # both synthetic families at 32K and 128K, where v2 at its former default 1e-3 gave 0.2-2.8%; faster than it
    # on the planted inputs, 11-14% slower on the mixed ones; dense retrieval on the trained testbed model at
    # density 0.33); block 128 is as accurate as 64 at equal density and faster; segment 2048 matches 512's
    # quality with 3.5x cheaper index building at 128K.
    tau: float = 1e-2            # v4: the share of each row's mass its planned budget may leave out; the audit
    #                              adds any left-out block holding a key with more than tau of a row's mass
    variant: str = "v4"          # early-stop rule (sgl_slim.attention.VARIANTS): v1 ... v5
    block_size: int = 128        # keys per virtual block (a run of the importance order)
    segment_size: int = 2048     # queries that share one ranking
    min_length: int = 4096       # shorter prefills run dense attention
    audit_last: int | None = None  # v5: the audit covers the sequence's last this many positions (None: 128)
    audit_form: str | None = None  # v4/v5 on the GPU: fused or split audit (None: the variant's default)
    calibration: str | None = None  # JSON file of per-layer, per-KV-head taus (sgl_slim.attention.calibration)

    def validate(self) -> None:
        if self.tau < 0:
            raise ConfigError("--s2o-tau", f"must be >= 0, got {self.tau}")
        if self.variant not in ("v1", "v2", "v3", "v4", "v5"):
            raise ConfigError("--s2o-variant", f"must be v1, v2, v3, v4 or v5, got {self.variant!r}")
        if self.block_size not in (16, 32, 64, 128):
            raise ConfigError("--s2o-block-size", f"must be one of 16, 32, 64, 128, got {self.block_size}")
        if self.segment_size < self.block_size or self.segment_size % self.block_size:
            raise ConfigError("--s2o-segment-size",
                              f"must be a positive multiple of --s2o-block-size ({self.block_size}), "
                              f"got {self.segment_size}")
        if self.min_length < 0:
            raise ConfigError("--s2o-min-length", f"must be >= 0, got {self.min_length}")
        cal = self.load_calibration()
        # the variant this server runs (a calibration file's own), named in the audit flags' messages
        variant = self.variant if cal is None else cal.variant
        runs = f"this server runs {variant}" + ("" if cal is None else f" (the variant of {self.calibration})")
        if self.audit_last is not None:
            if self.audit_last < 1:
                raise ConfigError("--s2o-audit-last", f"must be >= 1, got {self.audit_last}")
            if variant != "v5":
                raise ConfigError("--s2o-audit-last", f"applies to S2O variant v5 only; {runs}")
        if self.audit_form is not None:
            if self.audit_form not in ("fused", "split"):
                raise ConfigError("--s2o-audit-form", f"must be fused or split, got {self.audit_form!r}")
            if variant not in ("v4", "v5"):
                raise ConfigError("--s2o-audit-form", f"applies to the S2O variants that audit (v4, v5); {runs}")

    def load_calibration(self):
        """The ``--s2o-calibration`` file, read and checked against the block / segment size flags (they must
        equal the file's: the taus hold for those settings only); None without a file."""
        if self.calibration is None:
            return None
        from sgl_slim.attention.calibration import S2OCalibration  # noqa: PLC0415 (only with a file)
        try:
            cal = S2OCalibration.load(self.calibration)
        except ValueError as exc:
            raise ConfigError("--s2o-calibration", str(exc)) from exc
        if (cal.block_size, cal.segment_size) != (self.block_size, self.segment_size):
            raise ConfigError("--s2o-calibration",
                              f"{self.calibration} was measured with block size {cal.block_size} and segment size "
                              f"{cal.segment_size}; pass --s2o-block-size {cal.block_size} --s2o-segment-size "
                              f"{cal.segment_size} (got {self.block_size} and {self.segment_size})")
        return cal


@dataclass(frozen=True)
class IDPrunerConfig:
    enabled: bool = False
    keep_ratio: float = 0.25     # kept vision tokens per image = round(N * keep_ratio)
    mmr_lambda: float = 0.5      # 1 = pure importance, 0 = pure diversity
    min_tokens: int = 1          # never keep fewer tokens than this per image or frame group (nor more than N)
    scorer: str | None = None    # optional trained importance scorer (directory)
    video_keep_ratio: float | None = None   # kept share of each video frame group's tokens; None: keep_ratio

    def validate(self) -> None:
        _check_keep_ratio("--idpruner-keep-ratio", self.keep_ratio)
        if self.video_keep_ratio is not None:
            _check_keep_ratio("--idpruner-video-keep-ratio", self.video_keep_ratio)
        if not (0.0 <= self.mmr_lambda <= 1.0):
            raise ConfigError("--idpruner-lambda", f"must be in [0, 1], got {self.mmr_lambda}")
        if self.min_tokens < 1:
            raise ConfigError("--idpruner-min-tokens", f"must be >= 1, got {self.min_tokens}")
        if self.scorer is not None and not Path(self.scorer).is_dir():
            raise ConfigError("--idpruner-scorer", f"not a readable directory: {self.scorer}")

    def ratio(self, video: bool = False) -> float:
        """The keep ratio of an image, or (``video``) of one frame group of a video."""
        return self.keep_ratio if not video or self.video_keep_ratio is None else self.video_keep_ratio

    def keep_count(self, n: int, video: bool = False) -> int:
        """Tokens kept out of ``n`` (an image's, or a video frame group's): round(n * ratio), clamped to
        [min_tokens, n]."""
        return max(1, min(n, max(self.min_tokens, round(n * self.ratio(video)))))


@dataclass(frozen=True)
class SampConfig:
    enabled: bool = False
    keep_ratio: float = 0.6      # kept audio tokens per clip = round(N * keep_ratio)
    merge_threshold: float = 0.9  # mean cosine similarity to join a cluster; > 1 merges nothing

    def validate(self) -> None:
        _check_keep_ratio("--samp-keep-ratio", self.keep_ratio)
        if not (-1.0 <= self.merge_threshold):
            raise ConfigError("--samp-merge-threshold", f"must be >= -1, got {self.merge_threshold}")

    def keep_count(self, n: int) -> int:
        return max(1, min(n, round(n * self.keep_ratio)))


@dataclass(frozen=True)
class EagleConfig:
    draft: str | None = None     # directory of an exported EAGLE-3 draft
    steps: int = 3               # draft steps per verify
    draft_tokens: int | None = None  # tokens verified per step; None = steps + 1 (chain drafting)

    @property
    def verified_tokens(self) -> int:
        return self.steps + 1 if self.draft_tokens is None else self.draft_tokens

    @property
    def enabled(self) -> bool:
        return self.draft is not None

    def validate(self) -> None:
        if self.draft is not None:
            path = Path(self.draft)
            if not (path.is_dir() and os.access(path, os.R_OK) and (path / "config.json").is_file()):
                raise ConfigError("--eagle-draft", f"not a readable draft directory with config.json: {self.draft}")
        if self.steps < 1:
            raise ConfigError("--eagle-steps", f"must be >= 1, got {self.steps}")
        if self.draft_tokens is not None and self.draft_tokens < 2:
            raise ConfigError("--eagle-draft-tokens", f"must be >= 2, got {self.draft_tokens}")


@dataclass(frozen=True)
class MediaConfig:
    """Where clients may point the server at media on its own disk (``file://`` URLs and plain paths)."""
    allowed_local_media_path: str | None = None   # None: every local path is refused with a 400

    def validate(self) -> None:
        path = self.allowed_local_media_path
        if path is not None and not (os.path.isdir(path) and os.access(path, os.R_OK | os.X_OK)):
            raise ConfigError("--allowed-local-media-path", f"not a readable directory: {path}")


# -------------------------------------------------------------------------------------------------------------
# The feature table: every part of sgl_slim, once. The launcher's flags, SlimConfig's sections, the plugin's
# installs, the hooked-symbol check and the per-request metric fields are all read from it. A new feature is one
# entry here plus its modules (its settings class above, its glue in sgl_slim/integration/, its algorithm).
# -------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Flag:
    """One launcher flag: ``name`` sets the ``setting`` field of its feature's settings class."""
    name: str
    setting: str
    kind: type          # bool: a switch (store_true); otherwise the value's type
    help: str


# When the plugin installs a part's glue module in an SGLang process:
WHEN_ON = "on"              # its toggle is on
ALWAYS = "always"           # in every process, whatever the flags (and it is a toggle too)
WHEN_LAUNCHED = "launched"  # in every process of a server started by ``python -m sgl_slim.launch`` (the
                            # configuration variable is set; a plain ``sglang.launch_server`` stays stock)
WITH_ANY_ON = "with_any"    # whenever some toggle is on


@dataclass(frozen=True)
class Feature:
    name: str                         # its section of SlimConfig (``cfg.<name>``) and its name in logs
    module: str                       # its glue: sgl_slim.integration.<module> (install, HOOKED_SYMBOLS, and
                                      # optionally adjust_server_args)
    config: type | None = None        # its settings (a frozen dataclass with validate()); None: it has none
    flags: tuple[Flag, ...] = ()
    install: str = WHEN_ON
    metric_fields: tuple[str, ...] = ()   # what it reports per request under meta_info["sgl_slim"]

    @property
    def toggled(self) -> bool:
        """Whether it has an on/off toggle (``cfg.<name>.enabled``)."""
        return self.install in (WHEN_ON, ALWAYS)


FEATURES: tuple[Feature, ...] = (
    # always: the backend name must be a valid choice in every process before SGLang parses its command line
    Feature("s2o", "s2o_backend", S2OConfig, install=ALWAYS, metric_fields=("s2o_density", "s2o_sparse"), flags=(
        Flag("--s2o", "enabled", bool, "S2O sparse prefill attention (prefill/extend; decode stays dense)"),
        Flag("--s2o-tau", "tau", float, "sparsity threshold, >= 0 (0 = visit every block = dense); v4: the share "
             "of each row's attention mass left out (H200, benchmarks/s2o.md, 32K-128K: 1e-2 -> rel-L2 0.9-1.5%% "
             "at density 0.32-0.68, 3e-3 -> 0.3-0.6%%, 1e-3 -> 0.2-0.3%%)"),
        Flag("--s2o-variant", "variant", str, "sparsity rule: v4 (default: v3, then every block it leaves out is "
             "audited by its scores and visited if a key there holds > tau of some row's mass; through SGLang on the "
             "trained testbed model: dense's answers at 32K-128K), v5 (v3, with v4's audit for the prompt's last "
             "--s2o-audit-last positions only: faster, but it lost 8 of 200 answers there), "
             "v3 (budget "
             "planned from 32 sampled rows per segment: tau = their expected dropped mass; loses retrieval on the "
             "testbed model), v2 (early stop on the predicted unvisited mass) or v1 (per-block mass, the "
             "original rule)"),
        Flag("--s2o-block-size", "block_size", int, "keys per virtual block: 16, 32, 64 or 128"),
        Flag("--s2o-segment-size", "segment_size", int, "queries sharing one ranking; a multiple of the block size"),
        Flag("--s2o-min-length", "min_length", int,
             "sequences shorter than this (tokens) get exact dense attention, >= 0"),
        Flag("--s2o-audit-last", "audit_last", int,
             "v5: audit the tiles of each prompt's last N positions (default 128: the rows the next token reads; "
             "widen it when more rows' outputs are read, e.g. prompt logprobs), >= 1"),
        Flag("--s2o-audit-form", "audit_form", str,
             "v4/v5 on the GPU: run the audit inside the attention kernel (fused) or as kernels of their own "
             "(split: several q heads share each key tile); the same visited blocks either way (default: split for "
             "v4, fused for v5, the faster of each on the H200)"),
        Flag("--s2o-calibration", "calibration", str,
             "JSON file of per-layer, per-KV-head taus (replaces --s2o-tau; block/segment size must match the file)"),
    )),
    Feature("idpruner", "idpruner_hooks", IDPrunerConfig,
            metric_fields=("vision_tokens_kept", "vision_tokens_total"), flags=(
        Flag("--idpruner", "enabled", bool, "IDPruner: prune vision tokens (MMR) before the LLM"),
        Flag("--idpruner-keep-ratio", "keep_ratio", float, "kept share of each image's tokens, in (0, 1]"),
        Flag("--idpruner-video-keep-ratio", "video_keep_ratio", float,
             "kept share of each video frame group's tokens, in (0, 1] (default: --idpruner-keep-ratio)"),
        Flag("--idpruner-lambda", "mmr_lambda", float, "MMR trade-off in [0, 1]: 1 importance, 0 diversity"),
        Flag("--idpruner-min-tokens", "min_tokens", int,
             "keep at least this many tokens per image and per video frame group, >= 1"),
        Flag("--idpruner-scorer", "scorer", str, "directory of a trained importance scorer (optional)"),
    )),
    Feature("samp", "samp_hooks", SampConfig, metric_fields=("audio_tokens_kept", "audio_tokens_total"), flags=(
        Flag("--samp", "enabled", bool, "Samp: merge then prune audio tokens before the LLM"),
        Flag("--samp-keep-ratio", "keep_ratio", float, "kept share of each clip's tokens, in (0, 1]"),
        Flag("--samp-merge-threshold", "merge_threshold", float,
             "mean cosine similarity to join a cluster, >= -1 (> 1 disables merging)"),
    )),
    # the draft numbers are reported with any speculative decoding, --eagle-draft or SGLang's own flags
    Feature("eagle", "eagle", EagleConfig, metric_fields=("draft_tokens_proposed", "draft_tokens_accepted"),
            flags=(
        Flag("--eagle-draft", "draft", str, "directory of an EAGLE-3 draft exported by sgl_slim.spec"),
        Flag("--eagle-steps", "steps", int, "draft steps per verification, >= 1"),
        Flag("--eagle-draft-tokens", "draft_tokens", int,
             "tokens verified per step, >= 2 (default: --eagle-steps + 1, chain drafting)"),
    )),
    Feature("media", "input_checks", MediaConfig, install=WHEN_LAUNCHED, flags=(   # clear 4xx for bad input
        Flag("--allowed-local-media-path", "allowed_local_media_path", str,
             "directory whose files clients may name as media (file:// URLs, plain paths); default: none, every "
             "local path is refused with a 400"),
    )),
    Feature("containment", "containment", install=WHEN_LAUNCHED),    # per-request failures contained
    Feature("cpu_parallel", "standins.cpu_parallel", install=WHEN_LAUNCHED),  # --tp-size / --dp-size on the CPU
    Feature("video_decoder", "standins.video_decoder", install=WHEN_LAUNCHED),  # videos without FFmpeg libraries
    Feature("request_settings", "request_hooks", install=WHEN_LAUNCHED),  # a request's own sgl_slim settings
    Feature("metrics", "metrics", install=WITH_ANY_ON),             # the per-request numbers, for every feature
)


class _SlimConfigMethods:
    """The methods of :class:`SlimConfig`; its fields are the settings sections of :data:`FEATURES`."""

    def validate(self) -> "SlimConfig":
        for part in fields(self):
            getattr(self, part.name).validate()
        return self

    def enabled_features(self) -> list[str]:
        return [f.name for f in FEATURES if f.toggled and getattr(self, f.name).enabled]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SlimConfig":
        data = json.loads(text)
        kinds = {part.name: part.default_factory for part in fields(cls)}
        unknown = set(data) - set(kinds)
        if unknown:
            raise ValueError(f"{ENV_VAR}: unknown sections {sorted(unknown)}")
        return cls(**{name: kind(**data.get(name, {})) for name, kind in kinds.items()}).validate()

    @classmethod
    def from_env(cls, environ: dict | None = None) -> "SlimConfig":
        """The configuration the launcher handed down, or all features off when there is none."""
        text = (os.environ if environ is None else environ).get(ENV_VAR)
        return cls() if not text else cls.from_json(text)

    def to_env(self, environ: dict | None = None) -> None:
        (os.environ if environ is None else environ)[ENV_VAR] = self.to_json()


# One section per feature with settings, in table order: cfg.s2o, cfg.idpruner, cfg.samp, cfg.eagle, cfg.media.
SlimConfig = make_dataclass(
    "SlimConfig", [(f.name, f.config, field(default_factory=f.config)) for f in FEATURES if f.config is not None],
    bases=(_SlimConfigMethods,), frozen=True, namespace={"__module__": __name__})
SlimConfig.__doc__ = "sgl_slim's whole configuration: one frozen settings section per feature of FEATURES."


def feature(name: str) -> Feature:
    """The table entry called ``name``."""
    for entry in FEATURES:
        if entry.name == name:
            return entry
    raise KeyError(f"no sgl_slim feature {name!r} (known: {', '.join(f.name for f in FEATURES)})")
