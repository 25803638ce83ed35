//! Runs every benchmark (each figure the median of `--runs`) into plain figures, has
//! [`crate::markdown`] render them, and writes the report.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use clap::Args;

use crate::load::LoadResult;
use crate::raw::RawResult;
use crate::{median, proc_cpu_seconds, rss_mib};

#[derive(Args)]
pub struct AllArgs {
    #[command(flatten)]
    pub report: crate::Report,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Python with torch and tokenizers, for the naive generation baseline.
    #[arg(long, env = "MARQUEE_BENCH_PYTHON", default_value = "python3")]
    pub python: PathBuf,
}

/// Figures from the issue, measured by its author on this kind of machine; not measured here.
pub(crate) struct Reference {
    torchserve_p99_c32_ms: f64,
}

const MODELS: &[(&str, &str, &str, Reference)] = &[
    (
        "fashion_cnn",
        "1,28,28",
        "fashion.png",
        Reference {
            torchserve_p99_c32_ms: 15.0,
        },
    ),
    (
        "efficientnet_lite0",
        "3,224,224",
        "coffee.png",
        Reference {
            torchserve_p99_c32_ms: 857.0,
        },
    ),
];
/// Batch sizes of the raw ceiling (the table's columns).
pub(crate) const BATCHES: &[usize] = &[1, 4, 8, 16, 32];
/// `(lanes, threads)` of the raw ceiling (the table's rows, in this order).
pub(crate) const LANE_CONFIGS: &[(usize, usize)] = &[(2, 1), (1, 2)];
/// Client concurrencies of the service loads.
pub(crate) const CONCURRENCY: &[usize] = &[1, 8, 32];

pub(crate) fn me() -> PathBuf {
    std::env::current_exe().expect("own path")
}

pub(crate) fn json<T: serde::de::DeserializeOwned>(mut cmd: Command) -> anyhow::Result<T> {
    let out = cmd.stderr(Stdio::inherit()).output()?;
    anyhow::ensure!(out.status.success(), "{cmd:?} failed: {}", out.status);
    let line = String::from_utf8(out.stdout)?;
    Ok(serde_json::from_str(
        line.trim().lines().last().unwrap_or(""),
    )?)
}

fn raw(
    a: &AllArgs,
    model: &str,
    batch: usize,
    lanes: usize,
    threads: usize,
    tune: bool,
) -> anyhow::Result<RawResult> {
    let mut runs = Vec::new();
    for _ in 0..a.report.runs {
        let mut c = Command::new(me());
        c.args(["raw", "--model-dir"])
            .arg(a.report.repo.join(model))
            .args([
                "--batch",
                &batch.to_string(),
                "--lanes",
                &lanes.to_string(),
                "--threads",
                &threads.to_string(),
            ])
            .args(["--seconds", &a.seconds.to_string()]);
        if !tune {
            c.arg("--no-tune-alloc");
        }
        runs.push(json::<RawResult>(c)?);
    }
    Ok(RawResult {
        items_per_s: median(runs.iter().map(|r| r.items_per_s).collect()),
        p50_forward_ms: median(runs.iter().map(|r| r.p50_forward_ms).collect()),
        rss_mib: median(runs.iter().map(|r| r.rss_mib).collect()),
    })
}

/// The raw tch ceiling of `model` at `batch` with 2 lanes × 1 thread: items/s, median of `runs`.
pub(crate) fn raw_ceiling(
    repo: &Path,
    model: &str,
    batch: usize,
    runs: usize,
    input: &str,
) -> anyhow::Result<f64> {
    Ok(raw_figures(repo, model, batch, 2, runs, input)?.0)
}

/// `marquee-bench raw` of `model` at `batch` with `lanes` × 1 thread on `input`, on the
/// server's allocator: the medians over `runs` of items/s and of one forward's time (ms).
pub(crate) fn raw_figures(
    repo: &Path,
    model: &str,
    batch: usize,
    lanes: usize,
    runs: usize,
    input: &str,
) -> anyhow::Result<(f64, f64)> {
    let (mut items, mut forward) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let mut c = Command::new(me());
        c.args(["raw", "--model-dir"]).arg(repo.join(model)).args([
            "--batch",
            &batch.to_string(),
            "--lanes",
            &lanes.to_string(),
            "--threads",
            "1",
            "--input",
            input,
        ]);
        crate::with_server_allocator(&mut c)?;
        let r = json::<RawResult>(c)?;
        items.push(r.items_per_s);
        forward.push(r.p50_forward_ms);
    }
    Ok((median(items), median(forward)))
}

/// A service binary started for a benchmark on ephemeral ports; SIGTERM on drop.
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) addr: String,
    pub(crate) admin: String,
}

impl Server {
    pub(crate) fn start(
        bin_dir: &Path,
        repo: &Path,
        model: &str,
        batching: bool,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(bin_dir.join("marquee-vision"));
        cmd.env("MARQUEE__REPOSITORY__PATH", repo)
            .env("MARQUEE__REPOSITORY__MODELS", model)
            .env("MARQUEE__REPOSITORY__POLL_INTERVAL_MS", "0")
            .env("MARQUEE__REPOSITORY__BATCHING", batching.to_string());
        Self::spawn(cmd)
    }

    pub(crate) fn start_gateway(bin_dir: &Path, config: &Path) -> anyhow::Result<Self> {
        let mut cmd = Command::new(bin_dir.join("marquee-gateway"));
        cmd.arg("--config").arg(config);
        Self::spawn(cmd)
    }

    pub(crate) fn spawn(mut cmd: Command) -> anyhow::Result<Self> {
        let mut child = cmd
            .env("MARQUEE__SERVER__GRPC_ADDR", "127.0.0.1:0")
            .env("MARQUEE__SERVER__ADMIN_ADDR", "127.0.0.1:0")
            .env("MARQUEE__TELEMETRY__LOG_FILTER", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        let addr = line
            .split("grpc=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .ok_or_else(|| anyhow::anyhow!("server did not report its address: {line:?}"))?
            .to_string();
        let admin = line
            .split("admin=")
            .nth(1)
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Ok(Self { child, addr, admin })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// One load figure: the client's result (median of the runs) and the server's CPU share.
#[derive(Clone, Debug)]
pub(crate) struct Load {
    pub(crate) r: LoadResult,
    /// Cores the measured server (or gateway) used during the load.
    pub(crate) server_cpu: f64,
}

fn load(
    a: &AllArgs,
    server: &Server,
    model: &str,
    dims: &str,
    input: &str,
    image: &Path,
    c: usize,
) -> anyhow::Result<Load> {
    load_with(a, server, model, dims, input, image, c, None)
}

#[allow(clippy::too_many_arguments)]
fn load_with(
    a: &AllArgs,
    server: &Server,
    model: &str,
    dims: &str,
    input: &str,
    image: &Path,
    c: usize,
    api_key: Option<&str>,
) -> anyhow::Result<Load> {
    let mut runs = Vec::new();
    for _ in 0..a.report.runs {
        let cpu0 = proc_cpu_seconds(server.pid());
        let t0 = std::time::Instant::now();
        let mut cmd = Command::new(me());
        cmd.args([
            "load",
            "--addr",
            &server.addr,
            "--model",
            model,
            "--input",
            input,
            "--dims",
            dims,
        ])
        .args([
            "--concurrency",
            &c.to_string(),
            "--seconds",
            &a.seconds.to_string(),
        ])
        .arg("--image")
        .arg(image);
        if let Some(k) = api_key {
            cmd.args(["--api-key", k]);
        }
        let r: LoadResult = json(cmd)?;
        let server_cpu = (proc_cpu_seconds(server.pid()) - cpu0) / t0.elapsed().as_secs_f64();
        runs.push(Load { r, server_cpu });
    }
    let m = |f: &dyn Fn(&Load) -> f64| median(runs.iter().map(f).collect());
    Ok(Load {
        r: LoadResult {
            calls: runs.iter().map(|l| l.r.calls).sum::<usize>() / runs.len(),
            errors: runs.iter().map(|l| l.r.errors).sum(),
            rps: m(&|l| l.r.rps),
            p50_ms: m(&|l| l.r.p50_ms),
            p99_ms: m(&|l| l.r.p99_ms),
            client_cpu: m(&|l| l.r.client_cpu),
        },
        server_cpu: m(&|l| l.server_cpu),
    })
}

/// What a report was measured on and how: its header.
#[derive(Clone, Debug)]
pub(crate) struct RunInfo {
    /// `git rev-parse --short HEAD`, empty outside a checkout.
    pub(crate) commit: String,
    pub(crate) cores: usize,
    /// Repetitions per figure (each figure is their median).
    pub(crate) runs: usize,
    /// Seconds per measurement.
    pub(crate) seconds: f64,
}

/// The figures of one vision model: raw tch ceiling and the service under load.
#[derive(Clone, Debug)]
pub(crate) struct VisionFigures {
    pub(crate) model: &'static str,
    /// TorchServe's p99 at c=32, quoted from the issue (not measured).
    pub(crate) torchserve_p99_c32_ms: f64,
    /// Raw forward loop by `(lanes, threads, batch)`, over `LANE_CONFIGS` × `BATCHES`.
    pub(crate) raw: BTreeMap<(usize, usize, usize), RawResult>,
    /// One lane, one thread, batch 1.
    pub(crate) single: RawResult,
    /// 2 lanes × 1 thread at batch 8 with glibc's allocator defaults.
    pub(crate) untuned: RawResult,
    /// Service load by `(batching, input, concurrency)`: `raw` and `encoded` with batching,
    /// `raw` without, at every `CONCURRENCY`.
    pub(crate) service: BTreeMap<(bool, &'static str, usize), Load>,
    /// Resident memory of the batching server after its loads.
    pub(crate) server_rss_mib: f64,
}

/// The gateway's figures: loads by `(path, concurrency)` and the cost of authentication.
#[derive(Clone, Debug)]
pub(crate) struct GatewayFigures {
    /// Paths `direct` (c = 1, 8, 32), `gateway, batching on` and `gateway, batching off`
    /// (c = 1, 8, 32, 64).
    pub(crate) loads: BTreeMap<(&'static str, usize), Load>,
    pub(crate) auth_key_us: f64,
    pub(crate) auth_jwt_us: f64,
}

/// Measures everything, renders it ([`crate::markdown`]) and writes `--out`.
pub fn run_all(a: AllArgs) -> anyhow::Result<()> {
    let bin_dir = a.report.bin_dir();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let scratch = tempfile_dir()?;
    let run = run_info(&a);
    let mut vision = Vec::new();
    for (model, dims, image, reference) in MODELS {
        vision.push(measure_vision(
            &a, &bin_dir, &fixtures, &scratch, model, dims, image, reference,
        )?);
    }
    let gateway = measure_gateway(&a, &bin_dir, &scratch)?;
    let lm = crate::language::LanguageArgs {
        report: crate::Report {
            bin_dir: Some(bin_dir.clone()),
            ..a.report.clone()
        },
        seconds: a.seconds,
        python: a.python.clone(),
    };
    let language = crate::language::section(&lm, &bin_dir)?;
    let versus =
        crate::language::versus_transformers(&a.python, &bin_dir, &a.report.repo, a.report.runs)?;
    let rec = crate::recommend::RecommendArgs::with_defaults(a.report.repo.clone(), a.report.runs);
    let recommendation = crate::recommend::section(&rec)?;
    let h2 = crate::h2load::section(
        &crate::h2load::H2loadArgs {
            report: crate::Report {
                bin_dir: Some(bin_dir.clone()),
                ..a.report.clone()
            },
            calls: 20_000,
        },
        &bin_dir,
    )?;
    let stores = crate::stores::section(&crate::stores::StoresArgs::with_defaults(
        a.report.repo.clone(),
        a.report.runs,
    ))?;

    let mut md = crate::markdown::header(&run);
    for v in &vision {
        md.push_str(&crate::markdown::vision_section(v));
    }
    md.push_str(&crate::markdown::gateway_section(&gateway));
    md.push_str(&h2);
    md.push_str(&language);
    md.push_str(&versus);
    md.push_str(&recommendation);
    md.push_str(&stores);
    let old = std::fs::read_to_string(&a.report.out).unwrap_or_default();
    md.push_str(&other_recommendation_sections(&old, rec.items));
    std::fs::write(&a.report.out, &md)?;
    eprintln!("wrote {}", a.report.out.display());
    print!("{md}");
    Ok(())
}

/// The recommendation sections of `report` for other catalogue sizes than `items` (run by
/// hand, e.g. `--items 1000000`): `make bench` measures the 200k default only, and must not
/// drop them.
fn other_recommendation_sections(report: &str, items: usize) -> String {
    let ours = crate::recommend::heading(items);
    let mut out = String::new();
    for section in report.split("\n## ").skip(1) {
        let section = format!("## {}", section.trim_end());
        if section.starts_with(crate::recommend::HEADING) && !section.starts_with(&ours) {
            out.push_str(&format!("\n{section}\n"));
        }
    }
    out
}

fn run_info(a: &AllArgs) -> RunInfo {
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok();
    let commit = commit
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    RunInfo {
        commit,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        runs: a.report.runs,
        seconds: a.seconds,
    }
}

/// The raw ceiling over every lane configuration and batch, then the service with batching on
/// (raw and encoded inputs) and off, at every concurrency.
#[allow(clippy::too_many_arguments)]
fn measure_vision(
    a: &AllArgs,
    bin_dir: &Path,
    fixtures: &Path,
    scratch: &Path,
    model: &'static str,
    dims: &str,
    image: &str,
    reference: &Reference,
) -> anyhow::Result<VisionFigures> {
    eprintln!("== {model}");
    let image = if image == "fashion.png" {
        let p = scratch.join("fashion.png");
        write_fashion_png(&p)?;
        p
    } else {
        fixtures.join(image)
    };
    // Raw ceiling.
    let mut cells = BTreeMap::new();
    for &(lanes, threads) in LANE_CONFIGS {
        for &b in BATCHES {
            eprintln!("   raw lanes={lanes} threads={threads} batch={b}");
            cells.insert((lanes, threads, b), raw(a, model, b, lanes, threads, true)?);
        }
    }
    let single = raw(a, model, 1, 1, 1, true)?;
    let untuned = raw(a, model, 8, 2, 1, false)?;
    // Service.
    let mut results: BTreeMap<(bool, &'static str, usize), Load> = BTreeMap::new();
    let mut server_rss = 0.0;
    for batching in [true, false] {
        let server = Server::start(bin_dir, &a.report.repo, model, batching)?;
        for &c in CONCURRENCY {
            for input in if batching {
                &["raw", "encoded"][..]
            } else {
                &["raw"][..]
            } {
                eprintln!("   service batching={batching} input={input} concurrency={c}");
                results.insert(
                    (batching, input, c),
                    load(a, &server, model, dims, input, &image, c)?,
                );
            }
        }
        if batching {
            server_rss = rss_mib(server.pid());
        }
    }
    Ok(VisionFigures {
        model,
        torchserve_p99_c32_ms: reference.torchserve_p99_c32_ms,
        raw: cells,
        single,
        untuned,
        service: results,
        server_rss_mib: server_rss,
    })
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("marquee-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A 28×28 grayscale PNG for the encoded path of `fashion_cnn` (a synthetic garment-like blob).
fn write_fashion_png(path: &Path) -> anyhow::Result<()> {
    let img = image::GrayImage::from_fn(28, 28, |x, y| {
        let (dx, dy) = (x as f32 - 14.0, y as f32 - 14.0);
        image::Luma([if dx.abs() < 8.0 && dy.abs() < 11.0 {
            200
        } else {
            0
        }])
    });
    img.save(path)?;
    Ok(())
}

pub(crate) const BENCH_KEY: &str = "bench-key-7d1e0c";

/// The gateway config of the benchmarks, batching on, in front of `backend`.
pub(crate) fn bench_gateway_config(dir: &Path, backend: &str) -> anyhow::Result<PathBuf> {
    gateway_config(dir, backend, true)
}

fn gateway_config(dir: &Path, backend: &str, batching: bool) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("gateway-{batching}.toml"));
    std::fs::write(
        &path,
        format!(
            "[tenants.bench]\n\n[[auth.api_keys]]\nsha256 = \"{}\"\ntenant = \"bench\"\nscopes = [\"vision:infer\"]\n\n\
             [backends.vision]\nendpoints = [\"{backend}\"]\n\n[routes.vision]\nbatching = {batching}\n",
            marquee_gateway::auth::hash_key(BENCH_KEY)
        ),
    )?;
    Ok(path)
}

/// Gateway overhead against the vision service directly, gateway batching on and off, and the
/// cost of authentication.
fn measure_gateway(a: &AllArgs, bin_dir: &Path, scratch: &Path) -> anyhow::Result<GatewayFigures> {
    eprintln!("== gateway");
    let image = scratch.join("fashion.png");
    let (model, dims) = ("fashion_cnn", "1,28,28");
    let backend = Server::start(bin_dir, &a.report.repo, model, true)?;
    let mut figures: BTreeMap<(&'static str, usize), Load> = BTreeMap::new();
    for &c in &[1usize, 8, 32] {
        eprintln!("   direct concurrency={c}");
        figures.insert(
            ("direct", c),
            load(a, &backend, model, dims, "raw", &image, c)?,
        );
    }
    for batching in [true, false] {
        let cfg = gateway_config(scratch, &backend.addr, batching)?;
        let gw = Server::start_gateway(bin_dir, &cfg)?;
        let label = if batching {
            "gateway, batching on"
        } else {
            "gateway, batching off"
        };
        for &c in &[1usize, 8, 32, 64] {
            eprintln!("   {label} concurrency={c}");
            let l = load_with(a, &gw, model, dims, "raw", &image, c, Some(BENCH_KEY))?;
            figures.insert((label, c), l);
        }
    }
    let (auth_key_us, auth_jwt_us) = auth_cost()?;
    Ok(GatewayFigures {
        loads: figures,
        auth_key_us,
        auth_jwt_us,
    })
}

/// Median µs to authenticate one call: API key (SHA-256 + constant-time compare) and HS256 JWT.
fn auth_cost() -> anyhow::Result<(f64, f64)> {
    use marquee_gateway::config::{ApiKey, AuthSettings, Tenant};
    let dir = tempfile_dir()?;
    let secret = dir.join("hs256");
    std::fs::write(&secret, b"a-benchmark-secret-that-is-32-bytes-or-more")?;
    let mut tenants = std::collections::BTreeMap::new();
    tenants.insert("bench".to_string(), Tenant::default());
    let mut auth = AuthSettings::default();
    auth.api_keys = (0..8)
        .map(|i| ApiKey {
            sha256: marquee_gateway::auth::hash_key(&format!("key-{i}")),
            tenant: "bench".into(),
            scopes: vec!["vision:infer".into()],
        })
        .collect();
    auth.jwt.hs256_secret_file = Some(secret);
    let authn = marquee_gateway::auth::Authenticator::new(&auth, &tenants)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 3600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"tenant": "bench", "scope": "vision:infer", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(b"a-benchmark-secret-that-is-32-bytes-or-more")?,
    )?;
    let time = |headers: http::HeaderMap| -> f64 {
        let mut per_run = Vec::new();
        for _ in 0..5 {
            let n = 20_000;
            let t = std::time::Instant::now();
            for _ in 0..n {
                let p = authn.authenticate(&headers).expect("valid credential");
                std::hint::black_box(p);
            }
            per_run.push(t.elapsed().as_secs_f64() * 1e6 / n as f64);
        }
        median(per_run)
    };
    let mut key_headers = http::HeaderMap::new();
    key_headers.insert("x-api-key", "key-7".parse()?);
    let mut jwt_headers = http::HeaderMap::new();
    jwt_headers.insert("authorization", format!("Bearer {token}").parse()?);
    Ok((time(key_headers), time(jwt_headers)))
}

#[cfg(test)]
mod tests {
    use super::other_recommendation_sections;

    #[test]
    fn make_bench_keeps_recommendation_sections_of_other_sizes_and_nothing_else() {
        let report = "# Results\n\n## fashion_cnn\n\nv\n\n\
            ## Recommendation, 200000 items (`marquee-bench recommend`)\n\nold 200k\n\n\
            ## Recommendation, 1000000 items (`marquee-bench recommend`)\n\nthe 1M run\n\n\
            ## Feedback stores\n\nf\n";
        let kept = other_recommendation_sections(report, 200_000);
        assert_eq!(
            kept,
            "\n## Recommendation, 1000000 items (`marquee-bench recommend`)\n\nthe 1M run\n"
        );
        assert_eq!(other_recommendation_sections("# Results\n", 200_000), "");
    }
}
