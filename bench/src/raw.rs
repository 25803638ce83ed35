//! The raw ceiling: the same TorchScript module driven by tch in-process, no server.

use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clap::Args;
use marquee_core::model::ModelSpec;
use serde::{Deserialize, Serialize};
use tch::{CModule, IValue, Tensor};

#[derive(Args, Clone)]
pub struct RawArgs {
    /// Model directory (`<repo>/<model>`); version 1 is used.
    #[arg(long)]
    pub model_dir: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[arg(long, default_value_t = 1)]
    pub lanes: usize,
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Input values: `randn` (standard normal), or `ramp`, the deterministic values in [0, 1)
    /// that `marquee-bench h2load` sends, so a ceiling can be measured on the served input.
    #[arg(long, default_value = "randn")]
    pub input: String,
    /// `cpu`, `cuda` or `cuda:N`: where the module and its inputs live. On CUDA each forward
    /// is timed to the device's completion.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Leave glibc's allocator at its defaults (to measure what tuning buys).
    #[arg(long)]
    pub no_tune_alloc: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct RawResult {
    pub items_per_s: f64,
    /// Median time of one forward at this batch size.
    pub p50_forward_ms: f64,
    pub rss_mib: f64,
}

pub fn run(a: RawArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.input == "randn" || a.input == "ramp",
        "--input must be `randn` or `ramp`"
    );
    if !a.no_tune_alloc {
        marquee_core::alloc::tune_allocator();
    }
    let device = marquee_core::model::parse_device(&a.device).map_err(anyhow::Error::msg)?;
    marquee_core::device::check_available(device).map_err(anyhow::Error::msg)?;
    let spec = ModelSpec::load(&a.model_dir).map_err(anyhow::Error::msg)?;
    let mut shape = vec![a.batch as i64];
    shape.extend_from_slice(&spec.inputs[0].dims);
    let path = a.model_dir.join("1/model.pt");
    let barrier = Arc::new(Barrier::new(a.lanes));
    let handles: Vec<_> = (0..a.lanes)
        .map(|_| {
            let (path, shape, barrier, a) =
                (path.clone(), shape.clone(), barrier.clone(), a.clone());
            std::thread::spawn(move || -> anyhow::Result<(usize, Vec<f64>, f64)> {
                tch::set_num_threads(a.threads as i32);
                let mut m = CModule::load_on_device(&path, device)?;
                m.set_eval();
                // A fresh input each call, as a server would build one per batch.
                let n: i64 = shape.iter().product();
                let ramp = a.input == "ramp";
                let input = || {
                    if ramp {
                        Tensor::from_slice(&crate::h2load::ramp(n as usize / shape[0] as usize))
                            .repeat([shape[0]])
                            .view(shape.as_slice())
                    } else {
                        Tensor::randn(shape.as_slice(), (tch::Kind::Float, tch::Device::Cpu))
                    }
                    .to_device(device)
                };
                // A CUDA forward returns once queued; wait for the device so the time is real.
                let sync = || {
                    if let tch::Device::Cuda(i) = device {
                        tch::Cuda::synchronize(i as i64);
                    }
                };
                for _ in 0..3 {
                    tch::no_grad(|| m.forward_is(&[IValue::Tensor(input())]))?;
                }
                sync();
                barrier.wait();
                let start = Instant::now();
                let until = start + Duration::from_secs_f64(a.seconds);
                let mut times = Vec::new();
                while Instant::now() < until {
                    let x = input();
                    let t = Instant::now();
                    let out = tch::no_grad(|| m.forward_is(&[IValue::Tensor(x)]))?;
                    sync();
                    drop(out);
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
                Ok((times.len() * a.batch, times, start.elapsed().as_secs_f64()))
            })
        })
        .collect();
    let mut items = 0;
    let mut times = Vec::new();
    let mut elapsed: f64 = 0.0;
    for h in handles {
        let (n, t, secs) = h.join().expect("bench lane panicked")?;
        items += n;
        times.extend(t);
        elapsed = elapsed.max(secs);
    }
    let result = RawResult {
        items_per_s: items as f64 / elapsed,
        p50_forward_ms: crate::median(times),
        rss_mib: crate::rss_mib(std::process::id()),
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}
