//! Allocator set-up for libtorch's large tensors.
//!
//! glibc serves big allocations with mmap and returns freed memory to the OS at once, so every
//! batch pays page faults for its activations again. Measured on 2 cores: batched
//! EfficientNet-Lite0 ran at 41 images/s with glibc's defaults and 84 with the mmap and trim
//! thresholds raised. Done from the process so it never depends on the environment.
//!
//! `marquee-vision` links jemalloc as the process's `malloc` instead (its `main.rs`: 12.6k →
//! 14.9k calls/s on fashion_cnn); there these settings reach a glibc allocator nothing uses,
//! harmlessly. The language and recommendation services keep glibc with these settings: only
//! vision was measured.

/// Keeps large freed blocks in the heap instead of unmapping them. Returns whether glibc
/// accepted both settings. Call once at start, before models load.
pub fn tune_allocator() -> bool {
    // SAFETY: mallopt only changes allocator parameters; it is called before threads that
    // allocate heavily (the model lanes) start.
    #[allow(unsafe_code)]
    unsafe {
        // glibc rejects mmap thresholds above HEAP_MAX/2 (32 MiB on 64-bit); fall back to the cap.
        let mmap = libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30) == 1
            || libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1;
        let trim = libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) == 1;
        // With trimming off, every thread arena keeps its high-water mark; two arenas bound
        // that (measured: EfficientNet server after encoded load, 456 → 383 MiB resident).
        let arenas = libc::mallopt(libc::M_ARENA_MAX, 2) == 1;
        mmap && trim && arenas
    }
}

/// Returns the heap's free memory to the OS. Warm-up profiling touches the largest batch's
/// activations once; with trimming disabled that peak would otherwise stay resident forever.
pub fn release_free_memory() {
    // SAFETY: malloc_trim only returns unused heap pages; safe at any time.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}
