//! `marquee-vision`: parses the config, initialises telemetry, serves until SIGTERM, drains.

use std::path::PathBuf;

use clap::Parser;
use marquee_core::config::EXIT_CONFIG;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    version,
    about = "Marquee vision service: image classification and embeddings over gRPC"
)]
struct Args {
    /// TOML config file; `MARQUEE__SECTION__KEY` env vars override it.
    #[arg(long, env = "MARQUEE_CONFIG")]
    config: Option<PathBuf>,
}

fn main() {
    let args = Args::parse();
    let settings: marquee_vision::Settings =
        match marquee_core::config::load(args.config.as_deref()) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(EXIT_CONFIG);
            }
        };
    marquee_core::alloc::tune_allocator();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if settings.server.worker_threads > 0 {
        runtime.worker_threads(settings.server.worker_threads);
    }
    runtime.max_blocking_threads(settings.server.blocking_threads.max(1));
    let runtime = runtime
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let code = runtime.block_on(async {
        let _telemetry =
            match marquee_core::telemetry::init(&settings.telemetry, marquee_vision::NAME) {
                Ok(g) => g,
                Err(e) => {
                    eprintln!("telemetry: {e}");
                    return EXIT_CONFIG;
                }
            };
        let shutdown = CancellationToken::new();
        let running = match marquee_vision::start(settings, shutdown.clone()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("start failed: {e:#}");
                return 1;
            }
        };
        // One line on stdout that scripts and tests read to find the bound ports.
        println!(
            "{} listening grpc={} admin={}",
            marquee_vision::NAME,
            running.grpc_addr,
            running.admin_addr
        );
        marquee_core::server::termination_signal().await;
        shutdown.cancel();
        match running.task.await {
            Ok(Ok(())) => 0,
            Ok(Err(e)) => {
                tracing::error!("server failed: {e:#}");
                1
            }
            Err(e) => {
                tracing::error!("server task panicked: {e}");
                1
            }
        }
    });
    std::process::exit(code);
}
