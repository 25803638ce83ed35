//! `marquee-bench h2load`: the vision service from an external HTTP/2 client, `h2load` (Debian's
//! `nghttp2-client`), the way a gRPC client with one channel (`tritonclient`) calls: one
//! connection with N streams in flight, and N connections of one stream. OIP `ModelInfer` with
//! raw FP32 input; the raw tch ceiling is measured in the same run, so every figure is also a
//! share of it. Replaces its section of `--out`.
//!
//! h2load counts HTTP statuses, and a gRPC error is an HTTP 200 with a `grpc-status` trailer:
//! every call is checked against the server's own `marquee_grpc_requests_total{code="OK"}`.

use std::path::Path;
use std::process::{Command, Stdio};

use clap::Args;
use marquee_proto::inference::ModelInferRequest;
use marquee_proto::inference::model_infer_request::InferInputTensor;

use crate::report::Server;
use crate::{children_cpu_seconds, median, proc_cpu_seconds};

pub const SECTION: &str = "## Vision from an external HTTP/2 client (`marquee-bench h2load`)";

#[derive(Args)]
pub struct H2loadArgs {
    #[command(flatten)]
    pub report: crate::Report,
    /// Calls per measurement (per concurrency 1: a quarter).
    #[arg(long, default_value_t = 20_000)]
    pub calls: usize,
}

/// One h2load run's figures.
#[derive(Debug, Clone, Copy, Default)]
pub struct H2Figures {
    pub calls_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Cores the server used during the run.
    pub server_cores: f64,
    /// Server CPU per call, in µs, by thread: the model lanes (`lane-*`), the async runtime
    /// (`tokio-*`: HTTP/2, protobuf, hand-off, encode) and the rest.
    pub lanes_us: f64,
    pub runtime_us: f64,
    pub other_us: f64,
    /// h2load's own CPU per call, in µs (it shares the cores).
    pub client_us: f64,
    /// Cores used by the server and h2load together: 2.0 means the machine was saturated.
    pub busy_cores: f64,
}

/// CPU seconds so far of `pid`'s threads, by kind: lanes, async runtime, other.
pub fn thread_cpu_seconds(pid: u32) -> [f64; 3] {
    let mut by_kind = [0.0; 3];
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_kind;
    };
    for t in tasks.flatten() {
        let path = t.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let kind = if comm.starts_with("lane-") {
            0
        } else if comm.starts_with("tokio-") {
            1
        } else {
            2
        };
        by_kind[kind] += crate::stat_cpu_seconds(&path.join("stat"));
    }
    by_kind
}

/// A gRPC message framed for HTTP/2: flag byte, big-endian length, the protobuf.
pub fn grpc_frame(msg: &impl prost::Message) -> Vec<u8> {
    let body = msg.encode_to_vec();
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(0);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// The deterministic input values every call sends: `i % 251 / 251`, in [0, 1) like pixels.
pub fn ramp(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i % 251) as f32 / 251.0).collect()
}

/// One OIP call of `model` with a raw FP32 input of `dims` (batch 1), deterministic values.
pub(crate) fn infer_body(model: &str, input: &str, dims: &[i64]) -> Vec<u8> {
    let n: i64 = dims.iter().product();
    let data: Vec<u8> = ramp(n as usize)
        .into_iter()
        .flat_map(f32::to_le_bytes)
        .collect();
    let shape: Vec<i64> = std::iter::once(1).chain(dims.iter().copied()).collect();
    grpc_frame(&ModelInferRequest {
        model_name: model.into(),
        inputs: vec![InferInputTensor {
            name: input.into(),
            datatype: "FP32".into(),
            shape,
            ..Default::default()
        }],
        raw_input_contents: vec![data.into()],
        ..Default::default()
    })
}

/// Parses h2load's `--log-file` (tab-separated: start µs, status, µs to the end of the
/// response) into sorted latencies in ms.
pub fn latencies_ms(log: &str) -> Vec<f64> {
    let mut v: Vec<f64> = log
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse::<f64>().ok())
        .map(|us| us / 1e3)
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

/// The value at quantile `q` of sorted `v`.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Parses the `finished in …, X req/s` line of h2load's summary.
pub fn calls_per_s(summary: &str) -> Option<f64> {
    let line = summary.lines().find(|l| l.starts_with("finished in"))?;
    line.split(", ")
        .find(|p| p.ends_with(" req/s"))?
        .trim_end_matches(" req/s")
        .parse()
        .ok()
}

fn ok_calls(server: &Server) -> anyhow::Result<f64> {
    let text = crate::admin_http(&server.admin, "GET", "/metrics")?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("marquee_grpc_requests_total{") && l.contains("code=\"OK\""))
        .filter(|l| l.contains("ModelInfer"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Sets `model`'s batch cap in the running server (`repository.batching_control`).
fn set_cap(server: &Server, model: &str, cap: &str) -> anyhow::Result<()> {
    let reply = crate::admin_http(&server.admin, "POST", &format!("/batching/{model}/{cap}"))?;
    anyhow::ensure!(
        reply.split_whitespace().nth(1) == Some("200"),
        "cannot set the batch cap: {reply}"
    );
    Ok(())
}

/// One h2load measurement: `calls` calls of `body`, `connections` × `streams` in flight,
/// `headers` extra.
pub(crate) struct Load<'a> {
    pub body: &'a Path,
    pub calls: usize,
    pub connections: usize,
    pub streams: usize,
    pub headers: &'a [String],
}

impl<'a> Load<'a> {
    pub fn new(body: &'a Path, calls: usize, connections: usize, streams: usize) -> Self {
        Self {
            body,
            calls,
            connections,
            streams,
            headers: &[],
        }
    }
}

/// One h2load run against `server`; `behind` is the process behind a gateway, whose CPU counts
/// in the cores busy.
fn run_once(server: &Server, behind: Option<u32>, load: &Load) -> anyhow::Result<H2Figures> {
    let log = tempfile::NamedTempFile::new()?;
    let url = format!(
        "http://{}/inference.GRPCInferenceService/ModelInfer",
        server.addr
    );
    let pid = server.child.id();
    let calls = load.calls;
    let before = proc_cpu_seconds(pid);
    let threads_before = thread_cpu_seconds(pid);
    let behind_cpu = || behind.map(proc_cpu_seconds).unwrap_or(0.0);
    let behind_before = behind_cpu();
    let client_before = children_cpu_seconds();
    let started = std::time::Instant::now();
    let mut cmd = Command::new("h2load");
    cmd.args(["-n", &calls.to_string()])
        .args(["-c", &load.connections.to_string()])
        .args(["-m", &load.streams.to_string()])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg("-d")
        .arg(load.body)
        .arg("--log-file")
        .arg(log.path());
    for h in load.headers {
        cmd.args(["-H", h]);
    }
    let out = cmd
        .arg(&url)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| {
            anyhow::anyhow!("cannot run h2load ({e}); it is Debian's `nghttp2-client` (make setup)")
        })?;
    let wall = started.elapsed().as_secs_f64();
    let cpu = proc_cpu_seconds(pid) - before;
    let threads = thread_cpu_seconds(pid);
    let client = children_cpu_seconds() - client_before;
    let behind = behind_cpu() - behind_before;
    let per_call = |i: usize| (threads[i] - threads_before[i]) * 1e6 / calls as f64;
    let summary = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(out.status.success(), "h2load failed: {summary}");
    anyhow::ensure!(
        summary.contains(&format!("{calls} succeeded, 0 failed")),
        "h2load: not every call succeeded: {summary}"
    );
    let lat = latencies_ms(&std::fs::read_to_string(log.path())?);
    Ok(H2Figures {
        calls_per_s: calls_per_s(&summary)
            .ok_or_else(|| anyhow::anyhow!("no rate in h2load's output: {summary}"))?,
        p50_ms: quantile(&lat, 0.5),
        p99_ms: quantile(&lat, 0.99),
        server_cores: cpu / wall,
        lanes_us: per_call(0),
        runtime_us: per_call(1),
        other_us: per_call(2),
        client_us: client * 1e6 / calls as f64,
        busy_cores: (cpu + client + behind) / wall,
    })
}

/// The median over `runs` of each figure, every call checked `OK` by the server h2load calls
/// (the gateway counts its callers' calls; behind it, batching merges them).
pub(crate) fn measure(
    runs: usize,
    server: &Server,
    behind: Option<&Server>,
    load: &Load,
) -> anyhow::Result<H2Figures> {
    let mut all = Vec::new();
    for _ in 0..runs {
        let before = ok_calls(server)?;
        all.push(run_once(server, behind.map(|b| b.child.id()), load)?);
        let ok = ok_calls(server)? - before;
        anyhow::ensure!(
            ok >= load.calls as f64,
            "only {ok} of {} calls were answered with gRPC status OK",
            load.calls
        );
    }
    let m = |f: fn(&H2Figures) -> f64| median(all.iter().map(f).collect());
    Ok(H2Figures {
        calls_per_s: m(|r| r.calls_per_s),
        p50_ms: m(|r| r.p50_ms),
        p99_ms: m(|r| r.p99_ms),
        server_cores: m(|r| r.server_cores),
        lanes_us: m(|r| r.lanes_us),
        runtime_us: m(|r| r.runtime_us),
        other_us: m(|r| r.other_us),
        client_us: m(|r| r.client_us),
        busy_cores: m(|r| r.busy_cores),
    })
}

/// The rows of the report: label, figures, and the ceiling they are a share of.
pub struct Row {
    pub label: String,
    pub f: H2Figures,
    pub ceiling: f64,
}

pub fn section(a: &H2loadArgs, bin_dir: &Path) -> anyhow::Result<String> {
    let scratch = tempfile::tempdir()?;
    let mut rows = Vec::new();
    let mut ceilings = Vec::new();
    let mut forwards = Vec::new();
    for (model, input, dims, streams, raw_batch) in [
        (
            "fashion_cnn",
            "image",
            vec![1i64, 28, 28],
            vec![1usize, 32],
            32usize,
        ),
        (
            "efficientnet_lite0",
            "image",
            vec![3, 224, 224],
            vec![1, 8],
            1,
        ),
    ] {
        let ceiling =
            crate::report::raw_ceiling(&a.report.repo, model, raw_batch, a.report.runs, "randn")?;
        // The model's speed depends on its input's values: the ceiling on the very input
        // h2load sends, for the same rows read against it.
        let served =
            crate::report::raw_ceiling(&a.report.repo, model, raw_batch, a.report.runs, "ramp")?;
        // What one call alone cannot beat: one forward at batch 1 on the served input, one
        // lane (nothing else runs at c=1).
        let (_, forward1) =
            crate::report::raw_figures(&a.report.repo, model, 1, 1, a.report.runs, "ramp")?;
        ceilings.push((model, raw_batch, ceiling, served));
        forwards.push((model, forward1));
        let body = scratch.path().join(format!("{model}.bin"));
        std::fs::write(&body, infer_body(model, input, &dims))?;
        let spawn = |env: &[(&str, &str)]| {
            let mut cmd = Command::new(bin_dir.join("marquee-vision"));
            cmd.env("MARQUEE__REPOSITORY__PATH", &a.report.repo)
                .env("MARQUEE__REPOSITORY__MODELS", model)
                .env("MARQUEE__REPOSITORY__POLL_INTERVAL_MS", "0")
                // Batching off and on again in this same process (`POST /batching/...`).
                .env("MARQUEE__REPOSITORY__BATCHING_CONTROL", "true")
                .envs(env.iter().copied());
            Server::spawn(cmd)
        };
        let server = spawn(&[])?;
        let calls = if model == "fashion_cnn" {
            a.calls
        } else {
            a.calls / 50
        };
        for &s in &streams {
            eprintln!("== h2load {model}: 1 connection x {s} streams");
            let n = if s == 1 { calls / 4 } else { calls };
            let f = measure(a.report.runs, &server, None, &Load::new(&body, n, 1, s))?;
            let plural = if s == 1 { "" } else { "s" };
            rows.push(Row {
                label: format!("`{model}`, direct, 1 connection × {s} stream{plural}"),
                f,
                ceiling,
            });
            set_cap(&server, model, "1")?;
            let off = measure(a.report.runs, &server, None, &Load::new(&body, n, 1, s));
            set_cap(&server, model, "auto")?;
            rows.push(Row {
                label: format!(
                    "`{model}`, direct, 1 connection × {s} stream{plural}, batching off (same process)"
                ),
                f: off?,
                ceiling,
            });
            if s > 1 {
                eprintln!("== h2load {model}: {s} connections x 1 stream");
                let f = measure(a.report.runs, &server, None, &Load::new(&body, n, s, 1))?;
                rows.push(Row {
                    label: format!("`{model}`, direct, {s} connections × 1 stream"),
                    f,
                    ceiling,
                });
            }
        }
        if model == "fashion_cnn" {
            let cfg = crate::report::bench_gateway_config(scratch.path(), &server.addr)?;
            let gw = Server::start_gateway(bin_dir, &cfg)?;
            let key = vec![format!("x-api-key: {}", crate::report::BENCH_KEY)];
            eprintln!("== h2load {model}: gateway, 1 connection x 32 streams");
            let f = measure(
                a.report.runs,
                &gw,
                Some(&server),
                &Load {
                    headers: &key,
                    ..Load::new(&body, calls, 1, 32)
                },
            )?;
            rows.push(Row {
                label: format!("`{model}`, through the gateway, 1 connection × 32 streams"),
                f,
                ceiling,
            });
            drop(gw);
            drop(server);
            // Before: lanes at the network's priority (`repository.lane_nice = 0`), where a
            // reply waits for a core held by a forward.
            let before = spawn(&[("MARQUEE__REPOSITORY__LANE_NICE", "0")])?;
            eprintln!("== h2load {model}: lanes at nice 0, 1 connection x 32 streams");
            let f = measure(
                a.report.runs,
                &before,
                None,
                &Load::new(&body, calls, 1, 32),
            )?;
            rows.push(Row {
                label: format!(
                    "`{model}`, direct, 1 connection × 32 streams, lanes at nice 0 (before `lane_nice`)"
                ),
                f,
                ceiling,
            });
        }
    }
    Ok(markdown(&rows, &ceilings, &forwards, a.report.runs))
}

pub fn markdown(
    rows: &[Row],
    ceilings: &[(&str, usize, f64, f64)],
    forwards: &[(&str, f64)],
    runs: usize,
) -> String {
    let mut md = format!(
        "{SECTION}\n\n`h2load` (nghttp2) against `marquee-vision` (and the gateway in front of it), \
         OIP `ModelInfer` with raw FP32 input, batching on (the models' own settings); the raw \
         ceiling is `marquee-bench raw` with 2 lanes × 1 thread in the same run. \"Batching off\" rows \
         are the same server process with its batch cap set to 1 at run time \
         (`repository.batching_control`), then back to warm-up's choice. h2load shares the \
         2 cores with the server. Median of {runs} runs; every call checked `OK` against the \
         server's own count.\n\n\
         | client | calls/s | share of the raw ceiling | p50 / p99 (ms) | cores of the process called | its CPU µs per call: lanes + runtime + other | h2load µs per call | cores busy (every process: the server, the gateway and the vision service behind it, h2load; of 2) |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    );
    for r in rows {
        md.push_str(&format!(
            "| {} | {:.0} | {:.0}% | {:.2} / {:.2} | {:.2} | {:.0} + {:.0} + {:.0} | {:.0} | {:.2} |\n",
            r.label,
            r.f.calls_per_s,
            100.0 * r.f.calls_per_s / r.ceiling,
            r.f.p50_ms,
            r.f.p99_ms,
            r.f.server_cores,
            r.f.lanes_us,
            r.f.runtime_us,
            r.f.other_us,
            r.f.client_us,
            r.f.busy_cores,
        ));
    }
    md.push_str("\nRaw ceilings (same run): ");
    let parts: Vec<String> = ceilings
        .iter()
        .map(|(m, b, c, _)| format!("`{m}` {c:.0} items/s at batch {b}"))
        .collect();
    md.push_str(&parts.join(", "));
    md.push_str(
        ". Their input is random normal (`--input randn`), as in the issue's figures. The same \
         ceilings on the input h2load sends (`--input ramp`, values in [0, 1)): ",
    );
    let served: Vec<String> = ceilings
        .iter()
        .map(|(m, b, c, s)| {
            format!(
                "`{m}` {s:.0} items/s at batch {b} ({:.2}× the random-input ceiling)",
                s / c
            )
        })
        .collect();
    md.push_str(&served.join(", "));
    md.push_str(".\n\nOne call alone (1 connection × 1 stream, batching on) against one raw forward at batch 1 on the served input (1 lane, same run): ");
    let alone: Vec<String> = forwards
        .iter()
        .filter_map(|(m, f)| {
            let row = rows.iter().find(|r| {
                r.label
                    .starts_with(&format!("`{m}`, direct, 1 connection × 1 stream"))
            })?;
            Some(format!(
                "`{m}` p50 {:.3} ms against {f:.3} ms (+{:.3} ms)",
                row.f.p50_ms,
                row.f.p50_ms - f
            ))
        })
        .collect();
    md.push_str(&alone.join(", "));
    md.push_str(".\n");
    md
}

pub fn run(a: H2loadArgs) -> anyhow::Result<()> {
    let bin_dir = a.report.bin_dir();
    let md = section(&a, &bin_dir)?;
    crate::language::write_section(Some(&a.report.out), SECTION, &md)?;
    print!("{md}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_h2load_summary_and_log() {
        let summary = "finished in 2.56s, 7799.73 req/s, 4.86MB/s\nrequests: 20000 total";
        assert_eq!(calls_per_s(summary), Some(7799.73));
        let log = "1700000000000000\t200\t500\n1700000000000100\t200\t1500\n1700000000000200\t200\t1000\n";
        let lat = latencies_ms(log);
        assert_eq!(lat, vec![0.5, 1.0, 1.5]);
        assert_eq!(quantile(&lat, 0.5), 1.0);
        assert_eq!(quantile(&lat, 0.99), 1.5);
    }

    #[test]
    fn frames_a_grpc_message() {
        let f = grpc_frame(&ModelInferRequest {
            model_name: "m".into(),
            ..Default::default()
        });
        assert_eq!(f[0], 0, "not compressed");
        assert_eq!(
            u32::from_be_bytes([f[1], f[2], f[3], f[4]]) as usize,
            f.len() - 5
        );
    }
}
