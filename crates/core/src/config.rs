//! Typed, layered configuration: built-in defaults → optional TOML file → `MARQUEE__` env.
//!
//! Every service's settings type implements [`Validate`]; [`load`] merges the layers and reports
//! every problem at once so an operator fixes a config in one round instead of one per restart.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Exit status for bad configuration (`EX_CONFIG` from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// A settings type that can check itself after loading.
pub trait Validate {
    /// Pushes one human-readable message per problem onto `errors`.
    fn validate(&self, errors: &mut Vec<String>);
}

/// Everything wrong with a configuration, reported together.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigErrors(pub Vec<String>);

/// Loads `T` from its defaults, then `file` (if any), then environment variables named
/// `MARQUEE__SECTION__KEY` (for example `MARQUEE__SERVER__GRPC_ADDR=0.0.0.0:8001`).
pub fn load<T>(file: Option<&Path>) -> Result<T, ConfigErrors>
where
    T: Default + Serialize + DeserializeOwned + Validate,
{
    load_from(file, std::env::vars())
}

/// As [`load`], with the environment passed in (tests use this instead of mutating the process).
pub fn load_from<T, I>(file: Option<&Path>, env: I) -> Result<T, ConfigErrors>
where
    T: Default + Serialize + DeserializeOwned + Validate,
    I: IntoIterator<Item = (String, String)>,
{
    let defaults = config::Config::try_from(&T::default())
        .map_err(|e| ConfigErrors(vec![format!("built-in defaults do not serialise: {e}")]))?;
    let mut builder = config::Config::builder().add_source(defaults);
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigErrors(vec![format!(
                "config file `{}` does not exist",
                path.display()
            )]));
        }
        builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
    }
    let env: config::Map<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("MARQUEE__"))
        .collect();
    builder = builder.add_source(
        config::Environment::with_prefix("MARQUEE")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("repository.models")
            .source(Some(env)),
    );
    let settings: T = builder
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| ConfigErrors(vec![e.to_string()]))?;
    let mut errors = Vec::new();
    settings.validate(&mut errors);
    if errors.is_empty() {
        Ok(settings)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// The gRPC and admin listeners and the limits every request passes through.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// gRPC listen address. Port 0 picks a free port (tests).
    pub grpc_addr: SocketAddr,
    /// Admin HTTP listen address: `/metrics`, `/healthz`, `/readyz`.
    pub admin_addr: SocketAddr,
    /// Largest accepted request message; larger ones get `RESOURCE_EXHAUSTED` before they are
    /// buffered.
    pub max_message_bytes: usize,
    /// Requests in flight across all connections; past it new calls are shed at once with
    /// `RESOURCE_EXHAUSTED` instead of queueing unboundedly.
    pub max_concurrent_requests: usize,
    /// Open calls (health, reflection, OIP liveness/readiness: no credentials needed at the
    /// gateway) in flight, from a pool of their own: they never take `max_concurrent_requests`
    /// permits, and are not starved by them either.
    pub max_concurrent_open_requests: usize,
    /// How long a request body may take to arrive: a unary request must be complete this long
    /// after its headers, a client stream may not be silent longer. Past it the call ends with
    /// `DEADLINE_EXCEEDED` and frees its permit (slow-loris defence).
    pub body_read_timeout_ms: u64,
    /// HTTP/2 PING interval on idle gRPC connections; a peer that does not answer within 20 s
    /// is disconnected, with everything it held. 0 disables.
    pub http2_keepalive_interval_ms: u64,
    /// Deadline applied when the client sends none, so no call can wait forever.
    pub default_timeout_ms: u64,
    /// Upper bound on any client-supplied deadline.
    pub max_timeout_ms: u64,
    /// After shutdown starts: how long readiness reports NOT_SERVING while still serving, so load
    /// balancers stop routing here before the listener closes.
    pub drain_delay_ms: u64,
    /// After the listener closes: how long in-flight calls get to finish.
    pub shutdown_grace_ms: u64,
    /// Serve gRPC over TLS (and require client certificates with `client_ca_file`: mTLS).
    pub tls: Option<ServerTls>,
    /// Async runtime threads for network work (models run on their own lane threads); 0 means
    /// one per core. Default 1: measured on 2 cores, one thread beats two (gateway CPU per call
    /// 70 vs 89 µs at c=8; vision at c=64 14.1k vs 12.9k calls/s), because the lanes occupy
    /// the cores and cross-thread wake-ups cost more than they give.
    pub worker_threads: usize,
    /// Threads for blocking work such as image decoding; more than the cores only adds memory.
    pub blocking_threads: usize,
}

/// TLS for a gRPC listener. Files are PEM.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// Certificate chain presented to clients.
    pub cert_file: PathBuf,
    /// Its private key.
    pub key_file: PathBuf,
    /// When set, clients must present a certificate signed by this CA (mutual TLS).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

/// Default of `server.max_concurrent_open_requests`: a few dozen probes and reflection
/// streams at once is far more than any orchestrator or tool sends; more is an attack.
pub const DEFAULT_MAX_CONCURRENT_OPEN_REQUESTS: usize = 32;
/// Default of `server.body_read_timeout_ms`: a 16 MiB message (the default
/// `max_message_bytes`) arrives in time at 5 Mbit/s; a stalled client is cut within 30 s
/// instead of holding a permit until the 300 s deadline cap.
pub const DEFAULT_BODY_READ_TIMEOUT_MS: u64 = 30_000;
/// Default of `server.http2_keepalive_interval_ms`: dead peers (and peers stuck mid-frame) are
/// found within a minute, at one small frame a minute per idle connection.
pub const DEFAULT_HTTP2_KEEPALIVE_INTERVAL_MS: u64 = 60_000;

impl ServerSettings {
    /// The defaults, listening on `127.0.0.1:grpc` and `127.0.0.1:admin`: each service has its
    /// own pair, so all of them run side by side on one host without configuration.
    pub fn on_ports(grpc: u16, admin: u16) -> Self {
        Self {
            grpc_addr: std::net::SocketAddr::from(([127, 0, 0, 1], grpc)),
            admin_addr: std::net::SocketAddr::from(([127, 0, 0, 1], admin)),
            ..Self::default()
        }
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            grpc_addr: "127.0.0.1:8001".parse().expect("literal address"),
            admin_addr: "127.0.0.1:9001".parse().expect("literal address"),
            // 16 MiB: a 4K photo as PNG fits; anything larger is not an image we should decode.
            max_message_bytes: 16 << 20,
            // Far above what 2 cores can compute at once; bounds memory under a connection flood.
            max_concurrent_requests: 1024,
            max_concurrent_open_requests: DEFAULT_MAX_CONCURRENT_OPEN_REQUESTS,
            body_read_timeout_ms: DEFAULT_BODY_READ_TIMEOUT_MS,
            http2_keepalive_interval_ms: DEFAULT_HTTP2_KEEPALIVE_INTERVAL_MS,
            default_timeout_ms: 30_000,
            max_timeout_ms: 300_000,
            drain_delay_ms: 0,
            shutdown_grace_ms: 30_000,
            tls: None,
            worker_threads: 1,
            blocking_threads: 4,
        }
    }
}

impl Validate for ServerSettings {
    fn validate(&self, errors: &mut Vec<String>) {
        if self.max_message_bytes < 1024 {
            errors.push(format!(
                "`server.max_message_bytes` must be at least 1024, got {}",
                self.max_message_bytes
            ));
        }
        if self.max_concurrent_requests == 0 {
            errors.push("`server.max_concurrent_requests` must be at least 1, got 0".into());
        }
        if self.max_concurrent_open_requests == 0 {
            errors.push("`server.max_concurrent_open_requests` must be at least 1, got 0".into());
        }
        if self.body_read_timeout_ms == 0 || self.body_read_timeout_ms > self.max_timeout_ms {
            errors.push(format!(
                "`server.body_read_timeout_ms` must be in 1..=`server.max_timeout_ms` ({}), got {}",
                self.max_timeout_ms, self.body_read_timeout_ms
            ));
        }
        if self.default_timeout_ms == 0 || self.default_timeout_ms > self.max_timeout_ms {
            errors.push(format!(
                "`server.default_timeout_ms` must be in 1..=`server.max_timeout_ms` ({}), got {}",
                self.max_timeout_ms, self.default_timeout_ms
            ));
        }
        if let Some(tls) = &self.tls {
            let files = [
                Some(&tls.cert_file),
                Some(&tls.key_file),
                tls.client_ca_file.as_ref(),
            ];
            for f in files.into_iter().flatten() {
                if !f.is_file() {
                    errors.push(format!("`server.tls`: `{}` does not exist", f.display()));
                }
            }
        }
        if self.grpc_addr.port() != 0 && self.grpc_addr == self.admin_addr {
            errors.push(format!(
                "`server.grpc_addr` and `server.admin_addr` must differ, both are {}",
                self.grpc_addr
            ));
        }
    }
}

/// Where models come from and how they are run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RepositorySettings {
    /// The model repository: `<path>/<model>/model.toml` and `<path>/<model>/<version>/model.pt`.
    pub path: PathBuf,
    /// Models to serve; empty serves every model in the repository.
    pub models: Vec<String>,
    /// How often to look for new versions and models (hot reload); 0 disables polling.
    pub poll_interval_ms: u64,
    /// Profile each model at batch sizes 1..=max during warm-up and cap batches at the size with
    /// the best throughput, so batching never makes a model slower than running unbatched.
    /// Default `true`. Only the vision service batches tensor models; the others refuse the key.
    pub profile_batching: Option<bool>,
    /// `false` runs every item alone (batch cap 1): for comparisons, not production. Default
    /// `true`; vision only, like `profile_batching`.
    pub batching: Option<bool>,
    /// `true` lets `POST /batching/{model}/{cap}` on the admin port change a served model's
    /// batch cap at run time (`1`: batching off; `auto`: warm-up's choice), so batching on and
    /// off are compared in one process. Default `false`: the admin port is not authenticated.
    /// Vision only, like `batching`.
    pub batching_control: Option<bool>,
    /// Scheduling niceness (0–19) of the model lanes, so the async runtime's network work is
    /// never queued behind a forward on a busy core: a reply that waits for a core delays the
    /// client's next call and leaves the lanes idle later. Measured on 2 cores (fashion_cnn,
    /// one connection × 32 streams, 4 runs): 0 → 10.3k calls/s, 10 → 12.8k, 19 → 13.3k.
    /// Default 10: most of the gain, while a lane still gets a tenth of a core against a busy
    /// ordinary process. Vision only, like `batching`.
    pub lane_nice: Option<i32>,
    /// Overrides every model's `instance.lanes` (model copies, each on its own OS thread).
    pub lanes: Option<usize>,
    /// Overrides every model's `instance.threads` (libtorch intra-op threads per lane).
    pub threads: Option<usize>,
    /// Overrides every model's `instance.device` (`cpu`, `cuda`, `cuda:N`).
    pub device: Option<String>,
}

impl Default for RepositorySettings {
    fn default() -> Self {
        Self {
            path: PathBuf::from("model-repository"),
            models: Vec::new(),
            poll_interval_ms: 2_000,
            profile_batching: None,
            batching: None,
            batching_control: None,
            lane_nice: None,
            lanes: None,
            threads: None,
            device: None,
        }
    }
}

impl Validate for RepositorySettings {
    fn validate(&self, errors: &mut Vec<String>) {
        if !self.path.is_dir() {
            errors.push(format!(
                "`repository.path` `{}` is not a directory (run `make models`)",
                self.path.display()
            ));
        }
        if self.lanes == Some(0) {
            errors.push("`repository.lanes` must be at least 1, got 0".into());
        }
        if self.threads == Some(0) {
            errors.push("`repository.threads` must be at least 1, got 0".into());
        }
        if let Some(n) = self.lane_nice
            && !(0..=19).contains(&n)
        {
            errors.push(format!(
                "`repository.lane_nice` must be 0 to 19 (a lane may only lower its own priority), got {n}"
            ));
        }
        if let Some(d) = &self.device
            && !is_device_name(d)
        {
            errors.push(format!(
                "`repository.device` must be `cpu`, `cuda` or `cuda:N`, got `{d}`"
            ));
        }
    }
}

impl RepositorySettings {
    /// Whether dynamic batching is on (`repository.batching`, default `true`).
    pub fn batching(&self) -> bool {
        self.batching.unwrap_or(true)
    }

    /// Whether the admin port may change batch caps (`repository.batching_control`).
    pub fn batching_control(&self) -> bool {
        self.batching_control.unwrap_or(false)
    }

    /// Whether warm-up profiles batch sizes (`repository.profile_batching`, default `true`).
    pub fn profile_batching(&self) -> bool {
        self.profile_batching.unwrap_or(true)
    }

    /// The lanes' niceness (`repository.lane_nice`, default [`DEFAULT_LANE_NICE`]).
    pub fn lane_nice(&self) -> i32 {
        self.lane_nice.unwrap_or(DEFAULT_LANE_NICE)
    }

    /// Refuses the keys a service would ignore: an operator who sets `repository.lanes` on a
    /// service that runs one engine per model, or batching keys where nothing is batched,
    /// learns it at start instead of tuning a knob that does nothing.
    pub fn refuse_unused(&self, service: &str, uses: KeysUsed, errors: &mut Vec<String>) {
        if !uses.lanes && self.lanes.is_some_and(|l| l != 1) {
            errors.push(format!(
                "`repository.lanes` is not used by the {service} service (one engine thread per model); remove it"
            ));
        }
        if !uses.batching {
            for (key, set) in [
                ("batching", self.batching.is_some()),
                ("profile_batching", self.profile_batching.is_some()),
                ("batching_control", self.batching_control.is_some()),
                ("lane_nice", self.lane_nice.is_some()),
            ] {
                if set {
                    errors.push(format!(
                        "`repository.{key}` is not used by the {service} service (only vision batches tensor models); remove it"
                    ));
                }
            }
        }
    }
}

/// The checks every model service's settings begin with: the server, the repository (and the
/// per-model keys `service` would ignore) and telemetry.
pub fn validate_model_service(
    service: &str,
    uses: KeysUsed,
    (server, repository, telemetry): (&ServerSettings, &RepositorySettings, &TelemetrySettings),
    errors: &mut Vec<String>,
) {
    server.validate(errors);
    repository.validate(errors);
    repository.refuse_unused(service, uses, errors);
    telemetry.validate(errors);
}

/// Default of `repository.lane_nice` (see there for the measurement).
pub const DEFAULT_LANE_NICE: i32 = 10;

/// Which of the repository's per-model keys a service honours (see
/// [`RepositorySettings::refuse_unused`]).
#[derive(Debug, Clone, Copy)]
pub struct KeysUsed {
    /// `repository.lanes`: model copies on their own threads.
    pub lanes: bool,
    /// `repository.batching` and `repository.profile_batching`.
    pub batching: bool,
}

/// Whether `s` names a device: `cpu`, `cuda` or `cuda:N`.
pub fn is_device_name(s: &str) -> bool {
    s == "cpu"
        || s == "cuda"
        || s.strip_prefix("cuda:")
            .is_some_and(|n| n.parse::<usize>().is_ok())
}

/// Logs and traces.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    /// OTLP/gRPC collector endpoint, e.g. `http://otel-collector:4317`; empty disables tracing export.
    pub otlp_endpoint: String,
    /// `text` for people, `json` for log pipelines.
    pub log_format: String,
    /// `tracing` filter directive, e.g. `info,marquee_core=debug`.
    pub log_filter: String,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            log_format: "text".into(),
            log_filter: "info".into(),
        }
    }
}

impl Validate for TelemetrySettings {
    fn validate(&self, errors: &mut Vec<String>) {
        if !matches!(self.log_format.as_str(), "text" | "json") {
            errors.push(format!(
                "`telemetry.log_format` must be `text` or `json`, got `{}`",
                self.log_format
            ));
        }
        let scheme_ok = ["http://", "https://"]
            .iter()
            .any(|p| self.otlp_endpoint.starts_with(p));
        if !self.otlp_endpoint.is_empty() && !scheme_ok {
            errors.push(format!(
                "`telemetry.otlp_endpoint` must start with http:// or https://, got `{}`",
                self.otlp_endpoint
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(default)]
    struct S {
        server: ServerSettings,
        telemetry: TelemetrySettings,
    }
    impl Validate for S {
        fn validate(&self, e: &mut Vec<String>) {
            self.server.validate(e);
            self.telemetry.validate(e);
        }
    }

    #[test]
    fn env_overrides_defaults_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[server]\ngrpc_addr = \"127.0.0.1:7000\"\nmax_message_bytes = 2048\n",
        )
        .unwrap();
        let env = [(
            "MARQUEE__SERVER__MAX_MESSAGE_BYTES".to_string(),
            "4096".to_string(),
        )];
        let s: S = load_from(Some(&file), env).unwrap();
        assert_eq!(s.server.grpc_addr.port(), 7000, "file beats default");
        assert_eq!(s.server.max_message_bytes, 4096, "env beats file");
        assert_eq!(
            s.server.default_timeout_ms, 30_000,
            "untouched default stays"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let env = [
            (
                "MARQUEE__SERVER__MAX_CONCURRENT_REQUESTS".to_string(),
                "0".to_string(),
            ),
            (
                "MARQUEE__TELEMETRY__LOG_FORMAT".to_string(),
                "xml".to_string(),
            ),
        ];
        let err = load_from::<S, _>(None, env).unwrap_err();
        assert_eq!(err.0.len(), 2, "{err}");
        assert!(err.to_string().contains("`server.max_concurrent_requests`"));
        assert!(err.to_string().contains("got `xml`"));
    }

    #[test]
    fn open_limit_and_body_timeout_are_validated() {
        let env = [
            (
                "MARQUEE__SERVER__MAX_CONCURRENT_OPEN_REQUESTS".to_string(),
                "0".to_string(),
            ),
            (
                "MARQUEE__SERVER__BODY_READ_TIMEOUT_MS".to_string(),
                "400000".to_string(),
            ),
        ];
        let err = load_from::<S, _>(None, env).unwrap_err().to_string();
        assert!(
            err.contains("`server.max_concurrent_open_requests`"),
            "{err}"
        );
        assert!(
            err.contains("`server.body_read_timeout_ms` must be in"),
            "{err}"
        );
        assert!(err.contains("got 400000"), "{err}");
    }

    #[test]
    fn lane_niceness_is_bounded_and_only_where_lanes_are() {
        let repo = tempfile::tempdir().unwrap();
        let mut r = RepositorySettings {
            path: repo.path().to_path_buf(),
            ..Default::default()
        };
        assert_eq!(r.lane_nice(), DEFAULT_LANE_NICE);
        for bad in [-1, 20] {
            r.lane_nice = Some(bad);
            let mut errors = Vec::new();
            r.validate(&mut errors);
            assert!(
                errors.iter().any(|e| e.contains("`repository.lane_nice`")),
                "{bad}: {errors:?}"
            );
        }
        r.lane_nice = Some(19);
        let mut errors = Vec::new();
        r.validate(&mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        r.refuse_unused(
            "language",
            KeysUsed {
                lanes: false,
                batching: false,
            },
            &mut errors,
        );
        assert!(
            errors.iter().any(|e| e.contains("`repository.lane_nice`")),
            "{errors:?}"
        );
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let env = [("MARQUEE__SERVER__GRPC_ADR".to_string(), "x".to_string())];
        let err = load_from::<S, _>(None, env).unwrap_err();
        assert!(err.to_string().contains("grpc_adr"), "{err}");
    }
}
