//! The fault suite's harness: two vision replicas as child processes behind an in-process
//! gateway, a load generator that records every outcome, and the probes the cases read
//! (replica `/metrics`, `/proc/<pid>/status`, the gateway's own metrics).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use marquee_e2e::*;
use marquee_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use marquee_proto::inference::model_infer_request::InferInputTensor;
use marquee_proto::inference::{ModelInferRequest, ModelInferResponse};
use marquee_proto::vision::image_input::Source;
use marquee_proto::vision::image_service_client::ImageServiceClient;
use marquee_proto::vision::{ClassifyRequest, ImageInput};
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::Channel;

/// The model every case serves: small enough that two replicas start in seconds on 2 cores.
pub const MODEL: &str = "fashion_cnn";
/// The model the poison image is sent to: it resizes the shorter side to 256, the resize that
/// turns a 1 × 16,000,000 image into a 256 × 4,096,000,000 allocation (issue 10, item 2).
/// (`fashion_cnn` resizes to 28: on an unbounded decoder the same image then costs a replica
/// gigabytes and tens of seconds instead of an abort, which is no test for a shared machine.)
pub const POISON_MODEL: &str = "efficientnet_lite0";
/// Fashion-MNIST images the load cycles through (each with its reference answer).
const IMAGES: usize = 8;
/// Each load call's own deadline: generous on 2 busy cores, still bounds a hung call.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// One line of docs/RELIABILITY.md, printed before the case asserts.
pub fn report(case: &str, expected: &str, measured: &str) {
    eprintln!("FAULT-RESULT | {case} | {expected} | {measured}");
}

/// Holds the machine for one case: `cargo test` runs a binary's tests on parallel threads, and
/// two clusters at once on 2 cores would blur each other's measurements (the gateway's memory
/// is this process's). Every case takes this first.
/// (A tokio mutex: it is held across awaits, and a case that panics releases it unpoisoned.)
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    ONE_AT_A_TIME.lock().await
}

pub fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// At most `n` characters of `s`.
pub fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

/// Whether `check` holds within `timeout` ([`poll_until`]: a case reports what it measured
/// before it asserts, so a wait here answers instead of panicking).
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    poll_until(timeout, || {
        let held = check();
        async move { held.await.then_some(()) }
    })
    .await
    .is_some()
}

/// Resident memory of a process in MiB (`VmRSS` of `/proc/<pid>/status`; `"self"` for this
/// test process, which hosts the gateway).
pub fn rss_mib(pid: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

/// `GET path` on an admin port; `None` when nothing answers (a dead replica).
pub async fn try_http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.ok()?;
        buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .ok()
        .flatten()
}

/// Sum of the samples of `name` in a Prometheus text exposition whose labels include every
/// `key="value"` of `labels`.
pub fn sample_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Number of series (sample lines) in a Prometheus text exposition.
pub fn series(text: &str) -> usize {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count()
}

/// The environment of a replica: `fashion_cnn` from `repo`, one lane, one intra-op thread,
/// no batch-size profiling (fast start), repository polling every `poll_ms` (0: off) and a
/// drain delay of `drain_ms` after SIGTERM.
pub fn replica_env(repo: &Path, poll_ms: u64, drain_ms: u64) -> Vec<(&'static str, String)> {
    replica_env_serving(repo, &[MODEL], poll_ms, drain_ms)
}

/// As [`replica_env`], serving `models`.
pub fn replica_env_serving(
    repo: &Path,
    models: &[&str],
    poll_ms: u64,
    drain_ms: u64,
) -> Vec<(&'static str, String)> {
    vec![
        ("MARQUEE__REPOSITORY__PATH", repo.display().to_string()),
        ("MARQUEE__REPOSITORY__MODELS", models.join(",")),
        ("MARQUEE__REPOSITORY__LANES", "1".into()),
        ("MARQUEE__REPOSITORY__THREADS", "1".into()),
        ("MARQUEE__REPOSITORY__PROFILE_BATCHING", "false".into()),
        ("MARQUEE__REPOSITORY__POLL_INTERVAL_MS", poll_ms.to_string()),
        ("MARQUEE__SERVER__DRAIN_DELAY_MS", drain_ms.to_string()),
    ]
}

// === Replica ===

/// A vision replica in its own process.
pub struct Replica {
    pub name: &'static str,
    pub server: ChildServer,
    env: Vec<(&'static str, String)>,
}

impl Replica {
    /// Starts one (blocking until it prints its `listening` line, i.e. is ready).
    pub fn start(name: &'static str, env: Vec<(&'static str, String)>) -> Self {
        let server = ChildServer::start("marquee-vision", &env);
        Self { name, server, env }
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.server.grpc_addr
    }

    pub fn pid(&self) -> u32 {
        self.server.child.id()
    }

    /// `None` while the process runs; its exit status once it has ended.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.server.child.try_wait().ok().flatten()
    }

    pub fn is_alive(&mut self) -> bool {
        self.exit_status().is_none()
    }

    /// How the process ended, for the report: `running`, `exit 0`, `signal 6`.
    pub fn describe(&mut self) -> String {
        use std::os::unix::process::ExitStatusExt;
        match self.exit_status() {
            None => "running".into(),
            Some(s) => match (s.code(), s.signal()) {
                (Some(c), _) => format!("exit {c}"),
                (_, Some(sig)) => format!("killed by signal {sig}"),
                _ => format!("{s:?}"),
            },
        }
    }

    /// SIGKILL: no drain, no goodbye (waits for the process to be reaped).
    pub fn sigkill(&mut self) {
        self.server.kill();
    }

    /// SIGTERM: the replica drains (NOT_SERVING, drain delay, finish in-flight calls) and exits.
    pub fn sigterm(&self) {
        // SAFETY: kill(2) on a child process this test spawned and has not reaped yet.
        let rc = unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0, "SIGTERM delivered to {}", self.name);
    }

    /// Polls until the process has exited, at most `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        poll_until(timeout, || std::future::ready(self.exit_status())).await
    }

    /// Starts the replica again on the port it had: the gateway's backend list is a static
    /// address list (`backends.vision.endpoints`), so a restarted replica must come back at the
    /// same address to be re-admitted (as a pod behind a fixed Service address would).
    pub fn restart_on_same_port(&mut self) {
        let mut env = self.env.clone();
        env.retain(|(k, _)| *k != "MARQUEE__SERVER__GRPC_ADDR");
        env.push(("MARQUEE__SERVER__GRPC_ADDR", self.grpc_addr().to_string()));
        let addr = self.grpc_addr();
        self.server = ChildServer::start("marquee-vision", &env);
        assert_eq!(self.grpc_addr(), addr, "restarted on the same address");
    }

    /// The replica's own `/metrics`, or `None` when it does not answer.
    pub async fn metrics(&self) -> Option<String> {
        try_http_get(self.server.admin_addr, "/metrics").await
    }

    /// Inference calls this process answered OK (Classify, ClassifyBatch, ModelInfer), from
    /// its own counters (a restarted process starts from 0).
    pub async fn served(&self) -> f64 {
        let Some(text) = self.metrics().await else {
            return 0.0;
        };
        [
            "/marquee.vision.v1.ImageService/Classify",
            "/marquee.vision.v1.ImageService/ClassifyBatch",
            "/inference.GRPCInferenceService/ModelInfer",
        ]
        .iter()
        .map(|m| {
            sample_sum(
                &text,
                "marquee_grpc_requests_total",
                &[("code", "OK"), ("method", m)],
            )
        })
        .sum()
    }

    /// Whether this replica reports `version` of the model ready.
    pub async fn serves_version(&self, version: &str) -> bool {
        self.metrics().await.is_some_and(|t| {
            sample_sum(
                &t,
                "marquee_model_ready",
                &[("model", MODEL), ("version", version)],
            ) == 1.0
        })
    }

    pub fn rss_mib(&self) -> f64 {
        rss_mib(&self.pid().to_string())
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc_addr()))
            .unwrap()
            .connect()
            .await
            .expect("replica accepts connections")
    }
}

// === Cluster ===

/// What the load sends and what each call must answer: Fashion-MNIST images as PNG (for
/// `Classify`) and as normalised FP32 rows (for OIP `ModelInfer`), with the logits the model
/// computes for each, measured once, straight from a replica, before any fault.
pub struct Inputs {
    pub pngs: Vec<Vec<u8>>,
    pub rows: Vec<Vec<u8>>,
    pub want: Vec<Vec<f32>>,
}

impl Inputs {
    async fn measure(replica: &Replica) -> Self {
        let (images, _) = fashion_test_set(IMAGES);
        let pngs = images.iter().map(|p| png_gray(p, 28, 28)).collect();
        let rows: Vec<Vec<u8>> = images
            .iter()
            .map(|px| {
                px.iter()
                    .flat_map(|p| ((*p as f32 / 255.0 - 0.286) / 0.353).to_le_bytes())
                    .collect()
            })
            .collect();
        let mut oip = GrpcInferenceServiceClient::new(replica.channel().await);
        let mut want = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            let r = oip
                .model_infer(infer_request(i, row.clone()))
                .await
                .expect("reference call straight to a replica")
                .into_inner();
            want.push(logits(&r));
        }
        Self { pngs, rows, want }
    }
}

/// An OIP `ModelInfer` of one Fashion-MNIST row.
pub fn infer_request(id: usize, raw: Vec<u8>) -> ModelInferRequest {
    ModelInferRequest {
        model_name: MODEL.into(),
        id: format!("req-{id}"),
        inputs: vec![InferInputTensor {
            name: "image".into(),
            datatype: "FP32".into(),
            shape: vec![1, 1, 28, 28],
            ..Default::default()
        }],
        raw_input_contents: vec![raw.into()],
        ..Default::default()
    }
}

/// A `Classify` of one encoded image.
pub fn classify_request(encoded: Vec<u8>) -> ClassifyRequest {
    ClassifyRequest {
        model: MODEL.into(),
        image: Some(ImageInput {
            source: Some(Source::Encoded(encoded.into())),
        }),
        top_k: 1,
    }
}

pub fn logits(r: &ModelInferResponse) -> Vec<f32> {
    r.raw_output_contents
        .first()
        .map(|b| {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
        .unwrap_or_default()
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap_or(u32::MAX)
}

/// The gateway and its two replicas.
pub struct Cluster {
    pub gw: TestGateway,
    pub replicas: Vec<Replica>,
    pub inputs: Arc<Inputs>,
}

impl Cluster {
    /// Starts replicas `a` and `b` (in parallel) with `env`, then a gateway in front of both,
    /// adjusted by `tweak`.
    pub async fn start(
        env: Vec<(&'static str, String)>,
        tweak: impl FnOnce(&mut marquee_gateway::config::Settings),
    ) -> Self {
        let (ea, eb) = (env.clone(), env);
        let a = tokio::task::spawn_blocking(move || Replica::start("a", ea));
        let b = tokio::task::spawn_blocking(move || Replica::start("b", eb));
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        let mut s = gateway_settings(&[a.grpc_addr(), b.grpc_addr()]);
        tweak(&mut s);
        let gw = start_gateway(s).await;
        let inputs = Arc::new(Inputs::measure(&a).await);
        Self {
            gw,
            replicas: vec![a, b],
            inputs,
        }
    }

    /// Replicas the gateway considers healthy now.
    pub fn healthy(&self) -> f64 {
        self.gw.metric("marquee_gateway_endpoints_healthy", &[])
    }

    /// Calls the gateway resent to another replica.
    pub fn retries(&self) -> f64 {
        // `+ 0.0`: an empty float sum is -0.0, which prints as "-0".
        self.gw.metric("marquee_gateway_retries_total", &[]) + 0.0
    }

    /// `n` load targets through the gateway, each its own client connection.
    pub async fn gateway_targets(&self, n: usize) -> Vec<(String, Channel)> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(("gateway".to_string(), self.gw.channel().await));
        }
        out
    }

    /// Waits until every replica has answered at least `n` inference calls.
    pub async fn wait_all_served(&self, n: f64, timeout: Duration) -> bool {
        eventually(timeout, || async {
            for r in &self.replicas {
                if r.served().await < n {
                    return false;
                }
            }
            true
        })
        .await
    }

    /// The steady load every fault case starts from: 6 clients through the gateway for 90 s,
    /// returned once both replicas have served 20 calls of it.
    pub async fn steady_load(&self) -> Load {
        let load = Load::start(
            self.gateway_targets(6).await,
            self.inputs.clone(),
            Duration::from_secs(90),
        );
        assert!(
            self.wait_all_served(20.0, Duration::from_secs(30)).await,
            "both replicas serve the load before the fault"
        );
        load
    }

    pub fn stop(&self) {
        self.gw.shutdown.cancel();
    }
}

// === Load ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    Classify,
    Infer,
}

/// One call of the load and what came back.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// `gateway` or the replica the task calls directly.
    pub target: String,
    pub kind: CallKind,
    pub code: Code,
    pub message: String,
    pub model_version: String,
    /// Whether the answer is the one computed for this caller's own input.
    pub correct: bool,
    pub sent: Instant,
}

/// Client tasks calling `Classify` and `ModelInfer` (alternately, each on its own image) in a
/// loop until stopped, bounded in time and count.
pub struct Load {
    stop: Arc<AtomicBool>,
    completed: Arc<AtomicUsize>,
    handles: Vec<JoinHandle<Vec<Outcome>>>,
}

/// Upper bound on calls per task, whatever happens to the stop signal.
const MAX_CALLS_PER_TASK: usize = 20_000;

impl Load {
    /// One task per target; each stops after `limit` at the latest.
    pub fn start(targets: Vec<(String, Channel)>, inputs: Arc<Inputs>, limit: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let completed = Arc::new(AtomicUsize::new(0));
        let handles = targets
            .into_iter()
            .enumerate()
            .map(|(task, (target, channel))| {
                let (stop, completed, inputs) = (stop.clone(), completed.clone(), inputs.clone());
                tokio::spawn(async move {
                    let mut vision = ImageServiceClient::new(channel.clone());
                    let mut oip = GrpcInferenceServiceClient::new(channel);
                    let started = Instant::now();
                    let mut out = Vec::new();
                    for seq in 0..MAX_CALLS_PER_TASK {
                        if stop.load(Ordering::Relaxed) || started.elapsed() >= limit {
                            break;
                        }
                        let img = (task + seq) % inputs.pngs.len();
                        let kind = if seq % 2 == 0 {
                            CallKind::Classify
                        } else {
                            CallKind::Infer
                        };
                        let sent = Instant::now();
                        let (result, version, correct) = match kind {
                            CallKind::Classify => {
                                let mut req =
                                    with_key(classify_request(inputs.pngs[img].clone()), ACME_KEY);
                                req.set_timeout(CALL_TIMEOUT);
                                match vision.classify(req).await {
                                    Ok(r) => {
                                        let r = r.into_inner();
                                        let ok = r.labels.first().map(|l| l.index)
                                            == Some(argmax(&inputs.want[img]));
                                        (Ok(()), r.model_version, ok)
                                    }
                                    Err(e) => (Err(e), String::new(), false),
                                }
                            }
                            CallKind::Infer => {
                                let id = task * MAX_CALLS_PER_TASK + seq;
                                let mut req =
                                    with_key(infer_request(id, inputs.rows[img].clone()), ACME_KEY);
                                req.set_timeout(CALL_TIMEOUT);
                                match oip.model_infer(req).await {
                                    Ok(r) => {
                                        let r = r.into_inner();
                                        let got = logits(&r);
                                        let ok = r.id == format!("req-{id}")
                                            && got.len() == inputs.want[img].len()
                                            && got
                                                .iter()
                                                .zip(&inputs.want[img])
                                                .all(|(a, b)| (a - b).abs() < 1e-4);
                                        (Ok(()), r.model_version, ok)
                                    }
                                    Err(e) => (Err(e), String::new(), false),
                                }
                            }
                        };
                        let (code, message) = match result {
                            Ok(()) => (Code::Ok, String::new()),
                            Err(e) => (e.code(), e.message().to_string()),
                        };
                        out.push(Outcome {
                            target: target.clone(),
                            kind,
                            code,
                            message,
                            model_version: version,
                            correct,
                            sent,
                        });
                        completed.fetch_add(1, Ordering::Relaxed);
                    }
                    out
                })
            })
            .collect();
        Self {
            stop,
            completed,
            handles,
        }
    }

    pub fn completed(&self) -> usize {
        self.completed.load(Ordering::Relaxed)
    }

    /// Waits until `more` calls beyond `from` have completed, at most `timeout`.
    pub async fn wait_more(&self, from: usize, more: usize, timeout: Duration) -> bool {
        eventually(timeout, || async { self.completed() >= from + more }).await
    }

    /// Stops the tasks and collects every outcome.
    pub async fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for h in self.handles {
            all.extend(h.await.expect("load task does not panic"));
        }
        all
    }
}

/// Counts over a set of outcomes.
pub struct Stats {
    pub calls: usize,
    /// Calls that did not answer OK.
    pub failed: usize,
    /// OK answers that were not this caller's own result.
    pub wrong: usize,
    pub codes: BTreeMap<&'static str, usize>,
    /// The first few failures, for the assertion message.
    pub examples: Vec<String>,
}

impl Stats {
    pub fn of<'a>(outcomes: impl IntoIterator<Item = &'a Outcome>) -> Self {
        let mut s = Stats {
            calls: 0,
            failed: 0,
            wrong: 0,
            codes: BTreeMap::new(),
            examples: Vec::new(),
        };
        for o in outcomes {
            s.calls += 1;
            *s.codes.entry(code_name(o.code)).or_default() += 1;
            if o.code != Code::Ok {
                s.failed += 1;
                if s.examples.len() < 5 {
                    s.examples
                        .push(format!("{:?} {:?}: {}", o.kind, o.code, o.message));
                }
            } else if !o.correct {
                s.wrong += 1;
            }
        }
        s
    }

    /// `OK 1800, UNAVAILABLE 2` style.
    pub fn codes_text(&self) -> String {
        self.codes
            .iter()
            .map(|(c, n)| format!("{c} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The canonical name of a gRPC code (`INVALID_ARGUMENT`).
pub fn code_name(code: Code) -> &'static str {
    marquee_proto::code_name(code)
}
