"""Per-request settings: the ``sgl_slim`` object a request may carry (OpenAI ``extra_body``, ``/generate``).

One server serves many applications; each request may ask for its own IDPruner / Samp keep ratio or S2O tau,
or for dense attention::

    {"sgl_slim": {"idpruner_keep_ratio": 0.5, "idpruner_video_keep_ratio": 0.2, "samp_keep_ratio": 0.8,
                  "s2o_tau": 0.003, "s2o": false}}

Every field is optional. Each is checked like its launch flag (the same settings class validates it, so the
ranges are the flags' ranges); a field of a feature the server was started without, a value of the wrong type
or out of range, and an unknown field are client errors (``RequestSettingsError``, a ``ValueError``: HTTP 400)
whose message names the field and, where it helps, the flag. A request without the object is served exactly as
before. Nothing here imports sglang; the SGLang side is :mod:`sgl_slim.integration.request_hooks`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from sgl_slim.config import ConfigError, IDPrunerConfig, S2OConfig, SampConfig

BODY_KEY = "sgl_slim"            # the top-level field of a request body
CARRIER_KEY = "__sgl_slim"       # where the checked settings ride in SGLang's sampling_params.custom_params


class RequestSettingsError(ValueError):
    """A bad ``sgl_slim`` object; the message names the field (SGLang answers a ValueError with HTTP 400)."""


@dataclass(frozen=True)
class Field:
    """One field of the object: the feature section it changes (``cfg.<section>``), the setting it replaces,
    its type (bool or float) and the flag whose range it shares."""
    section: str
    setting: str
    kind: type
    flag: str


FIELDS: dict[str, Field] = {
    "idpruner_keep_ratio": Field("idpruner", "keep_ratio", float, "--idpruner-keep-ratio"),
    "idpruner_video_keep_ratio": Field("idpruner", "video_keep_ratio", float, "--idpruner-video-keep-ratio"),
    "samp_keep_ratio": Field("samp", "keep_ratio", float, "--samp-keep-ratio"),
    "s2o_tau": Field("s2o", "tau", float, "--s2o-tau"),
    "s2o": Field("s2o", "enabled", bool, "--s2o"),
}
_SECTIONS = {"idpruner": IDPrunerConfig, "samp": SampConfig, "s2o": S2OConfig}
_TOGGLES = {"idpruner": "--idpruner", "samp": "--samp", "s2o": "--s2o"}


@dataclass(frozen=True)
class RequestSettings:
    """A request's checked settings; None: the server's."""
    idpruner_keep_ratio: float | None = None
    idpruner_video_keep_ratio: float | None = None
    samp_keep_ratio: float | None = None
    s2o_tau: float | None = None
    s2o: bool | None = None

    def to_dict(self) -> dict:
        """The fields the request set (what rides in custom_params and is echoed in ``meta_info``)."""
        return {name: value for name, value in asdict(self).items() if value is not None}

    def __bool__(self) -> bool:
        return bool(self.to_dict())

    def idpruner(self, base: IDPrunerConfig) -> IDPrunerConfig:
        """The IDPruner settings for this request. Its image ratio also sets its videos' where neither the
        request nor the server set a video ratio (the flag's own default)."""
        changes = {}
        if self.idpruner_keep_ratio is not None:
            changes["keep_ratio"] = self.idpruner_keep_ratio
        if self.idpruner_video_keep_ratio is not None:
            changes["video_keep_ratio"] = self.idpruner_video_keep_ratio
        return replace(base, **changes) if changes else base

    def samp(self, base: SampConfig) -> SampConfig:
        """The Samp settings for this request."""
        if self.samp_keep_ratio is None:
            return base
        return replace(base, keep_ratio=self.samp_keep_ratio)

    def s2o_tau_for(self, base_tau):
        """This request's S2O tau: 0 (dense) with ``s2o: false``, its ``s2o_tau``, else ``base_tau`` (the
        server's, a float or per-layer taus)."""
        if self.s2o is False:
            return 0.0
        return base_tau if self.s2o_tau is None else self.s2o_tau


def check_settings(value) -> RequestSettings:
    """Types, ranges and field names of a ``sgl_slim`` object (None: no object). Needs no server."""
    if value is None:
        return RequestSettings()
    if not isinstance(value, dict):
        raise RequestSettingsError(f"{BODY_KEY} must be a JSON object with some of the fields "
                                   f"{', '.join(FIELDS)}; got {type(value).__name__}")
    unknown = [str(name) for name in value if name not in FIELDS]
    if unknown:
        raise RequestSettingsError(f"{BODY_KEY}: unknown field{'s' if len(unknown) > 1 else ''} "
                                   f"{', '.join(repr(n[:64]) for n in unknown[:8])}; known: {', '.join(FIELDS)}")
    checked = {name: _check_value(name, raw) for name, raw in value.items()}
    if checked.get("s2o") is False and "s2o_tau" in checked:
        raise RequestSettingsError(f"{BODY_KEY}.s2o_tau: has no effect with {BODY_KEY}.s2o false (dense); "
                                   f"send one of them")
    return RequestSettings(**checked)


def _check_value(name: str, raw):
    spec = FIELDS[name]
    where = f"{BODY_KEY}.{name}"
    if spec.kind is bool:
        if not isinstance(raw, bool):
            raise RequestSettingsError(f"{where}: must be true or false, got {_show(raw)}")
        return raw
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise RequestSettingsError(f"{where}: must be a number, got {_show(raw)}")
    try:
        value = float(raw)
    except OverflowError:              # an integer too large for a float
        value = math.inf
    if not math.isfinite(value):
        raise RequestSettingsError(f"{where}: must be a finite number, got {value}")
    try:                       # the flag's own check, on an otherwise default section
        replace(_SECTIONS[spec.section](), **{spec.setting: value}).validate()
    except ConfigError as exc:
        raise RequestSettingsError(f"{where}: out of range, as for {exc}") from None
    return value


def _show(raw) -> str:
    text = repr(raw)
    return f"{type(raw).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def check_server(settings: RequestSettings, cfg) -> None:
    """What this server (a ``SlimConfig``) can honour: every field's feature must be on."""
    for name in settings.to_dict():
        section = FIELDS[name].section
        if not getattr(cfg, section).enabled:
            raise RequestSettingsError(f"{BODY_KEY}.{name}: this server was started without {_TOGGLES[section]}; "
                                       f"start it with {_TOGGLES[section]} to use {name}")
    if settings.s2o_tau is not None and cfg.s2o.calibration is not None:
        raise RequestSettingsError(f"{BODY_KEY}.s2o_tau: this server runs the per-layer taus of "
                                   f"--s2o-calibration, which one tau cannot replace; send s2o false for dense "
                                   f"attention, or drop s2o_tau")


def parse_request_settings(value, cfg) -> RequestSettings:
    """A request's ``sgl_slim`` object checked against the field rules and this server's configuration."""
    settings = check_settings(value)
    check_server(settings, cfg)
    return settings


def settings_from_custom_params(custom_params) -> RequestSettings:
    """The settings the tokenizer process put in a request's ``custom_params`` (none: the server's). Its entry
    hook checked them against the server; what fails the field rules here anyway counts as none."""
    if not isinstance(custom_params, dict) or CARRIER_KEY not in custom_params:
        return RequestSettings()
    try:
        return check_settings(custom_params[CARRIER_KEY])
    except RequestSettingsError:
        return RequestSettings()
