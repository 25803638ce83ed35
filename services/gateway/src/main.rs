//! `marquee-gateway`: parses the config, initialises telemetry, serves until SIGTERM, drains.

use std::path::PathBuf;

use clap::Parser;
use marquee_core::config::EXIT_CONFIG;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    version,
    about = "Marquee gateway: auth, quotas, routing, batching and balancing in front of the model services"
)]
struct Args {
    /// TOML config file; `MARQUEE__SECTION__KEY` env vars override it.
    #[arg(long, env = "MARQUEE_CONFIG")]
    config: Option<PathBuf>,
    /// Print the SHA-256 to configure for an API key (read from stdin) and exit.
    #[arg(long)]
    hash_key: bool,
}

fn main() {
    let args = Args::parse();
    if args.hash_key {
        let mut key = String::new();
        if std::io::stdin().read_line(&mut key).is_err() {
            std::process::exit(EXIT_CONFIG);
        }
        println!(
            "{}",
            marquee_gateway::auth::hash_key(key.trim_end_matches(['\n', '\r']))
        );
        return;
    }
    let settings: marquee_gateway::config::Settings =
        match marquee_core::config::load(args.config.as_deref()) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(EXIT_CONFIG);
            }
        };
    // Key files are part of the configuration: unreadable or invalid ones are a config error.
    if let Err(errors) =
        marquee_gateway::auth::Authenticator::new(&settings.auth, &settings.tenants)
    {
        eprintln!("invalid configuration:\n  - {}", errors.join("\n  - "));
        std::process::exit(EXIT_CONFIG);
    }
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
            match marquee_core::telemetry::init(&settings.telemetry, marquee_gateway::NAME) {
                Ok(g) => g,
                Err(e) => {
                    eprintln!("telemetry: {e}");
                    return EXIT_CONFIG;
                }
            };
        let shutdown = CancellationToken::new();
        let running = match marquee_gateway::start(settings, shutdown.clone()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("start failed: {e:#}");
                return 1;
            }
        };
        println!(
            "{} listening grpc={} admin={}",
            marquee_gateway::NAME,
            running.grpc_addr,
            running.admin_addr
        );
        marquee_core::serve::termination_signal().await;
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
