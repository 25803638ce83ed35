//! Helpers of the `hardening_state` tests: histogram samples from a registry, and a
//! service binary started with a file-size limit (a full disk without root).

use std::time::{Duration, Instant};

use marquee_core::metrics::Metrics;

use crate::workspace_binary;

/// One histogram's samples, summed over the label sets that match.
#[derive(Debug, Default, Clone)]
pub struct Histogram {
    pub count: u64,
    pub sum: f64,
    /// `(upper bound, cumulative count)`, in bucket order.
    pub buckets: Vec<(f64, u64)>,
}

impl Histogram {
    /// Observations at most `bound` (`bound` must be a bucket bound).
    pub fn at_most(&self, bound: f64) -> u64 {
        self.buckets
            .iter()
            .find(|(le, _)| *le == bound)
            .map(|(_, n)| *n)
            .unwrap_or_else(|| panic!("{bound} is not a bucket bound: {:?}", self.buckets))
    }
}

/// Sums the histogram `name` over label sets whose labels include every `(name, value)`.
pub fn histogram(metrics: &Metrics, name: &str, labels: &[(&str, &str)]) -> Histogram {
    let mut out = Histogram::default();
    for f in metrics
        .registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
    {
        for m in f.get_metric() {
            let matches = labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            });
            if !matches {
                continue;
            }
            let h = m.get_histogram();
            out.count += h.get_sample_count();
            out.sum += h.get_sample_sum();
            for (i, b) in h.get_bucket().iter().enumerate() {
                match out.buckets.get_mut(i) {
                    Some(slot) => slot.1 += b.cumulative_count(),
                    None => out.buckets.push((b.upper_bound(), b.cumulative_count())),
                }
            }
        }
    }
    out
}

/// Sets the soft `RLIMIT_FSIZE` of process `pid` (the hard limit stays unlimited, so it can be
/// raised again: "the operator freed some disk").
pub fn set_file_size_limit(pid: u32, bytes: Option<u64>) {
    let limit = libc::rlimit {
        rlim_cur: bytes.unwrap_or(libc::RLIM_INFINITY),
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit reads `limit` and writes nothing (null old-limit pointer).
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_FSIZE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// A command for service binary `bin` on ephemeral ports, with `SIGXFSZ` ignored so that a
/// write past `RLIMIT_FSIZE` fails with `EFBIG` (as on a full disk) instead of killing the
/// process, and with a soft file-size limit of `limit` bytes from the start when given (lower
/// or raise it later with [`set_file_size_limit`]).
pub fn command_with_file_limit(
    bin: &str,
    env: &[(&str, String)],
    limit: Option<u64>,
) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(workspace_binary(bin));
    cmd.env("MARQUEE__SERVER__GRPC_ADDR", "127.0.0.1:0")
        .env("MARQUEE__SERVER__ADMIN_ADDR", "127.0.0.1:0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let rlimit = libc::rlimit {
        rlim_cur: limit.unwrap_or(libc::RLIM_INFINITY),
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: `signal` and `setrlimit` are async-signal-safe and touch only the child; nothing
    // else runs between fork and exec. An ignored disposition and the limit survive exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR
                || libc::setrlimit(libc::RLIMIT_FSIZE, &rlimit) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Runs `cmd` to its exit (bounded by `limit`) and returns its status.
pub fn run_to_exit(mut cmd: std::process::Command, limit: Duration) -> std::process::ExitStatus {
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
