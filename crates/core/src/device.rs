//! Devices a model may run on, checked before a version loads (out-of-memory errors are
//! [`crate::error::is_out_of_memory`]).
//!
//! libtorch's CUDA backend is its own library, `libtorch_cuda.so`, whose static initialisers
//! register the CUDA kernels. Nothing in a Rust binary calls into it, so the linker drops it
//! (`--as-needed`) and `cuda` would fail deep inside the first forward. It is loaded here, from
//! the directory of the `libtorch_cpu.so` this process already uses, only when a model asks for
//! CUDA: CPU-only deployments never map it (it is over a gigabyte of code).

use std::sync::OnceLock;

use tch::Device;

/// Checks that `device` exists in this process: for `cuda:N`, that libtorch's CUDA backend
/// loads and that at least N + 1 devices are visible. The error says which, so a refused model
/// version tells the operator what to fix.
pub fn check_available(device: Device) -> Result<(), String> {
    let index = match device {
        Device::Cpu => return Ok(()),
        Device::Cuda(i) => i,
        other => {
            return Err(format!(
                "device {other:?} is not supported (use `cpu` or `cuda:N`)"
            ));
        }
    };
    load_cuda_backend().map_err(|e| {
        format!("`instance.device` is `cuda:{index}`, but this libtorch has no CUDA backend: {e}")
    })?;
    let visible = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
    if index >= visible {
        return Err(format!(
            "`instance.device` is `cuda:{index}`, but this process sees {visible} CUDA device(s) \
             (libtorch's CUDA backend is loaded: check the driver, the pod's GPU request and \
             CUDA_VISIBLE_DEVICES)"
        ));
    }
    Ok(())
}

/// Loads `libtorch_cuda.so` once per process; later calls return the first answer.
fn load_cuda_backend() -> Result<(), String> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let maps = std::fs::read_to_string("/proc/self/maps")
                .map_err(|e| format!("cannot read /proc/self/maps: {e}"))?;
            let dir = libtorch_dir(&maps)
                .ok_or("libtorch_cpu.so is not mapped in this process".to_string())?;
            let path = format!("{dir}/libtorch_cuda.so");
            if !std::path::Path::new(&path).exists() {
                return Err(format!("`{path}` does not exist (a CPU-only libtorch)"));
            }
            dlopen_global(&path)
        })
        .clone()
}

/// The directory holding the `libtorch_cpu.so` mapped in a `/proc/self/maps` text.
pub fn libtorch_dir(maps: &str) -> Option<&str> {
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .and_then(|p| p.rsplit_once('/'))
        .map(|(dir, _)| dir)
}

/// `dlopen(path, RTLD_NOW | RTLD_GLOBAL)`, never closed: its registrations must outlive every
/// model.
fn dlopen_global(path: &str) -> Result<(), String> {
    let c = std::ffi::CString::new(path).map_err(|e| e.to_string())?;
    // SAFETY: `c` is a valid NUL-terminated path. The library is libtorch's own CUDA backend,
    // built for the libtorch already loaded; its initialisers only register kernels. The handle
    // is deliberately leaked.
    #[allow(unsafe_code)]
    unsafe {
        let handle = libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL);
        if handle.is_null() {
            let err = libc::dlerror();
            return Err(if err.is_null() {
                format!("cannot load `{path}`")
            } else {
                format!(
                    "cannot load `{path}`: {}",
                    std::ffi::CStr::from_ptr(err).to_string_lossy()
                )
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_libtorch_directory_in_a_maps_text() {
        let maps = "7f0000000000-7f0000001000 r--p 00000000 fd:01 123 /usr/lib/libc.so.6\n\
                    7f0000002000-7f0000003000 r-xp 00001000 fd:01 456 /venv/torch/lib/libtorch_cpu.so\n";
        assert_eq!(libtorch_dir(maps), Some("/venv/torch/lib"));
        assert_eq!(libtorch_dir("7f00-7f01 rw-p 00000000 00:00 0\n"), None);
    }

    #[test]
    fn cpu_is_always_available_and_a_missing_gpu_is_named() {
        assert_eq!(check_available(Device::Cpu), Ok(()));
        // No machine has 100 GPUs: refused everywhere, with the count this process sees.
        let e = check_available(Device::Cuda(99)).unwrap_err();
        assert!(e.contains("cuda:99"), "{e}");
        assert!(e.contains("CUDA device(s)"), "{e}");
    }

    #[test]
    fn asking_for_cuda_registers_libtorchs_cuda_kernels() {
        // Without the load, this fails with "Could not run 'aten::empty.memory_format' with
        // arguments from the 'CUDA' backend": the binary is not linked to libtorch_cuda.so.
        let _ = check_available(Device::Cuda(0));
        // With the kernels registered, a CUDA tensor either exists (a GPU is here) or fails
        // for want of a driver or device, never because no CUDA kernel is known.
        let after = tch::Tensor::f_zeros([1], (tch::Kind::Float, Device::Cuda(0)));
        if let Err(e) = after {
            let e = e.to_string();
            assert!(!e.contains("from the 'CUDA' backend"), "{e}");
        }
    }
}
