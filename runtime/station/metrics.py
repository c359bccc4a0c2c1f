"""Prometheus metrics of a station (prometheus-client, its own registry): per camera frames, OK, NG, errors,
latency histograms and warnings; per sink sent, queued, spooled, dropped and connected. Counters are read from the
station's state at scrape time; latencies are observed as records are written."""
from __future__ import annotations

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class StationMetrics:
    def __init__(self, state):
        from prometheus_client import CollectorRegistry, Histogram

        self.state = state
        self.registry = CollectorRegistry()
        self.latency = Histogram("clipad_latency_seconds", "Per-frame latency by stage (pre, infer, post) and in "
                                 "total", ["camera", "stage"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_StateCollector(state))

    def observe(self, camera: str, latency_ms: dict) -> None:
        if latency_ms.get("infer") is None:
            return
        total = 0.0
        for stage, value in latency_ms.items():
            if value is not None:
                self.latency.labels(camera, stage).observe(value / 1e3)
                total += value
        self.latency.labels(camera, "total").observe(total / 1e3)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _StateCollector:
    def __init__(self, state):
        self.state = state

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        counters = {key: CounterMetricFamily(f"clipad_{key}", help_, labels=["camera"]) for key, help_ in (
            ("frames", "Frames and inputs handled"), ("ok", "Parts labelled OK"), ("ng", "Parts labelled NG"),
            ("errors", "Records with an error (unreadable input, stream gap, non-finite output)"))}
        age = GaugeMetricFamily("clipad_last_frame_age_seconds", "Seconds since the camera's last frame",
                                labels=["camera"])
        warnings = GaugeMetricFamily("clipad_warning", "Watchdog and station warnings (1 while raised)",
                                     labels=["camera", "kind"])
        for name, camera in self.state.cameras.items():
            for key, family in counters.items():
                family.add_metric([name], getattr(camera, key))
            if camera.last_frame is not None:
                import time

                age.add_metric([name], time.monotonic() - camera.last_frame)
        for warning in self.state.warnings():
            warnings.add_metric([warning["camera"] or "", warning["kind"]], 1)
        sink = {key: (GaugeMetricFamily if key in ("queued", "spooled", "connected") else CounterMetricFamily)(
            f"clipad_sink_{key}", f"Sink records {key}" if key != "connected" else "1 while the sink is connected",
            labels=["sink"]) for key in ("sent", "queued", "spooled", "dropped", "connected")}
        for s in self.state.sinks:
            status = s.status()
            for key, family in sink.items():
                family.add_metric([s.name], float(status[key]))
        yield from counters.values()
        yield age
        yield warnings
        yield from sink.values()
