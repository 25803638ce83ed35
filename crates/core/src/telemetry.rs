//! Logging and tracing set-up: one `init()` per process, returning a guard that flushes spans.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::TelemetrySettings;

/// Flushes and shuts down the trace exporter when dropped.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("trace exporter shutdown failed: {e}");
        }
    }
}

/// The standard OpenTelemetry variable naming the collector; read when
/// `telemetry.otlp_endpoint` is empty, so operators (and the Helm chart) can use the variable
/// every OpenTelemetry SDK understands.
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// The collector spans go to: `telemetry.otlp_endpoint`, else `env_value` (the value of
/// [`OTLP_ENDPOINT_ENV`]), else none. An env value without an `http(s)://` scheme is an error,
/// like the setting.
pub fn otlp_endpoint(
    settings: &TelemetrySettings,
    env_value: Option<String>,
) -> anyhow::Result<Option<String>> {
    if !settings.otlp_endpoint.is_empty() {
        return Ok(Some(settings.otlp_endpoint.clone()));
    }
    match env_value.filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) if v.starts_with("http://") || v.starts_with("https://") => Ok(Some(v)),
        Some(v) => {
            anyhow::bail!("`{OTLP_ENDPOINT_ENV}` must start with http:// or https://, got `{v}`")
        }
    }
}

/// Installs the global subscriber: logs to stderr (text or JSON) and, when a collector is
/// configured ([`otlp_endpoint`]), spans to it over OTLP/gRPC. W3C trace context is the
/// propagation format.
pub fn init(settings: &TelemetrySettings, service: &'static str) -> anyhow::Result<TelemetryGuard> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_new(&settings.log_filter)?;
    let fmt = if settings.log_format == "json" {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed()
    };
    let mut provider = None;
    let endpoint = otlp_endpoint(settings, std::env::var(OTLP_ENDPOINT_ENV).ok())?;
    let otel = if let Some(endpoint) = endpoint {
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()?;
        let p = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(service)
                    .build(),
            )
            .build();
        let tracer = p.tracer(service);
        opentelemetry::global::set_tracer_provider(p.clone());
        provider = Some(p);
        Some(tracing_opentelemetry::layer().with_tracer(tracer))
    } else {
        None
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()?;
    Ok(TelemetryGuard { provider })
}

/// Links `span` to `to` (an OpenTelemetry span link): a batch span serving requests of many
/// traces points at each request span instead of being the child of one of them.
pub fn link(span: &tracing::Span, to: &tracing::Span) {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let cx = to.context().span().span_context().clone();
    if cx.is_valid() {
        span.add_link(cx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_setting(endpoint: &str) -> TelemetrySettings {
        TelemetrySettings {
            otlp_endpoint: endpoint.into(),
            ..TelemetrySettings::default()
        }
    }

    #[test]
    fn the_setting_wins_over_the_standard_variable() {
        let s = with_setting("http://from-config:4317");
        let got = otlp_endpoint(&s, Some("http://from-env:4317".into())).unwrap();
        assert_eq!(got.as_deref(), Some("http://from-config:4317"));
    }

    #[test]
    fn the_standard_variable_is_used_when_the_setting_is_empty() {
        let s = with_setting("");
        let got = otlp_endpoint(&s, Some("http://collector:4317".into())).unwrap();
        assert_eq!(got.as_deref(), Some("http://collector:4317"));
        assert_eq!(otlp_endpoint(&s, None).unwrap(), None, "neither: no export");
        assert_eq!(
            otlp_endpoint(&s, Some(String::new())).unwrap(),
            None,
            "empty variable: no export"
        );
    }

    #[test]
    fn a_variable_without_a_scheme_is_refused_naming_it() {
        let err = otlp_endpoint(&with_setting(""), Some("collector:4317".into())).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("OTEL_EXPORTER_OTLP_ENDPOINT") && msg.contains("collector:4317"),
            "{msg}"
        );
    }
}
