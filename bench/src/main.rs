//! `marquee-bench`: measures the raw tch ceiling and the vision service under load, and writes
//! `bench/RESULTS.md`. Bounded in count and time, loopback only. The load client runs on one
//! thread and reports its own CPU time, since it shares the 2 cores with the server.

mod gpu;
mod h2load;
mod language;
mod load;
mod markdown;
mod raw;
mod recommend;
mod report;
mod stores;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Marquee benchmarks (loopback only, bounded in time)")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Every benchmark, median of `--runs`, written to `--out`.
    All(report::AllArgs),
    /// In-process tch forward loop on one model (the ceiling); prints JSON.
    Raw(raw::RawArgs),
    /// A closed-loop gRPC load against a running server; prints JSON.
    Load(load::LoadArgs),
    /// The recommender on a synthetic 1M-item catalogue, plus exposure fairness; prints Markdown.
    Recommend(recommend::RecommendArgs),
    /// The language service, decode steps and the naive loop; replaces that section of `--out`.
    Language(language::LanguageArgs),
    /// The vision service from `h2load` (one connection × N streams, N connections), against
    /// the raw ceiling; replaces that section of `--out`.
    H2load(h2load::H2loadArgs),
    /// The CUDA path (`bench/gpu-check.sh`): vision and language served on `--device` against
    /// the raw ceiling there; prints Markdown (or replaces that section of `--out`).
    GpuCheck(gpu::GpuArgs),
    /// The recommender's feedback stores (file, PostgreSQL) side by side; prints Markdown or
    /// replaces that section of `--out`.
    Stores(stores::StoresArgs),
}

fn main() -> anyhow::Result<()> {
    match Args::parse().cmd {
        Cmd::All(a) => report::run_all(a),
        Cmd::Raw(a) => raw::run(a),
        Cmd::Load(a) => load::run(a),
        Cmd::Recommend(a) => recommend::run(a),
        Cmd::Language(a) => language::run(a),
        Cmd::Stores(a) => stores::run(a),
        Cmd::H2load(a) => h2load::run(a),
        Cmd::GpuCheck(a) => gpu::run(a),
    }
}

/// The options every report-writing subcommand shares (`all`, `language`, `h2load`).
#[derive(clap::Args, Clone)]
pub struct Report {
    /// The model repository.
    #[arg(long, default_value = "model-repository")]
    pub repo: PathBuf,
    /// The Markdown report: written whole by `all`, one section replaced (or appended) by the
    /// others.
    #[arg(long, default_value = "bench/RESULTS.md")]
    pub out: PathBuf,
    /// Directory holding the service binaries (default: next to this binary).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Repetitions per figure; the report shows the median.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

impl Report {
    /// `--bin-dir`, or the directory of this binary.
    pub fn bin_dir(&self) -> PathBuf {
        bin_dir_or_here(&self.bin_dir)
    }
}

/// `--bin-dir` if given, else the directory of this binary (where `cargo build` puts the
/// services beside it).
pub fn bin_dir_or_here(given: &Option<PathBuf>) -> PathBuf {
    given.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(std::path::Path::to_path_buf))
            .unwrap_or_default()
    })
}

/// Debian's jemalloc (`libjemalloc2`, installed by `make setup`): the allocator
/// `marquee-vision` links for every allocation, libtorch's included.
pub const JEMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";

/// Makes `cmd` (a `marquee-bench raw`) run libtorch on jemalloc, as `marquee-vision` does, so a
/// ceiling it is compared with is measured like for like (jemalloc alone is worth about 4% to
/// the raw forward loop). This binary keeps glibc so `marquee-bench all` can still compare
/// glibc's settings.
pub fn with_server_allocator(cmd: &mut std::process::Command) -> anyhow::Result<()> {
    anyhow::ensure!(
        std::path::Path::new(JEMALLOC).exists(),
        "`{JEMALLOC}` is missing: Debian's libjemalloc2 (make setup installs it)"
    );
    cmd.env("LD_PRELOAD", JEMALLOC);
    Ok(())
}

/// One plain HTTP/1.0 request without a body to a server's admin port (1.0: the answer is never
/// chunked, so its lines can be read as they are): the whole response, status line and headers
/// included.
pub fn admin_http(addr: &str, method: &str, path: &str) -> std::io::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// This process's user+system CPU seconds.
pub fn self_cpu_seconds() -> f64 {
    rusage_seconds(libc::RUSAGE_SELF)
}

/// User+system CPU seconds of this process's reaped children (an h2load run, once it exited).
pub fn children_cpu_seconds() -> f64 {
    rusage_seconds(libc::RUSAGE_CHILDREN)
}

fn rusage_seconds(who: libc::c_int) -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes into the provided struct; `who` is RUSAGE_SELF or
    // RUSAGE_CHILDREN, both always valid.
    let usage = unsafe {
        libc::getrusage(who, usage.as_mut_ptr());
        usage.assume_init()
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Resident set size of `pid` in MiB (VmRSS from /proc).
pub fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// CPU seconds (user+system) consumed so far by `pid`.
pub fn proc_cpu_seconds(pid: u32) -> f64 {
    stat_cpu_seconds(std::path::Path::new(&format!("/proc/{pid}/stat")))
}

/// CPU seconds (user+system) in a `/proc/…/stat` file (a process's or one thread's).
pub fn stat_cpu_seconds(path: &std::path::Path) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

pub fn model_dir(repo: &std::path::Path, model: &str) -> PathBuf {
    repo.join(model)
}
