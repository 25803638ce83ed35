//! Runs TorchScript models with tch on dedicated OS threads ("lanes"), never on the async
//! runtime. Each lane owns its own copy of the module and its own intra-op thread setting.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tch::{CModule, Device, IValue, Kind, Tensor};

use crate::batcher::{BatchQueue, Executor, run_lane};
use crate::liveness::Liveness;
use crate::model::TensorSpec;

/// A TorchScript module on one device.
pub struct TchExecutor {
    module: CModule,
    device: Device,
    input_dims: Vec<i64>,
}

impl TchExecutor {
    pub fn load(path: &Path, device: Device, input_dims: Vec<i64>) -> Result<Self, String> {
        let mut module = CModule::load_on_device(path, device)
            .map_err(|e| format!("cannot load `{}`: {e}", path.display()))?;
        module.set_eval();
        Ok(Self {
            module,
            device,
            input_dims,
        })
    }
}

impl TchExecutor {
    /// One forward pass; the module's output tensors, in output order, still on the device.
    fn forward(&mut self, input: &[f32], rows: usize) -> Result<Vec<Tensor>, String> {
        let mut shape = Vec::with_capacity(self.input_dims.len() + 1);
        shape.push(rows as i64);
        shape.extend_from_slice(&self.input_dims);
        let x = Tensor::from_slice(input)
            .view(shape.as_slice())
            .to_device(self.device);
        let out = tch::no_grad(|| self.module.forward_is(&[IValue::Tensor(x)]))
            .map_err(|e| e.to_string())?;
        match out {
            IValue::Tensor(t) => Ok(vec![t]),
            IValue::Tuple(items) | IValue::GenericList(items) => items
                .into_iter()
                .map(|v| match v {
                    IValue::Tensor(t) => Ok(t),
                    other => Err(format!("model returned a non-tensor output: {other:?}")),
                })
                .collect(),
            other => Err(format!("model returned {other:?}, expected tensors")),
        }
    }

    /// Runs `rows` items of `input` and checks every output against `model.toml`: the count,
    /// and each shape against `[rows, dims…]`. Never panics: a panic in libtorch (a
    /// sparse or otherwise unreadable output) becomes the error, so warm-up refuses the
    /// version instead of killing the loader.
    fn check(&mut self, input: &[f32], rows: usize, outputs: &[TensorSpec]) -> Result<(), String> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let tensors = self.forward(input, rows)?;
            if tensors.len() != outputs.len() {
                return Err(format!(
                    "the model returned {} outputs, model.toml declares {} ({})",
                    tensors.len(),
                    outputs.len(),
                    outputs
                        .iter()
                        .map(|o| format!("`{}`", o.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            for (t, spec) in tensors.iter().zip(outputs) {
                let mut want = vec![rows as i64];
                want.extend_from_slice(&spec.dims);
                let got = t.size();
                if got != want {
                    return Err(format!(
                        "output `{}` has shape {got:?} for a batch of {rows}, model.toml declares {want:?} (dims {:?})",
                        spec.name, spec.dims
                    ));
                }
                values(t)?;
            }
            Ok(())
        }))
        .unwrap_or_else(|p| {
            Err(format!(
                "the model panicked: {}",
                crate::liveness::panic_message(p.as_ref())
            ))
        })
    }
}

/// The elements of `t` as flat f32 values on the CPU.
fn values(t: &Tensor) -> Result<Vec<f32>, String> {
    let t = t
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous()
        .view(-1);
    Vec::<f32>::try_from(&t).map_err(|e| e.to_string())
}

impl Executor for TchExecutor {
    fn execute(&mut self, input: &[f32], rows: usize) -> Result<Vec<Vec<f32>>, String> {
        self.forward(input, rows)?.iter().map(values).collect()
    }
}

/// Lane settings for one model version.
#[derive(Debug, Clone)]
pub struct LaneConfig {
    pub model_path: std::path::PathBuf,
    pub device: Device,
    pub lanes: usize,
    pub threads: usize,
    /// Niceness each lane thread gives itself (`repository.lane_nice`); its intra-op threads,
    /// created from it, inherit it.
    pub nice: i32,
    pub input_dims: Vec<i64>,
    /// Declared outputs (`model.toml`), checked by warm-up before the version may serve.
    pub outputs: Vec<TensorSpec>,
    /// Profile batch sizes on the first lane during warm-up.
    pub profile: bool,
    /// The server's workers' liveness: a lane that panics while serving marks it dead.
    pub liveness: Liveness,
}

/// What warm-up learned.
#[derive(Debug, Clone)]
pub struct WarmupReport {
    /// Items per second at each profiled batch size.
    pub throughput: Vec<(usize, f64)>,
    /// Batch cap that gave the best throughput.
    pub best_batch: usize,
    pub took: Duration,
}

/// Starts the lanes of one model version: each loads the module, warms up, then serves `queue`
/// until it is closed. Returns once every lane is warm (so READY means warm).
pub fn start_lanes(cfg: &LaneConfig, queue: &Arc<BatchQueue>) -> Result<WarmupReport, String> {
    let started = Instant::now();
    let (ready_tx, ready_rx) = mpsc::channel();
    // Profiling waits until every lane is warm, so the other lanes' warm-up does not skew it.
    let warm = Arc::new(std::sync::Barrier::new(cfg.lanes));
    let profile = cfg
        .profile
        .then(|| Arc::new(Profile::new(cfg.lanes, queue.config().max_batch_size)));
    for lane in 0..cfg.lanes {
        let cfg = cfg.clone();
        let queue = queue.clone();
        let ready_tx = ready_tx.clone();
        let warm = warm.clone();
        let profile = profile.clone();
        let name = format!("lane-{}-{lane}", queue.config().model);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                // Per-thread: each lane gets its own intra-op pool size.
                tch::set_num_threads(cfg.threads as i32);
                lower_priority(cfg.nice);
                let mut exec =
                    match TchExecutor::load(&cfg.model_path, cfg.device, cfg.input_dims.clone()) {
                        Ok(e) => e,
                        Err(e) => {
                            // Still meet the others at every barrier so none waits forever.
                            warm.wait();
                            if let Some(p) = &profile {
                                p.abstain();
                            }
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                let report = warm_up(
                    &mut exec,
                    &queue,
                    &cfg.outputs,
                    &warm,
                    profile.as_deref(),
                    lane == 0,
                );
                let failed = report.is_err();
                let _ = ready_tx.send(report);
                drop(ready_tx);
                if failed {
                    return;
                }
                let model = queue.config().model.clone();
                if cfg
                    .liveness
                    .supervise(&model, || run_lane(&queue, &mut exec))
                    .is_none()
                {
                    // Fail fast rather than let calls wait for a lane that is gone; the
                    // server now reports NOT_SERVING and waits for its restart.
                    queue.fail(format!("a lane of model `{model}` died"));
                }
            })
            .map_err(|e| format!("cannot spawn a lane thread: {e}"))?;
    }
    drop(ready_tx);
    let mut best = None;
    for _ in 0..cfg.lanes {
        match ready_rx.recv() {
            Ok(Ok(Some(report))) => best = Some(report),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                queue.close();
                return Err(e);
            }
            Err(_) => {
                queue.close();
                return Err("a lane thread exited during warm-up".into());
            }
        }
    }
    let mut report = best.unwrap_or(WarmupReport {
        throughput: Vec::new(),
        best_batch: queue.config().max_batch_size,
        took: Duration::ZERO,
    });
    report.took = started.elapsed();
    queue.set_max_batch(report.best_batch);
    Ok(report)
}

/// Raises this thread's niceness to `nice` (Linux: niceness is per thread). A failure only
/// costs throughput, so it is logged, not fatal.
fn lower_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    // SAFETY: gettid has no preconditions; setpriority on this thread's own id only changes
    // its scheduling weight (raising niceness needs no privilege).
    #[allow(unsafe_code)]
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
    };
    if rc != 0 {
        tracing::warn!(nice, error = %std::io::Error::last_os_error(), "cannot lower a lane's priority");
    }
}

/// What the lanes measure together while profiling: items and time at each batch size.
struct Profile {
    sizes: Vec<usize>,
    barrier: std::sync::Barrier,
    items: Vec<AtomicU64>,
    nanos: Vec<AtomicU64>,
    failed: AtomicBool,
}

impl Profile {
    fn new(lanes: usize, max_batch: usize) -> Self {
        let mut sizes: Vec<usize> = std::iter::successors(Some(1usize), |n| Some(n * 2))
            .take_while(|n| *n < max_batch)
            .collect();
        sizes.push(max_batch);
        Self {
            barrier: std::sync::Barrier::new(lanes),
            items: sizes.iter().map(|_| AtomicU64::new(0)).collect(),
            nanos: sizes.iter().map(|_| AtomicU64::new(0)).collect(),
            failed: AtomicBool::new(false),
            sizes,
        }
    }

    /// Marks profiling failed and meets the other lanes at every barrier, so none waits forever.
    fn abstain(&self) {
        self.failed.store(true, Ordering::Relaxed);
        for _ in 0..self.sizes.len() * 2 {
            self.barrier.wait();
        }
    }
}

/// Runs the model until its timings settle; with a `profile`, every lane then runs batch sizes
/// 1, 2, 4, … up to the configured maximum at the same time (as they will when serving), and
/// `report` (lane 0) picks the size with the best aggregate throughput.
fn warm_up(
    exec: &mut TchExecutor,
    queue: &BatchQueue,
    outputs: &[TensorSpec],
    warm: &std::sync::Barrier,
    profile: Option<&Profile>,
    report: bool,
) -> Result<Option<WarmupReport>, String> {
    let cfg = queue.config();
    let item = vec![0f32; cfg.item_len];
    // The first calls pay for graph optimisation and allocation; never let a client pay them.
    // Each also checks the outputs against `model.toml`: a version whose outputs do not match
    // would fail every request, so it must never become the serving one.
    // A batch of two as well: an output that ignores the batch dimension passes at one item.
    let warmed = (0..3)
        .try_for_each(|_| exec.check(&item, 1, outputs))
        .and_then(|()| match cfg.max_batch_size {
            1 => Ok(()),
            _ => exec.check(&vec![0f32; cfg.item_len * 2], 2, outputs),
        });
    // Every lane reaches the barrier, failed or not, so none waits forever.
    warm.wait();
    let Some(p) = profile else {
        return warmed.map(|()| None);
    };
    if let Err(e) = warmed {
        p.abstain();
        return Err(e);
    }
    let mut error = None;
    for (i, &n) in p.sizes.iter().enumerate() {
        let input = vec![0f32; cfg.item_len * n];
        p.barrier.wait();
        if !p.failed.load(Ordering::Relaxed) {
            // Enough repetitions for a stable figure without making warm-up slow for big models.
            let budget = Duration::from_millis(150);
            let t0 = Instant::now();
            let mut runs = 0;
            while runs < 3 || (t0.elapsed() < budget && runs < 50) {
                if let Err(e) = exec.check(&input, n, outputs) {
                    p.failed.store(true, Ordering::Relaxed);
                    error = Some(e);
                    break;
                }
                runs += 1;
            }
            p.items[i].fetch_add((n * runs) as u64, Ordering::Relaxed);
            p.nanos[i].fetch_max(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        p.barrier.wait();
    }
    if let Some(e) = error {
        return Err(e);
    }
    if !report || p.failed.load(Ordering::Relaxed) {
        return Ok(None);
    }
    let throughput: Vec<(usize, f64)> = p
        .sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let secs = p.nanos[i].load(Ordering::Relaxed) as f64 / 1e9;
            (
                n,
                p.items[i].load(Ordering::Relaxed) as f64 / secs.max(1e-9),
            )
        })
        .collect();
    // Smallest batch within 3% of the best: larger batches that do not raise throughput only add
    // latency.
    let top = throughput.iter().map(|(_, t)| *t).fold(0.0, f64::max);
    let best_batch = throughput
        .iter()
        .find(|(_, t)| *t >= top * 0.97)
        .map(|(n, _)| *n)
        .unwrap_or(1);
    tracing::info!(model = %cfg.model, ?throughput, best_batch, "profiled batch sizes");
    Ok(Some(WarmupReport {
        throughput,
        best_batch,
        took: Duration::ZERO,
    }))
}
