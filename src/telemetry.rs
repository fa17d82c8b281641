//! Logs and traces. Logs: JSON lines (default) or human text on stdout, filtered by
//! LOG_LEVEL; every line inside a request carries the request's `trace_id`. Traces: when
//! OTEL_EXPORTER_OTLP_ENDPOINT is set, our spans are exported over OTLP/gRPC with a
//! parent-based ratio sampler; when it is not, no exporter or OpenTelemetry layer exists.
//! An `https://` collector is verified against the system roots plus
//! OTEL_EXPORTER_OTLP_CERTIFICATE; OTEL_EXPORTER_OTLP_HEADERS go with every export.
//! Tracing never stops the service or a verb: an exporter that cannot be built, or a
//! collector that is down or untrusted, is logged and counted
//! (`analytics_trace_export_failures_total`) and everything else carries on.
//! W3C `traceparent` is the propagation format. Panics are logged with a backtrace.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{read_ca_bundle, LogFormat, OtlpConfig, TelemetryConfig};

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
pub fn init(config: &TelemetryConfig) -> anyhow::Result<TelemetryGuard> {
    init_with_writer(config, std::io::stdout)
}

/// [`init`] with another log destination (tests capture the lines).
pub fn init_with_writer<W>(config: &TelemetryConfig, writer: W) -> anyhow::Result<TelemetryGuard>
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

    // Export failures are counted from the start, before the server installs /metrics.
    crate::metrics::install();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let mut setup_failure = None;
    let (trace_layer, tracer_provider) = match &config.otlp {
        Some(otlp) => match build_exporter(otlp) {
            Ok(exporter) => {
                let provider = SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                        otlp.sampler_ratio,
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
            Err(error) => {
                setup_failure = Some(error);
                (None, None)
            }
        },
        None => (None, None),
    };

    tracing_subscriber::registry().with(log_layer).with(trace_layer).try_init()?;
    std::panic::set_hook(Box::new(|info| {
        let backtrace = std::backtrace::Backtrace::force_capture();
        tracing::error!(panic = %info, backtrace = %backtrace, "panic");
    }));
    match (&config.otlp, setup_failure) {
        (Some(otlp), None) => {
            tracing::info!(
                endpoint = otlp.endpoint,
                ratio = otlp.sampler_ratio,
                "exporting traces over otlp"
            );
        }
        (Some(otlp), Some(error)) => {
            crate::metrics::record_trace_export_failure("setup");
            tracing::error!(
                endpoint = otlp.endpoint,
                error = format!("{error:#}"),
                "trace export off: the otlp exporter cannot be built"
            );
        }
        (None, _) => {}
    }
    Ok(TelemetryGuard { tracer_provider })
}

/// The OTLP/gRPC span exporter: TLS for `https://` endpoints, the configured headers,
/// failures counted. Errors name the variable to fix.
fn build_exporter(config: &OtlpConfig) -> anyhow::Result<CountingExporter> {
    let endpoint = config.endpoint.as_str();
    let mut metadata = http::HeaderMap::new();
    for (name, value) in config.headers.clone()?.0 {
        metadata.append(http::HeaderName::try_from(name)?, http::HeaderValue::try_from(value)?);
    }
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_metadata(tonic::metadata::MetadataMap::from_headers(metadata));
    if endpoint.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
        if let Some(path) = &config.certificate {
            let bundle = read_ca_bundle("OTEL_EXPORTER_OTLP_CERTIFICATE", path)?;
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(bundle));
        }
        builder = builder.with_tls_config(tls);
    } else if !endpoint.starts_with("http://") {
        anyhow::bail!("OTEL_EXPORTER_OTLP_ENDPOINT: expected an http:// or https:// url");
    } else if config.certificate.is_some() {
        tracing::warn!("OTEL_EXPORTER_OTLP_CERTIFICATE is ignored for an http:// collector");
    }
    let exporter =
        builder.build().map_err(|error| anyhow::anyhow!("OTEL_EXPORTER_OTLP_ENDPOINT: {error}"))?;
    Ok(CountingExporter { inner: exporter, failing: AtomicBool::new(false) })
}

/// The OTLP exporter, counting and logging batches the collector did not take (one
/// warning per outage, not one per batch). Export runs off the request path, so a
/// failure only loses spans.
#[derive(Debug)]
struct CountingExporter {
    inner: opentelemetry_otlp::SpanExporter,
    failing: AtomicBool,
}

impl SpanExporter for CountingExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("trace export recovered");
                }
            }
            Err(error) => {
                crate::metrics::record_trace_export_failure("export");
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %error, spans, "trace export failed, spans dropped; the service carries on");
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// A minimal subscriber for the verbs that run before configuration is known.
pub fn init_plain() {
    tracing_subscriber::fmt().with_env_filter(EnvFilter::new("info")).try_init().ok();
}

/// Reads W3C trace context from HTTP/2 headers (gRPC metadata).
pub(crate) struct HeaderExtractor<'a>(pub &'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The trace id of a `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`), if well formed.
pub(crate) fn traceparent_trace_id(headers: &http::HeaderMap) -> Option<String> {
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
