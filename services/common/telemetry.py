"""OpenTelemetry providers for one service process, built by its composition root and shut down last.

Traces: a ``TracerProvider`` with a parent-based ratio sampler; spans go to an OTLP/gRPC collector when an endpoint
is configured (the library's exporter with costmesh's cheaper encoder, :mod:`services.common.span_export`).
Metrics: a ``MeterProvider`` with a Prometheus reader served on ``metrics_port`` when set, exemplars off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased


@dataclass
class Telemetry:
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    tracing_enabled: bool
    _metrics_server: object | None = field(default=None, repr=False)

    def tracer(self, name: str) -> trace.Tracer:
        return self.tracer_provider.get_tracer(name)

    def meter(self, name: str) -> metrics.Meter:
        return self.meter_provider.get_meter(name)

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
        server = self._metrics_server
        if server is not None:
            shutdown = getattr(server, "shutdown", None)
            if callable(shutdown):
                shutdown()


def setup_telemetry(
    *,
    service: str,
    otlp_endpoint: str | None,
    sample_ratio: float = 1.0,
    metrics_port: int | None = None,
    metrics_host: str = "0.0.0.0",
    instance_id: str = "",
) -> Telemetry:
    """Build the tracer and meter providers of this process and install them as the global ones."""
    attrs = {"service.name": f"costmesh-{service}", "service.namespace": "costmesh"}
    if instance_id:
        attrs["service.instance.id"] = instance_id
    resource = Resource.create(attrs)
    tracer_provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
    if otlp_endpoint:
        from services.common.span_export import OtlpSpanExporter

        tracer_provider.add_span_processor(BatchSpanProcessor(OtlpSpanExporter(endpoint=otlp_endpoint, insecure=True)))
    readers: list[MetricReader] = []
    server: object | None = None
    if metrics_port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        readers.append(PrometheusMetricReader())
        server, _thread = start_http_server(metrics_port, addr=metrics_host)
    # Exemplars: the Prometheus reader drops them, yet with a sampled span current the SDK would offer every
    # measurement to a reservoir (the default filter is trace-based) — work that only tracing would cost.
    meter_provider = MeterProvider(resource=resource, metric_readers=readers, exemplar_filter=AlwaysOffExemplarFilter())
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    return Telemetry(tracer_provider, meter_provider, tracing_enabled=bool(otlp_endpoint), _metrics_server=server)
