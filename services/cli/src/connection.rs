//! One lazily connected channel plus what every request carries: the deadline and the API key.

use std::time::Duration;

use marquee_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use marquee_proto::language::text_generation_client::TextGenerationClient;
use marquee_proto::recommendation::recommender_client::RecommenderClient;
use marquee_proto::vision::image_service_client::ImageServiceClient;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_client::HealthClient;

use crate::cli::GlobalArgs;

/// The metadata key the gateway reads the API key from.
pub const API_KEY_HEADER: &str = "x-api-key";

/// Connecting is part of the first call, but a dead address should fail well before a long
/// `--timeout`; five seconds covers a slow DNS lookup and TCP handshake.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Connection {
    channel: Channel,
    timeout: Duration,
    api_key: Option<AsciiMetadataValue>,
}

impl Connection {
    /// Builds the channel without connecting; an unreachable server surfaces as `UNAVAILABLE` on
    /// the first call, like every other gRPC error.
    pub fn new(args: &GlobalArgs) -> Result<Self, String> {
        let api_key = match args.api_key.as_deref() {
            None | Some("") => None,
            // The message must not echo the key.
            Some(key) => Some(api_key_value(key).ok_or(
                "`--api-key` (or MARQUEE_API_KEY) must be printable ASCII without spaces",
            )?),
        };
        let channel = args
            .endpoint
            .clone()
            .connect_timeout(args.timeout.min(MAX_CONNECT_TIMEOUT))
            .connect_lazy();
        Ok(Self {
            channel,
            timeout: args.timeout,
            api_key,
        })
    }

    /// Wraps a message with the deadline and the API key.
    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(self.timeout);
        if let Some(key) = &self.api_key {
            request.metadata_mut().insert(API_KEY_HEADER, key.clone());
        }
        request
    }

    /// Awaits one call and unwraps its response.
    pub async fn call<T>(
        &self,
        call: impl Future<Output = Result<Response<T>, Status>>,
    ) -> Result<T, Status> {
        call.await
            .map(Response::into_inner)
            .map_err(|s| deadline_as_deadline_exceeded(s, self.timeout))
    }

    pub fn vision(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel.clone())
    }

    pub fn inference(&self) -> GrpcInferenceServiceClient<Channel> {
        GrpcInferenceServiceClient::new(self.channel.clone())
    }

    pub fn language(&self) -> TextGenerationClient<Channel> {
        TextGenerationClient::new(self.channel.clone())
    }

    pub fn recommender(&self) -> RecommenderClient<Channel> {
        RecommenderClient::new(self.channel.clone())
    }

    pub fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel.clone())
    }
}

/// The key as a metadata value marked sensitive (kept out of debug output), or `None` when it
/// cannot be sent as a header.
fn api_key_value(key: &str) -> Option<AsciiMetadataValue> {
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    let mut value: AsciiMetadataValue = MetadataValue::try_from(key).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// tonic's channel enforces `grpc-timeout` on this side too, but reports its own expiry as
/// `CANCELLED`; the gRPC spec, the server and every other client say `DEADLINE_EXCEEDED`.
fn deadline_as_deadline_exceeded(status: Status, timeout: Duration) -> Status {
    let mut source = std::error::Error::source(&status);
    while let Some(cause) = source {
        if cause.is::<tonic::TimeoutExpired>() {
            return Status::deadline_exceeded(format!(
                "no response within {}s (--timeout)",
                timeout.as_secs_f64()
            ));
        }
        source = cause.source();
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn connection(extra: &[&str]) -> Result<Connection, String> {
        let mut argv = vec!["marquee", "--endpoint", "http://127.0.0.1:1"];
        argv.extend_from_slice(extra);
        argv.extend_from_slice(&["health"]);
        let cli = crate::cli::Cli::try_parse_from(argv).expect("valid arguments");
        Connection::new(&cli.global)
    }

    #[tokio::test]
    async fn requests_carry_the_key_and_the_deadline() {
        let conn = connection(&["--api-key", "k-123", "--timeout", "7"]).unwrap();
        let request = conn.request(());
        assert_eq!(request.metadata().get(API_KEY_HEADER).unwrap(), "k-123");
        // The deadline travels as the `grpc-timeout` header, in tonic's encoding.
        let timeout = request.metadata().get("grpc-timeout").unwrap();
        assert_eq!(timeout, "7000000u");
    }

    #[test]
    fn the_local_deadline_reads_as_deadline_exceeded() {
        let timeout = Duration::from_millis(1500);
        let expired = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(
            expired.code(),
            tonic::Code::Cancelled,
            "tonic changed its mapping"
        );
        let mapped = deadline_as_deadline_exceeded(expired, timeout);
        assert_eq!(mapped.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(mapped.message(), "no response within 1.5s (--timeout)");
        let other = deadline_as_deadline_exceeded(Status::cancelled("client left"), timeout);
        assert_eq!(other.code(), tonic::Code::Cancelled);
    }

    #[tokio::test]
    async fn no_key_means_no_header() {
        let conn = connection(&["--api-key", ""]).unwrap();
        assert!(conn.request(()).metadata().get(API_KEY_HEADER).is_none());
    }

    #[tokio::test]
    async fn an_unsendable_key_is_refused_without_echoing_it() {
        let err = connection(&["--api-key", "bad key\n"]).err().unwrap();
        assert!(!err.contains("bad key"), "{err}");
    }
}
