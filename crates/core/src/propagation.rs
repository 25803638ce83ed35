//! W3C trace context (`traceparent`, `tracestate`) across gRPC hops: extracted from a call's
//! headers by the server stack, injected into a client call's metadata by whoever calls on
//! (the gateway calling a backend), so one request is one trace from the edge to the model.
//! The format is the process's global propagator, set by [`crate::telemetry::init`].

use opentelemetry::propagation::{Extractor, Injector};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The trace context a caller sent in `headers` (empty when it sent none or an invalid one).
pub fn extract(headers: &http::HeaderMap) -> opentelemetry::Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)))
}

/// Writes the current span's trace context into an outgoing call's `metadata`, so the callee's
/// server span is a child of it. Call it inside the client span.
pub fn inject(metadata: &mut MetadataMap) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MetadataInjector(metadata))
    });
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // A key or value gRPC metadata cannot carry is dropped: the call goes out untraced
        // rather than not at all.
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn what_a_client_injects_a_server_extracts() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let tracer = SdkTracerProvider::builder().build().tracer("test");
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(tracer));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("grpc.client");
            let _entered = span.enter();
            let sent = span.context().span().span_context().clone();
            assert!(sent.is_valid());

            let mut metadata = MetadataMap::new();
            inject(&mut metadata);
            assert!(metadata.get("traceparent").is_some(), "{metadata:?}");

            let received = extract(&metadata.into_headers());
            let received = received.span().span_context().clone();
            assert_eq!(received.trace_id(), sent.trace_id());
            assert_eq!(received.span_id(), sent.span_id(), "the callee's parent");
        });
    }

    #[test]
    fn no_trace_context_extracts_as_none() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", "garbage".parse().unwrap());
        assert!(!extract(&headers).span().span_context().is_valid());
    }
}
