//! Helpers for the server-stack hardening tests: calls to arbitrary paths, `/metrics` series,
//! a TorchScript model that fails at run time, and raw HTTP/2 requests whose body never ends.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// A small deterministic generator (xorshift64*): the tests need varied paths, not secrecy.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A random gRPC-looking path of 2..=`max_len` bytes: `/` then letters, digits, `.`,
    /// `_`, `-` and `/`.
    pub fn path(&mut self, max_len: usize) -> String {
        const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-/";
        let len = 1 + (self.next_u64() as usize) % (max_len - 1);
        let mut p = String::with_capacity(len + 1);
        p.push('/');
        for _ in 0..len {
            p.push(CHARS[(self.next_u64() as usize) % CHARS.len()] as char);
        }
        p
    }
}

/// Calls `path` with an empty health-check message (and `api_key`, if any); returns the code.
pub async fn call_path(channel: Channel, path: &str, api_key: Option<&str>) -> tonic::Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(e) = grpc.ready().await {
        panic!("channel not ready: {e}");
    }
    let mut req = tonic::Request::new(HealthCheckRequest::default());
    if let Some(k) = api_key {
        req.metadata_mut().insert("x-api-key", k.parse().unwrap());
    }
    let path = http::uri::PathAndQuery::from_maybe_shared(Bytes::from(path.to_owned()))
        .expect("generated paths are valid");
    let codec = tonic_prost::ProstCodec::<HealthCheckRequest, HealthCheckResponse>::default();
    match grpc.unary(req, path, codec).await {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

/// The series of a Prometheus text exposition: every sample line without its value.
pub fn series(metrics_text: &str) -> BTreeSet<String> {
    metrics_text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.rsplit_once(' ').map_or(l, |(s, _)| s).to_string())
        .collect()
}

/// `/metrics` of an admin listener, read over HTTP.
pub async fn scrape(admin: SocketAddr) -> String {
    let (status, body) = crate::http_get(admin, "/metrics").await;
    assert_eq!(status, 200, "/metrics answers");
    body
}

/// The Python of the project's virtual environment (with torch), as `make models` uses.
pub fn python() -> PathBuf {
    std::env::var_os("MARQUEE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                .join(".cache/marquee/venv/bin/python")
        })
}

/// The detail the fault model raises with: none of it may reach a caller.
pub const FAULT_DETAIL: &str = "fault injected: secret detail from /opt/secret/faulty.py";

/// A repository with one model, `faulty`: input `x` of 4 floats, output `logits` of 4 floats.
/// It runs normally (zeros warm it up) but raises a `RuntimeError` with [`FAULT_DETAIL`] at
/// run time when any input value is above 0.5, so a test can provoke a real `INTERNAL`.
pub fn fault_repo() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("faulty");
    std::fs::create_dir_all(model.join("1")).unwrap();
    std::fs::write(
        model.join("model.toml"),
        crate::lifecycle::test_manifest("faulty", &[("logits", 4)], 4, 16),
    )
    .unwrap();
    let script = format!(
        r#"
import sys, torch

class Faulty(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x > 0.5).any()):
            raise RuntimeError("{FAULT_DETAIL}")
        return x * 2.0

torch.jit.script(Faulty()).save(sys.argv[1])
"#
    );
    // TorchScript compiles from source files, not from `python -c`.
    let source = dir.path().join("make_faulty.py");
    std::fs::write(&source, script).unwrap();
    let out = std::process::Command::new(python())
        .arg(&source)
        .arg(model.join("1/model.pt"))
        .output()
        .expect("the venv's python runs (scripts/bootstrap.sh)");
    assert!(
        out.status.success(),
        "building the fault model failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// What became of a request whose body never completed.
#[derive(Debug, PartialEq, Eq)]
pub enum Stalled {
    /// The server answered with this `grpc-status` (and message).
    Status(tonic::Code, String),
    /// The stream was reset or the connection closed without a status.
    Reset(String),
}

/// One HTTP/2 connection to a gRPC listener, with no flow-control or framing help: for
/// requests whose body stops half-way.
pub struct RawH2 {
    send: h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
}

impl RawH2 {
    pub async fn connect(addr: SocketAddr) -> Self {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Self { send, addr }
    }

    /// Opens a call to `path` and sends only the first 3 bytes of the 5-byte message prefix;
    /// the body never ends. Resolves to what the server does about it.
    pub async fn stalled_call(
        &mut self,
        path: &str,
        api_key: Option<&str>,
    ) -> impl std::future::Future<Output = Stalled> + Send + 'static {
        let mut req = http::Request::builder()
            .method("POST")
            .uri(format!("http://{}{path}", self.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(k) = api_key {
            req = req.header("x-api-key", k);
        }
        let req = req.body(()).unwrap();
        let mut send = self.send.clone().ready().await.unwrap();
        let (response, mut body) = send.send_request(req, false).unwrap();
        body.send_data(Bytes::from_static(&[0, 0, 0]), false)
            .unwrap();
        async move {
            // Keep our half of the stream open (and stalled) until the server decides.
            let _body = body;
            let response = match response.await {
                Ok(r) => r,
                Err(e) => return Stalled::Reset(e.to_string()),
            };
            let (parts, mut resp_body) = response.into_parts();
            let from = |h: &http::HeaderMap| {
                h.get("grpc-status")
                    .and_then(|v| v.to_str().ok()?.parse::<i32>().ok())
                    .map(|c| {
                        let msg = h
                            .get("grpc-message")
                            .map(|m| percent_decode(m.as_bytes()))
                            .unwrap_or_default();
                        Stalled::Status(tonic::Code::from_i32(c), msg)
                    })
            };
            if let Some(s) = from(&parts.headers) {
                return s;
            }
            // Not trailers-only: the status is in the trailers after the (empty) body.
            while let Some(chunk) = resp_body.data().await {
                if let Err(e) = chunk {
                    return Stalled::Reset(e.to_string());
                }
            }
            match resp_body.trailers().await {
                Ok(Some(t)) => from(&t).unwrap_or_else(|| Stalled::Reset("no grpc-status".into())),
                Ok(None) => Stalled::Reset("no trailers".into()),
                Err(e) => Stalled::Reset(e.to_string()),
            }
        }
    }
}

fn percent_decode(b: &[u8]) -> String {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
