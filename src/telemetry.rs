//! Logs and traces. Logs: JSON lines (default) or human text on stdout, filtered by
//! LOG_LEVEL; every line inside a request carries the request's `trace_id`. Traces: when
//! OTEL_EXPORTER_OTLP_ENDPOINT is set, our spans are exported over OTLP/gRPC with a
//! parent-based ratio sampler; when it is not, no exporter or OpenTelemetry layer exists.
//! W3C `traceparent` is the propagation format. Panics are logged with a backtrace.

use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{Config, LogFormat};

/// Keeps the trace pipeline alive; dropping it flushes and stops the exporter.
pub struct TelemetryGuard {
    tracer_provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Exports every finished span now (tests, and before exit).
    pub fn flush(&self) {
        if let Some(provider) = &self.tracer_provider {
            if let Err(error) = provider.force_flush() {
                tracing::warn!(error = %error, "flushing traces failed");
            }
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.tracer_provider.take() {
            if let Err(error) = provider.shutdown() {
                eprintln!("trace exporter shutdown failed: {error}");
            }
        }
    }
}

/// Installs the global subscriber (and, when configured, the OTLP trace pipeline),
/// logging to stdout. Call once per process, inside the Tokio runtime (the OTLP client
/// needs it).
pub fn init(config: &Config) -> anyhow::Result<TelemetryGuard> {
    init_with_writer(config, std::io::stdout)
}

/// [`init`] with another log destination (tests capture the lines).
pub fn init_with_writer<W>(config: &Config, writer: W) -> anyhow::Result<TelemetryGuard>
where
    W: for<'writer> MakeWriter<'writer> + Send + Sync + 'static,
{
    let log_filter = EnvFilter::try_new(&config.log_level)
        .map_err(|error| anyhow::anyhow!("invalid configuration: LOG_LEVEL: {error}"))?;
    let log_layer = match config.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .with_writer(writer)
            .with_filter(log_filter)
            .boxed(),
        LogFormat::Text => {
            tracing_subscriber::fmt::layer().with_writer(writer).with_filter(log_filter).boxed()
        }
    };

    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let (trace_layer, tracer_provider) = match config.otlp_endpoint() {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|error| {
                    anyhow::anyhow!("invalid configuration: OTEL_EXPORTER_OTLP_ENDPOINT: {error}")
                })?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                    config.otel_traces_sampler_ratio,
                ))))
                .with_resource(
                    Resource::builder()
                        .with_service_name(config.service_name.clone())
                        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                        .build(),
                )
                .build();
            let tracer = provider.tracer("analytics-service");
            // Only our own spans: driver internals would flood the collector.
            let spans = Targets::new().with_target("analytics_service", Level::INFO);
            let layer = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(spans);
            (Some(layer), Some(provider))
        }
        None => (None, None),
    };

    tracing_subscriber::registry().with(log_layer).with(trace_layer).try_init()?;
    std::panic::set_hook(Box::new(|info| {
        let backtrace = std::backtrace::Backtrace::force_capture();
        tracing::error!(panic = %info, backtrace = %backtrace, "panic");
    }));
    if let Some(endpoint) = config.otlp_endpoint() {
        tracing::info!(endpoint, ratio = config.otel_traces_sampler_ratio, "exporting traces over otlp");
    }
    Ok(TelemetryGuard { tracer_provider })
}

/// A minimal subscriber for the verbs that run before configuration is known.
pub fn init_plain() {
    tracing_subscriber::fmt().with_env_filter(EnvFilter::new("info")).try_init().ok();
}

/// Reads W3C trace context from HTTP/2 headers (gRPC metadata).
pub struct HeaderExtractor<'a>(pub &'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The trace id of a `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`), if well formed.
pub fn traceparent_trace_id(headers: &http::HeaderMap) -> Option<String> {
    let value = headers.get("traceparent")?.to_str().ok()?;
    let mut parts = value.split('-');
    let (_version, trace_id) = (parts.next()?, parts.next()?);
    let valid = trace_id.len() == 32
        && trace_id.bytes().all(|byte| byte.is_ascii_hexdigit())
        && trace_id.bytes().any(|byte| byte != b'0');
    valid.then(|| trace_id.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parsing() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(traceparent_trace_id(&headers), None);
        headers.insert(
            "traceparent",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01".parse().unwrap(),
        );
        assert_eq!(traceparent_trace_id(&headers).as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        headers.insert(
            "traceparent",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01".parse().unwrap(),
        );
        assert_eq!(traceparent_trace_id(&headers), None);
        headers.insert("traceparent", "garbage".parse().unwrap());
        assert_eq!(traceparent_trace_id(&headers), None);
    }
}
