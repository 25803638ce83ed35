//! The language service under streaming load, the KV-cache decode step by position, and the
//! naive Python generation loop, all in one run, into plain figures; [`crate::markdown`] renders
//! them as the "Language generation" section.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use futures::StreamExt;
use marquee_proto::language::text_generation_client::TextGenerationClient;
use marquee_proto::language::{GenerateRequest, GenerationParameters};
use tch::{CModule, IValue, Kind, Tensor};

use crate::report::Server;
use crate::{median, percentile, proc_cpu_seconds, rss_mib};

#[derive(Args, Clone)]
pub struct LanguageArgs {
    #[command(flatten)]
    pub report: crate::Report,
    /// Seconds per load measurement.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Python with torch and tokenizers, for the naive baseline.
    #[arg(long, env = "MARQUEE_BENCH_PYTHON", default_value = "python3")]
    pub python: PathBuf,
}

pub(crate) const MODEL: &str = "gpt_reviews";
pub(crate) const NEW_TOKENS: u32 = 64;
pub(crate) const CONCURRENCY: &[usize] = &[1, 8, 16, 32];
const PROMPTS: &[&str] = &[
    "This dress",
    "I love this top",
    "The fabric is",
    "Runs small, so",
    "I ordered my usual size and",
    "These jeans",
    "Beautiful color but",
    "Perfect for summer",
];
pub const SECTION: &str = "## Language generation";

/// `marquee-language` on ephemeral ports, against `repo`.
fn start_server(bin_dir: &Path, repo: &Path) -> anyhow::Result<Server> {
    let mut cmd = Command::new(bin_dir.join("marquee-language"));
    cmd.env("MARQUEE__REPOSITORY__PATH", repo);
    // The repository also holds `textgenrnn`: serve the measured model alone, so the engine
    // metrics are its own.
    cmd.env("MARQUEE__REPOSITORY__MODELS", MODEL);
    Server::spawn(cmd)
}

/// One closed-loop streaming load: `c` clients, each generating `NEW_TOKENS` tokens per request.
#[derive(Debug, Clone, Default)]
pub(crate) struct StreamLoad {
    pub(crate) tokens_per_s: f64,
    pub(crate) requests: usize,
    pub(crate) ttft_ms: Vec<f64>,
    pub(crate) itl_ms: Vec<f64>,
    server_cpu_share: f64,
    /// From the server's own metrics over the run: mean sequences per model step, mean decode
    /// step, and the share of wall time the engine spent inside model calls.
    seqs_per_step: f64,
    decode_ms: f64,
    model_share: f64,
}

/// Sums of the engine's step histograms and batch counters, read from `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
struct EngineCounters {
    decode_sum: f64,
    decode_count: f64,
    prefill_sum: f64,
    items: f64,
    batches: f64,
}

fn engine_counters(admin: &str) -> EngineCounters {
    let body = crate::admin_http(admin, "GET", "/metrics").unwrap_or_default();
    let value = |prefix: &str| -> f64 {
        body.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    EngineCounters {
        decode_sum: value(
            r#"marquee_language_step_seconds_sum{model="gpt_reviews",phase="decode"}"#,
        ),
        decode_count: value(
            r#"marquee_language_step_seconds_count{model="gpt_reviews",phase="decode"}"#,
        ),
        prefill_sum: value(
            r#"marquee_language_step_seconds_sum{model="gpt_reviews",phase="prefill"}"#,
        ),
        items: value(r#"marquee_batcher_items_total{model="gpt_reviews"}"#),
        batches: value(r#"marquee_batcher_batches_total{model="gpt_reviews"}"#),
    }
}

pub(crate) async fn drive(addr: &str, c: usize, seconds: f64) -> anyhow::Result<StreamLoad> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..c {
        let mut client = TextGenerationClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = (0usize, 0usize, Vec::new(), Vec::new());
            let mut n = 0u64;
            while Instant::now() < end {
                n += 1;
                let req = GenerateRequest {
                    model: MODEL.into(),
                    prompt: PROMPTS[(w + n as usize) % PROMPTS.len()].into(),
                    parameters: Some(GenerationParameters {
                        max_new_tokens: Some(NEW_TOKENS),
                        // Fixed-length generations: every request does the same work.
                        min_new_tokens: NEW_TOKENS,
                        temperature: Some(0.8),
                        top_k: Some(40),
                        seed: Some((w as u64) << 32 | n),
                        ..Default::default()
                    }),
                };
                let t0 = Instant::now();
                let mut stream = client.generate_stream(req).await?.into_inner();
                let mut last: Option<Instant> = None;
                while let Some(msg) = stream.next().await {
                    let msg = msg?;
                    if msg.token_ids.is_empty() {
                        continue;
                    }
                    let now = Instant::now();
                    match last {
                        None => out.2.push(now.duration_since(t0).as_secs_f64() * 1e3),
                        Some(prev) => {
                            let gap = now.duration_since(prev).as_secs_f64() * 1e3;
                            let k = msg.token_ids.len();
                            out.3.extend(std::iter::repeat_n(gap / k as f64, k));
                        }
                    }
                    last = Some(now);
                    out.0 += msg.token_ids.len();
                }
                out.1 += 1;
            }
            anyhow::Ok(out)
        }));
    }
    let mut load = StreamLoad::default();
    let mut tokens = 0;
    for t in tasks {
        let (tk, reqs, ttft, itl) = t.await??;
        tokens += tk;
        load.requests += reqs;
        load.ttft_ms.extend(ttft);
        load.itl_ms.extend(itl);
    }
    load.tokens_per_s = tokens as f64 / started.elapsed().as_secs_f64();
    load.ttft_ms.sort_by(f64::total_cmp);
    load.itl_ms.sort_by(f64::total_cmp);
    Ok(load)
}

/// Median time of one `decode` over `batch` sequences whose next position is `position`.
fn decode_step_ms(
    model: &Path,
    spec: &toml::Table,
    batch: i64,
    position: i64,
) -> anyhow::Result<f64> {
    let lang = spec
        .get("language")
        .and_then(|v| v.as_table())
        .ok_or_else(|| anyhow::anyhow!("model.toml has no [language]"))?;
    let get = |k: &str| lang.get(k).and_then(|v| v.as_integer()).unwrap_or(0);
    let (layers, heads, dim, ctx) = (
        get("num_layers"),
        get("num_heads"),
        get("head_dim"),
        get("context_length"),
    );
    tch::set_num_threads(1);
    let _guard = tch::no_grad_guard();
    let module = CModule::load(model)?;
    let dims = [layers, batch, heads, ctx, dim];
    let k = Tensor::zeros(dims, (Kind::Float, tch::Device::Cpu));
    let v = Tensor::zeros(dims, (Kind::Float, tch::Device::Cpu));
    let prompt = Tensor::randint(100, [batch, position], (Kind::Int64, tch::Device::Cpu)) + 1;
    let ones = Tensor::ones([batch, position], (Kind::Int64, tch::Device::Cpu));
    let pos = Tensor::arange(position, (Kind::Int64, tch::Device::Cpu))
        .unsqueeze(0)
        .repeat([batch, 1]);
    let out = module.method_is(
        "prefill",
        &[
            IValue::Tensor(prompt),
            IValue::Tensor(ones),
            IValue::Tensor(pos),
        ],
    )?;
    if let IValue::Tuple(parts) = out
        && let (Some(IValue::Tensor(pk)), Some(IValue::Tensor(pv))) = (parts.get(1), parts.get(2))
    {
        k.narrow(3, 0, position).copy_(pk);
        v.narrow(3, 0, position).copy_(pv);
    }
    let tokens = Tensor::ones([batch], (Kind::Int64, tch::Device::Cpu));
    let positions = Tensor::full([batch], position, (Kind::Int64, tch::Device::Cpu));
    let kv = k.narrow(3, 0, position + 1);
    let vv = v.narrow(3, 0, position + 1);
    let mut times = Vec::new();
    for i in 0..230 {
        let t0 = Instant::now();
        module.method_is(
            "decode",
            &[
                IValue::Tensor(tokens.shallow_clone()),
                IValue::Tensor(positions.shallow_clone()),
                IValue::Tensor(kv.shallow_clone()),
                IValue::Tensor(vv.shallow_clone()),
            ],
        )?;
        if i >= 30 {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(median(times))
}

#[derive(serde::Deserialize)]
struct Naive {
    tokens_per_s: f64,
    tokens: f64,
    requests: f64,
}

fn naive(a: &LanguageArgs, requests: usize) -> anyhow::Result<Naive> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("naive_generate.py");
    let out = Command::new(&a.python)
        .arg(script)
        .arg("--model-dir")
        .arg(a.report.repo.join(MODEL))
        .args(["--requests", &requests.to_string()])
        .args(["--max-new-tokens", &NEW_TOKENS.to_string()])
        .args(["--threads", "1"])
        .stderr(Stdio::inherit())
        .output()?;
    anyhow::ensure!(out.status.success(), "naive_generate.py failed");
    let line = String::from_utf8_lossy(&out.stdout);
    let last = line.lines().last().unwrap_or_default();
    Ok(serde_json::from_str(last)?)
}

/// One row of the streaming table: the service under one concurrency's closed-loop streams,
/// each figure the median over the runs.
#[derive(Clone, Debug)]
pub(crate) struct StreamFigures {
    pub(crate) tokens_per_s: f64,
    pub(crate) requests: f64,
    pub(crate) ttft_p50_ms: f64,
    pub(crate) ttft_p99_ms: f64,
    pub(crate) itl_p50_ms: f64,
    pub(crate) itl_p99_ms: f64,
    /// Cores the server used during the load.
    pub(crate) server_cpu: f64,
    pub(crate) seqs_per_step: f64,
    pub(crate) decode_ms: f64,
    /// Share (0-1) of wall time the engine spent inside model calls.
    pub(crate) model_share: f64,
}

/// The in-process decode step at one batch size (median ms) at positions 10 and 200.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DecodeStep {
    pub(crate) batch: i64,
    pub(crate) position_10_ms: f64,
    pub(crate) position_200_ms: f64,
}

/// The language benchmarks' figures (each the median of `runs`) and how they were taken.
#[derive(Clone, Debug)]
pub(crate) struct LanguageFigures {
    /// `git rev-parse --short HEAD`, empty outside a checkout.
    pub(crate) commit: String,
    /// The version of `MODEL` measured.
    pub(crate) version: u64,
    /// Repetitions per figure.
    pub(crate) runs: usize,
    /// Seconds per load measurement.
    pub(crate) seconds: f64,
    /// The service under streaming load, by concurrency, at every `CONCURRENCY`.
    pub(crate) streams: BTreeMap<usize, StreamFigures>,
    /// Server resident memory after the runs.
    pub(crate) server_rss_mib: f64,
    /// Decode steps, batch 1 first (the target's), then batch 16.
    pub(crate) steps: Vec<DecodeStep>,
    /// The naive Python loop: tokens/s and tokens per request (it stops at EOS).
    pub(crate) naive_tokens_per_s: f64,
    pub(crate) naive_tokens_per_request: f64,
}

/// Runs the language benchmarks into plain figures.
pub(crate) fn measure(a: &LanguageArgs, bin_dir: &Path) -> anyhow::Result<LanguageFigures> {
    let model_dir = a.report.repo.join(MODEL);
    let spec: toml::Table = std::fs::read_to_string(model_dir.join("model.toml"))?.parse()?;
    let version = std::fs::read_dir(&model_dir)?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .ok_or_else(|| anyhow::anyhow!("no version of {MODEL}"))?;
    let weights = model_dir.join(version.to_string()).join("model.pt");

    eprintln!("== language: decode step by position");
    let mut steps = Vec::new();
    for &batch in &[1i64, 16] {
        let mut at = Vec::new();
        for &pos in &[10i64, 200] {
            let runs: Vec<f64> = (0..a.report.runs)
                .map(|_| decode_step_ms(&weights, &spec, batch, pos))
                .collect::<anyhow::Result<_>>()?;
            at.push(median(runs));
        }
        steps.push(DecodeStep {
            batch,
            position_10_ms: at[0],
            position_200_ms: at[1],
        });
    }

    eprintln!("== language: service under streaming load");
    let server = start_server(bin_dir, &a.report.repo)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    // Warm-up: connections, the engine's first shapes.
    rt.block_on(drive(&server.addr, 8, 1.0))?;
    let mut loads: Vec<(usize, Vec<StreamLoad>)> =
        CONCURRENCY.iter().map(|&c| (c, Vec::new())).collect();
    let mut naive_runs = Vec::new();
    for run in 0..a.report.runs {
        for (c, results) in loads.iter_mut() {
            eprintln!("   run {run} c={c}");
            let cpu0 = proc_cpu_seconds(server.child.id());
            let e0 = engine_counters(&server.admin);
            let t0 = Instant::now();
            let mut r = rt.block_on(drive(&server.addr, *c, a.seconds))?;
            let wall = t0.elapsed().as_secs_f64();
            r.server_cpu_share = (proc_cpu_seconds(server.child.id()) - cpu0) / wall;
            let e1 = engine_counters(&server.admin);
            let steps = e1.decode_count - e0.decode_count;
            r.decode_ms = (e1.decode_sum - e0.decode_sum) / steps.max(1.0) * 1e3;
            // Prefills count as model steps too (their items are prompts).
            r.seqs_per_step = (e1.items - e0.items) / (e1.batches - e0.batches).max(1.0);
            r.model_share =
                (e1.decode_sum - e0.decode_sum + e1.prefill_sum - e0.prefill_sum) / wall;
            results.push(r);
        }
        eprintln!("   run {run} naive loop");
        naive_runs.push(naive(a, 16)?);
    }
    let rss = rss_mib(server.child.id());
    drop(server);

    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    Ok(figures(a, commit, version, &loads, steps, &naive_runs, rss))
}

/// The runs' medians and how they were taken.
fn figures(
    a: &LanguageArgs,
    commit: String,
    version: u64,
    loads: &[(usize, Vec<StreamLoad>)],
    steps: Vec<DecodeStep>,
    naive_runs: &[Naive],
    rss: f64,
) -> LanguageFigures {
    let streams = loads
        .iter()
        .map(|(c, rs)| {
            let med = |f: &dyn Fn(&StreamLoad) -> f64| median(rs.iter().map(f).collect());
            let figures = StreamFigures {
                tokens_per_s: med(&|r| r.tokens_per_s),
                requests: med(&|r| r.requests as f64),
                ttft_p50_ms: med(&|r| percentile(&r.ttft_ms, 0.5)),
                ttft_p99_ms: med(&|r| percentile(&r.ttft_ms, 0.99)),
                itl_p50_ms: med(&|r| percentile(&r.itl_ms, 0.5)),
                itl_p99_ms: med(&|r| percentile(&r.itl_ms, 0.99)),
                server_cpu: med(&|r| r.server_cpu_share),
                seqs_per_step: med(&|r| r.seqs_per_step),
                decode_ms: med(&|r| r.decode_ms),
                model_share: med(&|r| r.model_share),
            };
            (*c, figures)
        })
        .collect();
    LanguageFigures {
        commit,
        version,
        runs: a.report.runs,
        seconds: a.seconds,
        streams,
        server_rss_mib: rss,
        steps,
        naive_tokens_per_s: median(naive_runs.iter().map(|n| n.tokens_per_s).collect()),
        naive_tokens_per_request: median(
            naive_runs.iter().map(|n| n.tokens / n.requests).collect(),
        ),
    }
}

/// Runs the language benchmarks and returns the Markdown section ([`crate::markdown`]).
pub fn section(a: &LanguageArgs, bin_dir: &Path) -> anyhow::Result<String> {
    Ok(crate::markdown::language_section(&measure(a, bin_dir)?))
}

/// Replaces `heading`'s section of the report at `out` with `md` (or appends it), or prints
/// `md` when there is no `out`.
pub fn write_section(out: Option<&Path>, heading: &str, md: &str) -> anyhow::Result<()> {
    match out {
        Some(p) => {
            let old = std::fs::read_to_string(p).unwrap_or_default();
            std::fs::write(p, replace_section(&old, heading, md))?;
            eprintln!("wrote {}", p.display());
        }
        None => print!("{md}"),
    }
    Ok(())
}

/// Replaces the `## …` section starting with `heading` in `report` (or appends it).
pub fn replace_section(report: &str, heading: &str, new: &str) -> String {
    match report.find(heading) {
        Some(start) => {
            let after = start + heading.len();
            let end = report[after..]
                .find("\n## ")
                .map_or(report.len(), |i| after + i + 1);
            format!("{}{}{}", &report[..start], new, &report[end..])
        }
        None => format!("{}\n{new}", report.trim_end()),
    }
}

pub fn run(a: LanguageArgs) -> anyhow::Result<()> {
    let bin_dir = a.report.bin_dir();
    let md = section(&a, &bin_dir)?;
    let report = std::fs::read_to_string(&a.report.out).unwrap_or_default();
    std::fs::write(&a.report.out, replace_section(&report, SECTION, &md))?;
    eprintln!("wrote {}", a.report.out.display());
    print!("{md}");
    Ok(())
}

/// The sections of `bench/lm_vs_transformers.py`: Marquee against `transformers` on a
/// GPT-2-small-shaped model (same weights, same run), and the `textgenrnn` character model's
/// characters/s at 1 and 16 streams. Each is its markdown, as the script prints it.
pub fn versus_transformers(
    python: &Path,
    bin_dir: &Path,
    repo: &Path,
    runs: usize,
) -> anyhow::Result<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("lm_vs_transformers.py");
    let mut md = String::new();
    for extra in [
        Vec::new(),
        vec![
            "--model-dir".to_string(),
            repo.join("textgenrnn").display().to_string(),
        ],
    ] {
        let out = Command::new(python)
            .arg(&script)
            .arg("--bin-dir")
            .arg(bin_dir)
            .args(["--runs", &runs.to_string(), "--markdown"])
            .args(&extra)
            .stderr(Stdio::inherit())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "lm_vs_transformers.py {extra:?} failed: {}",
            out.status
        );
        md.push('\n');
        md.push_str(String::from_utf8_lossy(&out.stdout).trim_end());
        md.push('\n');
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_replaced_in_place_or_appended() {
        let r = "# R\n\n## A\n\nold\n\n## Language generation\n\nold lm\n\n## B\n\nb\n";
        let out = replace_section(r, SECTION, "## Language generation\n\nnew\n\n");
        assert_eq!(
            out,
            "# R\n\n## A\n\nold\n\n## Language generation\n\nnew\n\n## B\n\nb\n"
        );
        let out = replace_section("# R\n", SECTION, "## Language generation\n\nx\n");
        assert_eq!(out, "# R\n## Language generation\n\nx\n");
    }
}
