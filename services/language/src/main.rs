//! `marquee-language`: parses the config, initialises telemetry, serves until SIGTERM, drains.

use std::path::PathBuf;

use clap::Parser;
use marquee_core::config::EXIT_CONFIG;
use marquee_core::serve::{Started, run_binary};

#[derive(Parser)]
#[command(
    version,
    about = "Marquee language service: streamed text generation over gRPC"
)]
struct Args {
    /// TOML config file; `MARQUEE__SECTION__KEY` env vars override it.
    #[arg(long, env = "MARQUEE_CONFIG")]
    config: Option<PathBuf>,
}

fn main() {
    let args = Args::parse();
    let settings: marquee_language::Settings =
        match marquee_core::config::load(args.config.as_deref()) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(EXIT_CONFIG);
            }
        };
    marquee_core::alloc::tune_allocator();
    let (server, telemetry) = (settings.server.clone(), settings.telemetry.clone());
    let code = run_binary(
        marquee_language::NAME,
        &server,
        &telemetry,
        |shutdown| async move {
            let r = marquee_language::start(settings, shutdown).await?;
            Ok(Started {
                grpc_addr: r.grpc_addr,
                admin_addr: r.admin_addr,
                task: r.task,
            })
        },
    );
    std::process::exit(code);
}
