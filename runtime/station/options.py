"""``edge-detect``'s station options (several cameras, live view, sinks) and the one place that turns flags, or a
station file, into a ``StationConfig``. Cameras come from flags or from the file, not both; a setting given in both
places is a usage error too."""
from __future__ import annotations

import argparse

from ..errors import ClipadError
from .config import (ON, CameraConfig, HttpConfig, OutputsConfig, StationConfig, cameras_from_flags, check_url,
                     parse_listen, read_secret, station_from_file)


def add_station_options(ap: argparse.ArgumentParser) -> None:
    src = ap.add_argument_group("inputs (repeat --camera / --source for several cameras in one process)")
    src.add_argument("--camera", action="append", metavar="[NAME=]N", help="camera index (OpenCV)")
    src.add_argument("--source", action="append", metavar="[NAME=]PATH_OR_URL",
                     help="image, folder, glob ('dir/*.png'), video file, rtsp/http(s) stream URL, or gst:PIPELINE; "
                          "NAME: a letter then up to 31 letters, digits, '-', '_' (default cam0, cam1, … in order). "
                          "An argument that exists as a file or folder is always a path")
    src.add_argument("--config", metavar="STATION.TOML", help="a station file: [[camera]] (name, source or camera, "
                                                              "class, reconnect), [outputs], [http]")
    view = ap.add_argument_group("live view")
    view.add_argument("--http", metavar="[HOST:]PORT", help="serve the live view, status, records, metrics and "
                                                            "health here (host default 127.0.0.1)")
    view.add_argument("--http-token", metavar="TOKEN", help="require this token (better: --http-token-file or "
                                                            "CLIPAD_HTTP_TOKEN, kept out of the process list)")
    view.add_argument("--http-token-file", metavar="FILE", help="the token, from a file")
    view.add_argument("--http-fps", type=float, default=None, metavar="F",
                      help="live-view frames per second per camera (default 5)")
    view.add_argument("--stall-s", type=float, default=None, metavar="S",
                      help="a camera without a frame for S seconds is stalled: /healthz 503 (default 10)")
    sinks = ap.add_argument_group("results to the line (each sink spools on disk and never blocks inspection)")
    sinks.add_argument("--mqtt", metavar="URL", help="mqtt://[USER[:PASS]@]HOST[:PORT]/PREFIX: records to "
                                                     "PREFIX/CAMERA/result (QoS 1), retained PREFIX/CAMERA/status "
                                                     "(password better from CLIPAD_MQTT_PASSWORD or "
                                                     "--mqtt-password-file)")
    sinks.add_argument("--mqtt-on", choices=ON, default=None, help="which records go to MQTT (default all)")
    sinks.add_argument("--mqtt-password-file", metavar="FILE", help="the MQTT password, from a file")
    sinks.add_argument("--webhook", metavar="URL", help="POST each record as JSON here (retried on 5xx/timeouts)")
    sinks.add_argument("--webhook-on", choices=ON, default=None, help="which records go to the webhook "
                                                                       "(default ng: NG parts and errors)")
    sinks.add_argument("--webhook-timeout-s", type=float, default=None, metavar="S",
                       help="give up on one webhook attempt after S seconds and retry later (default 5)")
    sinks.add_argument("--evidence", metavar="DIR", help="for each NG part: input image, overlay, mask and record")
    sinks.add_argument("--evidence-max-gb", type=float, metavar="GB",
                       help="delete the oldest evidence this tool wrote past GB")
    sinks.add_argument("--spool-dir", metavar="DIR", help="where records wait for their sinks (default: beside the "
                                                          "JSONL, else ~/.cache/clipad/spool)")
    sinks.add_argument("--spool-max-mb", type=float, default=None, metavar="MB",
                       help="per sink; past it the oldest waiting records are dropped and counted (default 100)")
    sinks.add_argument("--drain-s", type=float, default=None, metavar="S",
                       help="at the end (or SIGTERM), wait up to S seconds for the sinks (default 30)")


_FILE_OUTPUTS = {"jsonl": "--jsonl", "save": "--save", "save_maps": "--save-maps", "save_masks": "--save-masks",
                 "mqtt": "--mqtt", "mqtt_on": "--mqtt-on", "webhook": "--webhook", "webhook_on": "--webhook-on",
                 "webhook_timeout_s": "--webhook-timeout-s",
                 "evidence": "--evidence", "evidence_max_gb": "--evidence-max-gb", "spool_dir": "--spool-dir",
                 "spool_max_mb": "--spool-max-mb", "drain_s": "--drain-s"}
_FILE_HTTP = {"listen": "--http", "token_file": "--http-token-file", "fps": "--http-fps", "stall_s": "--stall-s"}


def station_config(args: argparse.Namespace) -> StationConfig:
    flags_cameras = (args.camera or []) + (args.source or [])
    outputs, http = {}, {}
    if args.config:
        if flags_cameras:
            raise ClipadError("--camera/--source and --config both declare cameras: give them in one place")
        cameras, outputs, http = station_from_file(args.config, args.class_name)
        for key, flag in (*_FILE_OUTPUTS.items(), *_FILE_HTTP.items()):
            if (key in outputs or key in http) and getattr(args, flag[2:].replace("-", "_"), None) is not None:
                raise ClipadError(f"{flag} is also set in --config {args.config}: give it in one place")
    elif flags_cameras:
        cameras = cameras_from_flags(args.camera, args.source, args.class_name, args.reconnect)
    else:
        raise ClipadError("give --camera N, --source PATH_OR_URL (repeat either for several cameras) or --config "
                          "STATION.TOML")

    def pick(key: str, default=None):
        value = getattr(args, _FILE_OUTPUTS[key][2:].replace("-", "_"), None)
        return value if value is not None else outputs.get(key, default)

    mqtt_password_file = args.mqtt_password_file or outputs.get("mqtt_password_file")
    out = OutputsConfig(jsonl=pick("jsonl"), save=pick("save"), save_maps=pick("save_maps"),
                        save_masks=pick("save_masks"), mqtt=pick("mqtt"), mqtt_on=pick("mqtt_on", "all"),
                        mqtt_password=read_secret(None, mqtt_password_file, "CLIPAD_MQTT_PASSWORD", "--mqtt-password"),
                        webhook=pick("webhook"), webhook_on=pick("webhook_on", "ng"),
                        webhook_timeout_s=float(pick("webhook_timeout_s", 5.0)), evidence=pick("evidence"),
                        evidence_max_gb=pick("evidence_max_gb"), spool_dir=pick("spool_dir"),
                        spool_max_mb=float(pick("spool_max_mb", 100.0)), drain_s=float(pick("drain_s", 30.0)))
    check_url(out.mqtt, "--mqtt", ("mqtt",))
    check_url(out.webhook, "--webhook", ("http", "https"))
    for flag, value in (("--mqtt-on", out.mqtt_on), ("--webhook-on", out.webhook_on)):
        if value not in ON:
            raise ClipadError(f"{flag} {value}: choose ng or all")
    for flag, value, low in (("--spool-max-mb", out.spool_max_mb, 0.001), ("--drain-s", out.drain_s, 0.0),
                             ("--webhook-timeout-s", out.webhook_timeout_s, 0.1),
                             ("--evidence-max-gb", out.evidence_max_gb, 0.0)):
        if value is not None and not value >= low:
            raise ClipadError(f"{flag} {value}: must be at least {low:g}")
    listen = args.http or http.get("listen")
    cfg = HttpConfig()
    if listen:
        cfg.host, cfg.port = parse_listen(str(listen))
        cfg.token = read_secret(args.http_token, args.http_token_file or http.get("token_file"), "CLIPAD_HTTP_TOKEN",
                                "--http-token")
    cfg.fps = float(args.http_fps if args.http_fps is not None else http.get("fps", 5.0))
    cfg.stall_s = float(args.stall_s if args.stall_s is not None else http.get("stall_s", 10.0))
    if not cfg.fps > 0 or not cfg.stall_s > 0:
        raise ClipadError("--http-fps and --stall-s must be above 0")
    if not listen and (args.http_token or args.http_token_file):
        raise ClipadError("--http-token needs --http")
    return StationConfig(cameras=cameras, outputs=out, http=cfg)


__all__ = ["CameraConfig", "add_station_options", "station_config"]
