//! `marquee-vision`: the model-service kit's `main` over the vision service.

/// jemalloc serves every allocation in the process, libtorch's too: with
/// `unprefixed_malloc_on_supported_platforms` it defines `malloc`, `free` and `posix_memalign`,
/// which the shared libtorch binds to instead of glibc's. libtorch allocates and frees its
/// activations on every forward; under glibc that was 11–14% of a lane's time
/// (`malloc_consolidate`, `_int_free`, memalign). Measured by hand, fashion_cnn from one
/// connection × 32 streams, 3 runs each: 12.6k calls/s with glibc, 14.9k with jemalloc.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    marquee_core::serve::main(
        marquee_vision::NAME,
        marquee_vision::ABOUT,
        |settings, shutdown| async move { Ok(marquee_vision::start(settings, shutdown).await?.into()) },
    );
}
