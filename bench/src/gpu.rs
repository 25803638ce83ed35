//! `marquee-bench gpu-check`: the one prepared check of the CUDA path (`bench/gpu-check.sh`).
//! Both vision models and the language model are served on `--device`, called from h2load
//! (vision, one connection × 1 and × 32 streams) and from streaming gRPC clients (language, 1
//! and 32 streams), and set against the raw ceiling on the same device, measured in the same
//! run. With `--device cpu` and small counts it is the dry run `make test` keeps working, so the
//! script is known to run before a GPU is ever lent.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Args;

use crate::h2load::{H2Figures, Load, infer_body, measure};
use crate::raw::RawResult;
use crate::report::{Server, json, me};

pub const SECTION: &str = "## On a GPU (`bench/gpu-check.sh`)";

#[derive(Args)]
pub struct GpuArgs {
    /// `cuda`, `cuda:N`, or `cpu` for the dry run.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// The model repository.
    #[arg(long, default_value = "model-repository")]
    pub repo: PathBuf,
    /// Directory holding `marquee-vision` and `marquee-language` (default: next to this binary).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// h2load calls per vision measurement (EfficientNet: a tenth).
    #[arg(long, default_value_t = 20_000)]
    pub calls: usize,
    /// Seconds per language measurement and per raw ceiling.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Repetitions per figure; the report shows the median.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// A report whose section this replaces (or appends); without it, printed only.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One vision model: its input, and the batch its raw ceiling is measured at.
struct VisionModel {
    name: &'static str,
    dims: [i64; 3],
    ceiling_batch: usize,
}

const VISION: [VisionModel; 2] = [
    VisionModel {
        name: "fashion_cnn",
        dims: [1, 28, 28],
        ceiling_batch: 32,
    },
    VisionModel {
        name: "efficientnet_lite0",
        dims: [3, 224, 224],
        ceiling_batch: 32,
    },
];

/// The raw forward on `device`: `(items/s, p50 of one forward in ms)` at `batch`, on the
/// input h2load sends.
fn raw(a: &GpuArgs, model: &str, batch: usize) -> anyhow::Result<(f64, f64)> {
    let mut items = Vec::new();
    let mut p50 = Vec::new();
    for _ in 0..a.runs {
        let mut c = Command::new(me());
        c.args(["raw", "--model-dir"])
            .arg(a.repo.join(model))
            .args(["--batch", &batch.to_string()])
            .args(["--lanes", "2", "--threads", "1", "--input", "ramp"])
            .args(["--device", &a.device])
            .args(["--seconds", &a.seconds.to_string()]);
        crate::with_server_allocator(&mut c)?;
        let r = json::<RawResult>(c)?;
        items.push(r.items_per_s);
        p50.push(r.p50_forward_ms);
    }
    Ok((crate::median(items), crate::median(p50)))
}

pub fn section(a: &GpuArgs, bin_dir: &Path) -> anyhow::Result<String> {
    let scratch = tempfile::tempdir()?;
    let mut md = format!(
        "{SECTION}\n\nDevice `{}`, median of {} runs. Raw ceiling: `marquee-bench raw` on the \
         device, two lanes (as the server runs), the input h2load sends, timed to the device's completion (the input's \
         copy to the device is outside the timing). Vision: `marquee-vision` serving both models \
         on the device, OIP `ModelInfer` from h2load over one connection. Language: \
         `marquee-language` serving `gpt_reviews` on the device, 64-token streams.\n\n\
         | vision model | raw ceiling (items/s, batch {}) | raw forward at batch 1 (ms) | c=1 calls/s, p50 / p99 (ms) | c=32 calls/s, p50 / p99 (ms) | c=32 share of the ceiling |\n\
         | --- | ---: | ---: | ---: | ---: | ---: |\n",
        a.device, a.runs, VISION[0].ceiling_batch
    );
    let mut cmd = Command::new(bin_dir.join("marquee-vision"));
    cmd.env("MARQUEE__REPOSITORY__PATH", &a.repo)
        .env(
            "MARQUEE__REPOSITORY__MODELS",
            VISION.map(|m| m.name).join(","),
        )
        .env("MARQUEE__REPOSITORY__POLL_INTERVAL_MS", "0")
        .env("MARQUEE__REPOSITORY__DEVICE", &a.device);
    let server = Server::spawn(cmd)?;
    for m in &VISION {
        let (ceiling, _) = raw(a, m.name, m.ceiling_batch)?;
        let (_, forward1) = raw(a, m.name, 1)?;
        let body = scratch.path().join(format!("{}.bin", m.name));
        std::fs::write(&body, infer_body(m.name, "image", &m.dims))?;
        let calls = if m.name == "fashion_cnn" {
            a.calls
        } else {
            (a.calls / 10).max(8)
        };
        eprintln!("== gpu-check {} on {}: h2load c=1, c=32", m.name, a.device);
        let one = measure(a.runs, &server, None, &Load::new(&body, calls / 4, 1, 1))?;
        let many = measure(a.runs, &server, None, &Load::new(&body, calls, 1, 32))?;
        let cell =
            |f: &H2Figures| format!("{:.0}, {:.2} / {:.2}", f.calls_per_s, f.p50_ms, f.p99_ms);
        md.push_str(&format!(
            "| `{}` | {ceiling:.0} | {forward1:.3} | {} | {} | {:.0}% |\n",
            m.name,
            cell(&one),
            cell(&many),
            100.0 * many.calls_per_s / ceiling
        ));
    }
    drop(server);

    md.push_str(
        "\n| language model | streams | tokens/s | TTFT p50 (ms) | inter-token p50 / p99 (ms) |\n\
         | --- | ---: | ---: | ---: | ---: |\n",
    );
    let mut cmd = Command::new(bin_dir.join("marquee-language"));
    cmd.env("MARQUEE__REPOSITORY__PATH", &a.repo)
        .env("MARQUEE__REPOSITORY__MODELS", crate::language::MODEL)
        .env("MARQUEE__REPOSITORY__DEVICE", &a.device);
    let server = Server::spawn(cmd)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for streams in [1usize, 32] {
        eprintln!("== gpu-check language on {}: {streams} streams", a.device);
        let mut runs = Vec::new();
        for _ in 0..a.runs {
            runs.push(rt.block_on(crate::language::drive(&server.addr, streams, a.seconds))?);
        }
        let m = |f: &dyn Fn(&crate::language::StreamLoad) -> f64| {
            crate::median(runs.iter().map(f).collect())
        };
        anyhow::ensure!(
            runs.iter().all(|r| r.requests > 0),
            "a language run finished no request in {} s",
            a.seconds
        );
        md.push_str(&format!(
            "| `{}` | {streams} | {:.0} | {:.1} | {:.1} / {:.1} |\n",
            crate::language::MODEL,
            m(&|r| r.tokens_per_s),
            m(&|r| crate::percentile(&r.ttft_ms, 0.5)),
            m(&|r| crate::percentile(&r.itl_ms, 0.5)),
            m(&|r| crate::percentile(&r.itl_ms, 0.99)),
        ));
    }
    Ok(md)
}

pub fn run(a: GpuArgs) -> anyhow::Result<()> {
    let bin_dir = crate::bin_dir_or_here(&a.bin_dir);
    let md = section(&a, &bin_dir)?;
    if let Some(out) = &a.out {
        crate::language::write_section(Some(out), SECTION, &md)?;
    }
    print!("{md}");
    Ok(())
}
