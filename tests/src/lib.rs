//! Harness for the end-to-end tests: real servers on `127.0.0.1:0` with the real model
//! repository, real gRPC clients over loopback. No fixed ports, no sleeps: servers are used
//! once they report ready, and other conditions are awaited with a bound ([`wait_until`]).

pub mod state;

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use marquee_core::metrics::Metrics;
use marquee_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use marquee_proto::vision::image_service_client::ImageServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub mod hostile;
pub mod jwt;
pub mod lifecycle;
pub mod postgres;
pub mod server;
pub mod torchscript;

/// The model repository built by `make models` (the `model-repository` link at the root).
pub fn model_repo() -> PathBuf {
    std::env::var_os("MARQUEE_MODEL_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../model-repository"))
}

/// A committed test file under `tests/fixtures`.
pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join(name),
    )
    .expect("fixture exists")
}

/// Polls `probe` every 20 ms until it returns `Some`, for at most `limit`; panics naming `what`
/// if it never does. The one wait of the test crate: every test waits for a condition through
/// it, with an explicit bound, never with a loop of its own.
pub async fn wait_until<T, F, Fut>(what: &str, limit: Duration, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    poll_until(limit, probe)
        .await
        .unwrap_or_else(|| panic!("timed out after {limit:?} waiting for {what}"))
}

/// [`wait_until`] without the panic: `None` once `limit` has passed. For the fault suite,
/// which reports what it measured before it asserts.
pub async fn poll_until<T, F, Fut>(limit: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return Some(v);
        }
        if Instant::now() >= until {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Settings for a test server: ephemeral ports, one intra-op thread per lane (tests run in
/// parallel on 2 cores), no repository polling unless a test asks for it.
pub fn settings(repo: &Path) -> marquee_vision::Settings {
    let mut s = marquee_vision::Settings::default();
    s.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    s.server.admin_addr = "127.0.0.1:0".parse().unwrap();
    s.repository.path = repo.to_path_buf();
    s.repository.threads = Some(1);
    s.repository.poll_interval_ms = 0;
    s
}

/// A running in-process server.
#[derive(Clone)]
pub struct TestServer {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics: Metrics,
    pub shutdown: CancellationToken,
}

impl TestServer {
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .expect("server accepts connections")
    }

    pub async fn vision(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel().await).max_decoding_message_size(64 << 20)
    }

    pub async fn oip(&self) -> GrpcInferenceServiceClient<Channel> {
        GrpcInferenceServiceClient::new(self.channel().await)
    }

    /// A metric's value summed over label sets whose labels include every `(name, value)`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics, name, labels)
    }
}

/// Sums the samples of `name` (counter or gauge) matching `labels`.
pub fn metric_value(metrics: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        // A sample is either a counter or a gauge; the other reads as 0.
        .map(|m| m.get_counter().get_value() + m.get_gauge().get_value())
        .sum()
}

/// Starts a server on the current runtime and returns once it is ready.
pub async fn start(settings: marquee_vision::Settings) -> TestServer {
    let shutdown = CancellationToken::new();
    let running = marquee_vision::start(settings, shutdown.clone())
        .await
        .expect("server starts");
    TestServer {
        grpc_addr: running.grpc_addr,
        admin_addr: running.admin_addr,
        metrics: running.metrics,
        shutdown,
    }
}

/// Runs `start` on a runtime of its own, on its own thread, and keeps that server running for
/// the rest of the test binary: a shared server must outlive each test's runtime.
pub fn on_own_runtime<F, Fut>(start: F) -> TestServer
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = TestServer>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let server = start().await;
            let done = server.shutdown.clone();
            tx.send(server).unwrap();
            done.cancelled().await;
        });
    });
    rx.recv().expect("shared server starts")
}

/// One vision server per test binary.
pub fn shared() -> &'static TestServer {
    static SHARED: OnceLock<TestServer> = OnceLock::new();
    SHARED.get_or_init(|| on_own_runtime(|| start(settings(&model_repo()))))
}

/// Fashion-MNIST test images (28×28, u8) and labels from Debian's `dataset-fashion-mnist`.
pub fn fashion_test_set(n: usize) -> (Vec<Vec<u8>>, Vec<u8>) {
    let dir = Path::new("/usr/share/datasets/fashion-mnist");
    let read = |name: &str| {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(
            std::fs::File::open(dir.join(name)).expect("dataset-fashion-mnist is installed"),
        )
        .read_to_end(&mut out)
        .unwrap();
        out
    };
    let images = read("t10k-images-idx3-ubyte.gz");
    let labels = read("t10k-labels-idx1-ubyte.gz");
    let imgs = (0..n)
        .map(|i| images[16 + i * 784..16 + (i + 1) * 784].to_vec())
        .collect();
    (imgs, labels[8..8 + n].to_vec())
}

/// Encodes a grayscale image as PNG.
pub fn png_gray(pixels: &[u8], w: u32, h: u32) -> Vec<u8> {
    let img = image::GrayImage::from_raw(w, h, pixels.to_vec()).expect("pixel count matches");
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// Plain HTTP GET against the admin port: `(status, body)`.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path).await
}

/// Plain HTTP POST without a body against the admin port: `(status, body)`.
pub async fn http_post(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "POST", path).await
}

async fn http_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let status = buf[9..12].parse().unwrap();
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Copies one model directory (with all versions) into a fresh temporary repository.
pub fn temp_repo(models: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for m in models {
        copy_dir(&model_repo().join(m), &dir.path().join(m));
    }
    dir
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

// === the gateway ===

/// Test API keys (configured below by their SHA-256 only).
pub const ACME_KEY: &str = "acme-test-key-5c1f0e";
pub const GLOBEX_KEY: &str = "globex-test-key-9ab2d4";
pub const NOISY_KEY: &str = "noisy-test-key-77e0aa";
pub const QUIET_KEY: &str = "quiet-test-key-31c9b8";
pub const LIMITED_KEY: &str = "limited-test-key-0d4e21";

/// A gateway backend of kind `recommendation` with one replica at `addr`, health-checked every
/// 100 ms.
pub fn recommendation_backend(addr: SocketAddr) -> marquee_gateway::config::Backend {
    use marquee_gateway::config::{Backend, BackendKind};
    Backend {
        kind: BackendKind::Recommendation,
        endpoints: vec![addr.to_string()],
        health_interval_ms: 100,
        ..Backend::default()
    }
}

/// Gateway settings in front of the recommender `replicas` only, for the API-key tenants `keys`
/// (`(key, tenant)`, each with `recommendation:read` and `:write`), forwarding each caller's
/// tenant with the shared token in `token_file`.
pub fn tenant_gateway_settings(
    replicas: &[SocketAddr],
    token_file: &Path,
    keys: &[(&str, &str)],
) -> marquee_gateway::config::Settings {
    use marquee_gateway::config::{ApiKey, Backend, Tenant};
    let mut s = gateway_settings(&[]);
    s.backends.clear();
    s.backends.insert(
        "recommendation".into(),
        Backend {
            tenant_token_file: Some(token_file.to_path_buf()),
            endpoints: replicas.iter().map(|a| a.to_string()).collect(),
            ..recommendation_backend(replicas[0])
        },
    );
    for &(key, tenant) in keys {
        s.tenants.insert(tenant.into(), Tenant::default());
        s.auth.api_keys.push(ApiKey {
            sha256: marquee_gateway::auth::hash_key(key),
            tenant: tenant.into(),
            scopes: vec!["recommendation:read".into(), "recommendation:write".into()],
        });
    }
    s
}

/// Gateway settings in front of `backends` (vision replicas): ephemeral ports; tenants `acme`
/// (vision), `globex` (recommendation only), `noisy` and `quiet` (vision), `limited` (2 calls/s).
pub fn gateway_settings(backends: &[SocketAddr]) -> marquee_gateway::config::Settings {
    use marquee_gateway::config::{ApiKey, Backend, BackendKind, Settings, Tenant};
    let mut s = Settings::default();
    s.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    s.server.admin_addr = "127.0.0.1:0".parse().unwrap();
    s.backends.clear();
    s.backends.insert(
        "vision".into(),
        Backend {
            kind: BackendKind::Vision,
            endpoints: backends.iter().map(|a| a.to_string()).collect(),
            health_interval_ms: 100,
            models_refresh_ms: 500,
            ..Backend::default()
        },
    );
    for t in ["acme", "globex", "noisy", "quiet"] {
        s.tenants.insert(t.into(), Tenant::default());
    }
    s.tenants.insert(
        "limited".into(),
        Tenant {
            rate_per_s: 2.0,
            burst: 2.0,
            ..Tenant::default()
        },
    );
    let key = |k: &str, tenant: &str, scopes: &[&str]| ApiKey {
        sha256: marquee_gateway::auth::hash_key(k),
        tenant: tenant.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
    };
    s.auth.api_keys = vec![
        key(ACME_KEY, "acme", &["vision:infer"]),
        key(GLOBEX_KEY, "globex", &["recommendation:read"]),
        key(NOISY_KEY, "noisy", &["vision:infer"]),
        key(QUIET_KEY, "quiet", &["vision:infer"]),
        key(LIMITED_KEY, "limited", &["vision:infer"]),
    ];
    s
}

/// A running in-process gateway.
pub struct TestGateway {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics: Metrics,
    pub gateway: std::sync::Arc<marquee_gateway::Gateway>,
    pub shutdown: CancellationToken,
}

impl TestGateway {
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc_addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn vision(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel().await)
    }

    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics, name, labels)
    }
}

/// Starts a gateway on the current runtime; returns once it knows its backends' models.
pub async fn start_gateway(settings: marquee_gateway::config::Settings) -> TestGateway {
    let shutdown = CancellationToken::new();
    let running = marquee_gateway::start(settings, shutdown.clone())
        .await
        .expect("gateway starts");
    TestGateway {
        grpc_addr: running.grpc_addr,
        admin_addr: running.admin_addr,
        metrics: running.metrics,
        gateway: running.gateway,
        shutdown,
    }
}

/// A request carrying an API key.
pub fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert("x-api-key", key.parse().unwrap());
    r
}

/// A request carrying a bearer token.
pub fn with_bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// Settings for a vision backend that serves only `fashion_cnn` with one lane (fast to start).
pub fn fashion_backend_settings() -> marquee_vision::Settings {
    let mut s = settings(&model_repo());
    s.repository.models = vec!["fashion_cnn".into()];
    s.repository.lanes = Some(1);
    s
}

/// The path of a workspace binary built by `cargo build --bins`.
pub fn workspace_binary(name: &str) -> PathBuf {
    let dir = std::env::var_os("MARQUEE_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::current_exe()
                .unwrap()
                .parent()
                .unwrap()
                .parent()
                .unwrap()
                .to_path_buf()
        });
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} missing: run `cargo build --bins` first",
        bin.display()
    );
    bin
}

/// A service binary started as a child process on ephemeral ports.
pub struct ChildServer {
    pub child: std::process::Child,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

impl ChildServer {
    /// Starts `bin` with `env` and reads its `listening grpc=… admin=…` line.
    pub fn start(bin: &str, env: &[(&str, String)]) -> Self {
        let mut cmd = std::process::Command::new(workspace_binary(bin));
        cmd.env("MARQUEE__SERVER__GRPC_ADDR", "127.0.0.1:0")
            .env("MARQUEE__SERVER__ADMIN_ADDR", "127.0.0.1:0")
            .stdout(std::process::Stdio::piped())
            // `MARQUEE_TEST_CHILD_LOGS=1` shows the child's logs when a test needs debugging.
            .stderr(if std::env::var_os("MARQUEE_TEST_CHILD_LOGS").is_some() {
                std::process::Stdio::inherit()
            } else {
                std::process::Stdio::null()
            });
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn(cmd)
    }

    /// Spawns `cmd` (a service binary with stdout piped) and reads its
    /// `listening grpc=… admin=…` line.
    pub fn spawn(mut cmd: std::process::Command) -> Self {
        use std::io::BufRead;
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let field = |name: &str| -> SocketAddr {
            line.split(&format!("{name}="))
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .unwrap_or_else(|| panic!("no {name} in {line:?}"))
                .parse()
                .unwrap()
        };
        Self {
            grpc_addr: field("grpc"),
            admin_addr: field("admin"),
            child,
        }
    }

    /// SIGKILL: no drain, no goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Settings for a test language server: ephemeral ports, one intra-op thread.
pub fn language_settings() -> marquee_language::Settings {
    let mut s = marquee_language::Settings::default();
    s.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    s.server.admin_addr = "127.0.0.1:0".parse().unwrap();
    s.repository.path = model_repo();
    s.repository.threads = Some(1);
    s.repository.poll_interval_ms = 0;
    // The repository also holds `textgenrnn`; requests without a model name mean this one.
    s.language.default_model = "gpt_reviews".into();
    s
}

/// Starts a language server on the current runtime and returns once it is ready.
pub async fn start_language(settings: marquee_language::Settings) -> TestServer {
    let shutdown = CancellationToken::new();
    let running = marquee_language::start(settings, shutdown.clone())
        .await
        .expect("language server starts");
    TestServer {
        grpc_addr: running.grpc_addr,
        admin_addr: running.admin_addr,
        metrics: running.metrics,
        shutdown,
    }
}

/// One language server per test binary.
pub fn shared_language() -> &'static TestServer {
    static SHARED: OnceLock<TestServer> = OnceLock::new();
    SHARED.get_or_init(|| on_own_runtime(|| start_language(language_settings())))
}

// === the recommender ===

/// Settings for a test recommender: ephemeral ports, one intra-op thread, feedback log and
/// user-id key under `state_dir`.
pub fn recommendation_settings(state_dir: &Path) -> marquee_recommendation::Settings {
    let mut s = marquee_recommendation::Settings::default();
    s.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    s.server.admin_addr = "127.0.0.1:0".parse().unwrap();
    s.repository.path = model_repo();
    s.repository.threads = Some(1);
    s.repository.poll_interval_ms = 0;
    s.recommendation.state_dir = state_dir.to_path_buf();
    s
}

/// A running in-process recommender.
pub struct TestRecommender {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics: Metrics,
    /// The recommender's repository (tests read the serving version's engine through it).
    pub repo: std::sync::Arc<
        marquee_core::repository::Repository<marquee_recommendation::family::RecFamily>,
    >,
    pub shutdown: CancellationToken,
}

impl TestRecommender {
    pub async fn client(
        &self,
    ) -> marquee_proto::recommendation::recommender_client::RecommenderClient<Channel> {
        let ch = Channel::from_shared(format!("http://{}", self.grpc_addr))
            .unwrap()
            .connect()
            .await
            .expect("recommender accepts connections");
        marquee_proto::recommendation::recommender_client::RecommenderClient::new(ch)
    }

    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics, name, labels)
    }
}

/// `Recommend` for `user_id`, k = 10, with explanations.
pub fn explained(user_id: i64) -> marquee_proto::recommendation::RecommendRequest {
    marquee_proto::recommendation::RecommendRequest {
        subject: Some(marquee_proto::recommendation::recommend_request::Subject::UserId(user_id)),
        k: 10,
        explain: true,
        ..Default::default()
    }
}

/// Every history item any explanation names.
pub fn history_named(r: &marquee_proto::recommendation::RecommendResponse) -> Vec<i64> {
    r.items
        .iter()
        .filter_map(|i| i.explanation.as_ref())
        .flat_map(|e| e.because_of.iter().map(|h| h.item_id))
        .collect()
}

/// A call to a recommender directly, naming `tenant` in `x-marquee-tenant` as the gateway does,
/// with `token` (the gateway's `x-marquee-tenant-token`) when given.
pub fn with_tenant<T>(message: T, tenant: &str, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("x-marquee-tenant", tenant.parse().unwrap());
    if let Some(t) = token {
        r.metadata_mut()
            .insert("x-marquee-tenant-token", t.parse().unwrap());
    }
    r
}

/// Starts a recommender on the current runtime; returns once it is ready.
pub async fn start_recommendation(settings: marquee_recommendation::Settings) -> TestRecommender {
    start_recommendation_with_parts(settings, Vec::new()).await
}

/// As [`start_recommendation`], serving models given in memory (a synthetic catalogue) in
/// the order they load; none: the repository's.
pub async fn start_recommendation_with_parts(
    settings: marquee_recommendation::Settings,
    parts: Vec<marquee_recommendation::family::Preloaded>,
) -> TestRecommender {
    let shutdown = CancellationToken::new();
    let running = marquee_recommendation::start_with_parts(settings, parts, shutdown.clone())
        .await
        .expect("recommender starts");
    TestRecommender {
        grpc_addr: running.grpc_addr,
        admin_addr: running.admin_addr,
        metrics: running.metrics,
        repo: running.repo,
        shutdown,
    }
}
